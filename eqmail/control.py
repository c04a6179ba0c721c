"""control -- the control/ files under the eqmail home, as one immutable snapshot.

SUMMARY
    `load(home)` reads every control file eqmail uses into a frozen `Config`.
    Missing files take qmail's documented defaults; a malformed file raises
    `ConfigError` naming the file and the line.  `ConfigHolder` keeps the
    current snapshot and swaps it whole on SIGHUP, keeping the last good one
    when the new one is bad.

STANDARDS
    qmail-control(5), qmail-smtpd(8), qmail-send(8), qmail-inject(8),
    qmail-showctl(8) of netqmail 1.06 and eQmail 1.09 (see the behaviour
    reference, section 1).  Reading rules as in qmail's control.c:
    single-line files use their first line with trailing blanks removed;
    list files drop empty lines and lines starting with ``#``; look-ups in
    domain lists ignore case.

CONTROL FILES (default when missing)
    me                  FQDN of this host; required.
    defaultdomain, defaulthost, plusdomain, idhost, envnoathost, bouncehost,
    doublebouncehost, localiphost, helohost, smtpgreeting
                        me
    bouncefrom          MAILER-DAEMON
    doublebounceto      postmaster
    locals              me
    rcpthosts           **locals, with a warning** (qmail accepts every
                        recipient without it, an open relay; eqmail does not)
    morercpthosts       none; eqmail reads the plain list file (qmail reads
                        only morercpthosts.cdb, which eqmail ignores)
    virtualdomains      none; ``addr-or-domain:prefix`` lines
    percenthack         none
    badmailfrom         none; ``addr``, ``@domain`` and ``.suffix`` lines
    databytes           0 (no limit), bytes
    timeoutsmtpd        1200 seconds; values <= 0 become 1
    concurrencylocal    10, at most 120; 0 holds local deliveries
    concurrencyremote   20, at most 120
    queuelifetime       604800 seconds
    delaywarningtime    0 (off), seconds: the sender hears once that a
                        message has waited this long (Postfix's
                        delay_warning_time)
    defaultdelivery     ./Maildir/  (eQmail's usual qmail-start argument); all
                        lines count, read like a .qmail file
    smtproutes          none; ``domain:relay[:port] [user password]`` lines
                        (see SmtpRoute)
    timeoutconnect      60 seconds for a remote connect()
    timeoutremote       1200 seconds per remote read or write
    tlsdestinations     none; ``domain:level[:argument]`` lines (TlsPolicy)
    mtasts              0; 1: honour MTA-STS policies (delivery.mtasts)
    dane                0; 1: honour DANE TLSA records (delivery.dane; needs
                        a validating resolver)
    tlsclientciphers    OpenSSL cipher list, lines joined with ``:``; default
                        the library's
    beforemote          none; one filter command line per line
    timeoutbeforemote   120 seconds a beforemote filter may run (eqmail's)
    smtprules           none (everyone allowed); per-client rules, first match
                        wins (see ClientRule)
    concurrencyincoming 200 SMTP sessions at once (eqmail's; tcpserver -c)
    concurrencyperip    100 sessions at once from one IP address (eqmail's)
    tlsserverciphers    OpenSSL cipher list for STARTTLS, lines joined with ``:``
    timeoutplugins      60 seconds a qmail-spp plugin may run (eqmail's)
    directlocal         1: local mail that only writes files is delivered
                        during DATA (eqmail.delivery.direct); 0: through
                        the queue, as qmail does (eqmail's)
    timeoutstress       10 seconds: while the sessions are at STRESS_SHARE of
                        concurrencyincoming or more, a session waits this
                        long for the client at most (Postfix's stress
                        mode); 0: off (eqmail's)
    greetdelay          0 seconds: wait this long before the greeting; a
                        client that talks first is refused (554) and
                        dropped (postscreen's pregreet test; GREETDELAY in
                        smtprules wins; eqmail's)
    strictpipelining    0; 1: a client that sends a command behind another
                        without PIPELINING (before EHLO, or after HELO) is
                        refused (554) and dropped (STRICTPIPELINING; eqmail's)
    tarpitdelay         0 seconds slept before each refused RCPT (TARPITDELAY;
                        eqmail's)
    rbls, rblthreshold, rblwhen, rbltemporary
                        none, 1, connect, 0: DNS blocklists (see
                        eqmail.smtp.dnsbl; eqmail's)
    greydelay, greywindow, greylifetime, greyallow
                        0 (off), 2 days, 35 days, none: greylisting (see
                        eqmail.smtp.greylist; GREYLIST=0 in smtprules)
    authcheck, dmarcreject, authmaxsize
                        0, 0, 2097152: DKIM, DMARC, ARC and
                        Authentication-Results (eqmail.smtp.authcheck)
    spfbehavior         0: SPF off; 1-6 qmail-spf's levels (see
                        eqmail.smtp.spfcheck; SPFBEHAVIOR in smtprules)
    aliases             /etc/aliases: the sendmail-style aliases file whose
                        compiled ``.cdb`` (eqmail newaliases) the alias user's
                        deliveries follow (eqmail.delivery.aliases; eqmail's)
    mailspool           none: a system user whose default delivery
                        (defaultdelivery) names a Maildir that does not exist
                        gets the mbox ``mailspool/USER`` instead, locked as
                        Debian policy 11.6 says (the package sets /var/mail;
                        eqmail's)
    conf-break          +  the extension delimiter (eQmail's conf-break; one
                        character; netqmail used -)

SECURITY
    Control files are trusted more than the network but are still checked:
    values with white space or control characters where a domain belongs are
    refused with a clear error rather than used.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

from . import log
from .address import address_key, domain_key, dot_suffixes

#: qmail's conf-spawn: the ceiling for concurrencylocal/concurrencyremote.
CONF_SPAWN = 120

#: qmail-send's queuelifetime default, seconds (qmail-send(8)).
DEFAULT_QUEUELIFETIME = 604800

#: qmail-smtpd's timeoutsmtpd default, seconds (qmail-smtpd(8)).
DEFAULT_TIMEOUTSMTPD = 1200


class ConfigError(Exception):
    """A control file is malformed.  `str()` names the file and the line."""

    def __init__(self, path: str, lineno: int, problem: str):
        self.path = path
        self.lineno = lineno
        self.problem = problem
        super().__init__("%s line %d: %s" % (path, lineno, problem))


@dataclass(frozen=True)
class SmtpRoute:
    """One control/smtproutes entry (eQmail's format, behaviour reference 7.3).

    ``domain:relay[:port][ user password]``; `relay` "" means "use MX".
    An IPv6 relay is written in brackets, ``[2001:db8::1]:587``.  user is
    the word after the first blank, password everything after the second
    (it may contain blanks).  Port 465 means TLS from the first byte.
    """

    key: str
    relay: str
    port: int
    user: str = ""
    password: str = field(default="", repr=False)

    @property
    def has_credentials(self) -> bool:
        return bool(self.user)


#: control/tlsdestinations' levels, weakest first.
TLS_LEVELS = ("none", "may", "encrypt", "verify", "fingerprint")


@dataclass(frozen=True)
class TlsPolicy:
    """One control/tlsdestinations entry (qmail-tls's idea, Postfix's
    levels): ``domain:level[:argument]``, the domain matched as in
    smtproutes (exact, ``.suffix``, empty for every other).

    none         never STARTTLS
    may          STARTTLS when offered, the certificate not checked (the
                 default: what eqmail always did)
    encrypt      STARTTLS required, the certificate not checked
    verify       STARTTLS required; the certificate chain verified against
                 the system's CA store, or the CA file given as argument,
                 and its name against the MX host's (the relay's) name
    fingerprint  STARTTLS required; the server certificate's SHA-256
                 (``sha256:AB:CD:...``, several separated by ``,``) must
                 be one of those given
    """

    key: str
    level: str = "may"
    cafile: str = ""
    fingerprints: Tuple[str, ...] = ()
    #: where the policy comes from, for the log: tlsdestinations, mta-sts, dane
    source: str = "tlsdestinations"
    #: level "dane": the host's TLSA records, (usage, selector, type, data)
    tlsa: Tuple[Tuple[int, int, int, bytes], ...] = ()
    #: the policy as TLS reports name it (RFC 8460 policy-string)
    strings: Tuple[str, ...] = ()
    #: level "dane" with DANE-TA records: the trust anchors (DER) found in
    #: the server's chain, the only ones its certificate may chain up to
    anchors: Tuple[bytes, ...] = ()
    #: MTA-STS mode testing: a failure is logged and the message sent anyway
    testing: bool = False

    @property
    def required(self) -> bool:
        return self.level in ("encrypt", "verify", "fingerprint", "dane")


DEFAULT_TLS = TlsPolicy("", "may")


def parse_tlsdestination(path: str, lineno: int, text: str) -> TlsPolicy:
    """Parse one tlsdestinations line.  Raises ConfigError naming the line."""
    key, sep, rest = text.partition(":")
    if not sep or any(ch.isspace() for ch in text):
        raise ConfigError(path, lineno, "expected 'domain:level[:argument]', got %r" % text)
    level, _, arg = rest.partition(":")
    level = level.lower()
    if level not in TLS_LEVELS:
        raise ConfigError(path, lineno, "unknown level %r (%s)" % (level, ", ".join(TLS_LEVELS)))
    if level == "fingerprint":
        prints = []
        for one in arg.split(","):
            algo, _, digest = one.partition(":")
            digest = digest.replace(":", "").lower()
            if algo.lower() != "sha256" or len(digest) != 64 or \
                    any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(path, lineno, "expected 'sha256:' and 32 hex bytes, got %r"
                                  % one)
            prints.append(digest)
        return TlsPolicy(domain_key(key), level, "", tuple(prints))
    if arg and level != "verify":
        raise ConfigError(path, lineno, "%s takes no argument" % level)
    if arg and not os.path.isabs(arg):
        raise ConfigError(path, lineno, "the CA file must be an absolute path: %r" % arg)
    return TlsPolicy(domain_key(key), level, arg)


def parse_smtproute(path: str, lineno: int, text: str) -> SmtpRoute:
    """Parse one smtproutes line.  Raises ConfigError naming the line (never
    quoting the password)."""
    key, sep, value = text.partition(":")
    if not sep:
        raise ConfigError(path, lineno, "expected 'domain:relay', no ':' found")
    if any(ch.isspace() for ch in key):
        raise ConfigError(path, lineno, "white space in the domain")
    hostport, _, creds = value.partition(" ")
    user, _, password = creds.partition(" ")
    if user and not password:
        # eQmail would send the next line of the file as the password
        raise ConfigError(path, lineno, "a user name needs a password after it")
    port = 25
    relay = hostport
    if hostport.startswith("["):
        end = hostport.find("]")
        if end == -1:
            raise ConfigError(path, lineno, "no closing ] in the relay")
        relay, rest = hostport[:end + 1], hostport[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(path, lineno, "expected :port after the relay")
            hostport_port = rest[1:]
        else:
            hostport_port = ""
    else:
        relay, _, hostport_port = hostport.partition(":")
    if hostport_port:
        if not (hostport_port.isascii() and hostport_port.isdigit()) \
                or not 0 < int(hostport_port) < 65536:
            raise ConfigError(path, lineno, "bad port %r" % hostport_port)
        port = int(hostport_port)
    if not relay and (hostport_port or user):
        raise ConfigError(path, lineno, "a port or credentials without a relay")
    if relay.startswith("["):
        from .address import ip_literal
        inner = relay[1:-1]
        lit = "[IPv6:%s]" % inner if ":" in inner and not inner.lower().startswith("ipv6:") \
            else relay
        if ip_literal(lit) is None:
            raise ConfigError(path, lineno, "bad IP address %r" % relay)
    return SmtpRoute(domain_key(key), relay, port, user, password)


@dataclass(frozen=True)
class ClientRule:
    """One control/smtprules line (eqmail's, after tcprules(1)):

        PATTERN:allow[,VAR=VALUE...]      or      PATTERN:deny

    PATTERN is an IPv4 or IPv6 address, a CIDR network (``10.0.0.0/8``,
    ``2001:db8::/32``), tcprules' IPv4 prefix with a final dot
    (``192.168.1.``), ``[::1]`` in brackets, or empty for everyone.
    VALUE may be in double quotes; ``RELAYCLIENT=""`` sets it empty.
    The variables become the session's environment (RELAYCLIENT,
    TLSREQUIRED, DATABYTES, NOSPP, and anything plugins read).
    """

    pattern: str
    allow: bool
    env: Tuple[Tuple[str, str], ...] = ()
    _net: object = field(default=None, compare=False, repr=False)

    def matches(self, ip: str) -> bool:
        if not self.pattern:
            return True
        if self.pattern.endswith(".") and ":" not in self.pattern:
            return ip.startswith(self.pattern)
        try:
            import ipaddress
            return ipaddress.ip_address(ip) in self._net
        except ValueError:
            return False


_RULE = re.compile(r"^(.*):(allow|deny)((?:,.*)?)$")
_VARNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_smtprule(path: str, lineno: int, text: str) -> ClientRule:
    """Parse one smtprules line.  Raises ConfigError naming the line."""
    import ipaddress

    m = _RULE.match(text)
    if m is None:
        raise ConfigError(path, lineno, "expected PATTERN:allow[,VAR=VALUE...] or PATTERN:deny")
    pattern, action, rest = m.group(1).strip(), m.group(2), m.group(3)
    if pattern.startswith("[") and pattern.endswith("]"):
        pattern = pattern[1:-1]
    net = None
    if pattern and not (pattern.endswith(".") and ":" not in pattern):
        try:
            net = ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            raise ConfigError(path, lineno, "not an address or network: %r" % pattern)
    elif pattern and not all(p.isdigit() for p in pattern[:-1].split(".")):
        raise ConfigError(path, lineno, "not an IPv4 prefix: %r" % pattern)
    env = []
    for item in rest[1:].split(",") if rest else []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not _VARNAME.match(name):
            raise ConfigError(path, lineno, "expected VAR=VALUE, got %r" % item)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name == "DATABYTES" and value.strip() and parse_size(value) is None:
            raise ConfigError(path, lineno, "DATABYTES: expected bytes from 0 to %d, got %r"
                              % (MAX_NUMBER, value[:20]))
        env.append((name, value))
    if action == "deny" and env:
        raise ConfigError(path, lineno, "deny takes no variables")
    return ClientRule(pattern, action == "allow", tuple(env), net)


#: The share of concurrencyincoming from which the sessions are in stress
#: mode (see timeoutstress).
STRESS_SHARE = 0.8


@dataclass(frozen=True)
class Config:
    """One consistent snapshot of the control files.  Domains are lower case."""

    home: str
    me: str
    defaultdomain: str
    defaulthost: str
    plusdomain: str
    idhost: str
    envnoathost: str
    bouncefrom: str
    bouncehost: str
    doublebounceto: str
    doublebouncehost: str
    localiphost: str
    helohost: str
    smtpgreeting: str
    locals: FrozenSet[str]
    rcpthosts: FrozenSet[str]
    rcpthosts_missing: bool
    morercpthosts: FrozenSet[str]
    virtualdomains: Tuple[Tuple[str, str], ...]
    percenthack: FrozenSet[str]
    badmailfrom: FrozenSet[str]
    databytes: int
    timeoutsmtpd: int
    concurrencylocal: int
    concurrencyremote: int
    queuelifetime: int
    defaultdelivery: str
    break_char: str
    smtproutes: Tuple[SmtpRoute, ...] = ()
    tlsdestinations: Tuple[TlsPolicy, ...] = ()
    timeoutconnect: int = 60
    timeoutremote: int = 1200
    tlsclientciphers: str = ""
    beforemote: Tuple[str, ...] = ()
    timeoutbeforemote: int = 120
    smtprules: Tuple[ClientRule, ...] = ()
    concurrencyincoming: int = 200
    concurrencyperip: int = 100
    tlsserverciphers: str = ""
    timeoutplugins: int = 60
    directlocal: bool = True
    timeoutstress: int = 10
    greetdelay: int = 0
    strictpipelining: bool = False
    tarpitdelay: int = 0
    rbls: Tuple[Tuple[str, int, bool], ...] = ()
    rblthreshold: int = 1
    rblwhen: str = "connect"
    rbltemporary: bool = False
    spfbehavior: int = 0
    greydelay: int = 0
    greywindow: int = 172800
    greylifetime: int = 3024000
    greyallow: Tuple[str, ...] = ()
    authcheck: bool = False
    dmarcreject: bool = False
    authmaxsize: int = 2097152
    aliases: str = "/etc/aliases"
    mailspool: str = ""
    delaywarningtime: int = 0
    mtasts: bool = False
    dane: bool = False
    _virtual_map: Dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _route_map: Dict[str, SmtpRoute] = field(default_factory=dict, compare=False, repr=False)
    _tls_map: Dict[str, TlsPolicy] = field(default_factory=dict, compare=False, repr=False)

    def path(self, *parts: str) -> str:
        """Return a path under the home."""
        return os.path.join(self.home, *parts)

    def virtual_prefix(self, address: str) -> Optional[str]:
        """Look `address` (``local@domain``) up in virtualdomains.

        Returns the prefix of the first match -- full address, exact domain,
        ``.suffix`` entries longest first, then the empty key -- or None
        when nothing matches.  An empty string means "not virtual"
        (qmail-send(8), behaviour reference section 5.4).
        """
        vmap = self._virtual_map
        addr = address_key(address)
        if addr in vmap:
            return vmap[addr]
        return _by_domain(vmap, addr.rpartition("@")[2])

    def client_rule(self, ip: str) -> Optional[ClientRule]:
        """The first smtprules line matching `ip` (None: no rule, allowed)."""
        for rule in self.smtprules:
            if rule.matches(ip):
                return rule
        return None

    def tls_policy(self, domain: str) -> TlsPolicy:
        """The tlsdestinations entry for `domain` (as smtproute finds one),
        else DEFAULT_TLS."""
        return _by_domain(self._tls_map, domain) or DEFAULT_TLS

    def smtproute(self, domain: str) -> Optional[SmtpRoute]:
        """The smtproutes entry for `domain`: exact, then ``.suffix``
        entries longest first, then the empty key; None when none applies."""
        return _by_domain(self._route_map, domain)


def _by_domain(table: dict, domain: str):
    """`table`'s entry for `domain` as qmail-remote looks smtproutes up:
    the exact domain, then ``.suffix`` keys longest first, then the empty
    key; None when none applies."""
    if not table:
        return None
    domain = domain_key(domain)
    if domain in table:
        return table[domain]
    for key in dot_suffixes(domain):
        if key in table:
            return table[key]
    return table.get("")


# -- reading ----------------------------------------------------------------------

def _read_lines(path: str) -> Optional[list]:
    """Return the decoded lines of `path`, or None when it does not exist.

    Raises ConfigError for undecodable text; OSError for other read errors.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 22)  # 4 MiB is far beyond any sane control file
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(path, n, "not valid UTF-8 text")
    return out


