"""delivery.mtasts -- SMTP MTA Strict Transport Security (RFC 8461).

SUMMARY
    `lookup(config, domain)` returns the MTA-STS `Policy` of a recipient
    domain, or None: the ``_mta-sts.DOMAIN`` TXT record says a policy
    exists and its id; the policy itself is fetched over HTTPS from
    ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (certificate
    verified against the system's CA store, no redirects, at most
    MAX_POLICY bytes, FETCH_TIMEOUT seconds) and kept on disk in
    ``queue/lock/mta-sts/DOMAIN`` for its max_age.  A cached policy is used
    while it is valid, also when the TXT record or the web server cannot
    be reached (RFC 8461 section 5.1); a policy older than REFRESH
    seconds is fetched again after the delivery, in the background
    (section 10.2).  Remote delivery enforces ``mode: enforce`` (the MX
    hosts must match the policy's ``mx:`` patterns, and TLS with a
    verified certificate naming the MX host) and logs what would fail
    under ``mode: testing``.

DNS AND HTTPS
    The TXT record and mta-sts.DOMAIN's address come from eqmail's
    resolver (dnspython, EQMAIL_RESOLV_CONF); the HTTPS request is
    stdlib http.client over a socket to that address, with the name
    checked.  Everything here blocks: remote delivery calls it through
    the threadpool.  A failure of any kind is logged once a domain and
    means "no new policy" -- never a traceback, never a lost message.

STANDARDS
    RFC 8461 sections 3 (the TXT record and the policy format), 3.3 (the
    HTTPS fetch), 4 (policy application), 5 (caching), 10 (security).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

#: Bytes of a policy at most (RFC 8461 section 3.3: 64 KB).
MAX_POLICY = 65536
#: Seconds the HTTPS fetch may take in all (section 3.3 suggests 60;
#: a delivery waits for it).
FETCH_TIMEOUT = 15.0
#: Seconds after which a cached policy is fetched again in the background.
REFRESH = 86400
#: max_age at most (section 3.2: 31557600).
MAX_AGE = 31557600


@dataclass(frozen=True)
class Policy:
    """One domain's policy: `mode` enforce, testing or none; the `mx`
    patterns; `max_age` seconds; `id` of the TXT record it came with;
    `fetched` (Unix seconds)."""

    domain: str
    id: str
    mode: str
    mx: Tuple[str, ...]
    max_age: int
    fetched: float

    def valid(self, now: float) -> bool:
        return now < self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        """Whether MX `host` matches an ``mx:`` pattern (section 4.1:
        ``*.example.net`` stands for one label)."""
        host = host.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


class PolicyError(ValueError):
    """A policy that cannot be fetched or read."""


def parse_policy(domain: str, id_: str, text: str, now: float) -> Policy:
    """A Policy from the policy file's `text` (section 3.2).  Raises
    PolicyError when it is malformed."""
    fields = {}
    mx: List[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        if not raw.strip():
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            raise PolicyError("a line without ':': %r" % raw[:80])
        key, value = key.strip().lower(), value.strip()
        if key == "mx":
            if not re.match(r"^(\*\.)?[A-Za-z0-9_.-]+$", value):
                raise PolicyError("a bad mx pattern: %r" % value[:80])
            mx.append(value.rstrip(".").lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError("mode %r" % mode[:40])
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError("max_age %r" % age[:40])
    if mode != "none" and not mx:
        raise PolicyError("no mx")
    return Policy(domain, id_, mode, tuple(mx), min(int(age), MAX_AGE), now)


def _txt_id(domain: str) -> Optional[str]:
    """The id of ``_mta-sts.DOMAIN``'s STSv1 record; None when there is
    none (or more than one, section 3.1).  Raises PolicyError for DNS
    trouble."""
    from .remote import PermError, TempError, _query

    try:
        answers = _query("_mta-sts." + domain, "TXT")
    except PermError:
        return None
    except TempError as e:
        raise PolicyError("DNS: %s" % e)
    records = []
    for r in answers:
        text = b"".join(r.strings).decode("ascii", "replace")
        if text.startswith("v=STSv1"):
            records.append(text)
    if len(records) != 1:
        return None
    for part in records[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key == "id" and re.match(r"^[A-Za-z0-9]{1,32}$", value):
            return value
    return None


def fetch(domain: str) -> str:
    """The policy file of `domain` over HTTPS (section 3.3).  Raises
    PolicyError."""
    import http.client
    import socket
    import ssl

    from .remote import addresses

    host = "mta-sts." + domain
    try:
        ips = addresses(host)
    except Exception as e:
        raise PolicyError("no address for %s: %s" % (host, e))
    if not ips:
        raise PolicyError("no address for %s" % host)
    deadline = time.monotonic() + FETCH_TIMEOUT
    ctx = ssl.create_default_context()
    try:
        sock = socket.create_connection((ips[0], 443), timeout=FETCH_TIMEOUT)
        try:
            tls = ctx.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        conn = http.client.HTTPConnection(host, 443, timeout=FETCH_TIMEOUT)
        conn.sock = tls
        try:
            conn.request("GET", "/.well-known/mta-sts.txt",
                         headers={"Host": host, "User-Agent": "eqmail"})
            resp = conn.getresponse()
            if resp.status != 200:  # no redirects (section 3.3)
                raise PolicyError("HTTP %d from %s" % (resp.status, host))
            ctype = resp.getheader("Content-Type", "")
            if not ctype.lower().startswith("text/plain"):
                raise PolicyError("Content-Type %r from %s" % (ctype[:60], host))
            body = b""
            while len(body) <= MAX_POLICY:
                if time.monotonic() > deadline:
                    raise PolicyError("%s is too slow" % host)
                chunk = resp.read(8192)
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_POLICY:
                raise PolicyError("the policy of %s is over %d bytes" % (domain, MAX_POLICY))
        finally:
            conn.close()
    except PolicyError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise PolicyError("HTTPS to %s: %s" % (host, e))
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("the policy of %s is not UTF-8" % domain)


def _cache_path(config, domain: str) -> Optional[str]:
    if not re.match(r"^[a-z0-9.-]{1,253}$", domain) or domain.startswith("."):
        return None
    return config.path("queue", "lock", "mta-sts", domain)


def cached(config, domain: str) -> Optional[Policy]:
    """The policy kept on disk for `domain` (valid or not), or None."""
    path = _cache_path(config, domain)
    if path is None:
        return None
    try:
        with open(path) as f:
            d = json.load(f)
        return Policy(domain, d["id"], d["mode"], tuple(d["mx"]), int(d["max_age"]),
                      float(d["fetched"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(config, policy: Policy) -> None:
    path = _cache_path(config, policy.domain)
    if path is None:
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"id": policy.id, "mode": policy.mode, "mx": list(policy.mx),
                   "max_age": policy.max_age, "fetched": policy.fetched}, f)
    os.replace(tmp, path)


def _told(domain: str, text: str, _seen={}) -> None:
    """Log a failure once a domain and text (at most 1,000 remembered)."""
    from .. import log

    if _seen.get(domain) == text:
        return
    if len(_seen) >= 1000:
        _seen.clear()
    _seen[domain] = text
    log.line("mta-sts: %s: %s" % (domain, text))


def lookup(config, domain: str, refresh: bool = False) -> Optional[Policy]:
    """The policy to apply to `domain` now, or None (section 5.1): the
    cached one when its id is current (or the TXT record cannot be
    read) and it is valid; else a fresh fetch; a fetch that fails falls
    back on a valid cached policy.  `refresh`: fetch even when the cached
    one is current (the background refresh).  Blocking."""
    now = time.time()
    domain = domain.rstrip(".").lower()
    old = cached(config, domain)
    if old is not None and not old.valid(now):
        old = None
    try:
        id_ = _txt_id(domain)
    except PolicyError as e:
        _told(domain, str(e))
        return old
    if id_ is None:
        return old  # no record: a valid cached policy still applies (5.1)
    if old is not None and old.id == id_ and not refresh:
        return old
    try:
        policy = parse_policy(domain, id_, fetch(domain), now)
    except PolicyError as e:
        _told(domain, "no new policy (%s)%s" % (e, "; the cached one stays" if old else ""))
        return old
    try:
        _store(config, policy)
    except OSError as e:
        _told(domain, "the policy cannot be kept: %s" % e)
    return policy


def needs_refresh(policy: Policy, now: Optional[float] = None) -> bool:
    """Whether `policy` is old enough to be fetched again (REFRESH)."""
    return (now or time.time()) - policy.fetched > REFRESH
