"""queue.bounce -- bounce messages as RFC 3464 delivery status notifications.

SUMMARY
    `bounce_envelope(config, sender)` says where the bounce of a message
    from `sender` goes: ``("", [sender])`` for a normal message, a double
    bounce from ``#@[]`` to doublebounceto@doublebouncehost when the failed
    message was itself a bounce (sender ""), and None -- discard, a "triple
    bounce" -- when the failed message was a double bounce.

    `build_bounce(config, sender, msgid, arrival, failures, msgpath)` returns
    the whole bounce message as bytes with LF line ends, ready for
    ``Store.draft().write()`` and ``commit(*bounce_envelope(...))``.  It is
    built with the stdlib email package (compat32 policy); nothing here
    writes MIME by hand.  Each permanent failure is one `Failure`: the
    envelope recipient, its RFC 3463 status, qmail's report text and, for
    remote deliveries, the remote MTA and its reply.

STANDARDS
    RFC 3464 (the message/delivery-status format), RFC 3461 section 6 (DSN
    content), RFC 6522 (multipart/report, text/rfc822-headers), RFC 3463
    (enhanced status codes), RFC 3834 (Auto-Submitted: auto-replied),
    RFC 5322 (header syntax, dates, the 998-octet line limit), RFC 6533
    section 3 (the ``utf-8`` address type and ``\\x{HEX}`` escapes for
    non-ASCII), qmail-send(8) and the behaviour reference section 5.5
    (who gets the bounce, the human text, double and triple bounces).

FORMAT
    Header, in this order::

        Date: <now, RFC 5322, local time>
        From: <bouncefrom>@<bouncehost>
        To: <the original sender, or doublebounceto@doublebouncehost>
        Subject: failure notice
        Message-ID: <...@idhost>
        Auto-Submitted: auto-replied
        MIME-Version: 1.0
        Content-Type: multipart/report; report-type="delivery-status"

    Part 1, text/plain: qmail's text with "qmail-send" replaced by
    "eqmail"::

        Hi. This is the eqmail program at <bouncehost>.
        I'm afraid I wasn't able to deliver your message to the following addresses.
        This is a permanent error; I've given up. Sorry it didn't work out.

        <joe@example.org>:
        <report text>

    one ``<recipient>:`` block per failed recipient.  A double bounce has
    qmail's "I tried to deliver a bounce message to this address, but the
    bounce bounced!" instead of the second and third lines.

    Part 2, message/delivery-status: the per-message fields
    ``Reporting-MTA: dns; <me>``, ``Arrival-Date:`` (when the message was
    queued) and ``X-Eqmail-Queue-ID: <queue id>``, then one block per
    recipient: ``Final-Recipient: rfc822; <recipient>``, ``Action: failed``,
    ``Status: <status>``, ``Remote-MTA: dns; <host>`` (remote failures
    only) and ``Diagnostic-Code:`` -- the far end's reply as given (e.g.
    ``smtp; 550 5.1.1 no such user``), else ``x-eqmail; <report text>``.

    Part 3, text/rfc822-headers: the header of the failed message (its
    queue file up to the first empty line, the queue's Received line
    included), at most HEADER_LIMIT octets, cut at a line end.  The body is
    never returned.

    Parts are 7bit when they are ASCII with short lines, else
    quoted-printable (UTF-8 for text that is not ASCII), so the bounce
    passes any SMTP server, 8BITMIME or not.

SECURITY
    Failure texts, recipients, the sender and the original header come from
    the network.  No CR or LF from them reaches a header field: in fields
    line breaks become spaces (Diagnostic-Code) or ``_`` (addresses, as
    qmail does with LF), other control characters become ``_`` or ``?``.
    In the text part CR LF and lone CR become LF, an empty line inside a
    report becomes ``/`` (qmail), so a report cannot fake the next
    recipient's block.  CR and NUL are dropped from the copied header.
    Field values are bounded (MAX_FIELD), so no line nears RFC 5322's 998.
    Undecodable text never raises: lone surrogates become ``?``, 8-bit
    header octets that are not UTF-8 become U+FFFD.

DIFFERENCES FROM QMAIL-SEND
    qmail-send appends the whole message (or, for a double bounce, the
    whole original bounce) after ``--- Below this line is a copy of the
    message.``; eqmail returns its header only, as RFC 3461 section 6.2
    suggests, so bounces stay small and a bounce never carries a body back.
    Recipients that appear twice in `failures` are listed once (the first
    wins; the domain compares without case).  The Date field carries the
    day of the week (email.utils.formatdate).

LIMITS
    HEADER_LIMIT   65536 octets of the original header (cut at a line end)
    MAX_FIELD      900 characters per delivery-status field value; longer
                   values are cut and end in ``...``

BUGS
    A non-ASCII envelope sender is written to the To field as an RFC 2047
    encoded word, which mail readers show but which is not an address.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from email import charset as _charset
from email.generator import BytesGenerator
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import formatdate, make_msgid
from typing import List, Optional, Sequence, Tuple

__all__ = ["Failure", "DOUBLE_BOUNCE_SENDER", "HEADER_LIMIT", "MAX_FIELD",
           "bounce_envelope", "build_bounce"]

#: The envelope sender of a double bounce; a failure of a message from it
#: is a triple bounce and is discarded (qmail-send(8)).
DOUBLE_BOUNCE_SENDER = "#@[]"

#: Octets of the failed message's header returned in part 3.
HEADER_LIMIT = 65536

#: Characters per delivery-status field value (RFC 5322 section 2.1.1
#: allows 998 octets per line; the field name and folding need the rest).
MAX_FIELD = 900

#: RFC 5322 section 2.1.1: longest line, CRLF excluded.
_MAX_LINE = 998

#: Generation policy: qmail's queue stores LF line ends.
_POLICY = compat32.clone(linesep="\n")

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
_ACTIONS = ("failed", "delayed", "delivered", "relayed")
_ORCPT = re.compile(r"[A-Za-z0-9-]{1,40};[\x21-\x7e]{1,500}\Z")

#: Octets of a failed message returned whole under RET=FULL (Postfix's
#: bounce_size_limit); a bigger one gets its header only.
RETURN_LIMIT = 100000
_DIAG_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*;")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINEBREAKS = re.compile(r"[ \t]*(?:\r\n|\r|\n)+[ \t]*")


@dataclass(frozen=True)
class Failure:
    """One recipient that failed permanently."""

    recipient: str                     # the failed envelope recipient
    status: str                        # RFC 3463 enhanced status, e.g. "5.1.1"
    text: str                          # qmail-style report; may hold LF
    remote_mta: Optional[str] = None   # remote host name/IP for remote failures
    diagnostic: Optional[str] = None   # e.g. "smtp; 550 5.1.1 no such user"
    #: RFC 3464 Action: failed, delayed, delivered or relayed (DSN, RFC 3461)
    action: str = "failed"
    orcpt: Optional[str] = None        # the ORCPT parameter, "rfc822;a@b" (xtext)


def bounce_envelope(config, sender: str) -> Optional[Tuple[str, List[str]]]:
    """(envelope sender, recipients) of the bounce for a message from `sender`.

    A normal sender gives ``("", [sender])``.  "" (a bounce failed) gives a
    double bounce: ``(DOUBLE_BOUNCE_SENDER, ["<doublebounceto>@<doublebouncehost>"])``.
    DOUBLE_BOUNCE_SENDER gives None: discard it, log "triple bounce".  As in
    qmail-send, an empty doublebounceto also discards double bounces (None).
    """
    if sender == DOUBLE_BOUNCE_SENDER:
        return None
    if sender == "":
        if not config.doublebounceto:
            return None
        return DOUBLE_BOUNCE_SENDER, ["%s@%s" % (config.doublebounceto,
                                                 config.doublebouncehost)]
    return "", [sender]


def build_bounce(config, sender: str, msgid: str, arrival: float,
                 failures: Sequence[Failure], msgpath: str,
                 now: Optional[float] = None, ret: Optional[str] = None,
                 envid: Optional[str] = None,
                 retry_until: Optional[float] = None) -> bytes:
    """The whole bounce message (see FORMAT), LF line ends, ready to commit.

    `sender` is the failed message's envelope sender, `msgid` its queue id,
    `arrival` when it was queued (Unix seconds), `msgpath` its queue file
    (only the header is read), `now` the bounce's date (default: now).

    DSN (RFC 3461): each `Failure` has its Action (failed, delayed,
    delivered, relayed; the Subject says which kind of notice it is) and
    its ORCPT (Original-Recipient); `envid` is the ENVID
    (Original-Envelope-Id); `ret` "FULL" returns the whole message of a
    failure (message/rfc822, when it is at most RETURN_LIMIT octets, else
    the header as without it); `retry_until` (Unix seconds) gives delayed
    recipients their Will-Retry-Until.

    Raises ValueError when there is nothing to bounce (no failures) or the
    bounce must be discarded (`bounce_envelope()` returns None: a triple
    bounce); OSError when `msgpath` cannot be read.  Reads a file: call it
    off the gevent hub when the disk may be slow.
    """
    if not failures:
        raise ValueError("build_bounce: no failures to report")
    envelope = bounce_envelope(config, sender)
    if envelope is None:
        raise ValueError("build_bounce: sender %r: the bounce is discarded" % sender)
    to = envelope[1][0]
    unique = _unique(failures)

    msg = MIMEMultipart("report", report_type="delivery-status", policy=_POLICY)
    content_type = msg["Content-Type"]
    del msg["Content-Type"]
    del msg["MIME-Version"]
    msg["Date"] = formatdate(now, localtime=True)
    msg["From"] = "%s@%s" % (config.bouncefrom, config.bouncehost)
    msg["To"] = _quote(_address(to))
    actions = {f.action for f in unique}
    msg["Subject"] = ("failure notice" if "failed" in actions else
                      "delay notice" if "delayed" in actions else "success notice")
    msg["Message-ID"] = make_msgid(domain=config.idhost)
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = content_type
    msg.preamble = "This is a delivery status notification (RFC 3464) in MIME format."

    msg.attach(_text_part(_human_text(config, sender, unique, retry_until), "plain"))
    msg.attach(_status_part(config, msgid, arrival, unique, envid, retry_until))
    whole = _read_whole(msgpath) if ret == "FULL" and "failed" in actions else None
    if whole is not None:
        returned = Message(policy=_POLICY)
        returned["Content-Type"] = "message/rfc822"
        returned.set_payload([_parsed(whole)])
        msg.attach(returned)
    else:
        msg.attach(_text_part(_read_header(msgpath), "rfc822-headers"))

    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
    return out.getvalue()


# -- the parts ------------------------------------------------------------------------

#: What the text part says before the recipients of each Action.
_SAYS = {
    "delayed": ["Your message has not been delivered yet to the following addresses.",
                "This is a temporary problem; I'll keep trying until %s.",
                "You do not need to send it again."],
    "delivered": ["Your message was delivered to the following addresses."],
    "relayed": ["Your message was passed on to the following addresses' mail servers,",
                "which do not tell whether it reached them."],
}


def _human_text(config, sender: str, failures: Sequence[Failure],
                retry_until: Optional[float] = None) -> str:
    lines = ["Hi. This is the eqmail program at %s." % config.bouncehost]
    failed = [f for f in failures if f.action == "failed"]
    if failed and sender == "":
        lines.append("I tried to deliver a bounce message to this address, "
                     "but the bounce bounced!")
    elif failed:
        lines.append("I'm afraid I wasn't able to deliver your message to the "
                     "following addresses.")
        lines.append("This is a permanent error; I've given up. Sorry it didn't "
                     "work out.")
    lines.append("")
    lines += _blocks(failed)
    for action in ("delayed", "delivered", "relayed"):
        group = [f for f in failures if f.action == action]
        if not group:
            continue
        until = formatdate(retry_until, localtime=True) if retry_until else "it expires"
        lines += [line.replace("%s", until) for line in _SAYS[action]] + [""]
        lines += _blocks(group)
    return "\n".join(lines) + "\n"


def _blocks(failures: Sequence[Failure]) -> List[str]:
    """One ``<recipient>:`` block each, with its report."""
    lines: List[str] = []
    for f in failures:
        lines.append("<%s>:" % _address(f.recipient))
        report = _clean(f.text).replace("\r\n", "\n").replace("\r", "\n").strip("\n")
        if report:
            lines.extend(_CONTROL.sub("?", line.replace("\t", " ")) or "/"
                         for line in report.split("\n"))
        lines.append("")
    return lines


def _status_part(config, msgid: str, arrival: float, failures: Sequence[Failure],
                 envid: Optional[str] = None,
                 retry_until: Optional[float] = None) -> Message:
    per_message = Message(policy=_POLICY)
    if envid:
        per_message["Original-Envelope-Id"] = _field(envid)
    per_message["Reporting-MTA"] = "dns; " + _field(config.me)
    per_message["Arrival-Date"] = formatdate(arrival, localtime=True)
    per_message["X-Eqmail-Queue-ID"] = _field(msgid)
    blocks = [per_message]
    for f in failures:
        block = Message(policy=_POLICY)
        if f.orcpt and _ORCPT.match(f.orcpt):
            block["Original-Recipient"] = _field(f.orcpt.replace(";", "; ", 1))
        block["Final-Recipient"] = _final_recipient(f.recipient)
        block["Action"] = f.action if f.action in _ACTIONS else "failed"
        default = {"failed": "5.0.0", "delayed": "4.0.0"}.get(block["Action"], "2.0.0")
        block["Status"] = f.status if _STATUS.match(f.status or "") else default
        if block["Action"] == "delayed" and retry_until:
            block["Will-Retry-Until"] = formatdate(retry_until, localtime=True)
        if f.remote_mta:
            block["Remote-MTA"] = _bound("dns; " + _field(f.remote_mta))
        diagnostic = _field(f.diagnostic or "")
        if not diagnostic:
            diagnostic = "x-eqmail; " + (_field(f.text) or "delivery failed")
        elif not _DIAG_TYPE.match(diagnostic):
            diagnostic = "x-eqmail; " + diagnostic
        block["Diagnostic-Code"] = _bound(diagnostic)
        blocks.append(block)
    part = Message(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _text_part(text: str, subtype: str) -> MIMEText:
    """A text/<subtype> part: 7bit when it can be, else quoted-printable."""
    name = "us-ascii" if text.isascii() else "utf-8"
    cs = _charset.Charset(name)
    if name != "us-ascii" or any(len(line) > _MAX_LINE for line in text.split("\n")):
        cs.body_encoding = _charset.QP
    part = MIMEText(text, subtype, cs, policy=_POLICY)
    del part["MIME-Version"]
    return part


def _read_whole(path: str) -> Optional[bytes]:
    """The data of the queue file `path` when it is at most RETURN_LIMIT
    octets (CR and NUL dropped), else None."""
    from .store import open_message

    with open_message(path) as f:
        data = f.read(RETURN_LIMIT + 1)
    if len(data) > RETURN_LIMIT:
        return None
    return data.replace(b"\r", b"").replace(b"\0", b"")


def _parsed(data: bytes) -> Message:
    """The returned message as an email Message (compat32, kept as given)."""
    from email import message_from_bytes

    return message_from_bytes(data, policy=_POLICY)


def _read_header(path: str) -> str:
    """The header of the queue file `path`: up to the first empty line, at
    most HEADER_LIMIT octets, cut after the last whole line; CR and NUL
    dropped."""
    from .store import open_message

    with open_message(path) as f:
        data = f.read(HEADER_LIMIT + 1)
    at_eof = len(data) <= HEADER_LIMIT
    end = 0
    while True:
        nl = data.find(b"\n", end)
        if nl < 0:
            # A last line without LF, when the file ends inside the bound.
            if at_eof and data[end:].strip(b"\r") and len(data) + 1 <= HEADER_LIMIT:
                data = data + b"\n"
                end = len(data)
            break
        if data[end:nl + 1] in (b"\n", b"\r\n") or nl + 1 > HEADER_LIMIT:
            break
        end = nl + 1
    header = data[:end].replace(b"\r", b"").replace(b"\0", b"")
    return header.decode("utf-8", "replace")


# -- cleaning untrusted values --------------------------------------------------------

def _unique(failures: Sequence[Failure]) -> List[Failure]:
    """`failures` without repeated recipients; the first one wins."""
    seen = set()
    out = []
    for f in failures:
        local, at, domain = f.recipient.rpartition("@")
        key = (local, domain.lower()) if at else (f.recipient, "")
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _clean(text: Optional[str]) -> str:
    """`text` as a string that encodes to UTF-8 (lone surrogates become ``?``)."""
    if text is None:
        return ""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def _address(addr: str) -> str:
    """An envelope address with no control character (qmail: LF -> ``_``)."""
    return _CONTROL.sub("_", _clean(addr))


def _field(text: Optional[str]) -> str:
    """One-line field value: line breaks become one space, other control
    characters ``?``, non-ASCII ``\\x{HEX}`` (RFC 6533), bounded."""
    value = _LINEBREAKS.sub(" ", _clean(text)).replace("\t", " ")
    value = _CONTROL.sub("?", value).strip()
    value = "".join(ch if ch < "\x80" else "\\x{%02X}" % ord(ch) for ch in value)
    return _bound(value)


def _bound(value: str) -> str:
    if len(value) > MAX_FIELD:
        return value[:MAX_FIELD - 3] + "..."
    return value


def _final_recipient(recipient: str) -> str:
    """``rfc822; addr`` for ASCII, else RFC 6533's ``utf-8; utf-8-addr-xtext``."""
    addr = _address(recipient)
    if addr.isascii():
        return _bound("rfc822; " + addr)
    return _bound("utf-8; " + "".join(
        ch if "\x21" <= ch <= "\x7e" and ch not in "+=\\" else "\\x{%02X}" % ord(ch)
        for ch in addr))


def _quote(addr: str) -> str:
    """`addr` for a To field: the local part quoted unless it is a dot-atom
    (qmail's quote2()); UTF-8 stays unquoted (RFC 6532)."""
    from ..address import quote_address

    return quote_address(addr, utf8=True)
