"""delivery.remote -- remote delivery over SMTP (qmail-remote's role).

SUMMARY
    `deliver(config, msgpath, sender, recipients, domain)` sends one queued
    message (a queue file, or with ``queued=False`` a plain file of data)
    to all of its recipients at one domain in one SMTP transaction and
    returns one Result per recipient: delivered (2xx), deferred (4xx, no
    connection, DNS trouble) or failed (5xx).

ROUTING
    control/smtproutes first (exact domain, ``.suffix`` longest first, the
    catch-all ``:relay``); a relay is looked up by AAAA and A only, or taken
    as an address when it is an ``[IP]`` literal or a plain dotted quad
    (``192.0.2.7``, as qmail's dns_ip does), and its port used.  Otherwise the MX records of
    the domain, by preference, equal preferences in random order; without
    MX the domain's own AAAA and A (RFC 5321 section 5.1).  For every host,
    IPv6 addresses come first, then IPv4 (eQmail 1.09).  A null MX
    (RFC 7505: one MX ``0 .``) and a domain that does not exist are
    permanent failures; DNS timeouts and SERVFAIL are temporary.  Address
    literals ``user@[192.0.2.1]`` and ``user@[IPv6:2001:db8::1]`` go to that
    address.  The next address is tried when a connection fails, the
    greeting is 4xx or the TLS handshake fails.

    The resolver is the system's, from /etc/resolv.conf, or from the file
    named by the environment variable EQMAIL_RESOLV_CONF.

CONNECTIONS
    A connection whose transaction ended cleanly is kept open for
    CACHE_IDLE (2) seconds, at most CACHE_MAX (20) of them and CACHE_USES
    (100) transactions each, and the next message to the same server (host,
    address, port, relay user) goes over it with MAIL again (RFC 5321
    section 3.3), as Postfix's connection cache does; one the far end
    closed meanwhile is replaced by a new connection before anything is
    sent.  Then QUIT.  TCP_NODELAY is set: every command waits for its
    reply, and Nagle's algorithm held the final ``.`` behind the far end's
    delayed ACK (40 ms a message).  A relay written as an address needs no
    DNS and no thread; the message's first 64 KB are read in one trip to
    the threadpool.

SMTP
    EHLO helohost (HELO when EHLO is refused); STARTTLS when offered, then
    EHLO again; AUTH with the smtproutes credentials only inside TLS (PLAIN
    when offered, else LOGIN), STARTTLS on any port but 465, where TLS
    starts with the first byte; MAIL FROM (with SIZE= when offered), one
    RCPT per recipient, DATA, the message with LF turned into CRLF and
    leading dots doubled, a missing final newline added.

TLS
    Opportunistic: any certificate is accepted (RFC 7435).  A failed
    handshake counts as a failed connection (the next address is tried,
    then the delivery is deferred); the mail is never sent in clear to a
    host that offered STARTTLS unless the operator creates
    control/notlshosts/<host> (eQmail's file), which turns TLS off for that
    host.  control/tlsclientciphers sets the ciphers, control/clientcert.pem
    (certificate and key) is shown to servers that ask.

STANDARDS
    RFC 5321, RFC 3207 (STARTTLS), RFC 4954 (AUTH), RFC 4616 (PLAIN),
    RFC 1870 (SIZE), RFC 7505 (null MX), RFC 3463 (status codes);
    qmail-remote(8) and eQmail's smtproutes (behaviour reference 7).

SECURITY
    Replies from the far end are bounded (line length and count).  Relay
    credentials are never logged and never sent without TLS.  Every network
    read and write has a timeout (timeoutremote), connect() timeoutconnect.
"""
from __future__ import annotations

import base64
import os
import random
import re
import socket
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from .. import log
from . import Result, deferred, delivered, failed
from ..address import ascii_address, ip_literal, to_ascii_domain
from ..control import DEFAULT_TLS, Config, SmtpRoute, TlsPolicy
from ..threads import run

#: Longest reply line and most lines of one reply read from a server.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
CHUNK = 65536
_BARE_LF = re.compile(rb"(?<!\r)\n")


class TempError(Exception):
    """A temporary problem: the delivery is deferred with this text."""


class PermError(Exception):
    """A permanent problem: the delivery fails with this text and status."""

    def __init__(self, text: str, status: str = "5.0.0"):
        super().__init__(text)
        self.status = status


class Retry(Exception):
    """This address did not work out; try the next one."""


class TlsRetry(Retry):
    """TLS did not meet the destination's policy (no STARTTLS, a failed
    handshake or certificate check)."""


# -- DNS ---------------------------------------------------------------------------------

_resolvers: dict = {}


def _without_feature_probe() -> None:
    """Keep dnspython from importing importlib.metadata (with email, zipfile
    and inspect: about 4 MB of RSS on CPython 3.11, half of what remote
    delivery costs in memory).

    dnspython's ``dns._features.have(feature)`` asks importlib.metadata
    whether optional packages are installed: cryptography (DNSSEC), httpx
    (DNS over HTTPS), aioquic (DNS over QUIC), trio, wmi, idna.  eqmail
    uses none of them -- plain DNS over UDP/TCP to the system's resolvers;
    domains go out as A-labels, and a rare U-label through Python's own
    IDNA codec.  So when dnspython is not loaded yet, a stand-in whose
    have() says "not available" (unless forced with force(), which
    dnspython documents for when metadata is unreliable) takes the place
    of dns._features.  Versions without dns._features never look at it.
    """
    import sys

    if "dns._features" in sys.modules:
        return
    import types

    import dns

    stub = types.ModuleType("dns._features")
    stub._cache = {}
    stub.have = lambda feature: stub._cache.get(feature, False)
    stub.force = stub._cache.__setitem__
    sys.modules["dns._features"] = stub
    dns._features = stub


