"""queue.pickup -- local injection without a world-writable queue.

SUMMARY
    Python programs cannot be setuid, so local users reach the queue
    through eqmaild: the daemon listens on the UNIX socket ``HOME/run/pickup``
    (mode 0666 in a 0755 directory), reads a message and its envelope,
    commits them with a qmail-queue style ``Received:`` line naming the
    sender's uid (taken from the kernel, SO_PEERCRED), and answers with a
    qmail-queue exit code.  `submit()` is the client used by
    ``eqmail queue``, ``eqmail inject`` and ``eqmail sendmail``; a caller
    who can write the queue itself (the daemon's own user, or root) commits
    directly, so injection works while eqmaild is stopped too.

PROTOCOL
    client:  the message as netstrings of at most 65536 bytes each
             (``5:hello,``), ended by the empty netstring ``0:,``; then
             one netstring holding qmail-queue's envelope
             (``F<sender>\\0T<rcpt>\\0...\\0``, at most 1 MiB)
    server:  one line ``<code> <text>\\n``: code 0 and the queue ID on
             success, else a qmail-queue exit code (11 address too long,
             91 bad envelope, 53 disk full, 54 read error, ...)

    A request instead of a message starts with ``!`` (a netstring never
    does): ``!flush\\n`` asks eqmaild to try every queued message now (as
    SIGALRM does; ``sendmail -q``, ``eqmail flush``), answered ``0 flush``.
    Any local user may ask, as with Postfix's ``postqueue -f``; eqmaild
    honours at most one flush every FLUSH_INTERVAL seconds and answers the
    others ``0 flush already started``.  ``!status\\n`` is answered
    ``0 <JSON>`` (eqmail status), for any user; ``!errors\\n`` with the
    JSON of the last temporary failures (eqmail queue list), for root
    and eqmaild's user.  ``!queue OP ID...\\n`` (OP
    delete, hold, release or retry; ``eqmail queue``) is for root and
    eqmaild's own user only (SO_PEERCRED), answered ``0 <what was done>``
    or ``77 permission denied``.

STANDARDS
    qmail-queue(8) for the envelope, the exit codes and the Received line;
    D. J. Bernstein's netstrings.

SECURITY
    Any local user may inject, as with sendmail.  Input is bounded (chunk
    and envelope sizes, address length, a timeout on every read) and the
    Received line records the real uid and pid of the peer.
"""
from __future__ import annotations

import os
import re
import socket
import struct
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

from .store import QueueError, Store

MAX_CHUNK = 65536
MAX_ENVELOPE = 1 << 20
#: qmail-queue refuses envelope addresses longer than this (exit 11).
MAX_ADDRESS = 1002
READ_TIMEOUT = 1200
#: Bytes of one ``!`` request line at most.
MAX_REQUEST = 1 << 16
#: A queue ID (``birth.pid.seq``), the only thing a queue request may name.
_QUEUE_ID = re.compile(r"^[0-9]{1,20}\.[0-9]{1,10}\.[0-9]{1,20}$")
#: Seconds between two flushes that a pickup request may start.
FLUSH_INTERVAL = 5.0

#: qmail-queue's exit codes and texts (behaviour reference section 5.1).
TEXTS = {
    11: "envelope address too long for qq (#5.1.3)",
    31: "mail server permanently rejected message (#5.3.0)",
    51: "qq out of memory (#4.3.0)",
    52: "qq timeout (#4.3.0)",
    53: "qq write error or disk full (#4.3.0)",
    54: "qq read error (#4.3.0)",
    55: "qq unable to read configuration (#4.3.0)",
    61: "qq trouble in home directory (#4.3.0)",
    62: "qq trouble creating files in queue (#4.3.0)",
    74: "communication with mail server failed (#4.4.2)",
    81: "qq internal bug (#4.3.0)",
    91: "qq internal bug (#4.3.0)",
}


def socket_path(home: str) -> str:
    return os.path.join(home, "run", "pickup")


