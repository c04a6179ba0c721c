"""smtp.policy -- who may send what to whom (qmail-smtpd's checks).

SUMMARY
    One function per stage, each returning a Reply to refuse or None to go
    on.  The session calls them; AUTH, per-client rules and qmail-spp plug
    in here, never into the protocol parsing.

STANDARDS
    qmail-smtpd(8): rcpthosts, morercpthosts, badmailfrom, databytes,
    RELAYCLIENT, localiphost (behaviour reference sections 2.2-2.5);
    RFC 1870 (SIZE).

POLICY
    * badmailfrom flags the transaction at MAIL; qmail refuses at every RCPT.
    * RELAYCLIENT set (even empty): any recipient, with the RELAYCLIENT value
      appended to the address.
    * Otherwise the recipient's domain must be in rcpthosts or morercpthosts;
      when rcpthosts is missing eqmail uses locals (qmail would relay).
"""
from __future__ import annotations

import ipaddress
from typing import Optional, Tuple

from .. import address
from ..control import Config
from . import reply
from .reply import Reply


def check_size(databytes: int, params: dict) -> Optional[Reply]:
    """MAIL's SIZE=n parameter against the limit (RFC 1870 section 6)."""
    size = params.get("SIZE")
    if databytes and size:
        try:
            if int(size) > databytes:
                return reply.TOO_BIG
        except ValueError:
            return reply.SYNTAX
    return None


def mail_is_bad(config: Config, sender: str) -> bool:
    """The badmailfrom flag for this envelope sender."""
    return address.in_badmailfrom(sender, config.badmailfrom)


def is_local_ip(literal_ip: str, local_ip: Optional[str]) -> bool:
    """Is this literal's IP one of ours?  The connection's local address and
    loopback count (qmail uses its interface list, ipme)."""
    try:
        ip = ipaddress.ip_address(literal_ip)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    if local_ip:
        try:
            return ip == ipaddress.ip_address(local_ip)
        except ValueError:
            return False
    return False


def rewrite_literal(config: Config, rcpt: str, local_ip: Optional[str]) -> str:
    """qmail-smtpd's localiphost: ``box@[ip]`` with one of our IPs becomes
    ``box@<localiphost>`` before the rcpthosts check."""
    local, domain = address.split(rcpt)
    if domain.startswith("["):
        ip = address.ip_literal(domain)
        if ip is not None and is_local_ip(ip, local_ip):
            return "%s@%s" % (local, config.localiphost)
    return rcpt


def check_rcpt(config: Config, rcpt: str, bad_mail: bool,
               relayclient: Optional[str], local_ip: Optional[str] = None
               ) -> Tuple[Optional[Reply], str]:
    """Decide one RCPT (behaviour reference section 2.3).

    Returns (refusal or None, the address as it goes into the envelope).
    """
    if bad_mail:
        return reply.BADMAILFROM, rcpt
    rcpt = rewrite_literal(config, rcpt, local_ip)
    if relayclient is not None:
        return None, rcpt + relayclient
    # the address as delivery will see it: percenthack turns user%host@local
    # into user@host, which must be acceptable too (qmail checks only the
    # first form, and relays)
    check = rcpt
    while True:
        if not address.in_rcpthosts(check, config.rcpthosts, config.morercpthosts):
            return reply.NOGATEWAY, rcpt
        local, domain = address.split(check)
        if address.domain_key(domain) in config.percenthack and "%" in local:
            i = local.rfind("%")
            check = "%s@%s" % (local[:i], local[i + 1:])
            continue
        return None, rcpt


#: NOTIFY's words (RFC 3461 section 4.1); NEVER stands alone.
_NOTIFY = frozenset(["SUCCESS", "FAILURE", "DELAY"])


def _xtext(value: str, limit: int) -> bool:
    """Whether `value` is RFC 3461 xtext of at most `limit` characters:
    printable ASCII but ``+`` and ``=``, and ``+HH`` escapes."""
    if not value or len(value) > limit or not value.isascii():
        return False
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            hexes = value[i + 1:i + 3]
            if len(hexes) != 2 or any(c not in "0123456789ABCDEF" for c in hexes):
                return False
            i += 3
            continue
        if not ("!" <= ch <= "~") or ch == "=":
            return False
        i += 1
    return True


def mail_dsn(params: dict) -> Optional[dict]:
    """MAIL's DSN parameters (RFC 3461 sections 4.3 and 4.4): {"ret":
    "FULL" or "HDRS", "envid": xtext} as given; None when one is malformed
    (the command gets 501)."""
    out = {}
    if "RET" in params:
        ret = (params["RET"] or "").upper()
        if ret not in ("FULL", "HDRS"):
            return None
        out["ret"] = ret
    if "ENVID" in params:
        if not _xtext(params["ENVID"] or "", 100):
            return None
        out["envid"] = params["ENVID"]
    return out


def rcpt_dsn(params: dict) -> Optional[dict]:
    """RCPT's DSN parameters (RFC 3461 sections 4.1 and 4.2): {"notify":
    "NEVER" or some of "SUCCESS,FAILURE,DELAY", "orcpt": "type;xtext"};
    None when one is malformed (the command gets 501)."""
    out = {}
    if "NOTIFY" in params:
        words = (params["NOTIFY"] or "").upper().split(",")
        if words != ["NEVER"] and not (words and set(words) <= _NOTIFY
                                       and len(set(words)) == len(words)):
            return None
        out["notify"] = ",".join(words)
    if "ORCPT" in params:
        kind, sep, value = (params["ORCPT"] or "").partition(";")
        if not sep or not kind or len(kind) > 40 or not all(
                c.isalnum() or c == "-" for c in kind) or not kind.isascii() \
                or not _xtext(value, 500):
            return None
        out["orcpt"] = kind.lower() + ";" + value
    return out
