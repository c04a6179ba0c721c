"""inject -- qmail-inject and sendmail: fix up a local message's header and queue it.

NAME
    eqmail inject [--home DIR] [-f SENDER] [-a|-h|-A|-H] [-n|-N] [RECIPIENT...]
    eqmail sendmail [-t] [-f SENDER] [-F NAME] [-i] [-oX...] [-bm|-bp|-bs] [RECIPIENT...]

SUMMARY
    `prepare()` reads the header of a message from a byte stream, completes
    it as qmail-inject does and works out the envelope; it leaves the body
    unread.  `cmd_inject()` and `cmd_sendmail()` are the command-line tools;
    both hand the result to ``eqmail.queue.pickup.submit()`` (or print it
    with ``-n``).

DESCRIPTION
    The header ends at the first empty line (LF or CRLF; stored with LF), or
    at the first line that is not a header field, which then starts the body
    after an inserted empty line.  A leading ``From `` line becomes
    ``MBOX-Line: From ...``.  Continuation lines stay with their field.

    Recipients, by mode: ``a`` the arguments only; ``h`` the header only
    (To, Cc, Bcc and Apparently-To, or Resent-To, Resent-Cc and Resent-Bcc
    when the message is resent, i.e. has any Resent-Sender, -From, -Reply-To,
    -To, -Cc, -Bcc, -Date or -Message-ID field); ``A`` (default) the
    arguments, or the header when there are none; ``H`` both.

    Fields deleted: Bcc, Resent-Bcc, Return-Path, Content-Length.  Fields
    added when missing, in front of the message's own fields: Date (local
    time, RFC 5322), ``Message-ID: <YYYYMMDDhhmmss.PID.qmail@idhost>`` (the
    time in UTC, as qmail's newfield.c), From, and
    ``Cc: recipient list not shown: ;`` when there is neither To nor Cc --
    or Resent-Date, Resent-Message-ID, Resent-From and Resent-Cc for a
    resent message.

    Address rewriting (qmail-inject's rwgeneric) in the address fields (From,
    Sender, Reply-To, To, Cc, Bcc, Apparently-To, Return-Receipt-To,
    Errors-To, Return-Path and their Resent- forms), in the recipients and
    in the envelope sender: a source route is dropped; an address without
    ``@`` gets ``@defaulthost``; a host ending in ``+`` has it replaced by
    ``.plusdomain``; a host without a dot (and not a ``[literal]``) gets
    ``.defaultdomain``, except ``localhost`` and the hosts in control/locals
    (eqmail's change: qmail-inject would send joe@localhost to
    joe@localhost.<defaultdomain>).  ``<>`` and ``box@[]`` are left alone.  A field in
    which no address changes is kept byte for byte; a changed one is
    re-rendered (comments in it are lost).  Addresses are parsed with the
    stdlib email package (``email.headerregistry``).  A To, Cc, Bcc,
    Apparently-To or Resent- recipient field that does not parse is kept
    unchanged and gives no recipients (as qmail-inject); any other address
    field that does not parse is a permanent error.

    Envelope sender: the ``sender`` argument (``-f``, rewritten) if given;
    else the first Return-Path field (unless QMAILINJECT has ``s``); else
    QMAILSUSER (else the From user) ``@`` QMAILSHOST (else the From host),
    rewritten.  The From user is QMAILUSER, MAILUSER, USER, LOGNAME, else
    ``anonymous``; the From host QMAILHOST, MAILHOST, else defaulthost (by
    rewriting).  The display name is `fullname` (sendmail -F), else
    QMAILNAME, MAILNAME, NAME; it is always quoted (RFC 2047-encoded when it
    is not ASCII), so it can never add a field.

STANDARDS
    qmail-inject(8) and sendmail(8) of netqmail 1.06 (behaviour reference
    section 5.6); RFC 5322 (header fields, dates, address syntax, section
    3.6.6 resent fields); RFC 2047 for non-ASCII display names; the
    sendmail command-line conventions (-t, -f, -F, -i, -o*, -b*).

ENVIRONMENT
    QMAILUSER, MAILUSER, USER, LOGNAME   user of the default From
    QMAILHOST, MAILHOST                  host of the default From
    QMAILNAME, MAILNAME, NAME            display name of the default From
    QMAILSUSER, QMAILSHOST               user / host of the default sender
    QMAILINJECT   flags: c (name as a comment), s (ignore and delete
                  Return-Path), f (delete From, add a fresh one), i (delete
                  Message-ID, add a fresh one), r (per-recipient VERP: the
                  sender gets ``-@[]``), m (per-message VERP: the sender's
                  user gets ``-TIME.PID``)
    QMAILMFTFILE  a file of mailing-list addresses; when To or Cc names one
                  of them and there is no Mail-Followup-To, one is added
                  listing the To and Cc addresses
    QMAILDEFAULTDOMAIN, QMAILDEFAULTHOST, QMAILPLUSDOMAIN, QMAILIDHOST
                  override control/defaultdomain, defaulthost, plusdomain,
                  idhost
    QMAILQUEUE    a program that takes the message (fd 0) and envelope (fd 1)
                  instead of the queue (eqmail.queue.qmailqueue)
    An empty variable counts as unset.

SECURITY
    Values from the environment, `fullname`, the arguments and control files
    go into header fields and the envelope: control characters (CR, LF, NUL
    ...) in them are refused with exit 100, so they cannot add fields.  A
    bare CR or a NUL inside the message header is refused too.  The header is
    read with a bound (MAX_HEADER); the body is never read here.

LIMITS
    MAX_HEADER    1 MiB of header, else exit 100.

EXIT CODES
    0    queued (or printed with -n)
    100  bad usage, unparsable header or address, header too big, no
         recipients, or the queue refused the message permanently
         (qmail-queue codes 11-40)
    111  temporary: control files or queue unreadable, read error, any other
         qmail-queue code
"""
from __future__ import annotations