class SubmitError(Exception):
    """Injection failed: `code` is a qmail-queue exit code (11-40 permanent)."""

    def __init__(self, code: int, text: Optional[str] = None):
        self.code = code
        self.text = text or TEXTS.get(code, "qq temporary problem (#4.3.0)")
        super().__init__(self.text)

    @property
    def permanent(self) -> bool:
        return 11 <= self.code <= 40


def encode_envelope(sender: str, recipients: Sequence[str],
                    params: Optional[Dict[str, str]] = None) -> bytes:
    """qmail-queue's envelope; the pickup socket's also carries the
    message's ESMTP options (Item.params) as ``Xkey=value`` fields after
    the recipients."""
    out = [b"F" + sender.encode("utf-8", "surrogateescape") + b"\0"]
    out += [b"T" + r.encode("utf-8", "surrogateescape") + b"\0" for r in recipients]
    out += [b"X" + ("%s=%s" % kv).encode("utf-8", "surrogateescape") + b"\0"
            for kv in sorted((params or {}).items())]
    return b"".join(out) + b"\0"


def parse_envelope(data: bytes) -> Tuple[str, List[str]]:
    """qmail-queue's envelope -> (sender, recipients).  Raises SubmitError."""
    sender, recipients, params = parse_envelope_params(data)
    if params:
        raise SubmitError(91)
    return sender, recipients


def parse_envelope_params(data: bytes) -> Tuple[str, List[str], Optional[Dict[str, str]]]:
    """The pickup socket's envelope -> (sender, recipients, the message's
    options or None).  Raises SubmitError."""
    if not data.startswith(b"F") or not data.endswith(b"\0\0"):
        raise SubmitError(91)
    fields = data[:-2].split(b"\0")
    sender = fields[0][1:]
    recipients = []
    params: Optional[Dict[str, str]] = None
    for f in fields[1:]:
        if f.startswith(b"X") and recipients:
            key, _, value = f[1:].decode("utf-8", "surrogateescape").partition("=")
            if not key or len(params or {}) >= 1000:
                raise SubmitError(91)
            params = params or {}
            params[key] = value
            continue
        if not f.startswith(b"T") or params is not None:
            raise SubmitError(91)
        recipients.append(f[1:])
    if not recipients:
        raise SubmitError(91, "no recipients (#5.1.3)")
    for a in [sender] + recipients:
        if len(a) > MAX_ADDRESS:
            raise SubmitError(11)
        if any(b < 32 for b in a):
            raise SubmitError(91, "control characters in an envelope address (#5.1.3)")
    dec = lambda b: b.decode("utf-8", "surrogateescape")  # noqa: E731
    return dec(sender), [dec(r) for r in recipients], params


def received_line(pid: int, uid: int, when: Optional[float] = None) -> bytes:
    """qmail-queue's ``Received: (qmail PID invoked by uid UID); DATE``."""
    from ..smtp.session import date822

    return ("Received: (eqmail %d invoked by uid %d); %s\n"
            % (pid, uid, date822(when))).encode("ascii")


# -- the client -----------------------------------------------------------------------

def _can_write_queue(home: str) -> bool:
    q = os.path.join(home, "queue")
    return all(os.access(os.path.join(q, d), os.W_OK | os.X_OK)
               for d in ("mess", "tmp"))


def submit(home: str, sender: str, recipients: Sequence[str], header: bytes,
           body: BinaryIO) -> str:
    """Queue a message made of `header` and the rest of `body`.

    Returns the queue ID.  Raises SubmitError with a qmail-queue code.
    """
    for a in [sender] + list(recipients):
        if len(a.encode("utf-8", "surrogateescape")) > MAX_ADDRESS:
            raise SubmitError(11)
        if any(ch < " " for ch in a):
            raise SubmitError(91, "control characters in an envelope address (#5.1.3)")
    if not recipients:
        raise SubmitError(91, "no recipients (#5.1.3)")
    if os.geteuid() == 0:
        try:
            st = os.stat(os.path.join(home, "queue"))
        except OSError:
            raise SubmitError(61)
        if st.st_uid != 0:
            # the queue is the daemon user's: files root made would be
            # unreadable to eqmaild, so commit as that user
            return _commit_as(st.st_uid, st.st_gid, home, sender, recipients, header, body)
    if _can_write_queue(home):
        return _commit_direct(home, sender, recipients, header, body)
    return _via_socket(home, sender, recipients, header, body)


