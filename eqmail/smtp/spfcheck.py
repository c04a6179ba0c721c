"""smtp.spfcheck -- SPF (RFC 7208) for HELO and MAIL FROM, with qmail-spf's policy levels.

SUMMARY
    `check(config, ip, sender, helo)` evaluates SPF with pyspf (Debian's
    python3-spf) and returns a `Verdict`: the result (pass, fail, softfail,
    neutral, none, temperror, permerror), its explanation and the
    ``Received-SPF:`` field.  The null sender is checked as
    ``postmaster@HELO`` (RFC 7208 section 2.4).  `check_helo(config, ip,
    helo)` checks the HELO identity on its own (section 2.3), when the
    name is a domain that can have a record.  pyspf enforces the limits
    of section 4.6.4 (10 look-ups with DNS, 2 void look-ups; more is a
    permerror) and a 20 s limit for the whole evaluation.

POLICY (control/spfbehavior, SPFBEHAVIOR in smtprules; qmail-spf's levels)
    0  no SPF (the default)
    1  look up and mark: ``Received-SPF:`` in the message, SPFRESULT for
       plugins; never refuse
    2  and answer temperror with 451 (try again)
    3  and refuse fail (550)
    4  and refuse softfail
    5  and refuse neutral
    6  and refuse everything but pass (none and permerror too)
    Authenticated and RELAYCLIENT sessions are never checked.  The HELO
    identity is checked first, once per HELO name; its fail is refused at
    level 3 and up whatever MAIL FROM says (as policyd-spf's HELO_reject),
    its other results are only reported (SPFHELORESULT).

DNS
    pyspf asks dnspython's default resolver; eqmail makes that its own
    (the system's resolv.conf, or EQMAIL_RESOLV_CONF).  `check` blocks: the
    session calls it through the threadpool.  pyspf is imported with the
    first check.

STANDARDS
    RFC 7208; qmail-spf's control/spfbehavior.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

#: Seconds one SPF evaluation may take in all (RFC 7208 section 4.6.4).
QUERY_TIME = 20


@dataclass(frozen=True)
class Verdict:
    result: str          # pass, fail, softfail, neutral, none, temperror, permerror
    explanation: str
    header: str          # the Received-SPF field, without the name


class Unavailable(Exception):
    """pyspf is not installed."""


def _spf():
    from ..delivery.remote import resolver

    r = resolver()  # also keeps dnspython's feature probe away
    import dns.resolver

    dns.resolver.default_resolver = r
    import warnings

    # pyspf 2.0 calls dnspython's deprecated query(): not the admin's concern
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="spf")
    try:
        import spf
    except ImportError as e:
        raise Unavailable("SPF needs pyspf (Debian: python3-spf): %s" % e)
    return spf


#: A HELO name worth an SPF look-up: a domain of two labels or more, no
#: address literal (RFC 7208 section 2.3: "a valid domain name").
_DOMAIN = re.compile(r"(?i)^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+"
                     r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?\.?$")


def helo_checkable(helo: Optional[str]) -> bool:
    """Whether `helo` is a domain name that can have an SPF record."""
    return bool(helo) and _DOMAIN.match(helo) is not None


def check_helo(config, ip: str, helo: Optional[str]) -> Optional[Verdict]:
    """SPF for the HELO identity (RFC 7208 section 2.3) of the client `ip`;
    None when `helo` is not a domain name (an address literal, one word).
    Blocking.  Raises Unavailable."""
    if not helo_checkable(helo):
        return None
    return _evaluate(_spf(), config, ip, "", helo)


def check(config, ip: str, sender: str, helo: Optional[str]) -> Verdict:
    """SPF for the envelope `sender` (``""``: the null sender, checked as
    postmaster@`helo`) from the client `ip`.  Blocking.  Raises Unavailable."""
    helo = helo or "unknown"
    return _evaluate(_spf(), config, ip, sender, helo)


def _evaluate(spf, config, ip: str, sender: str, helo: str) -> Verdict:
    """One pyspf evaluation: the MAIL FROM identity, or with `sender` ``""``
    the HELO one (postmaster@`helo`, ``identity=helo`` in the field)."""
    q = spf.query(i=ip, s=sender, h=helo, receiver=config.me, querytime=QUERY_TIME)
    try:
        result, _code, explanation = q.check()
    except Exception as e:  # pyspf on odd input: a permanent error, never a crash
        result, explanation = "permerror", "SPF evaluation failed: %s" % e
    try:
        header = q.get_header(result, receiver=config.me)
    except Exception:
        header = "%s (%s: %s) client-ip=%s" % (result, config.me, explanation, ip)
    header = " ".join(header.split())[:900]
    return Verdict(result, " ".join(str(explanation).split())[:300], header)


#: The least level at which a result is refused (451 for temperror).
_REFUSE_AT = {"temperror": 2, "fail": 3, "softfail": 4, "neutral": 5, "none": 6,
              "permerror": 6}


def refuses(level: int, result: str) -> bool:
    """Whether spfbehavior `level` refuses `result`."""
    at = _REFUSE_AT.get(result)
    return at is not None and level >= at