import io
import os
import re
import sys
import time
from dataclasses import dataclass
from email.header import Header
from email.errors import ObsoleteHeaderDefect, UndecodableBytesDefect
from email.headerregistry import HeaderRegistry
from email.utils import formatdate
from typing import BinaryIO, Dict, List, Mapping, Optional, Sequence, Tuple

#: The most header qmail-inject reads before giving up, bytes.
MAX_HEADER = 1 << 20

#: Fold rewritten address fields before this column (RFC 5322 section 2.1.1).
LINE_LENGTH = 78

MODES = ("a", "h", "A", "H")

# Fields qmail-inject knows, lower case (hfield.c).
_RECIPIENT_FIELDS = frozenset(["to", "cc", "bcc", "apparently-to"])
_RESENT_RECIPIENT_FIELDS = frozenset(["resent-to", "resent-cc", "resent-bcc"])
_SENDER_FIELDS = frozenset(["sender", "from", "reply-to", "return-receipt-to", "errors-to",
                            "resent-sender", "resent-from", "resent-reply-to"])
_RESENT_MARKERS = frozenset(["resent-sender", "resent-from", "resent-reply-to", "resent-to",
                             "resent-cc", "resent-bcc", "resent-date", "resent-message-id"])
_DELETED = frozenset(["bcc", "resent-bcc", "return-path", "content-length"])

# hfield_valid(): a name of printable non-space ASCII, blanks, then a colon.
_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM_RE = re.compile(r"^%s+(\.%s+)*$" % (_ATEXT, _ATEXT))
_PHRASE_RE = re.compile(r"^%s+( %s+)*$" % (_ATEXT, _ATEXT))
_ROUTE_RE = re.compile(r"<\s*@[^<>:\"]*:")


@dataclass
class Prepared:
    """The outcome of `prepare()`: envelope, completed header, unread body."""

    sender: str                 # envelope sender ("" for the null sender)
    recipients: List[str]       # envelope recipients, in order
    header: bytes               # the completed header, LF line ends, ending with b"\n"
    body: BinaryIO              # positioned at the start of the body (not read)


class InjectError(Exception):
    """The message cannot be injected.  `code` is 100 (permanent, bad usage)
    or 111 (temporary); `str()` is a one-line reason."""

    def __init__(self, code: int, reason: str):
        self.code = code
        self.reason = reason
        super().__init__(reason)


def _printable(text: str, limit: int = 200) -> str:
    """`text` made safe for a one-line message: control characters become
    ``_``, bounded to `limit` characters."""
    text = _CONTROL_RE.sub("_", text)
    return text if len(text) <= limit else text[:limit] + "..."


# -- settings: control files and environment --------------------------------------------

@dataclass(frozen=True)
class _Settings:
    defaultdomain: str
    defaulthost: str
    plusdomain: str
    idhost: str
    mailuser: str
    mailhost: Optional[str]
    suser: str
    shost: Optional[str]
    fullname: Optional[str]
    flags: str
    mftfile: Optional[str]
    locals: frozenset = frozenset()


def _env(env: Mapping[str, str], *names: str) -> Tuple[Optional[str], Optional[str]]:
    """(name, value) of the first of `names` set non-empty in `env`; a value
    with control characters is refused."""
    for name in names:
        value = env.get(name)
        if value:
            if _CONTROL_RE.search(value):
                raise InjectError(100, "control character in %s" % name)
            return name, value
    return None, None


def _host_override(env: Mapping[str, str], name: str, default: str) -> str:
    _, value = _env(env, name)
    if value is None:
        return default
    if any(ch.isspace() for ch in value):
        raise InjectError(100, "white space in %s: %s" % (name, _printable(value)))
    return value