def _bad_chars(text: str) -> bool:
    return any(ch < " " or ch == "\x7f" for ch in text)


def read_line(path: str, default: Optional[str]) -> Optional[str]:
    """qmail's control_rldef(): the first line, trailing blanks removed."""
    lines = _read_lines(path)
    if lines is None or not lines:
        return default
    value = lines[0].rstrip(" \t\r")
    if _bad_chars(value):
        raise ConfigError(path, 1, "control characters in value")
    return value


def read_name(path: str, default: Optional[str]) -> Optional[str]:
    """A single host or address name: one line, no white space."""
    value = read_line(path, default)
    if value is None:
        return None
    if value == "" or any(ch.isspace() for ch in value):
        raise ConfigError(path, 1, "expected one name without white space, got %r" % value)
    return value


#: The largest number a control file or DATABYTES may hold: qmail's int.
MAX_NUMBER = 2 ** 31 - 1


def read_int(path: str, default: int) -> int:
    """qmail's control_readint(): a decimal number on the first line, at
    most MAX_NUMBER either way (qmail's scan_ulong wrapped a longer one
    silently).  Raises ConfigError naming the file."""
    value = read_line(path, None)
    if value is None:
        return default
    text = value.strip()
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(path, 1, "expected a number, got %r" % value)
    if len(digits) > 10 or int(digits) > MAX_NUMBER:
        raise ConfigError(path, 1, "number too large (at most %d): %s"
                          % (MAX_NUMBER, text[:20] + ("..." if len(text) > 20 else "")))
    return int(text)


