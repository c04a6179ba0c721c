"""smtp.session -- the SMTP server state machine (qmail-smtpd's role).

SUMMARY
    `Session(...).run()` serves one SMTP connection.  It is transport
    agnostic: it reads through a `LineReader` over any ``recv(n)`` function
    and writes through any ``send(bytes)`` function, so the daemon's gevent
    sockets and ``eqmail smtpd`` on stdin/stdout share this code.  Verbs are
    methods named ``smtp_<VERB>``; each returns a Reply (or None when it has
    answered itself).

STANDARDS
    RFC 5321 (SMTP), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 2920
    (PIPELINING), RFC 2034 (ENHANCEDSTATUSCODES); qmail-smtpd(8) and the
    behaviour reference section 2 for replies, relay rules, the Received
    line and the DATA rules.

SECURITY
    Everything read is hostile.  Command lines are bounded (`MAX_LINE`),
    DATA is read in bounded chunks and streamed to the queue, never held
    whole.  Only CRLF.CRLF ends DATA; a bare LF anywhere in DATA is refused
    with qmail's 451 and the connection is closed, which closes "SMTP
    smuggling" (``\\n.\\n``, ``\\r\\n.\\n``, ``\\n.\\r\\n``).  Every read and
    write has a timeout (timeoutsmtpd).

DIFFERENCES FROM QMAIL-SMTPD
    The Received line's ``by`` host is TCPLOCALHOST, else control/me (qmail
    falls back to TCPLOCALIP, then ``unknown``).  Replies to EHLO clients
    carry RFC 2034 enhanced status codes in front (see smtp/reply.py).
    Command lines are limited to MAX_LINE octets (qmail has no limit).

LIMITS
    MAX_LINE       1000 octets per command line, CRLF included
                   (RFC 5321 section 4.5.3.1.4/4.5.3.1.6)
    MAX_RCPT       1000 recipients per message (RFC 5321 4.5.3.1.8 asks >= 100)
    MAX_ERRORS     the 20th refused command is answered with 421 and the
                   connection closes
    MAX_HOPS       100 Received/Delivered-To lines (qmail-smtpd)
    DATA_CHUNK     8192 octets read at a time in DATA
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import gevent

from .. import address, log
from ..control import Config
from ..queue.store import QueueError, Store
from . import policy, reply
from .reply import Reply

MAX_LINE = 1000
MAX_RCPT = 1000
MAX_ERRORS = 20
MAX_HOPS = 100
DATA_CHUNK = 8192

#: Verbs that show the client is not an SMTP client at all (chasquid's idea).
_NOT_SMTP = frozenset(["GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"])

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
           "Nov", "Dec")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-")


def date822(when: Optional[float] = None) -> str:
    """eQmail's date: local time, numeric offset, e.g. ``21 Nov 2026 22:41:36 +0000``."""
    t = time.localtime(when)
    off = t.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    return "%d %s %d %02d:%02d:%02d %s%02d%02d" % (
        t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min,
        t.tm_sec, sign, off // 60, off % 60)


def safe(text: str) -> str:
    """qmail-smtpd's safe(): keep letters, digits and ``.@%+/=:-``; else ``?``."""
    return "".join(ch if ch in _SAFE else "?" for ch in text)


def received_line(remote_host: str, helo: Optional[str], remoteinfo: Optional[str],
                  remote_ip: str, local_host: str, proto: str,
                  when: Optional[float] = None) -> bytes:
    """qmail-smtpd's Received line (behaviour reference section 2.4)."""
    out = ["Received: from ", safe(remote_host)]
    if helo is not None and helo.lower() != remote_host.lower():
        out += [" (HELO ", safe(helo), ")"]
    out.append(" (")
    if remoteinfo:
        out += [safe(remoteinfo), "@"]
    out += [safe(remote_ip), ")\n  by ", safe(local_host), " with ", proto, "; ",
            date822(when), "\n"]
    return "".join(out).encode("ascii", "replace")


class Disconnect(Exception):
    """The client went away (EOF or a reset connection)."""


class LineReader:
    """Bounded buffered reading over ``recv(n) -> bytes`` (b"" at EOF)."""

    def __init__(self, recv: Callable[[int], bytes], bufsize: int = 16384):
        self._recv = recv
        self._bufsize = bufsize
        self._buf = bytearray()

    def has_line(self) -> bool:
        """Is a complete line already buffered (pipelined input)?"""
        return b"\n" in self._buf

    def discard(self) -> None:
        """Forget buffered input (used after STARTTLS, RFC 3207 section 4.2)."""
        self._buf.clear()

    def readline(self, limit: int) -> bytes:
        """Up to `limit` bytes, ending with LF when the line fits.

        A result that does not end in LF is either a piece of a longer line
        (its length is `limit`) or the last bytes before EOF.  Returns b""
        at EOF.  Raises Disconnect when the connection breaks.
        """
        buf = self._buf
        start = 0
        while True:
            i = buf.find(b"\n", start, limit)
            if i != -1:
                out = bytes(buf[:i + 1])
                del buf[:i + 1]
                return out
            if len(buf) >= limit:
                out = bytes(buf[:limit])
                del buf[:limit]
                return out
            start = len(buf)
            try:
                data = self._recv(self._bufsize)
            except (ConnectionError, OSError) as e:
                raise Disconnect(str(e))
            if not data:
                out = bytes(buf)
                buf.clear()
                return out
            buf += data


class Session:
    """One SMTP conversation.

    Arguments:
      config    the Config snapshot for this session
      store     the queue to commit accepted messages to
      recv      ``recv(n) -> bytes`` from the client (b"" at EOF)
      send      ``send(bytes)``: all bytes to the client
      env       qmail-smtpd's environment: TCPREMOTEIP, TCPREMOTEHOST,
                TCPREMOTEINFO, TCPLOCALIP, TCPLOCALHOST, TCPLOCALPORT,
                RELAYCLIENT, DATABYTES (strings)
      stopping  a callable; True when the daemon is shutting down
    """

    def __init__(self, config: Config, store: Store, recv, send,
                 env: Optional[Dict[str, str]] = None,
                 stopping: Optional[Callable[[], bool]] = None):
        env = env or {}
        self.config = config
        self.store = store
        self.reader = LineReader(recv)
        self._send = send
        self._out: list = []
        self.stopping = stopping or (lambda: False)
        self.remote_ip = env.get("TCPREMOTEIP") or "unknown"
        self.remote_host = env.get("TCPREMOTEHOST") or "unknown"
        self.remoteinfo = env.get("TCPREMOTEINFO") or None
        self.local_ip = env.get("TCPLOCALIP") or None
        self.local_host = env.get("TCPLOCALHOST") or config.me
        self.relayclient = env.get("RELAYCLIENT")
        self.databytes = config.databytes
        databytes = (env.get("DATABYTES") or "").strip()
        if databytes.isascii() and databytes.isdigit():
            self.databytes = int(databytes)
        self.timeout = config.timeoutsmtpd
        self.greeting = config.smtpgreeting
        self.helo_host: Optional[str] = None
        self.esmtp = False
        self.errors = 0
        self.messages = 0
        self._reset()

    # -- plumbing ---------------------------------------------------------------

    def _reset(self) -> None:
        self.mailfrom: Optional[str] = None
        self.bad_mail = False
        self.rcpts: list = []
        self.last_rcpt: Optional[str] = None

    def send(self, r: Reply) -> None:
        self._out.append(r.render(self.esmtp))

    def flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        with gevent.Timeout(self.timeout, Disconnect("write timeout")):
            try:
                self._send(data)
            except (ConnectionError, OSError) as e:
                raise Disconnect(str(e))

    def _read(self, limit: int) -> bytes:
        if not self.reader.has_line():
            self.flush()
        with gevent.Timeout(self.timeout, False):
            return self.reader.readline(limit)
        raise TimeoutError()

    def _log(self, event: str) -> None:
        log.smtpd(event, self.mailfrom, self.remote_ip, self.last_rcpt, self.helo_host)

    # -- the conversation -----------------------------------------------------------

    def run(self) -> None:
        """Greet, then serve commands until QUIT, EOF, a timeout or a fatal
        reply.  Never raises for client behaviour."""
        try:
            self.send(reply.greeting(self.greeting))
            while True:
                try:
                    line = self._read(MAX_LINE)
                except TimeoutError:
                    self._log("timeout")
                    self.send(reply.TIMEOUT)
                    break
                if not line:
                    break
                if not line.endswith(b"\n"):
                    if len(line) < MAX_LINE:
                        break  # EOF in the middle of a line
                    try:
                        self._skip_long_line()
                    except TimeoutError:
                        self._log("timeout")
                        self.send(reply.TIMEOUT)
                        break
                    r = self._error(reply.LINE_TOO_LONG)
                else:
                    r = self.dispatch(line)
                if r is not None:
                    self.send(r)
                    if r.close:
                        break
                if self.stopping() and self.mailfrom is None:
                    self.send(reply.SHUTDOWN)
                    break
            self.flush()
        except Disconnect:
            pass
        except Exception as e:  # a bug must not leak a traceback to the client
            log.alert("smtpd: internal error: %s: %s" % (type(e).__name__, e))
            try:
                self._out = []
                self.send(reply.INTERNAL)
                self.flush()
            except Exception:
                pass

    def _skip_long_line(self) -> None:
        """Read and drop the rest of an over-long line.  Raises TimeoutError."""
        while True:
            chunk = self._read(MAX_LINE)
            if not chunk or chunk.endswith(b"\n"):
                return

    def _error(self, r: Reply) -> Reply:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            return reply.TOO_MANY_ERRORS
        return r

    def dispatch(self, line: bytes) -> Optional[Reply]:
        """Run one command line (ending in LF; one CR before it is removed)."""
        text = line[:-1]
        if text.endswith(b"\r"):
            text = text[:-1]
        text = text.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.lstrip(" ")
        handler = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
        if handler is None:
            if verb in _NOT_SMTP and self.helo_host is None:
                return reply.UNRECOGNISED.closing()
            return self._error(reply.UNRECOGNISED)
        r = handler(arg)
        if r is not None and r.code >= 500:
            return self._error(r)
        return r

    # -- verbs ----------------------------------------------------------------------

    def smtp_HELO(self, arg: str) -> Reply:
        self.helo_host = arg
        self.esmtp = False
        self._reset()
        return reply.helo(self.greeting)

    def smtp_EHLO(self, arg: str) -> Reply:
        self.helo_host = arg
        self.esmtp = True
        self._reset()
        return reply.ehlo(self.greeting, self.extensions())

    def extensions(self):
        """The EHLO keywords (RFC 5321 section 4.1.1.1)."""
        return ["PIPELINING", "8BITMIME", "SIZE %d" % self.databytes,
                "ENHANCEDSTATUSCODES"]

    def smtp_NOOP(self, arg: str) -> Reply:
        return reply.NOOP

    def smtp_RSET(self, arg: str) -> Reply:
        self._reset()
        return reply.RSET

    def smtp_VRFY(self, arg: str) -> Reply:
        return reply.VRFY

    def smtp_HELP(self, arg: str) -> Reply:
        return reply.HELP

    def smtp_QUIT(self, arg: str) -> Reply:
        return reply.quit(self.greeting)

    def smtp_MAIL(self, arg: str) -> Reply:
        # qmail-smtpd: a second MAIL simply starts a new transaction.
        try:
            sender, rest = address.parse_path(arg)
        except address.AddressError:
            return reply.SYNTAX
        params = address.parse_params(rest)
        refusal = policy.check_size(self.databytes, params)
        if refusal is not None:
            return refusal
        self._reset()
        self.mailfrom = sender
        self.bad_mail = policy.mail_is_bad(self.config, sender)
        return reply.OK_MAIL

    def smtp_RCPT(self, arg: str) -> Reply:
        if self.mailfrom is None:
            return reply.MAIL_FIRST
        try:
            rcpt, _ = address.parse_path(arg)
        except address.AddressError:
            return reply.SYNTAX
        if not rcpt:  # qmail takes RCPT TO:<>; RFC 5321 has no empty forward-path
            return reply.SYNTAX
        self.last_rcpt = rcpt
        if len(self.rcpts) >= MAX_RCPT:
            return reply.TOO_MANY_RCPT
        refusal, rcpt = policy.check_rcpt(self.config, rcpt, self.bad_mail,
                                          self.relayclient, self.local_ip)
        if refusal is not None:
            return refusal
        self.rcpts.append(rcpt)
        return reply.OK_RCPT

    def smtp_DATA(self, arg: str) -> Optional[Reply]:
        if self.mailfrom is None:
            return reply.MAIL_FIRST
        if not self.rcpts:
            return reply.RCPT_FIRST
        try:
            draft = self.store.draft()
        except QueueError as e:
            log.alert("smtpd: unable to open a queue file: %s" % e.text)
            return reply.QQT_FAILURE
        try:
            return self._data(draft)
        finally:
            draft.abort()  # no-op after a commit
            self._reset()

    def _data(self, draft) -> Optional[Reply]:
        """Stream the message into `draft`; behaviour reference section 2.4."""
        self.send(reply.GO_AHEAD)
        proto = "SMTP"
        draft.write(received_line(self.remote_host, self.helo_host, self.remoteinfo,
                                  self.remote_ip, self.local_host, proto))
        limit = self.databytes
        size = 0
        too_big = False
        in_header = True
        hops = 0
        at_start = True   # the next chunk begins a line
        held_cr = False   # a CR ended the last piece; is LF next?
        write = draft.write
        while True:
            try:
                chunk = self._read(DATA_CHUNK)
            except TimeoutError:
                self._log("timeout")
                return reply.TIMEOUT
            if not chunk:
                raise Disconnect("EOF in DATA")
            if chunk.endswith(b"\n"):
                if chunk.endswith(b"\r\n"):
                    body = chunk[:-2]
                elif chunk == b"\n" and held_cr:
                    body = b""
                    held_cr = False  # it was the CR of this CRLF
                else:
                    self._log("bad newlines")
                    return reply.BARE_LF
                if held_cr:  # a bare CR is data: keep it
                    body = b"\r" + body
                    held_cr = False
                if at_start:
                    if body == b".":
                        break
                    if body.startswith(b"."):
                        body = body[1:]
                    if in_header:
                        if not body:
                            in_header = False
                        elif body[:8].lower() == b"received" or body[:9].lower() == b"delivered":
                            hops += 1
                out = body + b"\n"
                at_start = True
            else:
                # a piece of a long line (or EOF next time)
                if held_cr:
                    chunk = b"\r" + chunk
                    held_cr = False
                if at_start:
                    if chunk.startswith(b"."):
                        chunk = chunk[1:]
                    if in_header and (chunk[:8].lower() == b"received"
                                      or chunk[:9].lower() == b"delivered"):
                        hops += 1
                if chunk.endswith(b"\r"):
                    chunk = chunk[:-1]
                    held_cr = True
                out = chunk
                at_start = False
            size += len(out)
            if limit and size > limit:
                too_big = True
            if not too_big:
                write(out)
        if too_big:
            self._log("message too big")
            return reply.TOO_BIG
        if hops >= MAX_HOPS:
            self._log("message looping")
            return reply.LOOPING
        try:
            item = draft.commit(self.mailfrom, self.rcpts)
        except QueueError as e:
            self._log("message delayed (%s)" % e.text)
            return reply.queue_failure(e.text)
        self.messages += 1
        self._log("message accepted")
        return reply.accepted(int(time.time()), item.id)