def _login() -> Optional[str]:
    """The login name of the real uid (getpwuid), or None."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name or None
    except (KeyError, OSError):
        return None


def _settings(config, env: Mapping[str, str], fullname: Optional[str],
              login_fallback: bool = False) -> _Settings:
    defaultdomain = _host_override(env, "QMAILDEFAULTDOMAIN", config.defaultdomain)
    defaulthost = _host_override(env, "QMAILDEFAULTHOST", config.defaulthost)
    plusdomain = _host_override(env, "QMAILPLUSDOMAIN", config.plusdomain)
    idhost = _host_override(env, "QMAILIDHOST", config.idhost)
    _, mailhost = _env(env, "QMAILHOST", "MAILHOST")
    _, mailuser = _env(env, "QMAILUSER", "MAILUSER", "USER", "LOGNAME")
    mailuser = mailuser or (_login() if login_fallback else None) or "anonymous"
    _, shost = _env(env, "QMAILSHOST")
    _, suser = _env(env, "QMAILSUSER")
    for label, value in (("QMAILHOST", mailhost), ("QMAILSHOST", shost)):
        if value is not None and any(ch.isspace() for ch in value):
            raise InjectError(100, "white space in %s: %s" % (label, _printable(value)))
    if fullname is not None:
        if _CONTROL_RE.search(fullname):
            raise InjectError(100, "control character in the full name")
        fullname = fullname or None
    else:
        _, fullname = _env(env, "QMAILNAME", "MAILNAME", "NAME")
    _, flags = _env(env, "QMAILINJECT")
    _, mftfile = _env(env, "QMAILMFTFILE")
    return _Settings(defaultdomain=defaultdomain, defaulthost=defaulthost,
                     plusdomain=plusdomain, idhost=idhost, mailuser=mailuser,
                     mailhost=mailhost, suser=suser or mailuser, shost=shost or mailhost,
                     fullname=fullname, flags=flags or "", mftfile=mftfile,
                     locals=frozenset(getattr(config, "locals", ())) | {"localhost"})


# -- addresses ---------------------------------------------------------------------------

def rewrite(local: str, domain: Optional[str], s: _Settings) -> Tuple[str, Optional[str]]:
    """qmail-inject's rwgeneric() on an address split into local part and
    domain (None when there was no ``@``).  Returns (local, domain); the
    null address and ``box@[]`` come back unchanged."""
    if not local and not domain:
        return local, domain
    if domain == "[]":
        return local, domain
    if domain is None:
        domain = s.defaulthost
    if domain.endswith("+"):
        domain = domain[:-1] + "." + s.plusdomain
    if "." not in domain and not domain.startswith("[") \
            and domain.lower() not in s.locals:
        # eqmail: a dotless host that is one of control/locals (or
        # localhost) is already complete; qmail-inject would make
        # joe@localhost into joe@localhost.<defaultdomain>
        domain = domain + "." + s.defaultdomain
    return local, domain


def _unquote_local(local: str) -> str:
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def _split_path(text: str) -> Optional[Tuple[str, Optional[str]]]:
    """Split an argument or Return-Path value into (local, domain or None).

    Angle brackets and a source route are dropped; ``<>`` and the empty
    string give ("", None).  None when it does not parse."""
    text = text.strip()
    if "<" in text:
        start = text.index("<")
        end = text.find(">", start)
        if end < 0:
            return None
        text = text[start + 1:end].strip()
    if text.startswith("@") and ":" in text:
        text = text[text.index(":") + 1:]
    if not text:
        return "", None
    if _CONTROL_RE.search(text):
        return None
    local, at, domain = text.rpartition("@")
    if not at:
        return _unquote_local(text), None
    if not local or not domain:
        return None
    return _unquote_local(local), domain


def _envelope(local: str, domain: Optional[str]) -> str:
    if not local and not domain:
        return ""
    return local if domain is None else "%s@%s" % (local, domain)


def _rewrite_argument(text: str, s: _Settings, what: str) -> str:
    parts = _split_path(text)
    if parts is None:
        raise InjectError(100, "unable to parse %s: %s" % (what, _printable(text)))
    local, domain = rewrite(parts[0], parts[1], s)
    return _envelope(local, domain)


def _quote_local(local: str) -> str:
    if _DOT_ATOM_RE.match(local):
        return local
    return '"%s"' % local.replace("\\", "\\\\").replace('"', '\\"')


def _quote_string(text: str) -> str:
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def _display_name(name: str, raw_value: str) -> str:
    """A display name or group name as a phrase: atoms as they are, else a
    quoted string; non-ASCII text decoded from an encoded word is encoded
    again (RFC 2047), raw 8-bit text is kept."""
    name = " ".join(name.split())
    if not name.isascii() and name not in raw_value and not re.search(r"[\ud800-\udfff]", name):
        return Header(name, "utf-8").encode()
    if _PHRASE_RE.match(name):
        return name
    return _quote_string(name)


def _mailbox(name: str, local: str, domain: Optional[str], raw_value: str) -> str:
    addr = _quote_local(local) if domain is None else "%s@%s" % (_quote_local(local), domain)
    if name:
        return "%s <%s>" % (_display_name(name, raw_value), addr)
    return addr


_REGISTRY = HeaderRegistry()

# Parser complaints that still leave a usable address (besides obsolete syntax
# and raw 8-bit text): no domain (rewriting adds defaulthost) and dots in odd
# places of the local part (which exist in the wild and are quoted when the
# field is re-rendered).
_HARMLESS_DEFECTS = ("local part with no domain", "local-part is not dot-atom",
                     "in local part", "repeated '.'")


def _parse_list(value: str):
    """Parse an address-list with email.headerregistry.

    Returns [(group name or None, [(display name, local, domain or None)])],
    or None when the value does not parse (an invalid or empty address,
    characters left over, or the parser failing)."""
    value = _ROUTE_RE.sub("<", value)
    try:
        header = _REGISTRY("To", value)
        groups = header.groups
        defects = list(header.defects)
    except Exception:  # the parser is lenient but not crash-proof
        return None
    for defect in defects:
        if isinstance(defect, (ObsoleteHeaderDefect, UndecodableBytesDefect)):
            continue
        text = str(defect).lower()
        if not any(ok in text for ok in _HARMLESS_DEFECTS):
            return None
    out = []
    for group in groups:
        members = []
        for a in group.addresses:
            if not a.username:
                return None
            if _CONTROL_RE.search(a.username + a.domain + a.display_name):
                return None
            members.append((a.display_name, a.username, a.domain or None))
        out.append((group.display_name, members))
    return out


def _fold(name: str, items: List[str]) -> str:
    """``Name: a, b, ...`` with LF folding before LINE_LENGTH where it can."""
    out = name + ": "
    col = len(out)
    for i, item in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        if i and col + 1 + len(item) + len(sep) > LINE_LENGTH:
            out += "\n  "
            col = 2
        elif i:
            out += " "
            col += 1
        out += item + sep
        col += len(item) + len(sep)
    return out + "\n"


# -- the header -------------------------------------------------------------------------

class _Field:
    __slots__ = ("name", "key", "raw")

    def __init__(self, name: str, raw: bytes):
        self.name = name          # as written, blanks before the colon removed
        self.key = name.lower()
        self.raw = raw            # the whole field, LF line ends, ending with LF

    def value(self) -> str:
        """The unfolded value after the colon, decoded (8-bit kept as surrogates)."""
        text = self.raw.split(b":", 1)[1].replace(b"\n", b"")
        return text.decode("utf-8", "surrogateescape").strip()


class _Prefixed(io.RawIOBase):
    """`prefix` then the rest of `stream`: the body when the header ended at a
    line that was not a header field."""

    def __init__(self, prefix: bytes, stream: BinaryIO):
        self._prefix = prefix
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._stream.read(len(b))
        if not data:
            return 0
        b[:len(data)] = data
        return len(data)


class _UnixLines(io.RawIOBase):
    """`stream` with CRLF line ends turned into LF, as the queue stores
    messages (a lone CR is kept).  Mail from Windows-minded programs would
    otherwise be queued with CRLF in the body and LF in the header."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._held = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            data = self._stream.read(max(1, len(b) - 1))
            if not data:
                out, self._held = self._held, b""
            else:
                data = self._held + data
                self._held = b""
                if data.endswith(b"\r"):
                    data, self._held = data[:-1], b"\r"
                out = data.replace(b"\r\n", b"\n")
                if not out:
                    continue
            n = len(out)
            b[:n] = out
            return n