#: Answers the resolver keeps for their TTL, shared by remote delivery and
#: the checks of received mail (SPF, DKIM keys, DMARC records); the least
#: recently used go first.
DNS_CACHE_SIZE = 512


def resolver(dnssec: bool = False):
    """The dnspython resolver (system's, or EQMAIL_RESOLV_CONF's), with a
    small LRU cache of DNS_CACHE_SIZE answers kept for their TTL.  With
    `dnssec`, a second one that asks with EDNS0 and the DO and AD bits, so
    that a validating resolver's answers say whether they were validated
    (RFC 6840 section 5.7; delivery.dane)."""
    _without_feature_probe()
    import dns.resolver

    conf = os.environ.get("EQMAIL_RESOLV_CONF") or "/etc/resolv.conf"
    r = _resolvers.get((conf, dnssec))
    if r is None:
        r = dns.resolver.Resolver(filename=conf)
        r.lifetime = 30.0
        r.cache = dns.resolver.LRUCache(DNS_CACHE_SIZE // 2 if dnssec else DNS_CACHE_SIZE)
        if dnssec:
            import dns.flags

            r.use_edns(0, dns.flags.DO, 1232)
            r.flags = dns.flags.RD | dns.flags.AD
        _resolvers[(conf, dnssec)] = r
    return r


def _query(name: str, rdtype: str):
    """Answers of one type; [] for NODATA.  Raises PermError for NXDOMAIN,
    TempError for anything temporary."""
    r = resolver()  # first: it keeps dnspython's feature probe out
    import dns.exception
    import dns.resolver

    try:
        return list(r.resolve(name, rdtype, search=False))
    except dns.resolver.NXDOMAIN:
        raise PermError("Sorry, I couldn't find any host named %s. (#5.1.2)" % name, "5.1.2")
    except dns.resolver.NoAnswer:
        return []
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout):
        raise TempError("Sorry, I couldn't find any host by that name. (#4.1.2)")
    except dns.exception.DNSException as e:
        raise TempError("DNS trouble with %s: %s. (#4.4.3)" % (name, e))


def addresses(host: str) -> List[str]:
    """AAAA then A addresses of `host` ([] when it has none)."""
    out = []
    for rdtype in ("AAAA", "A"):
        try:
            out += [r.address for r in _query(host, rdtype)]
        except PermError:
            return []
    return out


def mx_hosts(domain: str) -> List[Tuple[int, str]]:
    """(preference, host) by preference, equal ones shuffled; the domain
    itself when it has no MX.  Raises PermError (NXDOMAIN, null MX),
    TempError."""
    answers = _query(domain, "MX")
    if not answers:
        return [(0, domain)]
    mx = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answers]
    if any(host in ("", ".") for _, host in mx):
        raise PermError("Sorry, %s does not accept mail (null MX, RFC 7505). (#5.1.10)"
                        % domain, "5.1.10")
    random.shuffle(mx)
    mx.sort(key=lambda m: m[0])
    return mx


def dotted_quad(host: str) -> Optional[str]:
    """`host` as an IPv4 address when it is a plain dotted quad
    (``192.0.2.7``), else None.  qmail's dns_ip and dns_mxip take such a
    name as the address itself before any DNS look-up (qmail-remote(8)),
    for an smtproutes relay and for a recipient domain alike; unlike
    qmail's ip_scan, an octet above 255 is not an address."""
    if not host[:1].isdigit() or host.count(".") != 3:
        return None
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def _address_of(host: str) -> Optional[str]:
    """The IP of a relay written as an address (``[IP]``, ``[IPv6:...]``,
    a plain dotted quad), else None."""
    if host.startswith("["):
        return ip_literal(host) or ip_literal("[IPv6:%s]" % host[1:-1])
    return dotted_quad(host)


def static_plan(config: Config, domain: str):
    """`plan` for a destination that needs no DNS (an smtproutes relay
    written as an address, an address literal), else None.  Does no I/O,
    so it runs on the hub; raises PermError for a bad literal."""
    route = config.smtproute(domain)
    if route is not None and route.relay:
        ip = _address_of(route.relay)
        return None if ip is None else ([(route.relay, ip, route.port)], route)
    literal = ip_literal(domain) if domain.startswith("[") else dotted_quad(domain)
    if literal is not None:
        return [(domain, literal, 25)], route
    if domain.startswith("["):
        raise PermError("Sorry, %s is not a valid address literal. (#5.1.2)" % domain, "5.1.2")
    return None


def plan(config: Config, domain: str) -> Tuple[List[Tuple[str, str, int]], Optional[SmtpRoute]]:
    """Where to connect: [(host name, IP, port)] in order, and the
    smtproutes entry used.  Blocking (DNS): call it from the threadpool.
    Raises PermError, TempError."""
    static = static_plan(config, domain)
    if static is not None:
        return static
    route = config.smtproute(domain)
    if route is not None and route.relay:
        hosts = [(route.relay, route.port)]
    else:
        qname = to_ascii_domain(domain)  # U-labels are asked as A-labels (RFC 5891)
        if qname is None:
            raise PermError("Sorry, %s is not a valid domain name. (#5.1.2)" % domain,
                            "5.1.2")
        hosts = [(host, 25) for _, host in mx_hosts(qname)]
    out = []
    for host, port in hosts:
        if host.startswith("["):
            ip = _address_of(host)
            if ip:
                out.append((host, ip, port))
            continue
        ip = dotted_quad(host)
        if ip is not None:
            out.append((host, ip, port))
            continue
        out += [(host, ip, port) for ip in addresses(host)]
    if not out:
        raise PermError("Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)",
                        "5.4.4")
    return out, route


