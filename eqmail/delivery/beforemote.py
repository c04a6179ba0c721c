"""delivery.beforemote -- filters run on a message before remote delivery (qmail-bfrmt).

SUMMARY
    control/beforemote lists filters, one command line per line (``#``
    comments and empty lines ignored).  Before a remote delivery each runs
    as ``/bin/sh -c LINE``, in order, with the message on stdin; what it
    writes on stdout becomes the message for the next filter and for the
    delivery.  A filter that exits non-zero, runs longer than
    control/timeoutbeforemote seconds (default 120) or writes nothing is skipped -- the message goes
    on unchanged -- and one log line says so.  The queued message itself is
    never changed: filters work on copies in queue/tmp, removed after the
    attempt.  A typical filter is ``eqmail dkimsign``.

ENVIRONMENT
    SENDER (envelope sender), RECIPIENT (the first recipient of this
    delivery), RECIPIENTS (all of them, separated by spaces), HOST (their
    domain), EQMAIL_HOME, PATH=/usr/local/bin:/usr/bin:/bin.

STANDARDS
    eQmail's qmail-bfrmt and control/beforemote (behaviour reference 7.5),
    with its known faults left out: the original message is always still
    there for the fallback, and a filter's output never reaches the
    delivery report.

BLOCKING
    `run_filters()` blocks (it waits for the filters): the scheduler calls
    it in gevent's threadpool.  Filters are started with the stdlib
    subprocess module (see delivery.local on why not gevent.subprocess).
"""
from __future__ import annotations

import itertools
import os
import subprocess
from typing import Callable, List, Sequence, Tuple

from ..cpu import unpinned

_seq = itertools.count(1)


def run_filters(filters: Sequence[str], msgpath: str, tmpdir: str, home: str,
                sender: str, recipients: Sequence[str], domain: str,
                log: Callable[[str], None], timeout: float = 120) -> Tuple[str, List[str]]:
    """Apply `filters` to the message at `msgpath`.

    Returns (path of the message to send, [temporary files to remove]).
    Never raises for a failing filter.
    """
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SENDER": sender,
           "RECIPIENT": recipients[0] if recipients else "",
           "RECIPIENTS": " ".join(recipients), "HOST": domain, "EQMAIL_HOME": home}
    current = msgpath
    made: List[str] = []
    for command in filters:
        out = os.path.join(tmpdir, "bfrmt.%d.%d" % (os.getpid(), next(_seq)))
        problem = _run(command, current, out, home, env, timeout)
        if problem is None:
            made.append(out)
            current = out
        else:
            log("beforemote filter skipped, message sent unchanged by it: %s: %s"
                % (command, problem))
            try:
                os.unlink(out)
            except OSError:
                pass
    return current, made


def _run(command: str, src: str, dst: str, home: str, env: dict, timeout: float):
    """Run one filter; None when it worked, else the reason it did not."""
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            with unpinned():
                proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=fin, stdout=fout,
                                        stderr=subprocess.PIPE, cwd=home, env=env,
                                        start_new_session=True)
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, 9)
                except OSError:
                    pass
                proc.communicate()
                return "timed out after %d seconds" % timeout
    except OSError as e:
        return "unable to run: %s" % e.strerror
    if proc.returncode != 0:
        text = err[:300].decode("utf-8", "replace").strip()
        return "exit code %d%s" % (proc.returncode, (" (%s)" % text) if text else "")
    if os.path.getsize(dst) == 0:
        return "it wrote nothing"
    return None
