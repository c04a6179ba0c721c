"""eqlocal -- eqmail's local delivery with qmail-local's arguments.

    eqlocal.py -- user home local dash ext domain sender defaultdelivery

Runs eqmail.delivery.local.deliver() once on the message on stdin, the way
qmail-local runs one delivery, and prints the LocalResult as JSON (kind,
text, forwards, newsender).  The control files come from $EQMAIL_HOME;
defaultdelivery from the argument, as qmail-local takes it.  eqmail has no
such command of its own: its deliveries run inside eqmaild (delivery.lspawn).
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from eqmail import control  # noqa: E402
from eqmail.delivery.local import deliver  # noqa: E402
from eqmail.delivery.users import Target  # noqa: E402


def main(argv):
    if argv[:1] == ["--"]:
        argv = argv[1:]
    user, home, local, dash, ext, domain, sender, defaultdelivery = argv
    config = dataclasses.replace(control.load(os.environ["EQMAIL_HOME"]),
                                 defaultdelivery=defaultdelivery)
    target = Target(user, os.getuid(), os.getgid(), home, dash, ext)
    with os.fdopen(0, "rb", closefd=False) as msg:
        got = deliver(config, msg, sender, local, domain, target)
    print(json.dumps(got.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
