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

import base64
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import gevent

from .. import address, log
from ..control import Config, parse_size
from ..queue.store import QueueError, Store
from . import policy, reply
from .content import Chunks, HeaderScan
from .reply import Reply

MAX_LINE = 1000
MAX_RCPT = 1000
MAX_ERRORS = 20
MAX_HOPS = 100
DATA_CHUNK = 8192
#: Bytes of BDAT data read at a time.
BDAT_PIECE = 65536
#: The largest chunk read through only to be thrown away (its transaction
#: failed, or there is none); a bigger one ends the connection.
BDAT_DISCARD = 1 << 20
#: Seconds a QMAILQUEUE program may stall reading the message, and may take
#: to exit after the envelope (at most; timeoutsmtpd when shorter): RFC
#: 5321 section 4.5.3.2.6 gives the client 10 minutes for the final reply.
QMAILQUEUE_TIMEOUT = 300
#: AUTH responses may be longer than commands (RFC 4954 section 4: 12288).
MAX_AUTH_LINE = 12288
#: Seconds before a failed AUTH is answered (qmail-smtpd-auth: 5), and the
#: failures after which the connection is closed.
AUTH_FAIL_DELAY = 5
MAX_AUTH_FAILURES = 3

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


class _Canceled(Exception):
    """The client answered ``*`` to an AUTH challenge."""


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

    def take_lines(self) -> bytes:
        """Every complete line buffered now, as one bytes (b"" when there is
        none); never waits for input."""
        buf = self._buf
        i = buf.rfind(b"\n")
        if i == -1:
            return b""
        out = bytes(buf[:i + 1])
        del buf[:i + 1]
        return out

    def unread(self, data: bytes) -> None:
        """Put `data` back in front of the buffered input."""
        self._buf[:0] = data

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


    def read(self, limit: int) -> bytes:
        """Up to `limit` bytes, lines or not: what is buffered, else what
        one receive brings.  Returns b"" at EOF.  Raises Disconnect when
        the connection breaks."""
        buf = self._buf
        if not buf:
            try:
                data = self._recv(max(self._bufsize, min(limit, 65536)))
            except (ConnectionError, OSError) as e:
                raise Disconnect(str(e))
            if len(data) <= limit:
                return data
            buf += data
        out = bytes(buf[:limit])
        del buf[:limit]
        return out