def parse_size(text: str) -> Optional[int]:
    """A DATABYTES value (environment, smtprules): bytes from 0 to
    MAX_NUMBER, or None when `text` is not such a number."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > MAX_NUMBER:
        return None
    return int(text)


def read_list(path: str):
    """qmail's control_readfile(): [(lineno, entry)], or None when missing."""
    lines = _read_lines(path)
    if lines is None:
        return None
    out = []
    for n, text in enumerate(lines, 1):
        text = text.rstrip(" \t\r")
        if not text or text.startswith("#"):
            continue
        if _bad_chars(text):
            raise ConfigError(path, n, "control characters in line")
        out.append((n, text))
    return out


def _domains(path: str, allow_dot_prefix: bool = True) -> Optional[FrozenSet[str]]:
    entries = read_list(path)
    if entries is None:
        return None
    out = set()
    for n, text in entries:
        if any(ch.isspace() for ch in text) or "@" in text or "/" in text:
            raise ConfigError(path, n, "not a domain: %r" % text)
        if text.startswith(".") and not allow_dot_prefix:
            raise ConfigError(path, n, "not a domain: %r" % text)
        out.add(domain_key(text))
    return frozenset(out)


def load(home: str) -> Config:
    """Read all control files under `home` into a Config.

    Raises ConfigError for a malformed file (naming file and line), and
    for a missing control/me.  Logs a warning when rcpthosts is missing.
    """
    home = os.path.abspath(home)
    c = lambda name: os.path.join(home, "control", name)  # noqa: E731

    me = read_name(c("me"), None)
    if me is None:
        raise ConfigError(c("me"), 1, "missing: eqmail needs this host's name there")
    me_l = me.lower()

    locals_ = _domains(c("locals"), allow_dot_prefix=False)
    if locals_ is None:
        locals_ = frozenset([me_l])
    rcpthosts = _domains(c("rcpthosts"))
    rcpthosts_missing = rcpthosts is None
    if rcpthosts is None:
        rcpthosts = locals_
    morercpthosts = _domains(c("morercpthosts")) or frozenset()
    percenthack = _domains(c("percenthack"), allow_dot_prefix=False) or frozenset()

    vd_entries = read_list(c("virtualdomains")) or []
    virtual = []
    vmap: Dict[str, str] = {}
    for n, text in vd_entries:
        key, sep, prefix = text.partition(":")
        if not sep or any(ch.isspace() for ch in text):
            raise ConfigError(c("virtualdomains"), n,
                              "expected 'domain:prefix', got %r" % text)
        key = address_key(key) if "@" in key else domain_key(key)
        virtual.append((key, prefix))
        vmap.setdefault(key, prefix)  # first match wins

    bad = read_list(c("badmailfrom")) or []
    for n, text in bad:
        if any(ch.isspace() for ch in text):
            raise ConfigError(c("badmailfrom"), n, "white space in %r" % text)
    badmailfrom = frozenset(address_key(text) if "@" in text else domain_key(text)
                            for _, text in bad)

    timeoutsmtpd = read_int(c("timeoutsmtpd"), DEFAULT_TIMEOUTSMTPD)
    if timeoutsmtpd <= 0:
        timeoutsmtpd = 1
    databytes = read_int(c("databytes"), 0)
    if databytes < 0:
        raise ConfigError(c("databytes"), 1, "negative size")
    conc_local = read_int(c("concurrencylocal"), 10)
    conc_remote = read_int(c("concurrencyremote"), 20)
    for name, value in (("concurrencylocal", conc_local), ("concurrencyremote", conc_remote)):
        if value < 0:
            raise ConfigError(c(name), 1, "negative concurrency")
    queuelifetime = read_int(c("queuelifetime"), DEFAULT_QUEUELIFETIME)
    if queuelifetime < 0:
        raise ConfigError(c("queuelifetime"), 1, "negative lifetime")

    dd_lines = _read_lines(c("defaultdelivery"))
    for n, text in enumerate(dd_lines or [], 1):
        if _bad_chars(text.rstrip("\r")):
            raise ConfigError(c("defaultdelivery"), n, "control characters in line")
    defaultdelivery = "\n".join(l.rstrip(" \t\r") for l in dd_lines or []).strip("\n")
    if not defaultdelivery:
        defaultdelivery = "./Maildir/"
    routes = tuple(parse_smtproute(c("smtproutes"), n, text)
                   for n, text in (read_list(c("smtproutes")) or []))
    tlsdest = tuple(parse_tlsdestination(c("tlsdestinations"), n, text)
                    for n, text in (read_list(c("tlsdestinations")) or []))
    ciphers = ":".join(text for _, text in (read_list(c("tlsclientciphers")) or []))
    beforemote = tuple(text for _, text in (read_list(c("beforemote")) or []))
    timeoutconnect = max(1, read_int(c("timeoutconnect"), 60))
    timeoutremote = max(1, read_int(c("timeoutremote"), 1200))
    timeoutbeforemote = max(1, read_int(c("timeoutbeforemote"), 120))
    smtprules = tuple(parse_smtprule(c("smtprules"), n, text)
                      for n, text in (read_list(c("smtprules")) or []))
    incoming = max(1, read_int(c("concurrencyincoming"), 200))
    perip = max(1, read_int(c("concurrencyperip"), 100))
    server_ciphers = ":".join(text for _, text in (read_list(c("tlsserverciphers")) or []))
    timeoutplugins = max(1, read_int(c("timeoutplugins"), 60))
    aliases = read_line(c("aliases"), None) or "/etc/aliases"
    mailspool = (read_line(c("mailspool"), None) or "").rstrip("/")
    for name, value in (("aliases", aliases), ("mailspool", mailspool)):
        if value and (not value.startswith("/") or _bad_chars(value)):
            raise ConfigError(c(name), 1, "expected an absolute path, got %r" % value)
    rbls = []
    for n, text in read_list(c("rbls")) or []:
        words = text.split()
        zone = words[0]
        allow = zone.startswith("+")
        zone = zone.lstrip("+").strip(".").lower()
        if not zone or len(words) > 2 or any(ch in zone for ch in "/:@ ") or \
                (len(words) == 2 and not words[1].isdigit()):
            raise ConfigError(c("rbls"), n, "expected ZONE [WEIGHT] or +ZONE, got %r" % text)
        rbls.append((zone, int(words[1]) if len(words) == 2 else 1, allow))
    rblwhen = (read_line(c("rblwhen"), None) or "connect").strip().lower()
    if rblwhen not in ("connect", "mail"):
        raise ConfigError(c("rblwhen"), 1, "expected connect or mail, got %r" % rblwhen)
    break_char = read_line(c("conf-break"), "+")
    if len(break_char) != 1 or break_char.isalnum() or break_char in "@.:/":
        raise ConfigError(c("conf-break"), 1, "expected one delimiter character such "
                          "as + or -, got %r" % break_char)

    config = Config(
        home=home,
        me=me,
        defaultdomain=read_name(c("defaultdomain"), me),
        defaulthost=read_name(c("defaulthost"), me),
        plusdomain=read_name(c("plusdomain"), me),
        idhost=read_name(c("idhost"), me),
        envnoathost=read_name(c("envnoathost"), me),
        bouncefrom=read_name(c("bouncefrom"), "MAILER-DAEMON"),
        bouncehost=read_name(c("bouncehost"), me),
        doublebounceto=read_name(c("doublebounceto"), "postmaster"),
        doublebouncehost=read_name(c("doublebouncehost"), me),
        localiphost=read_name(c("localiphost"), me),
        helohost=read_name(c("helohost"), me),
        smtpgreeting=read_line(c("smtpgreeting"), None) or me,
        locals=locals_,
        rcpthosts=rcpthosts,
        rcpthosts_missing=rcpthosts_missing,
        morercpthosts=morercpthosts,
        virtualdomains=tuple(virtual),
        percenthack=percenthack,
        badmailfrom=badmailfrom,
        databytes=databytes,
        timeoutsmtpd=timeoutsmtpd,
        concurrencylocal=min(conc_local, CONF_SPAWN),
        concurrencyremote=min(conc_remote, CONF_SPAWN),
        queuelifetime=queuelifetime,
        defaultdelivery=defaultdelivery,
        break_char=break_char,
        smtproutes=routes,
        tlsdestinations=tlsdest,
        timeoutconnect=timeoutconnect,
        timeoutremote=timeoutremote,
        tlsclientciphers=ciphers,
        beforemote=beforemote,
        timeoutbeforemote=timeoutbeforemote,
        smtprules=smtprules,
        concurrencyincoming=incoming,
        concurrencyperip=perip,
        tlsserverciphers=server_ciphers,
        timeoutplugins=timeoutplugins,
        directlocal=read_int(c("directlocal"), 1) != 0,
        timeoutstress=max(0, read_int(c("timeoutstress"), 10)),
        greetdelay=max(0, read_int(c("greetdelay"), 0)),
        strictpipelining=read_int(c("strictpipelining"), 0) != 0,
        tarpitdelay=max(0, read_int(c("tarpitdelay"), 0)),
        rbls=tuple(rbls),
        rblthreshold=max(1, read_int(c("rblthreshold"), 1)),
        rblwhen=rblwhen,
        rbltemporary=read_int(c("rbltemporary"), 0) != 0,
        spfbehavior=min(6, max(0, read_int(c("spfbehavior"), 0))),
        greydelay=max(0, read_int(c("greydelay"), 0)),
        greywindow=max(60, read_int(c("greywindow"), 172800)),
        greylifetime=max(3600, read_int(c("greylifetime"), 3024000)),
        authcheck=read_int(c("authcheck"), 0) != 0,
        dmarcreject=read_int(c("dmarcreject"), 0) != 0,
        authmaxsize=max(0, read_int(c("authmaxsize"), 2097152)),
        greyallow=tuple(text.strip().lower() for _, text in (read_list(c("greyallow")) or [])),
        aliases=aliases,
        mailspool=mailspool,
        delaywarningtime=max(0, read_int(c("delaywarningtime"), 0)),
        mtasts=read_int(c("mtasts"), 0) != 0,
        dane=read_int(c("dane"), 0) != 0,
        _virtual_map=vmap,
        _route_map={r.key: r for r in reversed(routes)},  # the first line wins
        _tls_map={t.key: t for t in reversed(tlsdest)},
    )
    return config