def _commit_as(uid: int, gid: int, home, sender, recipients, header, body) -> str:
    """_commit_direct in a child running as `uid`:`gid` (the queue's
    owner), as qmail-queue runs setuid qmailq; the Received line keeps the
    caller's uid.  Returns the queue ID.  Raises SubmitError."""
    caller = os.getuid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code, text = 0, ""
        try:
            os.close(r)
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            text = _commit_direct(home, sender, recipients, header, body, caller)
        except SubmitError as e:
            code, text = e.code, e.text
        except BaseException:
            code, text = 81, ""
        try:
            os.write(w, ("%d %s" % (code, text)).encode("utf-8", "replace"))
        finally:
            os._exit(0)
    os.close(w)
    answer = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        answer += chunk
    os.close(r)
    os.waitpid(pid, 0)
    code, _, text = answer.decode("utf-8", "replace").partition(" ")
    if not code.isdigit():
        raise SubmitError(81)
    if int(code) != 0:
        raise SubmitError(int(code), text or None)
    return text


def _chunks(body: BinaryIO):
    """The rest of `body` in pieces of at most MAX_CHUNK bytes.  Raises
    SubmitError(54) for a read error (qmail-queue's "qq read error")."""
    while True:
        try:
            chunk = body.read(MAX_CHUNK)
        except OSError:
            raise SubmitError(54)
        if not chunk:
            return
        yield chunk


def _commit_direct(home, sender, recipients, header, body, caller: Optional[int] = None
                   ) -> str:
    try:
        store = Store.open(home, create=False)
        draft = store.draft()
    except (OSError, QueueError):
        raise SubmitError(61)
    try:
        draft.write(received_line(os.getpid(), os.getuid() if caller is None else caller))
        draft.write(header)
        for chunk in _chunks(body):
            draft.write(chunk)
        item = draft.commit(sender, list(recipients))
    except QueueError as e:
        raise SubmitError(53 if "disk full" in e.text else 62, e.text)
    finally:
        draft.abort()
    return item.id


def request_flush(home: str) -> str:
    """Ask the eqmaild of `home` to try every queued message now (the
    ``!flush`` request).  Returns its answer text.  Raises SubmitError(74)
    when eqmaild cannot be reached (not running)."""
    return request(home, "flush", timeout=30)


def _exchange(home: str, send, timeout: float, limit: int, suffix: str = ""):
    """Connect to eqmaild's pickup socket, `send(sock)`, read its one answer
    line: (code, text).  Raises SubmitError(74) when eqmaild cannot be
    reached or the conversation breaks."""
    path = socket_path(home)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise SubmitError(74, "unable to reach eqmaild at %s: %s; is it running?%s"
                              % (path, e.strerror, suffix))
        try:
            send(s)
            answer = b""
            while not answer.endswith(b"\n") and len(answer) < limit:
                got = s.recv(65536)
                if not got:
                    break
                answer += got
        except (OSError, socket.timeout):
            raise SubmitError(74)
    finally:
        s.close()
    code, _, text = answer.decode("utf-8", "replace").strip().partition(" ")
    if not code.isdigit():
        raise SubmitError(74)
    return int(code), text


def _via_socket(home, sender, recipients, header, body) -> str:
    def send(s):
        if header:
            s.sendall(b"%d:%s," % (len(header), header))
        for chunk in _chunks(body):
            s.sendall(b"%d:%s," % (len(chunk), chunk))
        env = encode_envelope(sender, recipients)
        s.sendall(b"0:," + b"%d:%s," % (len(env), env))

    code, text = _exchange(home, send, READ_TIMEOUT, 4096, " (#4.4.2)")
    if code != 0:
        raise SubmitError(code, text or None)
    return text


