"""queue.qmailqueue -- hand a message to the program named by QMAILQUEUE.

SUMMARY
    netqmail's qmail-smtpd and qmail-inject run the program named by the
    environment variable QMAILQUEUE instead of qmail-queue.  That is how
    qmail sites put a virus or spam scanner in front of the queue
    (simscan, qmail-scanner, a clamdscan wrapper); the program scans and
    then runs the real qmail-queue (here `eqmail queue`) itself.
    `ProgramDraft` does the same for eqmail: it has the interface of a
    queue draft (`write`, `commit`, `abort`), so the SMTP session and
    inject use it in place of the queue when QMAILQUEUE is set and not
    empty.

STANDARDS
    qmail-queue(8): the message on descriptor 0, the envelope on
    descriptor 1 (``F<sender>\\0``, ``T<recipient>\\0`` per recipient, a
    final ``\\0``), the exit code says what happened.  netqmail 1.06's
    qmail.c (qmail_open, qmail_close): the program is started in the qmail
    home (a relative QMAILQUEUE is relative to it) when the data begins,
    its exit codes turn into the texts below, ``D`` texts being permanent
    (SMTP 554, qmail-inject exit 100) and ``Z`` texts temporary (451,
    exit 111).

        0    success (unless eqmail could not write all of the message:
             then "qq read error")
        11   envelope address too long for qq (#5.1.3)            permanent
        31   mail server permanently rejected message (#5.3.0)    permanent
        11-40 otherwise: qq permanent problem (#5.3.0)            permanent
        51 52 53 54 55 56 61 62-66 71 72 73 74 81 91 120: qmail's texts
        anything else, or killed: qq temporary problem / qq crashed (#4.3.0)

HANGING AND DYING PROGRAMS
    The program runs in its own process group, cooperatively watched: it
    may stop reading the message for at most `timeout` seconds, and must
    exit at most `timeout` seconds after the envelope; then it is killed
    and the answer is "qq timeout (#4.3.0)", a temporary failure, so the
    client keeps the message and tries again (qmail would wait forever).
    A program that dies before reading everything gives its exit code's
    answer; one that cannot be run gives "unable to exec qq (#4.3.0)".
    Nothing is ever reported as accepted unless the program exited 0
    after reading the whole message and envelope.

    Its stderr is read (at most MAX_SAID bytes) and handed back in
    `said` for the caller's log: under xinetd, eqmail's stderr may be the
    client's socket (behaviour reference section 10.13).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional, Sequence

from ..cpu import unpinned
from .store import QueueError

#: Bytes kept of the program's stderr.
MAX_SAID = 4096

#: qmail.c's qmail_close: exit code -> reply text (D permanent, Z temporary).
_TEXTS = {
    115: "Denvelope address too long for qq (#5.1.3)",
    11: "Denvelope address too long for qq (#5.1.3)",
    31: "Dmail server permanently rejected message (#5.3.0)",
    51: "Zqq out of memory (#4.3.0)",
    52: "Zqq timeout (#4.3.0)",
    53: "Zqq write error or disk full (#4.3.0)",
    54: "Zqq read error (#4.3.0)",
    55: "Zqq unable to read configuration (#4.3.0)",
    56: "Zqq trouble making network connection (#4.3.0)",
    61: "Zqq trouble in home directory (#4.3.0)",
    62: "Zqq trouble creating files in queue (#4.3.0)",
    63: "Zqq trouble creating files in queue (#4.3.0)",
    64: "Zqq trouble creating files in queue (#4.3.0)",
    65: "Zqq trouble creating files in queue (#4.3.0)",
    66: "Zqq trouble creating files in queue (#4.3.0)",
    71: "Zmail server temporarily rejected message (#4.3.0)",
    72: "Zconnection to mail server timed out (#4.4.1)",
    73: "Zconnection to mail server rejected (#4.4.1)",
    74: "Zcommunication with mail server failed (#4.4.2)",
    81: "Zqq internal bug (#4.3.0)",
    91: "Zqq internal bug (#4.3.0)",
    120: "Zunable to exec qq (#4.3.0)",
}


def exit_text(code: int) -> str:
    """qmail_close's text for a qmail-queue exit `code` (-N: killed by
    signal N): a ``D`` (permanent) or ``Z`` (temporary) letter, then the
    reply text.  Code 0 gives "" (success)."""
    if code == 0:
        return ""
    if code < 0:
        return "Zqq crashed (#4.3.0)"
    if code in _TEXTS:
        return _TEXTS[code]
    if 11 <= code <= 40:
        return "Dqq permanent problem (#5.3.0)"
    return "Zqq temporary problem (#4.3.0)"


class QueueRefused(QueueError):
    """The QMAILQUEUE program refused the message for good (a ``D``
    text: SMTP 554, qmail-inject exit 100)."""

    permanent = True


class Handed:
    """What `ProgramDraft.commit` returns: `id` is the program's process ID,
    as qmail-smtpd's ``250 ok <time> qp <pid>`` shows it."""

    def __init__(self, pid: int):
        self.id = str(pid)


def envelope(sender: str, recipients: Sequence[str]) -> bytes:
    """qmail-queue's envelope: ``F<sender>\\0``, ``T<rcpt>\\0`` each, ``\\0``."""
    enc = lambda a: a.encode("utf-8", "surrogateescape")  # noqa: E731
    return (b"F" + enc(sender) + b"\0" + b"".join(b"T" + enc(r) + b"\0" for r in recipients)
            + b"\0")