# -- one SMTP connection -----------------------------------------------------------------------

class Reply:
    def __init__(self, code: int, lines: List[str]):
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        return "\n".join("%d %s" % (self.code, l) for l in self.lines)

    def said(self) -> str:
        return "Remote host said: " + " ".join(["%d" % self.code] + self.lines)


class _Body:
    """The message data to send: its size in bytes, an open reader and the
    first CHUNK bytes, read in one trip to the threadpool (a small message
    needs no other).  `rewind` makes it ready for the next address tried."""

    def __init__(self, msgpath: str, queued: bool):
        from ..queue.store import open_message

        self.file = open_message(msgpath) if queued else open(msgpath, "rb")
        try:
            self.size = self.file.seek(0, os.SEEK_END)
            self.file.seek(0)
            self.first: Optional[bytes] = self.file.read(CHUNK)
        except BaseException:
            self.file.close()
            raise

    def rewind(self) -> None:
        if self.first is not None and len(self.first) == self.size:
            return  # all of it in memory: nothing to read again
        self.file.seek(0)
        self.first = None

    def close(self) -> None:
        self.file.close()


class Connection:
    """A client SMTP connection over a gevent socket."""

    def __init__(self, sock, timeout: float):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.extensions: dict = {}

    def _readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i != -1:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > MAX_REPLY_LINE:
                raise Retry("reply line too long")
            data = self.sock.recv(CHUNK)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data

    def reply(self) -> Reply:
        lines = []
        while True:
            raw = self._readline().rstrip(b"\r\n").decode("utf-8", "replace")
            if len(raw) < 3 or not raw[:3].isdigit():
                raise ConnectionError("bad reply from server")
            lines.append(raw[4:])
            if len(lines) > MAX_REPLY_LINES:
                raise ConnectionError("reply too long")
            if raw[3:4] != "-":
                return Reply(int(raw[:3]), lines)

    def command(self, line: str) -> Reply:
        self.sock.sendall(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self.reply()

    def ehlo(self, helohost: str) -> Reply:
        r = self.command("EHLO " + helohost)
        if r.code == 250:
            self.extensions = {}
            for l in r.lines[1:]:
                word, _, rest = l.partition(" ")
                self.extensions[word.upper()] = rest
            return r
        r = self.command("HELO " + helohost)
        self.extensions = {}
        return r

    def send_body(self, body: "_Body") -> None:
        """The message as DATA: CRLF line ends, dots doubled, final CRLF."""
        f = body.file
        try:
            last = b"\n"
            sent = 0
            chunk = body.first
            while True:
                if chunk is None:
                    chunk = run(f.read, CHUNK) if sent < body.size else b""
                if not chunk:
                    break
                sent += len(chunk)
                data = chunk
                if last == b"\n" and data.startswith(b"."):
                    data = b"." + data
                data = data.replace(b"\n.", b"\n..")
                if last == b"\r" and data.startswith(b"\n"):
                    data = b"\n" + _BARE_LF.sub(b"\r\n", data[1:])
                else:
                    data = _BARE_LF.sub(b"\r\n", data)
                last = chunk[-1:]
                chunk = None
                self.sock.sendall(data)
            ending = b".\r\n" if last == b"\n" else b"\r\n.\r\n"
            self.sock.sendall(ending)
        finally:
            body.rewind()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


#: (policy level, CA file, ciphers, client cert, its mtime) -> SSLContext:
#: loading the system's CA store costs milliseconds and memory, once.
_contexts: dict = {}


def _tls_context(config: Config, policy: TlsPolicy = DEFAULT_TLS, named: bool = True):
    """The client context for `policy`: no verification, except for
    ``verify`` (the CA file, else the system's store; the server's name
    checked when `named`, i.e. it is a host name, not an address)."""
    import gevent.ssl as ssl

    verify = policy.level == "verify"
    anchors = policy.anchors if policy.level == "dane" else ()
    cert = config.path("control", "clientcert.pem")
    try:
        stamp = os.stat(cert).st_mtime
    except OSError:
        stamp = None
    key = (verify, policy.cafile if verify else "", named and (verify or bool(anchors)),
           anchors, config.tlsclientciphers, stamp)
    ctx = _contexts.get(key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if anchors:  # DANE-TA: these are the only trust anchors, not roots
        ctx.check_hostname = named
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        for der in anchors:
            ctx.load_verify_locations(cadata=der)
    elif verify:
        ctx.check_hostname = named
        ctx.verify_mode = ssl.CERT_REQUIRED
        if policy.cafile:
            ctx.load_verify_locations(cafile=policy.cafile)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.tlsclientciphers:
        ctx.set_ciphers(config.tlsclientciphers)
    if stamp is not None:
        ctx.load_cert_chain(cert)
    if len(_contexts) >= 16:
        _contexts.clear()
    _contexts[key] = ctx
    return ctx


def _tls_report(config: Config, policy: TlsPolicy, host: str, ip: str,
                result: Optional[str]) -> None:
    """Count a TLS session under an MTA-STS or DANE policy for the TLS
    reports (delivery.tlsrpt); `result` None for a success."""
    if policy.source in ("mta-sts", "dane"):
        from . import tlsrpt

        run(tlsrpt.record, config, policy.key,  # a file append: off the hub
            "sts" if policy.source == "mta-sts" else "tlsa", policy.strings,
            host.strip("[]"), ip, result)


def _start_tls(config: Config, sock, host: str, ip: str, policy: TlsPolicy):
    """The TLS side of `sock` under `policy`, after the handshake and the
    checks; logs one line with the TLS version, cipher and what was
    verified.  Raises Retry (handshake, certificate or fingerprint)."""
    import hashlib

    named = not host.startswith("[") and dotted_quad(host) is None
    try:
        tls = _tls_context(config, policy, named).wrap_socket(
            sock, server_hostname=host if named else None)
    except OSError as e:
        from .tlsrpt import result_of

        _tls_report(config, policy, host, ip, result_of(e))
        raise TlsRetry("TLS connect to %s failed: %s%s" % (
            ip, e, " (%s: %s)" % (policy.source, policy.level) if policy.required else ""))
    checked = "not verified"
    if policy.level == "verify":
        checked = "verified" if named else "chain verified, no name to check"
    elif policy.level == "dane" and policy.anchors:
        checked = "TLSA matched (DANE-TA)"  # the handshake verified chain and name
    elif policy.level == "dane":
        from . import dane

        if dane.usable(policy.tlsa, 3):
            if not dane.matches(policy.tlsa, dane.peer_chain(tls)):
                _tls_report(config, policy, host, ip, "validation-failure")
                log.line("tls: %s [%s] the certificate matches no TLSA record: disconnecting"
                         % (host, ip))
                tls.close()
                raise TlsRetry("TLS to %s: the certificate matches none of the DANE TLSA "
                            "records of %s (#4.7.5)" % (ip, host))
            checked = "TLSA matched"
        else:
            checked = "no usable TLSA record, not verified"
    elif policy.level == "fingerprint":
        der = tls.getpeercert(binary_form=True) or b""
        digest = hashlib.sha256(der).hexdigest()
        if digest not in policy.fingerprints:
            log.line("tls: %s [%s] certificate sha256:%s is not pinned: disconnecting"
                     % (host, ip, digest))
            tls.close()
            raise TlsRetry("TLS to %s: the certificate's fingerprint sha256:%s is not the one "
                        "in tlsdestinations (#4.7.5)" % (ip, digest))
        checked = "fingerprint matched"
    _tls_report(config, policy, host, ip, None)
    cipher = tls.cipher() or ("", "", 0)
    log.line("tls: %s [%s] %s %s %s (%s %s)"
             % (host, ip, tls.version() or "?", cipher[0], checked, policy.source,
                policy.level))
    return tls


def _auth(conn: Connection, route: SmtpRoute, ip: str) -> None:
    """AUTH PLAIN when offered, else LOGIN (RFC 4954).  Raises TempError."""
    mechs = conn.extensions.get("AUTH", "").upper().split()
    b64 = lambda s: base64.b64encode(s.encode("utf-8")).decode("ascii")  # noqa: E731
    if "PLAIN" in mechs:
        r = conn.command("AUTH PLAIN " + b64("\0%s\0%s" % (route.user, route.password)))
    elif "LOGIN" in mechs:
        r = conn.command("AUTH LOGIN")
        if r.code == 334:
            r = conn.command(b64(route.user))
            if r.code == 334:
                r = conn.command(b64(route.password))
    else:
        raise TempError("Connected to %s but it offers neither AUTH PLAIN nor AUTH LOGIN. "
                        "(#4.7.0)" % ip)
    if r.code != 235:
        raise TempError("Connected to %s but authentication was rejected.\n%s"
                        % (ip, r.said()))


def _notls(config: Config, host: str) -> bool:
    name = host.strip("[]").lower()
    return "/" not in name and os.path.exists(config.path("control", "notlshosts", name))


def _connect(config: Config, host: str, ip: str, port: int,
             policy: TlsPolicy = DEFAULT_TLS):
    import gevent.socket

    try:
        sock = gevent.socket.create_connection((ip, port), timeout=config.timeoutconnect)
    except OSError as e:
        raise Retry("unable to connect to %s port %d: %s" % (ip, port, e))
    # every command waits for its reply, so nothing is gained by Nagle's
    # algorithm; with it, the final ".\r\n" waited for the far end's
    # delayed ACK of the body (up to 40 ms a message on Linux)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    if port == 465:
        try:
            sock = _start_tls(config, sock, host, ip, policy)
        except Retry:
            sock.close()
            raise
    return Connection(sock, config.timeoutremote)


def _open(config: Config, conn: Connection, host: str, ip: str, port: int,
          route: Optional[SmtpRoute], policy: TlsPolicy = DEFAULT_TLS) -> None:
    """Greeting, EHLO, STARTTLS, AUTH on a new connection.  Raises Retry,
    TempError, PermError, ConnectionError/OSError."""
    greeting = conn.reply()
    if 400 <= greeting.code < 500:
        raise Retry("greeting %d" % greeting.code)
    if greeting.code >= 500:
        raise PermError("Connected to %s but greeting failed.\n%s" % (ip, greeting.said()),
                        "5.0.0")
    if greeting.code != 220:
        raise Retry("odd greeting")
    r = conn.ehlo(config.helohost)
    if r.code != 250:
        raise TempError("Connected to %s but my name was rejected.\n%s" % (ip, r.said()))
    tls = port == 465
    wanted = policy.level != "none" and (policy.required or not _notls(config, host))
    if not tls and wanted and "STARTTLS" in conn.extensions:
        r = conn.command("STARTTLS")
        if r.code == 220:
            conn.sock = _start_tls(config, conn.sock, host, ip, policy)
            conn.buf.clear()
            tls = True
            r = conn.ehlo(config.helohost)
            if r.code != 250:
                raise TempError("Connected to %s but my name was rejected after "
                                "STARTTLS.\n%s" % (ip, r.said()))
    if not tls and policy.required:
        _tls_report(config, policy, host, ip, "starttls-not-supported")
        raise TlsRetry("%s offers no STARTTLS, which %s requires (%s) (#4.7.4)"
                    % (ip, policy.source, policy.level))
    if route is not None and route.has_credentials:
        if not tls:
            raise TempError("Connected to %s but it offers no STARTTLS; relay credentials "
                            "are never sent in clear. (#4.7.0)" % ip)
        _auth(conn, route, ip)


class _Stale(Exception):
    """A connection taken from the cache was closed by the far end before
    it said anything about this message: open a new one."""


def _transaction(conn: Connection, ip: str, body: _Body, sender: str,
                 recipients: Sequence[str], reused: bool,
                 utf8: bool = False, dsn: Optional[dict] = None) -> Tuple[List[Result], bool]:
    """MAIL, RCPT, DATA on an open connection (RFC 5321 section 3.3).
    `utf8`: the message came with SMTPUTF8.  A message that needs SMTPUTF8
    (the flag, or an address that is not ASCII) goes with it to a server
    that offers it; to one that does not, its addresses go with their
    domains in A-labels, and one whose local part is not ASCII fails
    (5.6.7, RFC 6531 section 3.2).  Returns the results and whether the
    connection may carry another transaction (it ended cleanly).  Raises
    _Stale (only when `reused`), TempError, PermError,
    ConnectionError/OSError.  `dsn`: the message's DSN request (RFC 3461:
    "ret", "envid", and "notify" and "orcpt" lists aligned with
    `recipients`), passed on to a server that offers DSN; its successes
    then say dsn_passed."""
    needs = utf8 or not sender.isascii() or not all(r.isascii() for r in recipients)
    out_rcpts: List[Optional[str]] = list(recipients)
    mail_param = ""
    if needs and "SMTPUTF8" in conn.extensions:
        mail_param = " SMTPUTF8"
    elif needs:
        ascii_sender = ascii_address(sender)
        if ascii_sender is None:
            raise PermError("Sorry, the sender address %s needs SMTPUTF8, which %s does not "
                            "offer. (#5.6.7)" % (sender, ip), "5.6.7")
        sender = ascii_sender
        out_rcpts = [ascii_address(r) for r in recipients]
    mail = "MAIL FROM:<%s>" % sender
    if "SIZE" in conn.extensions:
        mail += " SIZE=%d" % body.size
    mail += mail_param
    passed = dsn is not None and "DSN" in conn.extensions
    if passed:
        if dsn.get("ret"):
            mail += " RET=" + dsn["ret"]
        if dsn.get("envid"):
            mail += " ENVID=" + dsn["envid"]
    lines: List[Optional[str]] = []  # each recipient's RCPT, None: it cannot go
    for n, rcpt in enumerate(out_rcpts):
        if rcpt is None:
            lines.append(None)
            continue
        line = "RCPT TO:<%s>" % rcpt
        if passed:
            if dsn["notify"][n]:
                line += " NOTIFY=" + dsn["notify"][n]
            if dsn["orcpt"][n]:
                line += " ORCPT=" + dsn["orcpt"][n]
        lines.append(line)
    # RFC 3030: a message all in memory goes in one BDAT LAST, no 354 to
    # wait for (a bigger one goes with DATA, which needs no size ahead)
    whole = body.first if body.first is not None and len(body.first) == body.size else None
    chunk = None
    if whole is not None and "CHUNKING" in conn.extensions:
        chunk = _BARE_LF.sub(b"\r\n", whole)
        if not chunk.endswith(b"\n"):
            chunk += b"\r\n"
    if "PIPELINING" in conn.extensions:
        return _pipelined(conn, ip, body, mail, lines, recipients, reused, passed, chunk)
    try:
        r = conn.command(mail)
    except (OSError, ConnectionError):
        if reused:
            raise _Stale()
        raise
    _mail_reply(r, ip, reused)
    results: List[Optional[Result]] = []
    for line, given in zip(lines, recipients):
        results.append(_rcpt_result(ip, given, None if line is None else conn.command(line)))
    if all(x is not None for x in results):
        return results, conn.command("RSET").code == 250  # nobody accepted: "Giving up"
    if chunk is not None:
        try:
            conn.sock.sendall(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
            r = conn.reply()
        except (OSError, ConnectionError):
            return _died(ip, results)
        return _after_data(ip, r, results, passed)
    return _data(conn, ip, body, conn.command("DATA"), results, passed)


def _died(ip: str, results: list) -> Tuple[List[Result], bool]:
    """The connection died once the message (or part of it) was sent."""
    res = deferred("Connected to %s but connection died. Possible duplicate! (#4.4.2)"
                   % ip, "4.4.2")
    return [x if x is not None else res for x in results], False


def _data(conn: Connection, ip: str, body: _Body, r: Reply, results: list,
          passed: bool) -> Tuple[List[Result], bool]:
    """After DATA's reply `r`: the message, then its reply."""
    if r.code != 354:
        res = (failed if r.code >= 500 else deferred)(
            "Connected to %s but it refused DATA.\n%s" % (ip, r.said()), _status(r, "4.0.0"))
        return [x if x is not None else res for x in results], False
    try:
        conn.send_body(body)
        r = conn.reply()
    except (OSError, ConnectionError):
        return _died(ip, results)
    return _after_data(ip, r, results, passed)


def _mail_reply(r: Reply, ip: str, reused: bool) -> None:
    """Raise for a MAIL that was not accepted (_Stale for a cached
    connection the far end is closing)."""
    if reused and r.code == 421:
        raise _Stale()
    if r.code >= 500:
        raise PermError("Connected to %s but sender was rejected.\n%s" % (ip, r.said()),
                        _status(r, "5.1.7"))
    if r.code >= 400:
        raise TempError("Connected to %s but sender was rejected.\n%s" % (ip, r.said()))


def _rcpt_result(ip: str, given: str, r: Optional[Reply]) -> Optional[Result]:
    """A recipient's result from its RCPT reply (None: accepted, so far);
    `r` None: it could not be sent (SMTPUTF8)."""
    if r is None:
        return failed("Sorry, the address %s needs SMTPUTF8, which %s does not offer. "
                      "(#5.6.7)" % (given, ip), "5.6.7")
    if r.code >= 500:
        return failed("%s does not like recipient.\n%s" % (ip, r.said()), _status(r, "5.1.1"))
    if r.code >= 400:
        return deferred("%s does not like recipient.\n%s" % (ip, r.said()),
                        _status(r, "4.0.0"))
    return None


def _pipelined(conn: Connection, ip: str, body: _Body, mail: str, lines, recipients,
               reused: bool, passed: bool, chunk: Optional[bytes]) -> Tuple[List[Result], bool]:
    """The transaction in one write (RFC 2920): MAIL, every RCPT, then DATA
    (the last command of the group, section 3.1) or the message itself in
    one BDAT LAST (RFC 3030 section 4.2); then the replies in order."""
    enc = lambda t: t.encode("utf-8", "surrogateescape") + b"\r\n"  # noqa: E731
    wire = [enc(mail)] + [enc(line) for line in lines if line is not None]
    wire.append(b"DATA\r\n" if chunk is None else b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    try:
        conn.sock.sendall(b"".join(wire))
        r = conn.reply()
    except (OSError, ConnectionError):
        if reused:
            raise _Stale()
        raise
    _mail_reply(r, ip, reused)  # raising closes the connection: its replies go unread
    results = [_rcpt_result(ip, given, None if line is None else conn.reply())
               for line, given in zip(lines, recipients)]
    try:
        r = conn.reply()  # to DATA, or to the message after BDAT
    except (OSError, ConnectionError):
        if chunk is None:
            raise
        return _died(ip, results)
    if all(x is not None for x in results):  # nobody accepted: "Giving up"
        if chunk is None and r.code == 354:  # a server that said yes anyway
            conn.sock.sendall(b".\r\n")
            conn.reply()
        return results, conn.command("RSET").code == 250
    if chunk is not None:
        return _after_data(ip, r, results, passed)
    return _data(conn, ip, body, r, results, passed)


def _after_data(ip: str, r: Reply, results: list, passed: bool) -> Tuple[List[Result], bool]:
    """The results of a transaction from the reply to the message (after
    DATA's dot or BDAT LAST), and whether the connection may go on."""
    if r.code >= 500:
        res = failed("%s failed after I sent the message.\n%s" % (ip, r.said()),
                     _status(r, "5.0.0"))
    elif r.code >= 400:
        res = deferred("%s failed after I sent the message.\n%s" % (ip, r.said()),
                       _status(r, "4.0.0"))
    else:
        res = replace(delivered("%s accepted message.\n%s" % (ip, r.said())),
                      dsn_passed=passed)
    return [x if x is not None else res for x in results], r.code != 421


# -- the connection cache ----------------------------------------------------------------

#: Seconds an idle connection is kept for the next message to the same
#: server (Postfix's smtp_connection_cache_time_limit), connections kept at
#: once, and transactions one connection carries at most.
CACHE_IDLE = 2.0
CACHE_MAX = 20
CACHE_USES = 100

#: (host, ip, port, relay user) -> [(Connection, idle since, transactions)]
_cache: dict = {}
_cache_state = {"count": 0, "reaper": None}


def _take(key) -> Optional[Tuple[Connection, int]]:
    """An idle connection to `key` and its use count, or None."""
    import time

    idle = _cache.get(key)
    while idle:
        conn, since, uses = idle.pop()
        _cache_state["count"] -= 1
        if not idle:
            del _cache[key]
        if time.monotonic() - since <= CACHE_IDLE:
            return conn, uses
        _goodbye(conn)
    return None


def _keep(key, conn: Connection, uses: int) -> None:
    """Keep `conn` (after `uses` transactions) for the next message to the
    same server, or say goodbye when the cache is full or it has done
    enough.  A reaper greenlet closes what waits longer than CACHE_IDLE."""
    import time

    import gevent

    if uses >= CACHE_USES or _cache_state["count"] >= CACHE_MAX:
        _goodbye(conn)
        return
    _cache.setdefault(key, []).append((conn, time.monotonic(), uses))
    _cache_state["count"] += 1
    if _cache_state["reaper"] is None:
        _cache_state["reaper"] = gevent.spawn_later(CACHE_IDLE, _reap)


def _reap() -> None:
    """QUIT every connection idle for more than CACHE_IDLE; go on while any
    is left."""
    import time

    import gevent

    _cache_state["reaper"] = None
    now = time.monotonic()
    for key in list(_cache):
        keep = [e for e in _cache[key] if now - e[1] <= CACHE_IDLE]
        for e in _cache[key]:
            if now - e[1] > CACHE_IDLE:
                _cache_state["count"] -= 1
                _goodbye(e[0])
        if keep:
            _cache[key] = keep
        else:
            del _cache[key]
    if _cache_state["count"] > 0:
        _cache_state["reaper"] = gevent.spawn_later(CACHE_IDLE, _reap)


def _goodbye(conn: Connection) -> None:
    """QUIT (a reply waited for at most 5 s) and close."""
    import gevent

    try:
        with gevent.Timeout(5, False):
            _quit(conn)
    finally:
        conn.close()


def _status(r: Reply, default: str) -> str:
    """The enhanced status at the start of the reply text, if any (RFC 3463)."""
    m = re.match(r"([245])\.(\d{1,3})\.(\d{1,3})\b", r.lines[0] if r.lines else "")
    if m and m.group(1) == str(r.code)[0]:
        return m.group(0)
    return default


def _quit(conn: Connection) -> None:
    try:
        conn.command("QUIT")
    except (OSError, ConnectionError):
        pass


def deliver(config: Config, msgpath: str, sender: str, recipients: Sequence[str],
            domain: str, queued: bool = True, utf8: bool = False,
            dsn: Optional[dict] = None) -> List[Result]:
    """Deliver the message at `msgpath` (a queue file; with `queued` false,
    a plain file holding only the data) to `recipients` (all at `domain`);
    `utf8`: it came with SMTPUTF8 (RFC 6531).  One Result per recipient,
    in order; `dsn`: its DSN request (see _transaction).  Cooperative
    (gevent sockets; DNS in the threadpool); never raises for delivery
    problems."""
    n = len(recipients)
    try:
        planned = static_plan(config, domain) or run(plan, config, domain)
        targets, route = planned
        body = run(_Body, msgpath, queued)
    except PermError as e:
        return [failed(str(e), e.status)] * n
    except TempError as e:
        return [deferred(str(e), "4.4.3")] * n
    except (OSError, ValueError) as e:
        return [deferred("Unable to read the queued message: %s. (#4.3.0)"
                         % (getattr(e, "strerror", None) or e))] * n
    policy = config.tls_policy(domain)
    per_host: dict = {}
    by_mx = not policy.key and not (route is not None and route.relay) \
        and not domain.startswith("[")
    refusal = None
    if by_mx and config.dane:
        targets, per_host, refusal = _dane(domain, targets)
    if by_mx and config.mtasts and not per_host and refusal is None:
        targets, policy, refusal = _mta_sts(config, domain, targets, policy)
    if refusal is not None:
        body.close()
        return [refusal] * n
    try:
        return _deliver_to(config, targets, route, body, sender, recipients, utf8, dsn,
                           policy, per_host)
    finally:
        body.close()


#: host -> (time, trust anchors) found by _dane_ta, a few minutes at most
_anchors: dict = {}
ANCHORS_TTL = 300


def _dane_ta(config: Config, policy: TlsPolicy, host: str, ip: str, port: int) -> TlsPolicy:
    """`policy` with the DANE-TA trust anchors of `host` when it has only
    usage 2 records: the certificates of its chain that the records name,
    learnt from one probe handshake (the real one then verifies up to
    them).  Raises Retry when the chain holds none."""
    import time as _time
    from dataclasses import replace as _replace

    from . import dane

    if dane.usable(policy.tlsa, 3) or not dane.usable(policy.tlsa, 2):
        return policy
    hit = _anchors.get((host, policy.tlsa))
    if hit is not None and _time.monotonic() - hit[0] < ANCHORS_TTL:
        return _replace(policy, anchors=hit[1])
    anchors = dane.trust_anchors(policy.tlsa, [])  # 2 0 0: the anchor is in DNS
    if not anchors:
        anchors = dane.trust_anchors(policy.tlsa, _probe_chain(config, host, ip, port))
    if not anchors:
        _tls_report(config, policy, host, ip, "validation-failure")
        raise Retry("TLS to %s: no certificate of its chain matches the DANE-TA records "
                    "of %s (#4.7.5)" % (ip, host))
    if len(_anchors) >= 64:
        _anchors.clear()
    _anchors[(host, policy.tlsa)] = (_time.monotonic(), tuple(anchors))
    return _replace(policy, anchors=tuple(anchors))


def _probe_chain(config: Config, host: str, ip: str, port: int) -> List[bytes]:
    """The certificate chain `host` sends after STARTTLS (DER, leaf
    first), from a connection made for that alone.  Raises Retry."""
    from . import dane

    conn = _connect(config, host, ip, port)
    try:
        if conn.reply().code != 220 or conn.ehlo(config.helohost).code != 250 \
                or "STARTTLS" not in conn.extensions or conn.command("STARTTLS").code != 220:
            raise Retry("%s offers no STARTTLS, which dane requires (#4.7.4)" % ip)
        import gevent.ssl as ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn.sock = ctx.wrap_socket(conn.sock, server_hostname=host)
        chain = dane.peer_chain(conn.sock)
        conn.buf.clear()
        _quit(conn)
        return chain
    except (OSError, ConnectionError) as e:
        raise Retry("TLS probe of %s failed: %s" % (ip, e))
    finally:
        conn.close()


def _dane(domain: str, targets):
    """DANE (RFC 7672) for a delivery by MX to `domain`: (targets without
    the hosts whose TLSA look-up failed, {host: its TlsPolicy}, a deferral
    or None)."""
    from . import dane

    qdomain = to_ascii_domain(domain) or domain
    try:
        found = run(dane.policies, qdomain, [host for host, _, _ in targets])
    except Exception as e:  # a bug there must not stop mail
        log.alert("dane: %s: %s: %s" % (qdomain, type(e).__name__, e))
        return targets, {}, None
    if not found:
        return targets, {}, None
    bad = sorted(h for h, recs in found.items() if recs == dane.INDETERMINATE)
    if bad:
        log.line("dane: %s: the TLSA records of %s could not be looked up (bogus or "
                 "SERVFAIL): skipped" % (qdomain, ", ".join(bad)))
    kept = [t for t in targets if found.get(t[0]) != dane.INDETERMINATE]
    if not kept:
        return targets, {}, deferred("The TLSA records of the MX hosts of %s could not be "
                                     "looked up (DNSSEC). (#4.7.5)" % qdomain, "4.7.5")
    per_host = {h: TlsPolicy(qdomain, "dane", source="dane", tlsa=tuple(recs),
                             strings=tuple("%d %d %d %s" % (u, s, m, d.hex())
                                           for u, s, m, d in recs))
                for h, recs in found.items() if recs != dane.INDETERMINATE}
    return kept, per_host, None


def _mta_sts(config: Config, domain: str, targets, policy: TlsPolicy):
    """MTA-STS (RFC 8461 section 4) for a delivery by MX to `domain`:
    (targets, TLS policy, a deferral or None).  ``enforce`` keeps the MX
    hosts the policy names and requires a verified certificate; ``testing``
    logs the MX hosts it would refuse."""
    from . import mtasts

    qdomain = to_ascii_domain(domain) or domain
    try:
        sts = run(mtasts.lookup, config, qdomain)
    except Exception as e:  # a bug there must not stop mail
        log.alert("mta-sts: %s: %s: %s" % (qdomain, type(e).__name__, e))
        return targets, policy, None
    if sts is None or sts.mode == "none":
        return targets, policy, None
    if mtasts.needs_refresh(sts):
        import gevent

        gevent.spawn(run, mtasts.lookup, config, qdomain, True)
    outside = sorted({host for host, _, _ in targets if not sts.matches(host)})
    strings = ("version: STSv1", "mode: %s" % sts.mode) + tuple(
        "mx: %s" % m for m in sts.mx) + ("max_age: %d" % sts.max_age,)
    if sts.mode == "testing":
        if outside:
            log.line("mta-sts: %s testing: MX %s not in the policy (sent anyway)"
                     % (qdomain, ", ".join(outside)))
        return targets, TlsPolicy(qdomain, "verify", source="mta-sts", strings=strings,
                                  testing=True), None
    kept = [t for t in targets if sts.matches(t[0])]
    if not kept:
        return targets, policy, deferred(
            "None of the MX hosts of %s (%s) is in its MTA-STS policy. (#4.7.5)"
            % (qdomain, ", ".join(outside)), "4.7.5")
    return kept, TlsPolicy(qdomain, "verify", source="mta-sts", strings=strings), None


def _deliver_to(config: Config, targets, route: Optional[SmtpRoute], body: _Body, sender: str,
                recipients: Sequence[str], utf8: bool = False,
                dsn: Optional[dict] = None,
                policy: TlsPolicy = DEFAULT_TLS,
                per_host: Optional[dict] = None) -> List[Result]:
    """Try `targets` in order, on cached or new connections."""
    n = len(recipients)
    tried = []
    user = route.user if route is not None and route.has_credentials else None
    base = policy
    for host, ip, port in targets:
        policy = (per_host or {}).get(host, base)
        if policy.level == "dane" and not policy.anchors:
            try:
                policy = _dane_ta(config, policy, host, ip, port)
            except Retry as e:
                tried.append(str(e))
                continue
        key = (host, ip, port, user, policy)
        while True:
            cached = _take(key)
            if cached is not None:
                conn, uses = cached
            else:
                try:
                    conn = _connect(config, host, ip, port, policy)
                except Retry as e:
                    tried.append(str(e))
                    break
                uses = 0
            keep = done = False
            try:
                if cached is None:
                    _open(config, conn, host, ip, port, route, policy)
                results, keep = _transaction(conn, ip, body, sender, recipients,
                                             cached is not None, utf8, dsn)
                done = True
                return [_with_host(r, host) for r in results]
            except _Stale:
                continue  # the far end closed the idle connection: a new one
            except TlsRetry as e:
                if policy.testing:  # MTA-STS testing: say it, send it anyway
                    log.line("mta-sts: %s testing: %s would fail: %s (sent anyway)"
                             % (policy.key, host, e))
                    policy = DEFAULT_TLS
                    key = (host, ip, port, user, policy)
                    continue
                tried.append(str(e))
                break
            except Retry as e:
                tried.append(str(e))
                break
            except PermError as e:
                return [_with_host(failed(str(e), e.status), host)] * n
            except TempError as e:
                return [_with_host(deferred(str(e), "4.4.2"), host)] * n
            except (OSError, ConnectionError) as e:
                tried.append("connection to %s died: %s" % (ip, e))
                break
            finally:
                if keep:
                    _keep(key, conn, uses + 1)
                elif done:
                    _goodbye(conn)  # the transaction ended: QUIT, as qmail-remote
                else:
                    conn.close()
    return [deferred("Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"
                     + ("\n" + "; ".join(tried[-3:]) if tried else ""), "4.4.1")] * n


def _with_host(r: Result, host: str) -> Result:
    """Name the remote MTA and its reply, for the bounce (RFC 3464)."""
    said = r.text.rpartition("Remote host said: ")[2] if "Remote host said: " in r.text else None
    return replace(r, remote_mta=host.strip("[]"),
                   diagnostic=("smtp; " + said.replace("\n", " ")) if said else None)