# -- the server (in eqmaild) ----------------------------------------------------------------

def listen(home: str) -> socket.socket:
    """Bind the pickup socket (replacing a stale one).  Raises OSError."""
    rundir = os.path.join(home, "run")
    os.makedirs(rundir, mode=0o755, exist_ok=True)
    os.chmod(rundir, 0o755)
    path = socket_path(home)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o666)
    s.listen(64)
    return s


class _Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        import gevent

        with gevent.Timeout(READ_TIMEOUT, SubmitError(52)):
            data = self.sock.recv(65536)
        if not data:
            raise SubmitError(54)
        self.buf += data

    def netstring(self, limit: int) -> bytes:
        while b":" not in self.buf:
            if len(self.buf) > 10:
                raise SubmitError(91)
            self._fill()
        i = self.buf.index(b":")
        length = bytes(self.buf[:i])
        if not length.isdigit() or int(length) > limit:
            raise SubmitError(91)
        n = int(length)
        while len(self.buf) < i + 1 + n + 1:
            self._fill()
        if self.buf[i + 1 + n] != ord(","):
            raise SubmitError(91)
        out = bytes(self.buf[i + 1:i + 1 + n])
        del self.buf[:i + 1 + n + 1]
        return out


class Flusher:
    """The daemon's side of ``!flush``: calls `retry_now()` (the
    scheduler's SIGALRM handler) at most once every FLUSH_INTERVAL s."""

    def __init__(self, retry_now) -> None:
        self.retry_now = retry_now
        self.last = None

    def __call__(self) -> str:
        import time

        now = time.monotonic()
        if self.last is not None and now - self.last < FLUSH_INTERVAL:
            return "flush already started"
        self.last = now
        self.retry_now()
        return "flush"


def _request(reader: "_Reader", flush, admin, uid: int, status=None, errors=None) -> str:
    """A ``!`` request line: the answer line."""
    while b"\n" not in reader.buf:
        if len(reader.buf) > MAX_REQUEST:
            return "91 request too long\n"
        reader._fill()
    line = bytes(reader.buf[1:reader.buf.index(b"\n")]).decode("ascii", "replace").split()
    if line == ["flush"] and flush is not None:
        return "0 %s\n" % flush()
    if line == ["errors"] and errors is not None:
        if uid not in (0, os.geteuid()):
            return "77 permission denied: the queue is root's and eqmaild's user's\n"
        import json

        return "0 %s\n" % json.dumps(errors())
    if line == ["status"] and status is not None:
        import json

        return "0 %s\n" % json.dumps(status(), sort_keys=True)
    if len(line) >= 3 and line[0] == "queue" and admin is not None:
        if uid not in (0, os.geteuid()):
            return "77 permission denied: the queue is root's and eqmaild's user's\n"
        if line[1] not in ("delete", "hold", "release", "retry") or not all(
                _QUEUE_ID.match(i) for i in line[2:]):
            return "91 bad queue request\n"
        return "0 %s\n" % admin(line[1], line[2:], uid).replace("\n", " ")
    return "91 unknown request\n"


def request(home: str, line: str, timeout: float = 60) -> str:
    """Send one ``!`` request line to the eqmaild of `home`; its answer
    text.  Raises SubmitError (74 when eqmaild cannot be reached, else
    the answer's code)."""
    code, text = _exchange(home, lambda s: s.sendall(("!%s\n" % line).encode("ascii")),
                           timeout, MAX_REQUEST * 4)
    if code != 0:
        raise SubmitError(code, text or None)
    return text


