"""smtp.authcheck -- DKIM, DMARC and ARC on received mail, and Authentication-Results.

SUMMARY
    `evaluate(config, data, ip, mail_from, helo, spf_result)` verifies every
    DKIM signature of the message (RFC 6376, dkimpy), the ARC chain
    (RFC 8617, where authheaders gives it) and DMARC (RFC 7489: the From
    domain's policy, found at the organizational domain with the Public
    Suffix List, and the alignment of SPF and of each passing DKIM
    signature; authheaders and publicsuffix2), and returns an `Outcome`:
    the ``Authentication-Results:`` field (RFC 8601) with this host's name
    (control/me) as authserv-id, and the DMARC result and policy.

CONTROL FILES (and variables in smtprules)
    authcheck       0; 1: check, and add Authentication-Results at the top
                    of each message (AUTHCHECK)
    dmarcreject     0; 1: refuse (550 at the end of DATA) a message whose
                    DMARC result is fail under a policy of reject; a
                    quarantine policy is recorded in Authentication-Results
                    (policy.dmarc=quarantine) for the mailbox's filters
    authmaxsize     2097152 bytes: a bigger message is not checked (the
                    signature check holds the message in memory) and gets
                    no Authentication-Results
    Authentication-Results fields that claim this authserv-id and come
    from outside are removed while the message is received (RFC 8601
    section 5).  Authenticated and RELAYCLIENT sessions are not checked.

DNS
    dkimpy and authheaders ask dnspython's default resolver, which eqmail
    makes its own.  Everything here blocks: the session calls it through
    the threadpool.  The libraries are imported with the first check.

STANDARDS
    RFC 6376, RFC 7489, RFC 8601, RFC 8617.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

DEFAULT_MAX_SIZE = 2 * 1024 * 1024
_SIG = re.compile(rb"^dkim-signature:", re.I | re.M)


@dataclass(frozen=True)
class Outcome:
    header: str                 # the whole field, "Authentication-Results: ..."
    dmarc: str                  # pass, fail, none, temperror, permerror
    policy: str                 # none, quarantine, reject
    from_domain: str


class Unavailable(Exception):
    """dkimpy or authheaders is not installed."""


def _libs():
    from ..delivery.remote import resolver

    r = resolver()
    import dns.resolver

    dns.resolver.default_resolver = r
    try:
        import authheaders
        import dkim
    except ImportError as e:
        raise Unavailable("authentication checks need dkimpy and authheaders (Debian: "
                          "python3-dkim, python3-authheaders): %s" % e)
    _org_domain_once(authheaders)
    return dkim, authheaders


_org = {"psl": None, "cache": {}}
#: Organizational domains remembered at most (a dict, emptied when full).
ORG_CACHE = 4096


def _org_domain_once(authheaders) -> None:
    """authheaders 0.15 parses the whole Public Suffix List again for every
    message (about 30 ms of CPU and several MB in flight): give its
    dmarc_lookup one parsed list, built once from the file it would read,
    and remember the answers.  The result is the one authheaders computes."""
    lookup = getattr(authheaders, "dmarc_lookup", None)
    if lookup is None or getattr(lookup.get_org_domain, "_eqmail", False):
        return
    original = lookup.get_org_domain

    def get_org_domain(domain):
        hit = _org["cache"].get(domain)
        if hit is not None:
            return hit
        psl = _org["psl"]
        if psl is None:
            try:
                try:
                    from authheaders.findpsl import location  # Debian: the system's list
                    with open(location) as f:
                        psl = lookup.PublicSuffixList(f)
                except ImportError:  # the list authheaders carries
                    import importlib.resources

                    ref = importlib.resources.files("authheaders") / "public_suffix_list.txt"
                    with importlib.resources.as_file(ref) as path, open(path) as f:
                        psl = lookup.PublicSuffixList(f)
            except Exception:
                return original(domain)
            _org["psl"] = psl
        value = psl.get_public_suffix(domain)
        if len(_org["cache"]) >= ORG_CACHE:
            _org["cache"].clear()
        _org["cache"][domain] = value
        return value

    get_org_domain._eqmail = True
    lookup.get_org_domain = get_org_domain


def _dkim_results(dkim, authheaders, data: bytes) -> List:
    """One DKIMAuthenticationResult for every signature (a single ``none``
    without any)."""
    count = len(_SIG.findall(data.split(b"\n\n", 1)[0]))
    out = []
    for idx in range(count):
        d = dkim.DKIM(data)
        try:
            result = "pass" if d.verify(idx=idx) else "fail"
        except dkim.DKIMException as e:
            result = "temperror" if "dns" in str(e).lower() else "fail"
        except Exception:  # a signature dkimpy cannot even read
            result = "permerror"
        fields = getattr(d, "signature_fields", None) or {}
        out.append(authheaders.DKIMAuthenticationResult(
            result=result,
            header_d=fields.get(b"d", b"").decode("ascii", "replace") or None,
            header_i=fields.get(b"i", b"").decode("ascii", "replace") or None,
            header_s=fields.get(b"s", b"").decode("ascii", "replace") or None,
            header_a=fields.get(b"a", b"").decode("ascii", "replace") or None))
    if not out:
        out.append(authheaders.DKIMAuthenticationResult(result="none"))
    return out


def evaluate(config, data: bytes, ip: str, mail_from: str, helo: Optional[str],
             spf_result: Optional[str]) -> Outcome:
    """Check the message `data` (LF line ends) from `ip`.  `spf_result`: the
    session's SPF verdict (None: not looked up, then it is done here when
    pyspf is there).  Blocking.  Raises Unavailable."""
    dkim, authheaders = _libs()
    helo = helo or "unknown"
    if spf_result is None:
        try:
            from .spfcheck import Unavailable as NoSpf, check

            spf_result = check(config, ip, mail_from, helo).result
        except NoSpf:
            spf_result = None
    results = []
    spf = None
    if spf_result is not None:
        spf = authheaders.SPFAuthenticationResult(
            result=spf_result, smtp_mailfrom=mail_from or None,
            smtp_helo=None if mail_from else helo)
        results.append(spf)
    dkims = _dkim_results(dkim, authheaders, data)
    results += dkims
    try:
        arc = authheaders.check_arc(data, None)
        if arc is not None and getattr(arc, "result", "none") != "none":
            results.append(arc)
    except Exception:
        pass  # no chain, or one authheaders cannot read: not reported
    dmarc = None
    passing = [d for d in dkims if d.result == "pass"] or dkims[:1]
    for candidate in passing:  # any aligned passing signature will do
        try:
            got = authheaders.check_dmarc(data, spf, candidate)
        except Exception:
            continue
        if dmarc is None or (got.result == "pass" and dmarc.result != "pass"):
            dmarc = got
    if dmarc is not None:
        results.append(dmarc)
    header = str(authheaders.AuthenticationResultsHeader(authserv_id=config.me,
                                                         results=results))
    header = " ".join(header.split())
    if not header.lower().startswith("authentication-results:"):
        header = "Authentication-Results: " + header
    return Outcome(header=header,
                   dmarc=getattr(dmarc, "result", None) or "none",
                   policy=(getattr(dmarc, "policy", None) or "none").lower(),
                   from_domain=getattr(dmarc, "header_from", None) or "")


def authserv_id(field: bytes) -> bytes:
    """The authserv-id of an ``Authentication-Results:`` line (lower case)."""
    value = field.split(b":", 1)[1] if b":" in field else b""
    value = re.sub(rb"\([^)]*\)", b" ", value)  # comments
    first = value.split(b";", 1)[0].strip().split()
    return first[0].lower() if first else b""