#: qmail-spp's sections, in control/smtpplugins as ``[connection]`` and so on
#: (only the second character of the line counts).
SPP_SECTIONS = ("connection", "helo", "mail", "rcpt", "data", "auth")


def check_smtpplugins(home: str) -> List[str]:
    """Problems of HOME/control/smtpplugins that every SMTP session would
    meet: a plugin line naming a file that is missing, not a regular file
    or not executable (``:`` lines run the shell and are not looked at), or
    a file that cannot be read.  Each problem is one line naming the file
    and the line, as a ConfigError does.  eqmaild checks at start (exit 78)
    and on SIGHUP (an alert); the sessions read the file themselves, as
    qmail-smtpd does (qmail-spp), and answer 451 for such a plugin."""
    path = os.path.join(home, "control", "smtpplugins")
    try:
        entries = read_list(path)
    except ConfigError as e:
        return [str(e)]
    except OSError as e:
        return ["%s: cannot read: %s" % (path, e.strerror or e)]
    letters = {s[0] for s in SPP_SECTIONS}
    problems = []
    in_section = False
    for lineno, text in entries or ():
        if text.startswith("["):
            in_section = text[1:2] in letters
            continue
        if not in_section or text.startswith(":"):
            continue
        program = os.path.join(home, text)
        if not os.path.exists(program):
            why = "no such file"
        elif not os.path.isfile(program):
            why = "not a regular file"
        elif not os.access(program, os.X_OK):
            why = "not executable"
        else:
            continue
        problems.append("%s line %d: plugin %s: %s" % (path, lineno, text, why))
    return problems