class ProgramDraft:
    """One message on its way to the QMAILQUEUE program.

    program: the QMAILQUEUE value (a path; relative to `home`).
    home: the qmail home; the program's working directory.
    env: the program's environment (the session's, with QMAILQUEUE in it).
    timeout: seconds the program may stall reading, and may take to exit
        after the envelope (see HANGING AND DYING PROGRAMS).

    The program starts here, as qmail_open starts qmail-queue before the
    354.  `write` never raises: a program that stopped reading makes the
    rest of the message go nowhere, and `commit` reports its exit code.
    Cooperative under gevent; works in a plain process too (inject).
    """

    def __init__(self, program: str, home: str, env: Dict[str, str], timeout: float):
        import gevent.os

        self.timeout = timeout
        self.pid = 0
        self.failure: Optional[int] = None  # an exit code that decides the answer
        self.write_error = False
        self.said = ""
        self._fds = []
        self._msg = self._env = self._err = -1
        self._drain = None
        import subprocess

        path = os.path.join(home, program)
        msg_r, self._msg = os.pipe()
        env_r, self._env = os.pipe()
        self._err, err_w = os.pipe()
        # execv(2) semantics, as qmail_open: no PATH search and no shell for a
        # file without #! (ENOEXEC is "unable to exec qq"); the fork and exec
        # of subprocess run in C, safe beside eqmaild's threads.  The exit
        # status is collected by pid (eqmail.children.wait), never by Popen.
        try:
            with unpinned():
                proc = subprocess.Popen([path], executable=path, stdin=msg_r, stdout=env_r,
                                        stderr=err_w, cwd=home, env=dict(env),
                                        close_fds=True, start_new_session=True)
            self.pid = proc.pid
            proc.returncode = 0  # so that Popen never waits for it itself
        except (OSError, ValueError, subprocess.SubprocessError):
            self.failure = 120  # qmail: execv failed, _exit(120)
        for fd in (msg_r, env_r, err_w):
            os.close(fd)
        self._fds = [self._msg, self._env, self._err]
        if self.failure is not None:
            self._close_all()
            return
        for fd in self._fds:
            gevent.os.make_nonblocking(fd)
        import gevent

        self._drain = gevent.spawn(self._read_said)

    def _read_said(self) -> None:
        import gevent.os

        buf = bytearray()
        while True:
            try:
                chunk = gevent.os.nb_read(self._err, 65536)
            except OSError:
                break
            if not chunk:
                break
            if len(buf) < MAX_SAID:
                buf += chunk[:MAX_SAID - len(buf)]
        self.said = buf.decode("utf-8", "replace").strip()

    def _send(self, fd: int, data: bytes) -> bool:
        """Write all of `data`; False when the program stopped reading
        (closed the pipe, or took more than `timeout` for a piece)."""
        import gevent
        import gevent.os

        view = memoryview(data)
        try:
            with gevent.Timeout(self.timeout):
                while view:
                    view = view[gevent.os.nb_write(fd, view):]
        except gevent.Timeout:
            self.failure = 52
            return False
        except OSError:
            return False
        return True

    def write(self, data: bytes) -> None:
        """Send a piece of the message (LF line ends, as queued)."""
        if self.failure is not None or self.write_error or not data:
            return
        if not self._send(self._msg, data):
            self.write_error = True

    def commit(self, sender: str, recipients: Sequence[str], params=None) -> Handed:
        """End the message, send the envelope, wait for the program.
        `params` (the message's ESMTP options) are dropped: qmail-queue's
        envelope has no place for them.

        Returns a Handed with the program's pid.  Raises QueueRefused for
        a permanent refusal, QueueError for anything temporary."""
        pid = self.pid
        if self.failure is None:
            self._close(self._msg)
            if not self.write_error and not self._send(self._env, envelope(sender, recipients)):
                self.write_error = True
        self._close(self._env)
        code = self._wait(self.timeout if self.failure is None else 0)
        if code is None:
            code = 52  # still running after the time allowed: killed
        if self.failure is not None:
            code = self.failure
        self._close_all()
        if code == 0 and not self.write_error:
            return Handed(pid)
        text = exit_text(code or 54)  # 0 without the whole message: qmail's "read error"
        if text.startswith("D"):
            raise QueueRefused(text[1:])
        raise QueueError(text[1:])

    def abort(self) -> None:
        """Give up (too big, looping, client gone): the program gets no
        envelope, so qmail-queue queues nothing; it is waited for (and
        killed when it lingers).  A no-op after `commit`."""
        if self.pid:
            self._close(self._msg)
            self._close(self._env)
            self._wait(5.0 if self.failure is None else 0)
        self._close_all()

    def _wait(self, limit: float) -> Optional[int]:
        """The program's exit code (-signal when killed by one), or None
        when it ran past `limit` seconds and was killed."""
        from ..children import wait

        if not self.pid:
            return self.failure
        status = wait(self.pid, time.time() + limit)
        if status is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
            wait(self.pid, time.time() + 5)
            self.pid = 0
            return None
        self.pid = 0
        if self._drain is not None:
            self._drain.join(timeout=1)
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_all(self) -> None:
        for fd in list(self._fds):
            self._close(fd)
        drain = getattr(self, "_drain", None)
        if drain is not None:
            drain.kill(block=False)