class _Chunked:
    """The message BDAT is building: its draft and its `Chunks`; or, with
    no draft, a message that has failed (later chunks are read and
    refused)."""

    __slots__ = ("draft", "chunks", "failed")

    def __init__(self, draft, chunks: Optional[Chunks]):
        self.draft = draft          # None: the message has failed
        self.chunks = chunks
        self.failed = draft is None


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
                 stopping: Optional[Callable[[], bool]] = None,
                 starttls: Optional[Callable[[], tuple]] = None,
                 tls_cipher: Optional[str] = None,
                 checkpassword: Optional[Sequence[str]] = None,
                 submission: bool = False, direct: bool = False,
                 stressed: Optional[Callable[[], bool]] = None):
        self.env: Dict[str, str] = dict(env or {})
        env = self.env
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
        self.databytes = config.databytes
        databytes = parse_size(env.get("DATABYTES") or "")
        if databytes is not None:  # else control/databytes (qmail: scan_ulong)
            self.databytes = databytes
        self.timeout = config.timeoutsmtpd
        #: load-adaptive limits (Postfix's stress mode): while `stressed()`
        #: (the sessions near concurrencyincoming), a read waits at most
        #: control/timeoutstress seconds
        self.stressed = stressed
        self.stress_timeout = getattr(config, "timeoutstress", 0)
        self._waiting = False
        self._reads = 0
        self._greenlet = None
        self.strict_pipelining = bool(self._setting("STRICTPIPELINING",
                                                    int(config.strictpipelining)))
        self.tarpit = self._setting("TARPITDELAY", config.tarpitdelay)
        self.greeting = config.smtpgreeting
        self.starttls = starttls          # None: STARTTLS not offered
        self.tls_cipher = tls_cipher      # set once TLS is on
        self.checkpassword = list(checkpassword) if checkpassword else None
        self.submission = submission
        self.direct = direct              # local mail may go to its mailboxes in DATA
        self.auth_user: Optional[str] = None
        self.auth_method: Optional[str] = None
        self.auth_failures = 0
        self._relay_from_auth = False
        self.helo_host: Optional[str] = None
        self._helo_spf: Optional[tuple] = None   # (HELO name, its spfcheck.Verdict or None)
        self.esmtp = False
        self.errors = 0
        self.messages = 0
        self.plugins = None               # spp.Plugins while qmail-spp is on
        self.rcpt_count_all = 0
        self.later: Dict[str, str] = {}   # LM/LR/LD texts from plugins
        self._timer = None
        self._chunked: Optional[_Chunked] = None   # BDAT's message
        self._extra_drafts: list = []
        self._reset()

    @property
    def relayclient(self) -> Optional[str]:
        """RELAYCLIENT as it stands now (per-client rules, AUTH, plugins)."""
        return self.env.get("RELAYCLIENT")

    @property
    def tls_required(self) -> bool:
        return self.env.get("TLSREQUIRED") == "1"

    # -- plumbing ---------------------------------------------------------------

    def _reset(self) -> None:
        """RSET and the end of DATA: a new transaction, and the plugins' H
        and L* texts are forgotten (qmail-spp's spp_rset).  HELO, EHLO,
        MAIL and STARTTLS start a new transaction only: what the
        [connection] and [helo] plugins said stays, as in eQmail, so that
        a client cannot shed a plugin's verdict by sending HELO again."""
        self._new_transaction()
        self.spp_headers: list = []
        self.later = {}

    def _new_transaction(self) -> None:
        self._drop_chunks()
        self.spf_header: Optional[str] = None
        self.mailfrom: Optional[str] = None
        self.smtputf8 = False    # MAIL FROM said SMTPUTF8 (RFC 6531)
        self.dsn: dict = {}      # MAIL's RET and ENVID (RFC 3461), as "ret", "envid"
        self.rcpt_dsn: list = []  # each recipient's NOTIFY and ORCPT, as "notify", "orcpt"
        self.bad_mail = False
        self.rcpts: list = []
        self.last_rcpt: Optional[str] = None
        self.rcpt_count_all = 0

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

    def _read_timeout(self) -> int:
        if self.stress_timeout and self.stressed is not None and self.stressed():
            return min(self.timeout, self.stress_timeout)
        return self.timeout

    def _read(self, limit: int, raw: bool = False) -> bytes:
        """The next line, or piece of one, of at most `limit` bytes (with
        `raw`: the next bytes, lines or not); flushes the replies first
        when it has to wait.  Raises TimeoutError, Disconnect."""
        if raw and self.reader._buf:
            return self.reader.read(limit)
        if raw or not self.reader.has_line():
            self.flush()
            # one timer per session, started and cancelled around each read
            # (a new one only when the timeout changes: stress mode)
            seconds = self._read_timeout()
            timer = self._timer
            if timer is None or timer.seconds != seconds:
                timer = self._timer = gevent.Timeout(seconds)
            timer.start()
            self._waiting = True
            self._reads += 1
            self._greenlet = gevent.getcurrent()
            try:
                return self.reader.read(limit) if raw else self.reader.readline(limit)
            except gevent.Timeout as t:
                if t is not self._timer:
                    raise
                raise TimeoutError()
            finally:
                self._waiting = False
                self._timer.cancel()
        return self.reader.readline(limit)  # a whole line is buffered: no wait

    def stalled_read(self) -> Optional[int]:
        """Stress mode has begun (eqmail.workers): the number of the read
        this session waits in, when it waits for its client longer than
        control/timeoutstress allows; else None."""
        if not self._waiting or not self.stress_timeout or self._timer is None \
                or self._timer.seconds <= self.stress_timeout:
            return None
        return self._reads

    def expire(self, reads: int) -> None:
        """The squeezed wait is over: if the session still waits in read
        number `reads`, end it as its own timer would (from another
        greenlet)."""
        if self._waiting and self._reads == reads and self._greenlet is not None:
            g = self._greenlet
            if hasattr(g, "kill"):  # a gevent Greenlet (the server's)
                g.kill(self._timer, block=False)
            else:
                gevent.kill(g, self._timer)

    def _log(self, event: str) -> None:
        log.smtpd(event, self.mailfrom, self.remote_ip, self.last_rcpt, self.helo_host)

    # -- the conversation -----------------------------------------------------------

    def run(self) -> None:
        """Greet, then serve commands until QUIT, EOF, a timeout or a fatal
        reply.  Never raises for client behaviour."""
        try:
            if not self._open():
                self.flush()
                return
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
                elif self.strict_pipelining and not self.esmtp and self.reader.has_line():
                    log.line("smtpd: %s pipelined without PIPELINING" % self.remote_ip)
                    r = reply.UNAUTH_PIPELINING
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
        finally:
            self._drop_chunks()  # a message BDAT left unfinished

    def _open(self) -> bool:
        """Load the plugins, run [connection], greet.  False: hang up."""
        try:
            from . import spp
            self.plugins = spp.Plugins.load(self.config.home, self.env)
            if self.plugins is not None and not any(self.plugins.sections.values()):
                self.plugins = None  # config-fast's empty sections: nothing to run
        except Exception as e:  # spp.SppConfigError, or worse: never a crash
            log.alert("smtpd: unable to read control/smtpplugins: %s" % e)
            self.send(reply.SPP_UNREADABLE)
            return False
        delay = self._setting("GREETDELAY", self.config.greetdelay)
        if delay > 0 and self._talks_within(delay):
            log.line("smtpd: early talker %s: sent before the greeting (greetdelay %d s)"
                     % (self.remote_ip, delay))
            self.send(reply.EARLY_TALKER)
            return False
        if self.config.rblwhen == "connect":
            refusal = self._rbl(at_mail=False)
            if refusal is not None:
                self.send(refusal)
                return False
        refusal = self._spp_refusal(self._spp("connection"))
        if refusal is None:
            self.send(reply.greeting(self.greeting))
            return True
        self.send(refusal)  # an E text replaces the greeting, the session goes on
        return not refusal.close

    def _rbl(self, at_mail: bool) -> Optional[Reply]:
        """rblsmtpd's check (eqmail.smtp.dnsbl): RBLSMTPD from the rules,
        else the look-ups (once a session); the refusal, or None.  A
        RELAYCLIENT or authenticated session is never refused."""
        if self.relayclient is not None or self.auth_user is not None:
            return None
        text = self.env.get("RBLSMTPD")
        if text is None:
            if not self.config.rbls:
                return None
            from . import dnsbl

            text = self.env["RBLSMTPD"] = dnsbl.verdict(self.config, self.remote_ip)
        if not text:
            return None
        permanent = text.startswith("-")
        shown = (text[1:] if permanent else text) or "your address is not welcome here"
        log.line("smtpd: %s refused by DNS blocklist: %s" % (self.remote_ip, log.clean(shown)))
        return reply.rbl(shown, permanent, at_mail)

    _auth_missing_told = False

    def _authcheck_on(self) -> bool:
        return bool(self._setting("AUTHCHECK", int(self.config.authcheck))) and \
            self.relayclient is None and self.auth_user is None and \
            not self.env.get("QMAILQUEUE")

    def _authenticate(self, draft):
        """DKIM, ARC, DMARC (eqmail.smtp.authcheck, in the threadpool) on the
        received message: a new draft that starts with the
        Authentication-Results field (the old one is aborted), a Reply
        when DMARC's reject is honoured (dmarcreject), or None (too big,
        libraries missing, or a failure: the message goes on unchanged)."""
        from ..threads import run_check as run
        from . import authcheck

        data = draft.contents(self.config.authmaxsize)
        if data is None:
            return None
        try:
            outcome = run(authcheck.evaluate, self.config, data, self.remote_ip,
                          self.mailfrom or "", self.helo_host, self.env.get("SPFRESULT"))
        except authcheck.Unavailable as e:
            if not Session._auth_missing_told:
                Session._auth_missing_told = True
                log.alert("smtpd: %s; mail is not checked" % e)
            return None
        except Exception as e:  # a library's trouble must not lose the message
            log.alert("smtpd: authentication checks failed: %s: %s" % (type(e).__name__, e))
            return None
        self.env["DMARCRESULT"] = outcome.dmarc
        if outcome.dmarc == "fail" and outcome.policy == "reject" and \
                self._setting("DMARCREJECT", int(self.config.dmarcreject)):
            log.line("smtpd: dmarc fail (p=reject) for %s from %s: refused"
                     % (log.clean(outcome.from_domain), self.remote_ip))
            return reply.dmarc_reject(outcome.from_domain)
        try:
            fresh = self._draft()
        except (QueueError, OSError):
            return None
        fresh.write(outcome.header.encode("utf-8", "replace") + b"\n")
        fresh.write(data)
        draft.abort()
        self._extra_drafts.append(fresh)
        return fresh

    _spf_missing_told = False

    def _spf(self, level: int, sender: str) -> Optional[Reply]:
        """SPF for HELO, once per HELO name, and for MAIL FROM
        (eqmail.smtp.spfcheck, in the threadpool): sets SPFHELORESULT,
        SPFRESULT and the Received-SPF field; the refusal `level` calls
        for, or None.  A HELO fail is refused from level 3 on; the null
        sender's result is the HELO one (RFC 7208 section 2.4)."""
        from ..threads import run_check as run
        from . import spfcheck

        try:
            if self._helo_spf is None or self._helo_spf[0] != self.helo_host:
                self._helo_spf = (self.helo_host, run(spfcheck.check_helo, self.config,
                                                      self.remote_ip, self.helo_host))
            helo = self._helo_spf[1]
            if helo is not None:
                self.env["SPFHELORESULT"] = helo.result
                if helo.result == "fail" and spfcheck.refuses(level, "fail"):
                    log.line("smtpd: spf fail for HELO %s from %s refused (spfbehavior %d)"
                             % (log.clean(self.helo_host), self.remote_ip, level))
                    return reply.spf(helo.result, helo.explanation)
            if sender == "" and helo is not None:
                v = helo
            else:
                v = run(spfcheck.check, self.config, self.remote_ip, sender, self.helo_host)
        except spfcheck.Unavailable as e:
            if not Session._spf_missing_told:
                Session._spf_missing_told = True
                log.alert("smtpd: %s; mail is not checked" % e)
            return None
        self.env["SPFRESULT"] = v.result
        self.spf_header = "Received-SPF: " + v.header
        if spfcheck.refuses(level, v.result):
            log.line("smtpd: spf %s: %s from %s refused (spfbehavior %d)"
                     % (v.result, log.clean(sender), self.remote_ip, level))
            return reply.spf(v.result, v.explanation)
        return None

    def _setting(self, name: str, default: int) -> int:
        """A number from the session's environment (smtprules), else `default`."""
        value = self.env.get(name)
        if value is None:
            return default
        value = value.strip()
        return int(value) if value.isdigit() else (1 if value and value != "0" else 0)

    def _talks_within(self, seconds: float) -> bool:
        """Whether the client sends anything (or hangs up) within `seconds`
        before it was greeted; what it sent stays unread."""
        try:
            with gevent.Timeout(seconds, False):
                data = self.reader._recv(self.reader._bufsize)
                if data:
                    self.reader.unread(data)
                return True
        except (ConnectionError, OSError):
            return True
        return False

    # -- qmail-spp ------------------------------------------------------------------

    def _spp(self, section: str):
        """Run the plugins of `section` (None when qmail-spp is off) and apply
        their environment changes, P lines, H lines and L texts."""
        if self.plugins is None:
            return None
        from . import spp

        out = spp.run_section(self.plugins, section, self.config.home, self._child_env(),
                              timeout=self.config.timeoutplugins)
        for text in out.logs:
            log.line("smtpd: spp %s: %s" % (section, log.clean(text)))
        for name, value in out.set_env.items():
            self.env[name] = value
        for name in out.unset_env:
            self.env.pop(name, None)
        for text in out.partial:
            self.send(reply.raw(text))
        self.spp_headers += out.headers
        self.later.update(out.later)
        if out.verdict == "accept":
            self.plugins = None  # A: accepted, and qmail-spp is off from now on
        return out

    @staticmethod
    def _spp_refusal(out) -> Optional[Reply]:
        if out is None:
            return None
        if out.verdict == "reject":
            return reply.raw(out.reply or "")
        if out.verdict == "close":
            return reply.raw(out.reply or "", close=True)
        if out.verdict == "drop":
            return Reply(0, None, (), close=True)
        return None

    def _child_env(self) -> Dict[str, str]:
        """The environment plugins and checkpassword programs see."""
        env = dict(self.env)
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env["EQMAIL_HOME"] = self.config.home
        env.setdefault("TCPREMOTEIP", self.remote_ip)
        env.setdefault("TCPLOCALHOST", self.local_host)
        return env

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
        if r is not None and r.code >= 400 and verb == "RCPT" and self.tarpit:
            gevent.sleep(min(self.tarpit, self.timeout))  # a tarpit for bad recipients
        if r is not None and r.code >= 500:
            return self._error(r)
        return r

    # -- verbs ----------------------------------------------------------------------

    def smtp_HELO(self, arg: str) -> Reply:
        return self._helo(arg, False) or reply.helo(self.greeting)

    def smtp_EHLO(self, arg: str) -> Reply:
        return self._helo(arg, True) or reply.ehlo(self.greeting, self.extensions())

    def _helo(self, arg: str, esmtp: bool) -> Optional[Reply]:
        self._new_transaction()
        self.env["SMTPHELOHOST"] = arg
        refusal = self._spp_refusal(self._spp("helo"))
        if refusal is not None:
            return refusal  # no 250, and the name is not taken
        self.helo_host = arg
        self.esmtp = esmtp
        return None

    def extensions(self):
        """The EHLO keywords (RFC 5321 section 4.1.1.1)."""
        ext = []
        if self.starttls is not None and self.tls_cipher is None:
            ext.append("STARTTLS")
        ext += ["PIPELINING", "8BITMIME", "SIZE %d" % self.databytes, "ENHANCEDSTATUSCODES",
                "CHUNKING", "SMTPUTF8", "DSN"]
        if self.checkpassword and self.auth_user is None:
            if self.tls_required and self.tls_cipher is None:
                ext.append("AUTH CRAM-MD5")
            else:
                ext.append("AUTH LOGIN PLAIN CRAM-MD5")
        return ext

    def proto(self) -> str:
        """The ``with`` protocol of the Received line (RFC 3848; RFC 6531
        section 3.7.3 for an SMTPUTF8 transaction)."""
        if self.smtputf8:
            name = "UTF8SMTP" + ("S" if self.tls_cipher else "") + \
                ("A" if self.auth_user else "")
            return "%s (%s encrypted)" % (name, self.tls_cipher) if self.tls_cipher else name
        if self.tls_cipher:
            return "%s (%s encrypted)" % ("ESMTPSA" if self.auth_user else "ESMTPS",
                                          self.tls_cipher)
        return "ESMTPA" if self.auth_user else "SMTP"

    # -- STARTTLS (RFC 3207) -------------------------------------------------------------

    def smtp_STARTTLS(self, arg: str) -> Optional[Reply]:
        if self.tls_cipher is not None:
            return reply.TLS_AGAIN
        if self.starttls is None:
            return reply.UNRECOGNISED
        if arg.strip():
            return reply.TLS_PARAMS
        self.send(reply.TLS_READY)
        self.flush()
        try:
            with gevent.Timeout(self.timeout):
                recv, send, cipher = self.starttls()
        except BaseException as e:  # gevent.Timeout too: a failed handshake ends it
            if isinstance(e, (KeyboardInterrupt, SystemExit, gevent.GreenletExit)):
                raise
            log.line("smtpd: TLS handshake with %s failed: %s"
                     % (self.remote_ip, log.clean(str(e))))
            raise Disconnect("TLS handshake failed")
        # whatever the client pipelined in plain text is thrown away, and all
        # that was learnt before TLS is forgotten (RFC 3207 section 4.2)
        self.reader = LineReader(recv)
        self._send = send
        self.tls_cipher = cipher
        self.helo_host = None
        self.esmtp = False
        if self.auth_user is not None:  # AUTH before TLS is forgotten too
            if self._relay_from_auth:
                self.env.pop("RELAYCLIENT", None)
            for name in ("SMTPAUTHUSER", "SMTPAUTHMETHOD", "TCPREMOTEINFO"):
                self.env.pop(name, None)
            self.auth_user = self.auth_method = self.remoteinfo = None
        self._new_transaction()
        return None

    # -- AUTH (RFC 4954) -------------------------------------------------------------------

    def smtp_AUTH(self, arg: str) -> Reply:
        if self.auth_user is not None:
            return reply.AUTH_ALREADY
        if self.mailfrom is not None:
            return reply.AUTH_IN_MAIL
        if not self.checkpassword:
            return reply.AUTH_NOT_AVAILABLE
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        if mech not in ("PLAIN", "LOGIN", "CRAM-MD5"):
            return reply.AUTH_UNIMPLEMENTED
        # TLSREQUIRED=1: PLAIN and LOGIN only inside TLS; CRAM-MD5 whatever
        # its spelling (eQmail only let the lower-case form through)
        if self.tls_required and self.tls_cipher is None and mech != "CRAM-MD5":
            return reply.AUTH_TLS_REQUIRED
        from . import auth

        challenge = ""
        try:
            if mech == "PLAIN":
                user, secret = auth.decode_plain(initial.strip() or
                                                 self._auth_read(reply.challenge("")))
            elif mech == "LOGIN":
                user = auth.decode_b64_line(initial.strip() or
                                            self._auth_read(reply.challenge("VXNlcm5hbWU6")))
                secret = auth.decode_b64_line(self._auth_read(reply.challenge("UGFzc3dvcmQ6")))
            else:
                challenge = auth.cram_challenge(self.local_host, os.getpid(), time.time())
                user, secret = auth.decode_cram(self._auth_read(reply.challenge(
                    base64.b64encode(challenge.encode("utf-8")).decode("ascii"))))
        except _Canceled:
            return reply.AUTH_CANCELED
        except TimeoutError:
            self._log("timeout")
            return reply.TIMEOUT
        except auth.AuthSyntax:
            return reply.AUTH_MALFORMED
        verdict = auth.check(self.checkpassword, user, secret, challenge, env=self._child_env())
        if verdict == "ok":
            self.env["SMTPAUTHUSER"] = user
            self.env["SMTPAUTHMETHOD"] = mech.lower()
            refusal = self._spp_refusal(self._spp("auth"))
            if refusal is not None:  # an [auth] plugin said no: not authenticated
                self.env.pop("SMTPAUTHUSER", None)
                self.env.pop("SMTPAUTHMETHOD", None)
                return refusal
            self.auth_user = user
            self.auth_method = mech.lower()
            self.remoteinfo = user
            self.env["TCPREMOTEINFO"] = user
            self._relay_from_auth = "RELAYCLIENT" not in self.env
            self.env["RELAYCLIENT"] = ""
            log.line("smtpd: auth %s: user %s from %s"
                     % (mech.lower(), log.clean(user, 100), log.clean(self.remote_ip)))
            return reply.auth_ok(user)
        if verdict == "crash":
            return reply.AUTH_CHILD
        self.auth_failures += 1
        log.line("smtpd: auth %s failed: user %s from %s"
                 % (mech.lower(), log.clean(user, 100), log.clean(self.remote_ip)))
        self.flush()
        gevent.sleep(AUTH_FAIL_DELAY)  # only this session waits
        if self.auth_failures >= MAX_AUTH_FAILURES:
            return reply.AUTH_TOO_MANY
        return reply.AUTH_FAILED

    def _auth_read(self, prompt: Reply) -> str:
        """Send an AUTH continuation and read the client's line.  Raises
        _Canceled for ``*``, TimeoutError, Disconnect."""
        self.send(prompt)
        line = self._read(MAX_AUTH_LINE)
        if not line:
            raise Disconnect("EOF in AUTH")
        if not line.endswith(b"\n"):
            raise Disconnect("AUTH line too long")
        text = line.rstrip(b"\r\n").decode("ascii", "replace")
        if text.strip() == "*":
            raise _Canceled()
        return text

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
        if self.submission and self.auth_user is None:
            return reply.AUTH_REQUIRED
        # qmail-smtpd: a second MAIL simply starts a new transaction.  Here
        # it ends the earlier one even when it is refused (eQmail kept it),
        # so that RCPT and DATA pipelined behind a refused MAIL get 503
        # instead of going out with the sender of the transaction before.
        self._new_transaction()
        try:
            sender, rest = address.parse_path(arg)
        except address.AddressError:
            return reply.SYNTAX
        params = address.parse_params(rest)
        refusal = policy.check_size(self.databytes, params)
        if refusal is not None:
            return refusal
        if "SMTPUTF8" in params:  # RFC 6531 section 3.4
            if params["SMTPUTF8"] is not None:
                return reply.PARAM_SYNTAX
            if not address.valid_utf8(sender):
                return reply.BAD_UTF8_SENDER
        dsn = policy.mail_dsn(params)  # RFC 3461 section 4.3 and 4.4
        if dsn is None:
            return reply.PARAM_SYNTAX
        if "mail" in self.later:  # LM: every MAIL until RSET (qmail-spp)
            return reply.raw(self.later["mail"])
        if self.config.rblwhen == "mail":
            refusal = self._rbl(at_mail=True)
            if refusal is not None:
                return refusal
        level = self._setting("SPFBEHAVIOR", self.config.spfbehavior)
        if level > 0 and self.relayclient is None and self.auth_user is None:
            refusal = self._spf(level, sender)
            if refusal is not None:
                return refusal
        # AUTH=<...> is ignored: eQmail let unauthenticated clients put any
        # identity into the Received line with it.
        override = False
        if self.plugins is not None:
            self.env["SMTPMAILFROM"] = sender
            out = self._spp("mail")
            refusal = self._spp_refusal(out)
            if refusal is not None:
                return refusal
            if out is not None and out.change_address is not None:
                sender = out.change_address
                self.env["SMTPMAILFROM"] = sender
            override = out is not None and out.verdict == "override"
        self.mailfrom = sender
        self.smtputf8 = "SMTPUTF8" in params
        self.dsn = dsn
        # an O answer skips badmailfrom, never the relay check
        self.bad_mail = not override and policy.mail_is_bad(self.config, sender)
        return reply.OK_MAIL

    def smtp_RCPT(self, arg: str) -> Reply:
        if self.mailfrom is None:
            return reply.MAIL_FIRST
        if "rcpt" in self.later:
            return reply.raw(self.later["rcpt"])
        try:
            rcpt, rest = address.parse_path(arg)
        except address.AddressError:
            return reply.SYNTAX
        if not rcpt:  # qmail takes RCPT TO:<>; RFC 5321 has no empty forward-path
            return reply.SYNTAX
        rcpt_dsn = policy.rcpt_dsn(address.parse_params(rest))  # RFC 3461 4.1, 4.2
        if rcpt_dsn is None:
            return reply.PARAM_SYNTAX
        if self.smtputf8 and not address.valid_utf8(rcpt):
            return reply.BAD_UTF8_RCPT
        self.last_rcpt = rcpt
        if len(self.rcpts) >= MAX_RCPT:
            return reply.TOO_MANY_RCPT
        self.rcpt_count_all += 1
        if self.plugins is not None:
            # eQmail never ran [rcpt] plugins; eqmail does, after computing
            # what the relay check would say
            rewritten = policy.rewrite_literal(self.config, rcpt, self.local_ip)
            hostsok = self.relayclient is not None or address.in_rcpthosts(
                rewritten, self.config.rcpthosts, self.config.morercpthosts)
            self.env.update({"SMTPRCPTTO": rcpt, "SMTPRCPTCOUNT": str(len(self.rcpts)),
                             "SMTPRCPTCOUNTALL": str(self.rcpt_count_all),
                             "SMTPRCPTHOSTSOK": "1" if hostsok else "0"})
            out = self._spp("rcpt")
            refusal = self._spp_refusal(out)
            if refusal is not None:
                return refusal
            if out is not None and out.change_address is not None:
                rcpt = out.change_address
        # the relay check always runs; a plugin can only open it by setting
        # RELAYCLIENT (S), which is read here
        refusal, rcpt = policy.check_rcpt(self.config, rcpt, self.bad_mail,
                                          self.relayclient, self.local_ip)
        if refusal is not None:
            return refusal
        if self.config.greydelay > 0:
            refusal = self._greylist(rcpt)
            if refusal is not None:
                return refusal
        self.rcpts.append(rcpt)
        self.rcpt_dsn.append(rcpt_dsn)
        return reply.OK_RCPT

    def _greylist(self, rcpt: str) -> Optional[Reply]:
        """Greylisting (eqmail.smtp.greylist, in the threadpool): 451 for a
        triplet not yet seen long enough, else None.  Trusted sessions,
        SPF passes, GREYLIST=0 and control/greyallow are let by."""
        if self.relayclient is not None or self.auth_user is not None or \
                self.env.get("SPFRESULT") == "pass" or self.env.get("GREYLIST") == "0":
            return None
        from ..threads import run
        from . import greylist

        sender = self.mailfrom or ""
        if greylist.allowed(self.config, self.remote_ip, sender):
            return None
        wait = run(greylist.check, self.config, self.remote_ip, sender, rcpt)
        if wait is None:
            return None
        log.line("smtpd: greylisted %s from %s to %s for %d s"
                 % (log.clean(sender), self.remote_ip, log.clean(rcpt), wait))
        return reply.greylisted(wait)

    def smtp_DATA(self, arg: str) -> Optional[Reply]:
        if self._chunked is not None:
            return reply.DATA_IN_BDAT
        draft = self._open_message()
        if isinstance(draft, Reply):
            return draft
        try:
            return self._data(draft)
        finally:
            draft.abort()  # no-op after a commit
            for extra in self._extra_drafts:  # authcheck's copy
                extra.abort()
            self._reset()

    # -- CHUNKING (RFC 3030) ----------------------------------------------------------

    def smtp_BDAT(self, arg: str) -> Optional[Reply]:
        """One chunk: ``BDAT size [LAST]``, then exactly `size` bytes.  The
        first chunk passes DATA's checks and opens the message; each chunk
        gets its own reply; LAST ends the message as the final dot ends
        DATA (the same checks, the fsync before the 250).  A chunk that
        cannot be taken is still read to its end, so that its bytes are
        never taken for commands, and the message has failed: its later
        chunks are refused too, until LAST or RSET.  A chunk too big to
        read through (BDAT_DISCARD when it would be thrown away; one that
        would pass databytes) ends the connection."""
        words = arg.split()
        if not words or len(words) > 2 or not words[0].isdigit() or len(words[0]) > 18 or \
                (len(words) == 2 and words[1].upper() != "LAST"):
            # the size is unknown: the data cannot be told from commands
            self._drop_chunks()
            return reply.BDAT_SYNTAX
        size, last = int(words[0]), len(words) == 2
        chunked = self._chunked
        refusal = None
        if chunked is None:
            refusal = self._bdat_open()
            chunked = self._chunked
        elif chunked.failed:
            refusal = reply.BDAT_FAILED
        if refusal is None:
            chunks = chunked.chunks
            if self.databytes and chunks.size + size // 2 > self.databytes:
                # over databytes even if every line were empty: not worth reading
                self._log("message too big")
                self._drop_chunks()
                return reply.TOO_BIG.closing()
            got = self._bdat_read(size, chunks.feed)
            if got is not None:  # a timeout
                return got
            if chunks.bare_lf:
                self._log("bad newlines")
                refusal = reply.BARE_LF
            elif chunks.too_big:
                self._log("message too big")
                refusal = reply.TOO_BIG
            elif not last:
                return reply.bdat_chunk(size)
            else:
                chunks.finish()
                try:
                    return self._accept(chunked.draft, chunks.too_big, chunks.scan)
                finally:
                    self._drop_chunks()
                    self._reset()
        else:
            if size > BDAT_DISCARD:
                self._drop_chunks()
                return refusal.closing()
            got = self._bdat_read(size, None)
            if got is not None:
                return got
        # the message has failed: its draft goes, later chunks are refused
        self._drop_chunks()
        if last:
            self._reset()
        else:
            self._chunked = _Chunked(None, None)
        return refusal

    def _open_message(self):
        """The checks before a message (DATA, or BDAT's first chunk): MAIL
        and RCPT done, no LD text, the [data] plugins; then its draft.
        Returns the draft or the refusal."""
        if self.mailfrom is None:
            return reply.MAIL_FIRST
        if not self.rcpts:
            return reply.RCPT_FIRST
        if "data" in self.later:  # LD: every DATA until RSET; the transaction stays
            return reply.raw(self.later["data"])
        refusal = self._spp_refusal(self._spp("data"))
        if refusal is not None:
            return refusal
        try:
            draft = self._draft()
        except QueueError as e:
            log.alert("smtpd: unable to open a queue file: %s" % e.text)
            return reply.QQT_FAILURE
        except OSError as e:  # no pipes for the QMAILQUEUE program
            log.alert("smtpd: unable to start QMAILQUEUE: %s" % e)
            return reply.QQT_FAILURE
        self._extra_drafts = []
        return draft

    def _bdat_open(self) -> Optional[Reply]:
        """DATA's checks for a first chunk; on success `_chunked` holds
        the new message with eqmail's own lines above it."""
        if not self.esmtp:
            return reply.UNRECOGNISED
        draft = self._open_message()
        if isinstance(draft, Reply):
            return draft
        self._head(draft)
        self._chunked = _Chunked(draft, Chunks(draft.write, self.databytes,
                                               self._header_scan()))
        return None

    def _bdat_read(self, size: int, feed) -> Optional[Reply]:
        """Read exactly `size` bytes of chunk data into `feed` (None: throw
        them away).  None when all came; else the reply (timeout) or
        Disconnect."""
        left = size
        while left:
            try:
                piece = self._read(min(left, BDAT_PIECE), raw=True)
            except TimeoutError:
                self._log("timeout")
                return reply.TIMEOUT
            if not piece:
                raise Disconnect("EOF in BDAT")
            left -= len(piece)
            if feed is not None:
                feed(piece)
        return None

    def _drop_chunks(self) -> None:
        """Forget the message BDAT was building (its draft is aborted)."""
        chunked, self._chunked = self._chunked, None
        if chunked is not None and chunked.draft is not None:
            chunked.draft.abort()
            for extra in self._extra_drafts:
                extra.abort()
            self._extra_drafts = []

    def _deliver_direct(self, draft, rcpts) -> List[int]:
        """Local mail written once (eqmail.delivery.direct): deliver what
        may be delivered now; return the indexes of the recipients the
        queue must take."""
        from ..delivery import direct
        from ..threads import run

        everyone = list(range(len(rcpts)))
        if not direct.candidates(self.config, rcpts):
            return everyone
        data = draft.held()
        if data is None:
            return everyone
        try:
            reports = direct.deliver(self.config, data, self.mailfrom, rcpts, wait=run)
        except Exception as e:  # a bug: the queue takes every recipient
            log.alert("smtpd: direct delivery failed: %s: %s" % (type(e).__name__, e))
            return everyone
        rest = []
        for i, (rcpt, report) in enumerate(zip(rcpts, reports)):
            if report is None:
                rest.append(i)
            else:
                log.direct_delivery(draft.id, len(data), self.mailfrom, rcpt, report)
        return rest

    def _params(self, keep: List[int]) -> Optional[Dict[str, str]]:
        """The options the queue keeps with the message (Item.params): the
        SMTPUTF8 flag, RET and ENVID, and NOTIFY and ORCPT of the
        recipients `keep` (indexes into self.rcpts) as ``notify.N`` and
        ``orcpt.N`` for their places in the queued list."""
        params: Dict[str, str] = dict(self.dsn)
        if self.smtputf8:
            params["utf8"] = "1"
        for n, i in enumerate(keep):
            for key, value in self.rcpt_dsn[i].items():
                params["%s.%d" % (key, n)] = value
        return params or None

    def _draft(self):
        """Where the message goes: the queue, or the program named by
        QMAILQUEUE (session environment: smtprules, eqmaild's or
        smtpd's environment, a plugin's S line), as netqmail's
        qmail-smtpd does.  Raises QueueError, OSError."""
        program = self.env.get("QMAILQUEUE")
        if not program:
            return self.store.draft()
        from ..queue.qmailqueue import ProgramDraft

        return ProgramDraft(program, self.config.home, self._child_env(),
                            min(self.timeout, QMAILQUEUE_TIMEOUT))

    def _data(self, draft) -> Optional[Reply]:
        """Stream the message into `draft`; behaviour reference section 2.4.

        The header lines are read one by one (Received and Delivered-To are
        counted there); the body is taken in blocks of whole buffered lines
        when all of them end in CRLF, with the same dot removal and LF line
        ends, so that a 4 KB body costs a few calls rather than one per line.
        """
        self.send(reply.GO_AHEAD)
        self._head(draft)
        limit = self.databytes
        size = 0
        too_big = False
        scan = self._header_scan()
        at_start = True   # the next chunk begins a line
        held_cr = False   # a CR ended the last piece; is LF next?
        write = draft.write
        reader = self.reader

        def keep(out: bytes) -> None:
            """Count `out` against databytes; write it while under."""
            nonlocal size, too_big
            size += len(out)
            if limit and size > limit:
                too_big = True
            if not too_big:
                write(out)

        while True:
            if not scan.in_header and at_start and not held_cr:
                # The body, at a line start: take every whole line buffered
                # at once when they all end in CRLF (else line by line).
                block = reader.take_lines()
                if block:
                    if block.count(b"\n") != block.count(b"\r\n"):
                        reader.unread(block)  # a bare LF: answered line by line
                    else:
                        if block.startswith(b".\r\n"):
                            end = 0  # where the final dot line starts
                        else:
                            end = block.find(b"\r\n.\r\n")
                            if end != -1:
                                end += 2
                        if end != -1:
                            reader.unread(block[end + 3:])  # pipelined commands
                            block = block[:end]
                        out = block.replace(b"\r\n.", b"\r\n")
                        if out.startswith(b"."):
                            out = out[1:]
                        keep(out.replace(b"\r\n", b"\n"))
                        if end != -1:
                            break
                        continue
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
                    if scan.in_header and not scan.line(body):
                        continue
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
                    if scan.in_header:
                        scan.piece(chunk)
                if chunk.endswith(b"\r"):
                    chunk = chunk[:-1]
                    held_cr = True
                out = chunk
                at_start = False
            keep(out)
        return self._accept(draft, too_big, scan)

    def _head(self, draft) -> None:
        """eqmail's own lines at the top of a message: Received-SPF, the
        Received line, the plugins' H lines."""
        if self.spf_header:  # above our Received line (RFC 7208 section 9.1)
            draft.write(self.spf_header.encode("utf-8", "replace") + b"\n")
        draft.write(received_line(self.remote_host, self.helo_host, self.remoteinfo,
                                  self.remote_ip, self.local_host, self.proto()))
        for header in self.spp_headers:  # plugins' H lines, under Received
            draft.write(header.encode("utf-8", "surrogateescape") + b"\n")

    def _header_scan(self) -> HeaderScan:
        """The header checks of one message: hops, and Authentication-Results
        fields claiming this host dropped (RFC 8601 section 5) when eqmail
        adds its own."""
        return HeaderScan(self.config.me.lower().encode() if self._authcheck_on() else None)

    def _accept(self, draft, too_big: bool, scan: HeaderScan) -> Reply:
        """The end of DATA or of BDAT LAST: the message is in `draft`; check
        its size and hops, run the authentication checks, deliver what
        direct delivery may, commit the rest to the queue (fsync'd before
        the 250).  Returns the reply."""
        if too_big:
            self._log("message too big")
            return reply.TOO_BIG
        if scan.hops >= MAX_HOPS:
            self._log("message looping")
            return reply.LOOPING
        if scan.strip is not None:
            got = self._authenticate(draft)
            if isinstance(got, Reply):
                return got
            if got is not None:
                draft = got
        keep = list(range(len(self.rcpts)))
        wants_success = any("SUCCESS" in d.get("notify", "") for d in self.rcpt_dsn)
        if self.direct and self.config.directlocal and self.config.concurrencylocal \
                and not self.env.get("QMAILQUEUE") and not wants_success:
            keep = self._deliver_direct(draft, self.rcpts)
            if not keep:
                draft.abort()
                self.messages += 1
                self._log("message accepted")
                return reply.accepted(int(time.time()), draft.id)
        rcpts = [self.rcpts[i] for i in keep]
        try:
            item = draft.commit(self.mailfrom, rcpts, params=self._params(keep))
        except QueueError as e:
            permanent = getattr(e, "permanent", False)  # qmailqueue.QueueRefused
            self._log("message %s (%s)" % ("rejected" if permanent else "delayed", e.text))
            return reply.queue_failure(e.text, permanent)
        finally:
            said = getattr(draft, "said", "")
            if said:
                log.line("smtpd: QMAILQUEUE %s said: %s"
                         % (self.env.get("QMAILQUEUE"), log.clean(said[:500])))
        self.messages += 1
        self._log("message accepted")
        return reply.accepted(int(time.time()), item.id)