def _line(raw: bytes) -> bytes:
    """One input line with LF end (CRLF accepted; a missing end added)."""
    if raw.endswith(b"\r\n"):
        raw = raw[:-2] + b"\n"
    elif not raw.endswith(b"\n"):
        raw += b"\n"
    return raw


def read_header(stream: BinaryIO) -> Tuple[List[_Field], BinaryIO]:
    """Read the header fields from `stream` (headerbody.c's rules).

    Returns (fields, body stream).  Raises InjectError 100 for more than
    MAX_HEADER bytes or a bare CR / NUL in a field, 111 for a read error."""
    fields: List[_Field] = []
    total = 0
    current: Optional[List[bytes]] = None
    current_name = ""
    body: BinaryIO = stream

    def close():
        if current is not None:
            raw = b"".join(current)
            if b"\r" in raw or b"\0" in raw:
                raise InjectError(100, "bare CR or NUL in header field %s" % _printable(current_name))
            fields.append(_Field(current_name, raw))

    while True:
        try:
            raw = stream.readline(MAX_HEADER - total + 2)
        except OSError as e:
            raise InjectError(111, "read error: %s" % e)
        if not raw:
            break
        if raw in (b"\n", b"\r\n"):
            break
        total += len(raw)
        if total > MAX_HEADER:
            raise InjectError(100, "header too big (more than %d bytes)" % MAX_HEADER)
        line = _line(raw)
        if current is not None and line[:1] in (b" ", b"\t"):
            current.append(line)
            continue
        close()
        current = None
        if line.startswith(b"From "):
            line = b"MBOX-Line: " + line
        m = _FIELD_RE.match(line)
        if m is None:
            body = io.BufferedReader(_Prefixed(raw, stream))
            break
        current = [line]
        current_name = m.group(1).decode("ascii")
    close()
    return fields, body


# -- prepare ------------------------------------------------------------------------------