class ConfigHolder:
    """The daemon's one piece of global mutable state: the current Config.

    `current` is swapped whole by `reload()`; readers take one snapshot per
    SMTP session or delivery and keep using it.
    """

    def __init__(self, home: str):
        self.home = home
        self.current = load(home)
        self._warn(self.current)

    @staticmethod
    def _warn(config: Config) -> None:
        if config.rcpthosts_missing:
            log.warning("control/rcpthosts is missing: accepting recipients "
                        "at control/locals only (qmail would relay for everyone)")

    def reload(self) -> bool:
        """Re-read the control files.  True when the new snapshot is in force;
        False (with one log line naming file and line) when the old one stays."""
        try:
            new = load(self.home)
        except ConfigError as e:
            log.alert("bad control file, keeping the last good configuration: %s" % e)
            return False
        except OSError as e:
            log.alert("unable to read control files, keeping the last good "
                      "configuration: %s" % e)
            return False
        self.current = new
        self._warn(new)
        log.status("control files reloaded")
        return True


# -- config-fast ----------------------------------------------------------------------

def host_fqdn() -> str:
    """This host's FQDN as `hostname -f` would say, lower case."""
    name = socket.getfqdn()
    if not name or name.startswith("localhost"):
        # getfqdn() found the loopback entry of /etc/hosts: the plain host
        # name says more about this machine.
        name = socket.gethostname() or "localhost"
    return name.lower()