def serve_client(sock, store: Store, flush=None, admin=None, status=None,
                 errors=None) -> None:
    """Serve one pickup connection (a greenlet of the daemon): a message,
    or a ``!`` request.  `flush`: a Flusher (None: flush refused);
    `admin(op, ids, uid) -> str`: the scheduler's queue operations;
    `status() -> dict`: eqmaild's figures for ``!status`` (any user);
    `errors() -> dict`: the last temporary failures for ``!errors``."""
    from .. import log

    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
    except (OSError, AttributeError):
        pid, uid = -1, -1
    draft = None
    try:
        try:
            reader = _Reader(sock)
            reader._fill()
            if reader.buf[:1] == b"!":
                answer = _request(reader, flush, admin, uid, status, errors)
                if answer.startswith("0 flush"):
                    log.line("pickup: flush asked by uid %d pid %d" % (uid, pid))
                try:
                    sock.sendall(answer.encode("utf-8"))
                except OSError:
                    pass
                return
            draft = store.draft()
            draft.write(received_line(pid, uid))
            while True:
                chunk = reader.netstring(MAX_CHUNK)
                if not chunk:
                    break
                draft.write(chunk)
            sender, recipients, params = parse_envelope_params(
                reader.netstring(MAX_ENVELOPE))
            item = draft.commit(sender, recipients, uid=uid, pid=pid, params=params)
            answer = "0 %s\n" % item.id
        except QueueError as e:
            answer = "%d %s\n" % (53 if "disk full" in e.text else 62, e.text)
        except SubmitError as e:
            answer = "%d %s\n" % (e.code, e.text)
        try:
            sock.sendall(answer.encode("utf-8"))
        except OSError:
            pass
    except Exception as e:  # never a traceback for a local client
        log.alert("pickup: internal error: %s: %s" % (type(e).__name__, e))
    finally:
        if draft is not None:
            draft.abort()
        sock.close()


# -- the queue of a process that cannot write it (eqmail smtpd under xinetd) ------------------

class _Committed:
    def __init__(self, msgid: str):
        self.id = msgid


class RemoteDraft:
    """Store.Draft's interface over the pickup socket: what `eqmail smtpd`
    uses when it runs as a user who cannot write the queue (xinetd's
    service user).  Bytes are streamed to eqmaild as they come."""

    def __init__(self, home: str):
        import gevent.socket

        self.sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(READ_TIMEOUT)
        try:
            self.sock.connect(socket_path(home))
        except OSError as e:
            self.sock.close()
            raise QueueError("qq trouble making network connection (#4.3.0)", e.errno)
        self._buf = bytearray()
        self.size = 0
        self.error: Optional[QueueError] = None
        self._closed = False

    def write(self, data: bytes) -> None:
        if self.error is not None or self._closed:
            return
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= MAX_CHUNK:
            self._flush()

    def _flush(self) -> None:
        while self._buf:
            chunk = bytes(self._buf[:MAX_CHUNK])
            del self._buf[:MAX_CHUNK]
            try:
                self.sock.sendall(b"%d:%s," % (len(chunk), chunk))
            except OSError as e:
                self.error = QueueError("qq write error or disk full (#4.3.0)", e.errno)
                return

    def commit(self, sender: str, recipients: Sequence[str],
               params: Optional[Dict[str, str]] = None) -> "_Committed":
        """Hand the message over, with its ESMTP options `params`; raises
        QueueError with eqmaild's text."""
        self._flush()
        if self.error is not None:
            self.abort()
            raise self.error
        env = encode_envelope(sender, recipients, params)
        try:
            self.sock.sendall(b"0:," + b"%d:%s," % (len(env), env))
            answer = b""
            while not answer.endswith(b"\n") and len(answer) < 4096:
                got = self.sock.recv(4096)
                if not got:
                    break
                answer += got
        except OSError:
            answer = b""
        finally:
            self.abort()
        code, _, text = answer.decode("utf-8", "replace").strip().partition(" ")
        if code != "0":
            raise QueueError(text or "qq temporary problem (#4.3.0)")
        return _Committed(text)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.close()
            except OSError:
                pass


class PickupQueue:
    """A stand-in for Store whose drafts go through eqmaild's pickup socket."""

    def __init__(self, home: str):
        self.home = home

    def draft(self) -> RemoteDraft:
        return RemoteDraft(self.home)


def queue_for(home: str):
    """The Store when this process can write the queue, else a PickupQueue."""
    if _can_write_queue(home):
        return Store.open(home, create=False)
    return PickupQueue(home)
