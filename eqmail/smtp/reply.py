"""smtp.reply -- SMTP replies, named once.

SUMMARY
    `Reply(code, status, text, close)` is one SMTP reply.  Fixed replies are
    constants here, with qmail-smtpd's wording, so the session and the tests
    compare against the same object.

STANDARDS
    RFC 5321 section 4.2 (reply codes), RFC 3463 (enhanced status codes),
    RFC 2034 (ENHANCEDSTATUSCODES), qmail-smtpd(8) for the texts.

RENDERING
    qmail writes the enhanced status at the end, ``(#5.7.1)``.  eqmail keeps
    qmail's text and, because it advertises ENHANCEDSTATUSCODES, also puts
    the status in front of the text for clients that said EHLO (RFC 2034
    section 3), e.g. ``553 5.7.1 sorry, ... (#5.7.1)``.  Clients that said
    HELO get qmail's exact lines.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; `lines` > 1 renders as a multi-line reply."""

    code: int
    status: Optional[str]
    lines: Tuple[str, ...]
    close: bool = False
    cont: bool = False   # a lone continuation line (``250-...``) from a plugin

    @classmethod
    def of(cls, code: int, status: Optional[str], text: str, close: bool = False) -> "Reply":
        return cls(code, status, (text,), close)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def closing(self) -> "Reply":
        """The same reply, then hang up."""
        return replace(self, close=True)

    def render(self, enhanced: bool = False) -> bytes:
        """The reply as bytes on the wire, CRLF-terminated lines."""
        out = []
        last = len(self.lines) - 1
        for i, text in enumerate(self.lines):
            sep = " " if i == last and not self.cont else "-"
            if enhanced and self.status and self.code >= 200 and self.code != 220:
                text = "%s %s" % (self.status, text)
            out.append("%d%s%s\r\n" % (self.code, sep, text))
        return "".join(out).encode("utf-8", "replace")


def R(code: int, status: Optional[str], text: str, close: bool = False) -> Reply:
    return Reply.of(code, status, text, close)


