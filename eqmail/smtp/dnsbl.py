"""smtp.dnsbl -- DNS blocklists in the session, with rblsmtpd's semantics.

SUMMARY
    `verdict(config, ip)` looks the client address up in the zones of
    control/rbls and returns what rblsmtpd would put in RBLSMTPD: "" (not
    listed), ``-TEXT`` (refuse for good) or ``TEXT`` (refuse for now).

CONTROL FILES
    rbls            one zone a line, ``ZONE [WEIGHT]`` (weight 1 by default);
                    ``+ZONE`` is an allow-list: a client listed there is
                    never refused.  A listing is an A record under the
                    reversed address (IPv4 octets, IPv6 nibbles); its TXT
                    record, when there is one, is the text.
    rblthreshold    1: the sum of the weights of the zones that list the
                    client at which it is refused.
    rblwhen         ``connect`` (the default): a listed client is refused
                    instead of the greeting (554, or 421 when temporary) and
                    dropped; ``mail``: at MAIL (553 or 451), so that the log
                    shows the sender, and an authenticated or RELAYCLIENT
                    session is never refused.
    rbltemporary    0; 1: a listing refuses for now (451/421) instead of for
                    good, as rblsmtpd -t... would (try it out first).

ENVIRONMENT
    RBLSMTPD (from control/smtprules, as with tcpserver): set, it replaces
    the look-ups, as in rblsmtpd: empty means not listed (an allow rule),
    ``-TEXT`` a permanent refusal, anything else a temporary one.  The
    verdict reaches qmail-spp plugins as RBLSMTPD too.

DNS
    Through dnspython in the checks' threadpool (threads.run_check; never
    on the hub), every zone at
    once, each answer within TIMEOUT seconds; a zone that does not answer
    in time counts as not listing (a blocklist being down must not stop
    mail).  Answers are kept in a small cache (at most CACHE_SIZE names)
    for their TTL (at most an hour; "not listed" for a minute).
    dnspython is imported with the first look-up: an eqmaild without
    control/rbls keeps today's memory.

STANDARDS
    RFC 5782 (DNS blacklists and whitelists); rblsmtpd(1) of ucspi-tcp.
"""
from __future__ import annotations

import ipaddress
import time
from typing import Dict, List, Optional, Tuple

TIMEOUT = 5.0
CACHE_SIZE = 1024
NEGATIVE_TTL = 60
MAX_TTL = 3600
MAX_TEXT = 200

_cache: Dict[str, Tuple[float, Optional[str]]] = {}


def reversed_name(ip: str, zone: str) -> Optional[str]:
    """The DNSBL query name of `ip` in `zone` (RFC 5782 section 2.1 and
    2.4), or None for something that is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 4:
        labels = str(addr).split(".")[::-1]
    else:
        labels = addr.exploded.replace(":", "")[::-1]
    return ".".join(labels) + "." + zone.strip(".") + "."


def _lookup(name: str) -> Optional[str]:
    """None: not listed; else the TXT text ("" without one).  Blocking:
    a threadpool thread."""
    now = time.time()
    hit = _cache.get(name)
    if hit is not None and hit[0] > now:
        return hit[1]
    from ..delivery.remote import resolver

    r = resolver()
    import dns.exception
    import dns.resolver

    listed: Optional[str] = None
    ttl = NEGATIVE_TTL
    try:
        a = r.resolve(name, "A", search=False, lifetime=TIMEOUT)
        ttl = min(MAX_TTL, max(1, a.rrset.ttl))
        listed = ""
        try:
            txt = r.resolve(name, "TXT", search=False, lifetime=TIMEOUT)
            listed = " ".join(b"".join(t.strings).decode("utf-8", "replace")
                              for t in txt)[:MAX_TEXT]
        except dns.exception.DNSException:
            pass
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        listed = None
    except dns.exception.DNSException:
        return None  # a zone down: not listed, and not remembered
    if len(_cache) >= CACHE_SIZE:
        for key in sorted(_cache, key=lambda k: _cache[k][0])[:CACHE_SIZE // 4]:
            del _cache[key]
    _cache[name] = (now + ttl, listed)
    return listed


def zones(config) -> List[Tuple[str, int, bool]]:
    """(zone, weight, allow) of control/rbls."""
    return list(getattr(config, "rbls", ()))


def verdict(config, ip: str) -> str:
    """RBLSMTPD for `ip`: "" not listed (or allow-listed), ``-TEXT`` refuse
    for good, ``TEXT`` refuse for now.  Waits for the look-ups (every zone
    at once, at most TIMEOUT seconds) without blocking the hub."""
    entries = zones(config)
    if not entries:
        return ""
    import gevent

    from ..threads import run_check as run

    jobs = []
    for zone, weight, allow in entries:
        name = reversed_name(ip, zone)
        if name is None:
            return ""
        jobs.append((zone, weight, allow, gevent.spawn(run, _lookup, name)))
    gevent.joinall([j[3] for j in jobs], timeout=TIMEOUT + 1)
    score, texts = 0, []
    for zone, weight, allow, g in jobs:
        listed = g.value if g.successful() else None
        if listed is None:
            continue
        if allow:
            return ""
        score += weight
        texts.append(listed or "listed in %s" % zone)
    if not texts or score < getattr(config, "rblthreshold", 1):
        return ""
    text = "Your address %s is listed: %s" % (ip, "; ".join(texts))
    text = "".join(ch if " " <= ch < "\x7f" else " " for ch in text)[:400]
    return text if getattr(config, "rbltemporary", False) else "-" + text