def _rewrite_field(field: _Field, s: _Settings, out_recipients: Optional[List[str]],
                   may_fail: bool) -> bool:
    """Rewrite the addresses of `field` in place; append its envelope
    addresses to `out_recipients`.  False when it does not parse and
    `may_fail`; InjectError 100 when it does not parse otherwise."""
    value = field.value()
    # "<>" (a bounce's From) is left alone, as qmail-inject leaves it.
    parsed = _parse_list(value) if value and value != "<>" else []
    if parsed is None:
        if may_fail:
            return False
        raise InjectError(100, "unable to parse header field: %s"
                          % _printable(field.raw.decode("utf-8", "replace").rstrip("\n")))
    changed = False
    items = []
    for gname, members in parsed:
        rendered = []
        for name, local, domain in members:
            nlocal, ndomain = rewrite(local, domain, s)
            changed |= (nlocal, ndomain) != (local, domain)
            if out_recipients is not None:
                out_recipients.append(_envelope(nlocal, ndomain))
            rendered.append(_mailbox(name, nlocal, ndomain, value))
        if gname is not None:
            items.append("%s: %s;" % (_display_name(gname, value), ", ".join(rendered)))
        else:
            items.extend(rendered)
    if changed:
        field.raw = _fold(field.name, items).encode("utf-8", "surrogateescape")
    return True


def _default_from(s: _Settings, prefix: str) -> str:
    """qmail-inject's defaultfrommake(), rewritten."""
    local, domain = rewrite(s.mailuser, s.mailhost, s)
    addr = "%s@%s" % (_quote_local(local), domain)
    name = s.fullname
    if not name:
        return "%sFrom: %s\n" % (prefix, addr)
    if "c" in s.flags:
        comment = name.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        return "%sFrom: %s (%s)\n" % (prefix, addr, comment)
    if not name.isascii() and not re.search(r"[\ud800-\udfff]", name):
        shown = Header(name, "utf-8").encode()
    else:
        shown = _quote_string(name)
    return "%sFrom: %s <%s>\n" % (prefix, shown, addr)


def _default_sender(s: _Settings, now: float, pid: int) -> str:
    """qmail-inject's dodefaultreturnpath(): QMAILSUSER@QMAILSHOST, rewritten."""
    user = s.suser
    if "m" in s.flags:
        user += "-%d.%d" % (int(now), pid)
    if "r" in s.flags:
        user += "-"
    local, domain = rewrite(user, s.shost, s)
    return _envelope(local, domain) + ("-@[]" if "r" in s.flags else "")


def _message_id(s: _Settings, now: float, pid: int) -> str:
    return "Message-ID: <%s.%d.qmail@%s>\n" % (
        time.strftime("%Y%m%d%H%M%S", time.gmtime(now)), pid, s.idhost)