# 2xx
OK_MAIL = R(250, "2.1.0", "ok")
OK_RCPT = R(250, "2.1.5", "ok")
NOOP = R(250, "2.0.0", "ok")
RSET = R(250, "2.0.0", "flushed")
VRFY = R(252, "2.1.5", "send some mail, i'll try my best")
HELP = R(214, "2.0.0", "eqmail: see RFC 5321; commands HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
# 3xx
GO_AHEAD = R(354, None, "go ahead")
# 4xx
TIMEOUT = R(451, "4.4.2", "timeout (#4.4.2)", close=True)
def bdat_chunk(size: int) -> Reply:
    """A chunk that is not the last one, taken (RFC 3030 section 2)."""
    return R(250, "2.0.0", "%d octets received" % size)


def rbl(text: str, permanent: bool, at_mail: bool) -> Reply:
    """A DNS blocklist's refusal (rblsmtpd's RBLSMTPD text): at the
    connection 554 or 421 and hang up, at MAIL 553 or 451."""
    if at_mail:
        return R(553, "5.7.1", text) if permanent else R(451, "4.7.1", text)
    return R(554, None, text, close=True) if permanent else R(421, None, text, close=True)


def spf(result: str, explanation: str) -> Reply:
    """A refusal for an SPF result (RFC 7208 section 8; RFC 7372's 5.7.23)."""
    if result == "temperror":
        return R(451, "4.4.3", "SPF: temporary error evaluating the sender's domain, "
                 "try again later (#4.4.3)")
    return R(550, "5.7.23", "SPF %s: %s (#5.7.1)" % (result, explanation or "not permitted"))


def greylisted(seconds: int) -> Reply:
    """Greylisting's try-again (RFC 6647 section 2.1)."""
    return R(451, "4.7.1", "greylisted, please try again in %d seconds (#4.7.1)" % seconds)


def dmarc_reject(domain: str) -> Reply:
    """A message refused under its From domain's DMARC policy (RFC 7489 6.7)."""
    return R(550, "5.7.1", "the DMARC policy of %s says reject, and this message "
             "failed (#5.7.1)" % domain)


EARLY_TALKER = R(554, None, "SMTP protocol violation: talked before the greeting (#5.5.0)",
                 close=True)
UNAUTH_PIPELINING = R(554, "5.5.0", "SMTP protocol violation: pipelining without "
                      "PIPELINING (#5.5.0)", close=True)
BARE_LF = R(451, "4.6.0", "See http://pobox.com/~djb/docs/smtplf.html.", close=True)
QQT_FAILURE = R(451, "4.3.0", "qqt failure (#4.3.0)")
TOO_MANY_RCPT = R(452, "4.5.3", "too many recipients (#4.5.3)")
SHUTDOWN = R(421, "4.3.2", "service shutting down, try again later (#4.3.2)", close=True)
TOO_MANY_ERRORS = R(421, "4.7.0", "too many errors, closing (#4.7.0)", close=True)
INTERNAL = R(451, "4.3.0", "internal error, try again later (#4.3.0)", close=True)
CONTROLS = R(421, "4.3.0", "unable to read controls (#4.3.0)", close=True)
# 5xx
UNRECOGNISED = R(500, "5.5.2", "unrecognised (#5.5.2)")
LINE_TOO_LONG = R(500, "5.5.2", "line too long (#5.5.2)")
MAIL_FIRST = R(503, "5.5.1", "MAIL first (#5.5.1)")
RCPT_FIRST = R(503, "5.5.1", "RCPT first (#5.5.1)")
SYNTAX = R(555, "5.5.4", "syntax error (#5.5.4)")
PARAM_SYNTAX = R(501, "5.5.4", "syntax error in parameters (#5.5.4)")
BAD_UTF8_SENDER = R(553, "5.6.7", "sorry, the sender address is not valid UTF-8 (#5.6.7)")
BAD_UTF8_RCPT = R(553, "5.6.7", "sorry, the recipient address is not valid UTF-8 (#5.6.7)")
BDAT_SYNTAX = R(501, "5.5.4", "syntax error in BDAT: the chunk's size is unknown, "
                "closing (#5.5.4)", close=True)
BDAT_FAILED = R(503, "5.5.1", "this message has failed already: RSET and send it again "
                "(#5.5.1)")
DATA_IN_BDAT = R(503, "5.5.1", "BDAT already began this message: no DATA (#5.5.1)")
BADMAILFROM = R(553, "5.7.1", "sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
NOGATEWAY = R(553, "5.7.1", "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
TOO_BIG = R(552, "5.3.4", "sorry, that message size exceeds my databytes limit (#5.3.4)")
LOOPING = R(554, "5.4.6", "too many hops, this message is looping (#5.4.6)")


# AUTH (qmail-smtpd-auth's texts; RFC 4954 codes)
AUTH_NOT_AVAILABLE = R(503, "5.3.3", "auth not available (#5.3.3)")
AUTH_ALREADY = R(503, "5.5.1", "you're already authenticated (#5.5.0)")
AUTH_IN_MAIL = R(503, "5.5.1", "no auth during mail transaction (#5.5.0)")
AUTH_TLS_REQUIRED = R(538, "5.7.11", "AUTH PLAIN/LOGIN not available without TLS (#5.3.3)")
AUTH_UNIMPLEMENTED = R(504, "5.5.4", "auth type unimplemented (#5.5.1)")
AUTH_CANCELED = R(501, "5.0.0", "auth exchange canceled (#5.0.0)")
AUTH_MALFORMED = R(501, "5.5.2", "malformed auth input (#5.5.4)")
AUTH_FAILED = R(535, "5.7.8", "authentication failed (#5.7.1)")
AUTH_CHILD = R(454, "4.3.0", "oops, problem with child and I can't auth (#4.3.0)")
AUTH_REQUIRED = R(530, "5.7.0", "Authorization required (#5.7.1)")
AUTH_TOO_MANY = R(421, "4.7.0", "too many failed authentications, closing (#4.7.0)",
                  close=True)
# STARTTLS (eQmail's TLS patch; RFC 3207)
TLS_READY = R(220, "2.0.0", "ready for tls")
TLS_PARAMS = R(501, "5.5.4", "Syntax error (no parameters allowed) (#5.5.4)")
TLS_AGAIN = R(502, "5.5.1", "unimplemented (#5.5.1)")
TLS_UNAVAILABLE = R(454, "4.7.0", "TLS not available (#4.3.0)")
# per-client rules and limits
DENIED = R(554, None, "sorry, your address is not allowed to use this service (#5.7.1)",
           close=True)
TOO_MANY_CONNECTIONS = R(421, None, "too many connections, try again later (#4.7.0)",
                         close=True)
SPP_UNREADABLE = R(451, None, "qmail-spp failure: unable to read control/smtpplugins "
                   "(#4.3.0)", close=True)


def auth_ok(user: str) -> Reply:
    """``235 ok, <user>, go ahead (#2.0.0)``."""
    return R(235, "2.7.0", "ok, %s, go ahead (#2.0.0)" % user)


def challenge(text: str) -> Reply:
    """An AUTH continuation, ``334 <base64>``."""
    return R(334, None, text)


def raw(text: str, close: bool = False) -> Reply:
    """A reply a plugin wrote (``554 go away``), sent as written.  A line
    that does not start with a reply code gets ``451 ``."""
    text = text.replace("\r", "").replace("\n", "")[:1000]
    if len(text) >= 3 and text[:3].isdigit() and text[0] in "2345" and text[3:4] in ("", " ", "-"):
        code, sep, rest = text[:3], text[3:4], text[4:]
        if sep == "-":  # a plugin's continuation line: keep it as one line
            return Reply(int(code), None, (rest,), close, cont=True)
        return Reply(int(code), None, (rest,), close)
    return Reply(451, None, (text,), close)


def greeting(text: str) -> Reply:
    """``220 <smtpgreeting> ESMTP``."""
    return R(220, None, "%s ESMTP" % text)


def helo(text: str) -> Reply:
    """HELO's ``250 <smtpgreeting>``."""
    return R(250, None, text)


def ehlo(text: str, extensions) -> Reply:
    """EHLO's multi-line reply: the greeting line, then one extension a line."""
    return Reply(250, None, (text,) + tuple(extensions))


def quit(text: str) -> Reply:
    return R(221, "2.0.0", text, close=True)


def accepted(when: int, msgid: str) -> Reply:
    """qmail-smtpd's ``250 ok <unix time> qp <id>``; eqmail gives the queue ID."""
    return R(250, "2.0.0", "ok %d qp %s" % (when, msgid))


def queue_failure(text: str, permanent: bool = False) -> Reply:
    """A queue failure with qmail-queue's text (``qq ... (#4.3.0)``):
    451, or 554 when `permanent` (qmail-smtpd's answer to a ``D`` text of
    qmail_close); the status is the one the text ends with."""
    import re

    m = re.search(r"\(#([245]\.\d{1,3}\.\d{1,3})\)$", text)
    status = m.group(1) if m else ("5.3.0" if permanent else "4.3.0")
    return R(554 if permanent else 451, status, text)
