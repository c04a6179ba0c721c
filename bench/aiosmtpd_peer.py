"""The minimal peer of the benchmark: aiosmtpd writing each message to a Maildir.

    python bench/aiosmtpd_peer.py HOST PORT MAILDIR

One process, aiosmtpd's asyncio loop; each DATA is written the durable
Maildir way before the 250: tmp/NAME, fsync, rename to new/NAME, fsync of
new/.  The writes are done synchronously in the handler (the simplest
correct server: no thread pool, no batching).  Prints "ready" once listening;
stops on SIGTERM/SIGINT.  Used by bench/run.py as the "aiosmtpd" column and
as the far end of eqmail's remote delivery.
"""
import os
import signal
import socket
import sys
import time

from aiosmtpd.controller import Controller


class MaildirHandler:
    def __init__(self, maildir: str):
        self.maildir = maildir
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.n = 0
        self.newfd = os.open(os.path.join(maildir, "new"), os.O_RDONLY | os.O_DIRECTORY)

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        now = time.time()
        name = "%d.M%dP%dQ%d.%s" % (int(now), int((now % 1) * 1e6), self.pid, self.n, self.host)
        tmp = os.path.join(self.maildir, "tmp", name)
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        head = ("Return-Path: <%s>\nDelivered-To: %s\n"
                % (envelope.mail_from, ",".join(envelope.rcpt_tos))).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, head)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.maildir, "new", name))
        os.fsync(self.newfd)
        return "250 2.0.0 OK delivered"


def main() -> int:
    host, port, maildir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    handler = MaildirHandler(maildir)
    controller = Controller(handler, hostname=host, port=port,
                            server_hostname="aiosmtpd.bench.test",
                            data_size_limit=0, decode_data=False)
    controller.start()
    print("ready", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    while not stop:
        time.sleep(0.2)
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