def _write_if(path: str, text: str, always: bool) -> None:
    if always or not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def config_fast(home: str, fqdn: str, extra_locals=()) -> None:
    """Write the control files of eQmail's ``config-fast FQDN``.

    Always (re)writes me and defaultdomain (FQDN without its first label
    when it has two dots or more); writes plusdomain (last two labels),
    locals and rcpthosts (FQDN plus `extra_locals`) and an empty
    smtpplugins only when they are missing (behaviour reference section 8,
    test vector T47).
    """
    control = os.path.join(home, "control")
    os.makedirs(control, exist_ok=True)
    fqdn = fqdn.strip().lower()
    labels = fqdn.split(".")
    defaultdomain = ".".join(labels[1:]) if fqdn.count(".") >= 2 else fqdn
    plusdomain = ".".join(labels[-2:])
    domains = "".join("%s\n" % d for d in [fqdn] + [d for d in extra_locals if d != fqdn])
    _write_if(os.path.join(control, "me"), fqdn + "\n", True)
    _write_if(os.path.join(control, "defaultdomain"), defaultdomain + "\n", True)
    _write_if(os.path.join(control, "plusdomain"), plusdomain + "\n", False)
    _write_if(os.path.join(control, "locals"), domains, False)
    _write_if(os.path.join(control, "rcpthosts"), domains, False)
    _write_if(os.path.join(control, "smtpplugins"),
              "[connection]\n[helo]\n[mail]\n[rcpt]\n[data]\n#[auth]\n", False)