def _mail_followup_to(s: _Settings, tocc: List[str]) -> str:
    """Mail-Followup-To for QMAILMFTFILE (qmail-inject's finishmft())."""
    if not s.mftfile or not tocc:
        return ""
    try:
        with open(s.mftfile, "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise InjectError(111, "unable to read %s: %s" % (_printable(s.mftfile), e))
    lists = set()
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        line = line.strip()
        if line and not line.startswith("#"):
            lists.add(line)
    if not any(addr in lists for addr in tocc):
        return ""
    return _fold("Mail-Followup-To", [_mailbox("", *_split_envelope(a), "") for a in tocc])


def _split_envelope(addr: str) -> Tuple[str, Optional[str]]:
    local, at, domain = addr.rpartition("@")
    return (local, domain) if at else (addr, None)


def prepare(config, stream: BinaryIO, env: Mapping[str, str], recipients: Sequence[str] = (),
            sender: Optional[str] = None, mode: str = "A", fullname: Optional[str] = None,
            now: Optional[float] = None, pid: Optional[int] = None,
            login_fallback: bool = False) -> Prepared:
    """Read the header from `stream` and complete it as qmail-inject does.

    `config` is a control.Config (defaultdomain, defaulthost, plusdomain,
    idhost); `env` the environment (see ENVIRONMENT); `recipients` the
    argument recipients; `sender` the -f envelope sender ("" or "<>" for the
    null sender); `mode` one of a, h, A, H; `fullname` sendmail's -F;
    `now` (Unix time) and `pid` default to the current ones;
    `login_fallback`: without QMAILUSER, MAILUSER, USER and LOGNAME the
    user is the real uid's login name (sendmail), not "anonymous"
    (qmail-inject).

    Returns a Prepared whose body is `stream` (or a wrapper of it) positioned
    at the body.  Raises InjectError (code 100 or 111) -- see the module
    docstring."""
    if mode not in MODES:
        raise InjectError(100, "bad recipient mode %r" % mode)
    now = time.time() if now is None else now
    pid = os.getpid() if pid is None else pid
    s = _settings(config, env, fullname, login_fallback)

    envelope_sender: Optional[str] = None
    if sender is not None:
        envelope_sender = _rewrite_argument(sender, s, "sender")

    if mode == "A":
        mode = "a" if recipients else "h"
    arg_recipients: List[str] = []
    if mode != "h":
        for r in recipients:
            if r == "" or r.strip() in ("", "<>"):
                raise InjectError(100, "unable to parse address: %s" % _printable(r))
            arg_recipients.append(_rewrite_argument(r, s, "address"))

    fields, body = read_header(stream)
    if "f" in s.flags:
        fields = [f for f in fields if f.key != "from"]
    if "i" in s.flags:
        fields = [f for f in fields if f.key != "message-id"]
    if "s" in s.flags:
        fields = [f for f in fields if f.key != "return-path"]

    seen = set(f.key for f in fields)
    resent = bool(seen & _RESENT_MARKERS)
    header_rcpts: List[str] = []
    resent_rcpts: List[str] = []
    tocc: List[str] = []
    for f in fields:
        if f.key in ("to", "cc"):
            got: List[str] = []
            if _rewrite_field(f, s, got, may_fail=True):
                header_rcpts.extend(got)
                tocc.extend(got)
        elif f.key in _RECIPIENT_FIELDS:
            _rewrite_field(f, s, header_rcpts, may_fail=True)
        elif f.key in _RESENT_RECIPIENT_FIELDS:
            _rewrite_field(f, s, resent_rcpts, may_fail=True)
        elif f.key in _SENDER_FIELDS:
            _rewrite_field(f, s, None, may_fail=False)
        elif f.key == "return-path":
            value = f.value()
            parts = _split_path(value)
            if parts is None:
                raise InjectError(100, "unable to parse header field: Return-Path: %s"
                                  % _printable(value))
            path = _envelope(*rewrite(parts[0], parts[1], s))
            if envelope_sender is None:
                envelope_sender = path + ("-@[]" if "r" in s.flags and path else "")

    if envelope_sender is None:
        envelope_sender = _default_sender(s, now, pid)

    added = []
    prefix = "Resent-" if resent else ""
    if (prefix + "date").lower() not in seen:
        added.append("%sDate: %s\n" % (prefix, formatdate(now, localtime=True)))
    if (prefix + "message-id").lower() not in seen:
        added.append(prefix + _message_id(s, now, pid))
    if (prefix + "from").lower() not in seen:
        added.append(_default_from(s, prefix))
    if (prefix + "to").lower() not in seen and (prefix + "cc").lower() not in seen:
        added.append("%sCc: recipient list not shown: ;\n" % prefix)
    if not resent and "mail-followup-to" not in seen:
        added.append(_mail_followup_to(s, tocc))

    final: List[str] = []
    if mode != "h":
        final.extend(arg_recipients)
    if mode != "a":
        final.extend(resent_rcpts if resent else header_rcpts)
    final = [r for r in final if r]
    if not final:
        raise InjectError(100, "no recipients")

    header = b"".join(a.encode("utf-8", "surrogateescape") for a in added)
    header += b"".join(f.raw for f in fields if f.key not in _DELETED)
    return Prepared(sender=envelope_sender, recipients=final, header=header + b"\n",
                    body=io.BufferedReader(_UnixLines(body)))


# -- queueing ---------------------------------------------------------------------------------

def _submit(prog: str, home: str, prepared: Prepared,
            env: Optional[Mapping[str, str]] = None) -> int:
    """Hand `prepared` to the queue, or to the program named by QMAILQUEUE
    in `env` (netqmail's qmail-inject); the exit code, with one line on
    stderr when it fails (qmail-queue codes 11-40 are permanent: 100)."""
    env = os.environ if env is None else env
    if env.get("QMAILQUEUE"):
        return _submit_program(prog, home, prepared, env)
    try:
        from eqmail.queue import pickup
    except ImportError as e:
        sys.stderr.write("%s: fatal: unable to load the queue: %s\n" % (prog, e))
        return 111
    try:
        pickup.submit(home, prepared.sender, prepared.recipients, prepared.header, prepared.body)
    except pickup.SubmitError as e:
        code = getattr(e, "code", 0)
        text = getattr(e, "text", "") or str(e)
        sys.stderr.write("%s: fatal: %s\n" % (prog, _printable(str(text), 500)))
        return 100 if isinstance(code, int) and 11 <= code <= 40 else 111
    except OSError as e:
        sys.stderr.write("%s: fatal: unable to queue: %s\n" % (prog, e))
        return 111
    return 0


def _submit_program(prog: str, home: str, prepared: Prepared, env: Mapping[str, str]) -> int:
    """qmail-inject with QMAILQUEUE: the program gets the message (no
    Received line: qmail-queue adds its own) and the envelope; a ``D``
    answer exits 100, anything else that is not success 111."""
    from .queue.qmailqueue import ProgramDraft, QueueError

    draft = ProgramDraft(env["QMAILQUEUE"], home, dict(env), timeout=300)
    try:
        draft.write(prepared.header)
        while True:
            try:
                chunk = prepared.body.read(65536)
            except OSError:
                draft.abort()
                sys.stderr.write("%s: fatal: unable to read the message\n" % prog)
                return 111
            if not chunk:
                break
            draft.write(chunk)
        draft.commit(prepared.sender, prepared.recipients)
    except QueueError as e:
        sys.stderr.write("%s: fatal: %s\n" % (prog, e.text))
        return 100 if getattr(e, "permanent", False) else 111
    finally:
        if draft.said:
            sys.stderr.write("%s: QMAILQUEUE said: %s\n" % (prog, _printable(draft.said, 500)))
    return 0


def _print(prepared: Prepared) -> int:
    """-n: the message as it would be queued, after a Return-Path line (as
    qmail-inject -n)."""
    out = getattr(sys.stdout, "buffer", sys.stdout)
    sender = prepared.sender.encode("utf-8", "surrogateescape")
    out.write(b"Return-Path: <" + sender + b">\n")
    out.write(prepared.header)
    while True:
        chunk = prepared.body.read(65536)
        if not chunk:
            break
        out.write(chunk)
    out.flush()
    return 0


def _run(prog: str, home: str, queue: bool, env: Optional[Mapping[str, str]] = None,
         **kw) -> int:
    from .control import ConfigError, load

    try:
        config = load(home)
    except (ConfigError, OSError) as e:
        from .paths import explain

        sys.stderr.write("%s: fatal: unable to read controls of %s: %s\n"
                         % (prog, explain(home), e))
        return 111
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    try:
        prepared = prepare(config, stdin, os.environ if env is None else env, **kw)
    except InjectError as e:
        sys.stderr.write("%s: fatal: %s\n" % (prog, e))
        return e.code
    if not queue:
        return _print(prepared)
    return _submit(prog, home, prepared, env)


# -- eqmail inject --------------------------------------------------------------------------

class _Usage(Exception):
    def __init__(self, status: int, message: str = ""):
        self.status = status
        self.message = message


class _Parser:
    """argparse without its exits: usage errors become exit 100."""

    @staticmethod
    def make(prog: str, description: str):
        import argparse

        class P(argparse.ArgumentParser):
            def exit(self, status=0, message=None):
                raise _Usage(status, message or "")

            def error(self, message):
                raise _Usage(100, "%s: usage: %s\n" % (self.prog, message))

        return P(prog=prog, description=description, add_help=False)


INJECT_DESCRIPTION = (
    "Read a message on stdin, complete its header as qmail-inject does (From, Date, "
    "Message-ID, 'Cc: recipient list not shown: ;' when missing; Bcc, Resent-Bcc, "
    "Return-Path and Content-Length removed; addresses rewritten with defaulthost, "
    "defaultdomain and plusdomain) and queue it (or hand it to the program named by "
    "$QMAILQUEUE, as netqmail does). Recipients: -a the arguments, -h the "
    "header (To, Cc, Bcc, or the Resent- fields), -A the arguments or else the header "
    "(default), -H both. Exit 0 ok, 100 permanent, 111 temporary.")


def cmd_inject(argv: List[str]) -> int:
    """``eqmail inject``: qmail-inject(8)."""
    p = _Parser.make("eqmail inject", INJECT_DESCRIPTION)
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("--home", metavar="DIR", help="the eqmail home (default: see `eqmail --help`)")
    p.add_argument("-f", dest="sender", metavar="SENDER", help="envelope sender")
    g = p.add_mutually_exclusive_group()
    for flag, text in (("a", "recipients from the arguments only"),
                       ("h", "recipients from the header only"),
                       ("A", "the arguments, or the header when there are none (default)"),
                       ("H", "the arguments and the header")):
        g.add_argument("-" + flag, dest="mode", action="store_const", const=flag, help=text)
    p.add_argument("-n", dest="queue", action="store_false", default=True,
                   help="print the message instead of queueing it")
    p.add_argument("-N", dest="queue", action="store_true", help="queue the message (default)")
    p.add_argument("recipients", nargs="*", metavar="RECIPIENT")
    try:
        args = p.parse_args(argv)
    except _Usage as u:
        (sys.stdout if u.status == 0 else sys.stderr).write(u.message)
        return u.status
    from .paths import resolve_home

    home = resolve_home(args.home)
    return _run("eqmail inject", home, args.queue, recipients=args.recipients,
                sender=args.sender, mode=args.mode or "A")


# -- sendmail ---------------------------------------------------------------------------------

SENDMAIL_USAGE = ("sendmail: usage: sendmail [--home DIR] [-t] [-f sender] [-F name] [-i] "
                  "[-o option] [-bm|-bp|-bs|-bi|-bv] [-q[interval]] [recipient ...]\n")

SENDMAIL_HELP = """
The sendmail(8) interface of eqmail: read a message on stdin, complete its
header as qmail-inject does and queue it (through eqmaild's pickup socket
when the queue is not writable).

  recipient ...   envelope recipients (default with -t: the header's)
  -t              take recipients from To, Cc, Bcc (and Resent-*); Bcc is removed
  -f SENDER       envelope sender (also -r); sets From: unless the header has one
  -F NAME         full name for an added From:
  -i, -oi         accepted: a lone dot never ends the message here
  -bm             deliver mail (the default)
  -bp             list the queue (eqmail qread; mailq does the same); the queue
                  is readable by root and the daemon's user only, others are
                  told so (exit 77)
  -bs             one SMTP session on stdin/stdout, allowed to relay
  -bi             compile the aliases file (eqmail newaliases; newaliases)
  -bv             verify: print where each recipient would go (local user,
                  alias, .forward, program, remote route) and send nothing
  -q, -qINTERVAL  try every queued message now (eqmail flush); the interval
                  (-q30m) is accepted and ignored: eqmaild retries by itself.
                  -qR... and -qS... flush the whole queue too
  -oem, -oee, -oep, -oeq, -oew
                  accepted: errors always come back as a bounce message
  -N DSN, -R RET, -V ENVID
                  accepted and not kept: bounces report failures only
  -o*, -B*, -v, -m, -x, -U, -G, -n, -L*, -O*, -X*, -p*
                  accepted and ignored
  -bd, -bD, -C, -qp and anything else: refused (exit 100)
  --home DIR      the eqmail home (default: see eqmail --help)

Without -f the sender is $QMAILUSER, $MAILUSER, $USER or $LOGNAME, else
the login name of the real uid (as Postfix and Exim do; qmail-inject says
"anonymous"), at control/defaulthost.

Exit status: 0 queued, 100 permanent error or bad usage, 111 temporary error;
-q: 69 when eqmaild is not running.
"""

# Options taking an argument (attached or as the next word), ignored ones included:
# -e error mode, -p protocol, -o option, -B body type, -N/-R/-V DSN, -X log,
# -L label, -O option, -r (old -f), -C config file is refused (no config files).
_SENDMAIL_ARG = "efrpoBFbNRVXLO"
# Flags without argument: -t, and ignored -v -i -m -x -U -G -n (-E/-J eat the rest).
_SENDMAIL_FLAG = "timvxUGnEJ"


def _sendmail_env(sender: str) -> Dict[str, str]:
    """qmail's sendmail do_sender(): the From user and host follow -f."""
    parts = _split_path(sender)
    if parts is None or not parts[0]:
        return dict(os.environ)
    env = dict(os.environ)
    for name in ("QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"):
        env.pop(name, None)
    env["QMAILUSER"] = parts[0]
    if parts[1] is not None:
        env["QMAILHOST"] = parts[1]
    return env


def cmd_sendmail(argv: List[str]) -> int:
    """``eqmail sendmail``: the sendmail(8) interface over prepare()."""
    home_arg: Optional[str] = None
    headers = False
    sender: Optional[str] = None
    fullname: Optional[str] = None
    action = "m"
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if word == "--help":
            sys.stdout.write(SENDMAIL_USAGE + SENDMAIL_HELP)
            return 0
        if word == "--home" or word.startswith("--home="):
            if word == "--home":
                if i + 1 >= len(argv):
                    sys.stderr.write(SENDMAIL_USAGE)
                    return 100
                home_arg = argv[i + 1]
                i += 2
            else:
                home_arg = word[len("--home="):]
                i += 1
            continue
        if not word.startswith("-") or word == "-":
            break
        if word.startswith("--"):
            sys.stderr.write("sendmail: unknown option %s\n" % _printable(word))
            return 100
        j = 1
        i += 1
        while j < len(word):
            opt = word[j]
            j += 1
            if opt == "q":
                if word[j:j + 1] == "p":
                    sys.stderr.write("sendmail: -qp (a persistent queue runner) is "
                                     "eqmaild's work: start eqmaild\n")
                    return 100
                action = "q"  # -q, -q30m, -qR..., -qS..., -qf: flush all
                j = len(word)
                continue
            if opt in _SENDMAIL_FLAG:
                if opt == "t":
                    headers = True
                elif opt in "EJ":
                    j = len(word)
                continue
            if opt not in _SENDMAIL_ARG:
                sys.stderr.write("sendmail: unknown option -%s\n" % _printable(opt))
                return 100
            if j < len(word):
                value = word[j:]
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                sys.stderr.write("sendmail: option -%s needs an argument\n" % opt)
                return 100
            j = len(word)
            if opt in "fr":
                sender = value
            elif opt == "F":
                fullname = value
            elif opt == "b":
                if value in ("d", "D"):
                    sys.stderr.write("sendmail: -b%s: the daemon is eqmaild (see eqmaild "
                                     "--help)\n" % value)
                    return 100
                if value not in ("m", "p", "s", "i", "v"):
                    sys.stderr.write("sendmail: unsupported mode -b%s\n" % _printable(value))
                    return 100
                action = value
    recipients = argv[i:]

    from .paths import resolve_home

    home = resolve_home(home_arg)
    if action == "p":
        from .cli import cmd_qread

        return cmd_qread(["--home", home])
    if action == "i":
        from .cli import cmd_newaliases

        return cmd_newaliases(["--home", home])
    if action == "v":
        from .cli import cmd_verify

        return cmd_verify(["--home", home, "--"] + recipients)
    if action == "q":
        from .cli import cmd_flush

        return cmd_flush(["--home", home])
    if action == "s":
        from .cli import cmd_smtpd

        if "PROTO" not in os.environ:
            # a local user may send anywhere (qmail's sendmail -bs)
            os.environ["RELAYCLIENT"] = ""
            os.environ.setdefault("TCPREMOTEIP", "127.0.0.1")
            os.environ.setdefault("TCPREMOTEHOST", "localhost")
            os.environ.setdefault("TCPREMOTEINFO", "sendmail-bs")
        return cmd_smtpd(["--home", home])
    mode = ("H" if recipients else "h") if headers else "a"
    env = _sendmail_env(sender) if sender is not None else None
    return _run("sendmail", home, True, env=env, recipients=recipients, sender=sender,
                mode=mode, fullname=fullname, login_fallback=True)
