"""delivery.dane -- DANE for SMTP (RFC 7672): TLSA records of MX hosts.

SUMMARY
    `policies(domain, hosts)` says, for a delivery through `domain`'s MX
    records, which MX hosts have DANE: {host: [TLSA record, ...]} when the
    MX RRset, the host's address records and its ``_25._tcp.HOST`` TLSA
    RRset are all DNSSEC-validated (the AD bit of a validating resolver:
    eqmail checks no signatures itself, as Postfix does not), None when
    DANE does not apply to the domain (an unsigned MX RRset).  A host
    whose TLSA look-up fails (a bogus answer, SERVFAIL) is marked
    INDETERMINATE: it must not be used (RFC 7672 section 2.2).

    `matches(records, chain)` checks a server's certificate against the
    usage 3 (DANE-EE) records, selector 0 (the certificate) or 1 (its
    SubjectPublicKeyInfo), matching type 0 (exact), 1 (SHA-256) or 2
    (SHA-512); no name or date checks (section 3.1.1).  For usage 2
    (DANE-TA), `trust_anchors(records, chain)` finds the certificates of
    the server's chain that the records name; remote delivery then makes
    its real connection with those as the only trust anchors, so that
    the handshake verifies the chain up to one and the MX host's name
    (section 3.1.2).  A host with no usable record still requires TLS,
    unauthenticated (section 3.1.3).

DNS
    remote.resolver(dnssec=True): the same resolv.conf as the rest of
    eqmail, with EDNS0, the DO and AD bits set, and a small cache.  It must point
    at a validating resolver (unbound on localhost); eqmail trusts the AD
    bit from it.  Blocking: remote delivery calls it in the threadpool.

STANDARDS
    RFC 7672 (SMTP security via opportunistic DANE TLS), RFC 6698 and
    RFC 7218 (TLSA), RFC 6840 section 5.7 (the AD bit), RFC 8461 section 2
    (DANE before MTA-STS).
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

#: A host whose TLSA look-up failed: skip it (RFC 7672 section 2.2).
INDETERMINATE = "indeterminate"

class Bogus(Exception):
    """The validating resolver could not answer (SERVFAIL: bogus data, or
    a server that does not answer)."""


def secure_query(name: str, rdtype: str) -> Tuple[list, bool]:
    """(answers, validated) for `name`/`rdtype`: [] for NODATA and
    NXDOMAIN; validated when the resolver set AD.  Raises Bogus."""
    from .remote import resolver

    r = resolver(dnssec=True)
    import dns.exception
    import dns.flags
    import dns.resolver

    try:
        a = r.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as e:
        resp = next(iter(e.responses().values()), None)
        return [], bool(resp is not None and resp.flags & dns.flags.AD)
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
        raise Bogus(str(e))
    except dns.exception.DNSException as e:
        raise Bogus(str(e))
    secure = bool(a.response.flags & dns.flags.AD)
    return (list(a) if a.rrset is not None else []), secure


def policies(domain: str, hosts: Sequence[str]) -> Optional[Dict[str, object]]:
    """{MX host: its TLSA records, or INDETERMINATE} for the hosts with
    DANE; None when the MX RRset of `domain` is not validated (DANE does
    not apply).  Hosts without validated TLSA records are left out."""
    try:
        _, mx_secure = secure_query(domain, "MX")
    except Bogus:
        return None  # the MX look-up itself went through remote.plan already
    if not mx_secure:
        return None
    out: Dict[str, object] = {}
    for host in hosts:
        if host in out or host.startswith("["):
            continue
        try:
            addrs = []
            for rdtype in ("AAAA", "A"):
                answers, ok = secure_query(host, rdtype)
                if answers:
                    addrs.append(ok)
            if not addrs or not all(addrs):
                continue  # an unsigned address: no DANE for this host (2.2.2)
            tlsa, ok = secure_query("_25._tcp." + host.rstrip("."), "TLSA")
        except Bogus:
            out[host] = INDETERMINATE
            continue
        if ok and tlsa:
            out[host] = [(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in tlsa]
    return out


def usable(records, usage: Optional[int] = None) -> list:
    """The records eqmail can check (of `usage` only, when given): usage 3
    (DANE-EE) and 2 (DANE-TA), selectors 0/1, matching types 0/1/2."""
    return [r for r in records if r[0] in (2, 3) and r[1] in (0, 1) and r[2] in (0, 1, 2)
            and (usage is None or r[0] == usage)]


def _matches(record, der: bytes) -> bool:
    _usage, selector, mtype, data = record
    try:
        blob = der if selector == 0 else spki(der)
    except ValueError:
        return False
    digest = blob if mtype == 0 else (hashlib.sha256(blob).digest() if mtype == 1
                                       else hashlib.sha512(blob).digest())
    return digest == data


def matches(records, chain: Sequence[bytes]) -> bool:
    """Whether the server's certificate (DER, the first of `chain`)
    matches a usable DANE-EE record (section 3.1.1: no other check)."""
    return bool(chain) and any(_matches(r, chain[0]) for r in usable(records, 3))


def trust_anchors(records, chain: Sequence[bytes]) -> List[bytes]:
    """The DANE-TA trust anchors (DER) for a server whose chain is
    `chain`: the certificates of the chain (past the leaf) that match a
    usage 2 record, and the certificates a ``2 0 0`` record holds whole.
    The handshake then verifies the chain up to one of them and the name
    (section 3.1.2)."""
    out = []
    for r in usable(records, 2):
        if r[1] == 0 and r[2] == 0 and r[3] not in out:
            out.append(r[3])
        for der in chain[1:]:
            if der not in out and _matches(r, der):
                out.append(der)
    return out


def _tlv(der: bytes, pos: int) -> Tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at
    `pos`.  Raises ValueError for anything malformed."""
    if pos + 2 > len(der):
        raise ValueError("truncated")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(der):
            raise ValueError("bad length")
        length = int.from_bytes(der[pos:pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise ValueError("truncated")
    return tag, pos, pos + length


def spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of an X.509 certificate (RFC 5280
    section 4.1: the seventh field of tbsCertificate, counting the
    optional [0] version).  Raises ValueError."""
    tag, start, _ = _tlv(der, 0)          # Certificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, end = _tlv(der, start)      # tbsCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    fields = []
    while pos < end and len(fields) < 7:
        tag, cstart, cend = _tlv(der, pos)
        fields.append((tag, pos, cend))
        pos = cend
    if fields and fields[0][0] == 0xA0:   # [0] version
        fields = fields[1:]
    if len(fields) < 6 or fields[5][0] != 0x30:
        raise ValueError("no SubjectPublicKeyInfo")
    return der[fields[5][1]:fields[5][2]]


def peer_chain(tls) -> List[bytes]:
    """The certificates the server sent (DER, leaf first): the ssl
    module's get_unverified_chain (public from Python 3.13, in _ssl since
    3.10), else the leaf only."""
    obj = getattr(tls, "_sslobj", None)
    get = getattr(obj, "get_unverified_chain", None)
    if get is not None:
        try:
            import _ssl

            return [c.public_bytes(_ssl.ENCODING_DER) for c in (get() or [])]
        except Exception:
            pass
    leaf = tls.getpeercert(binary_form=True)
    return [leaf] if leaf else []
