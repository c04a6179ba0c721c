"""address -- envelope addresses: parsing SMTP paths, domains, list look-ups.

SUMMARY
    `parse_path()` turns the argument of MAIL FROM/RCPT TO into an envelope
    address the way qmail-smtpd's addrparse() does; the look-up helpers
    implement rcpthosts, badmailfrom and locals matching.

STANDARDS
    RFC 5321 section 4.1.2 (Reverse-path, Forward-path, source routes),
    section 4.5.3.1 (size limits); qmail-smtpd(8), qmail-control(5),
    eQmail's badmailfrom wildcard (behaviour reference sections 2.2-2.5).

SECURITY
    Input is hostile.  Addresses are bounded (`MAX_ADDRESS`), and characters
    that would corrupt the queue's NUL-separated envelope or a log line
    (NUL, CR, LF and other control characters) are refused.
"""
from __future__ import annotations

from typing import FrozenSet, Optional, Tuple

#: qmail-smtpd answers 555 to an address of 900 characters or more.
MAX_ADDRESS = 900


class AddressError(ValueError):
    """The path cannot be parsed into an address."""


def parse_path(arg: str) -> Tuple[str, str]:
    """Parse a MAIL/RCPT argument such as ``FROM:<a@b> SIZE=10``.

    Follows qmail-smtpd's addrparse(): the path starts after the first
    ``<`` and ends at the next ``>`` outside double quotes (or at the end);
    without ``<``, it starts after the first ``:`` (leading blanks skipped)
    and ends at a blank.  A source route (``@a,@b:``) is dropped; double
    quotes are removed and backslash escapes resolved, so ``"x y"@d`` gives
    ``x y@d`` and ``"a>b"@d`` gives ``a>b@d``.

    Returns (address, rest) where rest is the text after the path (ESMTP
    parameters).  Raises AddressError when there is neither ``<`` nor
    ``:``, when the ``>`` is missing (qmail accepts that), for an address of `MAX_ADDRESS` characters or more, and for
    control characters.
    """
    lt = arg.find("<")
    if lt != -1:
        pos = lt + 1
        terminator = ">"
    else:
        colon = arg.find(":")
        if colon == -1:
            raise AddressError("no path")
        pos = colon + 1
        while pos < len(arg) and arg[pos] in " \t":
            pos += 1
        terminator = " "
    if arg.startswith("@", pos):  # source route: @a,@b:user@host
        colon = arg.find(":", pos)
        pos = len(arg) if colon == -1 else colon + 1
    out = []
    quoted = False
    closed = terminator == " "
    n = len(arg)
    while pos < n:
        ch = arg[pos]
        pos += 1
        if ch == "\\" and pos < n:
            out.append(arg[pos])
            pos += 1
        elif ch == '"':
            quoted = not quoted
        elif ch == terminator and not quoted:
            closed = True
            break
        elif terminator == " " and ch == "\t" and not quoted:
            break
        else:
            out.append(ch)
    if not closed:  # qmail lets this pass ("why bother?"); eqmail does not
        raise AddressError("no closing >")
    address = "".join(out)
    if len(address) >= MAX_ADDRESS:
        raise AddressError("address too long")
    if any(ch < " " or ch == "\x7f" for ch in address):
        raise AddressError("control characters in address")
    return address, arg[pos:].strip()


def parse_params(rest: str) -> dict:
    """ESMTP parameters ``KEY=VALUE KEY2`` -> {KEY: VALUE or None}, keys upper case."""
    params = {}
    for word in rest.split():
        key, sep, value = word.partition("=")
        params[key.upper()] = value if sep else None
    return params


def split(address: str) -> Tuple[str, str]:
    """Split at the last ``@``: ``(local, domain)``; domain is "" without ``@``."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def domain_of(address: str) -> str:
    """The part after the last ``@`` ("" when there is none) in the form
    domains are compared in (`domain_key`)."""
    return domain_key(split(address)[1])


def domain_key(domain: str) -> str:
    """The form in which eqmail compares domains: lower case (ASCII only,
    as qmail's case_diffs), and a domain with non-ASCII labels as its
    A-labels (IDNA, RFC 5891), so that ``bücher.example`` in a control
    file matches ``xn--bcher-kva.example`` in an address and the other way
    round.  A leading ``.`` (a suffix entry) is kept.  A name that is not a
    valid IDN stays as it is, lower-cased."""
    if domain.isascii():
        return domain.lower()
    ascii_ = to_ascii_domain(domain)
    return ascii_ if ascii_ is not None else domain.lower()


def to_ascii_domain(domain: str) -> Optional[str]:
    """`domain` with its U-labels as A-labels (RFC 5891 section 4, with
    UTS 46 mapping: the `idna` package, Debian's python3-idna; Python's
    IDNA 2003 codec without it), lower case; None when it is not a valid
    IDN (invalid UTF-8 included).  An ASCII domain comes back lower-cased."""
    if domain.isascii():
        return domain.lower()
    lead = "." if domain.startswith(".") else ""
    core = domain[len(lead):]
    if not core or core.startswith("["):
        return None
    try:
        import idna
    except ImportError:  # Python's own IDNA 2003 codec
        try:
            return lead + core.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return None
    try:
        return lead + idna.encode(core, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def ascii_address(addr: str) -> Optional[str]:
    """`addr` as it may go to a server without SMTPUTF8 (RFC 6531 section
    3.2): unchanged when it is ASCII, else with its domain in A-labels;
    None when its local part is not ASCII or its domain is not a valid
    IDN."""
    if addr.isascii():
        return addr
    local, at, domain = addr.rpartition("@")
    if not at or not local.isascii():
        return None
    d = to_ascii_domain(domain)
    return None if d is None else local + "@" + d


def address_key(addr: str) -> str:
    """An address in the form eqmail compares addresses in: lower case,
    its domain as `domain_key` gives it."""
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr.lower()
    return local.lower() + "@" + domain_key(domain)


def valid_utf8(text: str) -> bool:
    """Whether `text` (decoded with surrogateescape) was valid UTF-8."""
    return text.isascii() or not any("\udc80" <= ch <= "\udcff" for ch in text)


def dot_suffixes(domain: str):
    """Yield the ``.suffix`` keys of `domain`: ``a.b.c`` gives ``.b.c``, ``.c``
    (longest first), as qmail matches rcpthosts, badmailfrom and
    virtualdomains entries."""
    i = domain.find(".")
    while i != -1:
        yield domain[i:]
        i = domain.find(".", i + 1)


def in_rcpthosts(address: str, rcpthosts: FrozenSet[str],
                 more: FrozenSet[str] = frozenset()) -> bool:
    """qmail-smtpd's addrallowed(): is the recipient's domain accepted?

    An exact entry, or a ``.suffix`` entry matching on a dot boundary
    (``.example.net`` matches ``sub.example.net``, not ``example.net``).
    An address without ``@`` always passes (qmail adds envnoathost later).
    """
    if "@" not in address:
        return True
    domain = domain_of(address)
    for table in (rcpthosts, more):
        if not table:
            continue
        if domain in table or any(k in table for k in dot_suffixes(domain)):
            return True
    return False


def in_badmailfrom(address: str, badmailfrom: FrozenSet[str]) -> bool:
    """qmail-smtpd's bmfcheck() with eQmail's wildcard, case ignored.

    Matches the whole address, ``@domain``, or ``.`` followed by any
    dot-suffix of the domain (``.spammer.org`` blocks
    ``joe@mail.spammer.org`` but not ``joe@spammer.org``).  The null sender
    is never matched.
    """
    if not badmailfrom or not address:
        return False
    addr = address_key(address)
    if addr in badmailfrom:
        return True
    at = addr.rfind("@")
    if at == -1:
        return False
    domain = addr[at + 1:]
    if "@" + domain in badmailfrom:
        return True
    return any(k in badmailfrom for k in dot_suffixes(domain))


def ip_literal(domain: str) -> Optional[str]:
    """The IP text of an address literal ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``,
    or None when `domain` is not a valid literal (RFC 5321 section 4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    import ipaddress

    if "%" in inner:  # no zone index in an address literal
        return None
    if inner.lower().startswith("ipv6:"):
        try:
            return str(ipaddress.IPv6Address(inner[5:]))
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


#: RFC 5322 atext: what a local part may hold unquoted, dots aside.
ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                  "0123456789!#$%&'*+-/=?^_`{|}~")


def quote_address(addr: str, utf8: bool = False) -> str:
    """`addr` with its local part (up to the last ``@``) quoted as an RFC
    5322 quoted-string unless it is a dot-atom, as qmail's quote2() does
    (quote.c: the Return-Path of qmail-local): ``a b@x.org`` gives
    ``"a b"@x.org``; backslash and ``"`` are escaped; "" stays "".  Valid
    UTF-8 is atext (RFC 6532 section 3.2: an SMTPUTF8 address is written
    as it is); other bytes above 127 are quoted as in qmail, unless
    `utf8`."""
    if not addr:
        return addr
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    utf8 = utf8 or (not local.isascii() and valid_utf8(local))
    atoms = local.split(".")
    if local and all(a and all(ch in ATEXT or (utf8 and ch >= "\x80") for ch in a)
                     for a in atoms):
        return addr
    quoted = '"%s"' % local.replace("\\", "\\\\").replace('"', '\\"')
    return quoted + ("@" + domain if at else "")


def verp_sender(sender: str, recipient: str) -> str:
    """The envelope sender for one recipient (qmail-send's senderadd()):
    a VERP sender ``owner-@host-@[]`` (qmail-local's NEWSENDER for a list
    with ``.qmail-LIST-owner-default``) becomes ``owner-box=rhost@host``
    for the recipient ``box@rhost``; any other sender stays as it is."""
    if not sender.endswith("-@[]"):
        return sender
    j = sender.rfind("@", 0, len(sender) - 4)
    box, at, rhost = recipient.rpartition("@")
    if not at or j == -1 or j + 5 > len(sender):
        return sender
    return "%s%s=%s@%s" % (sender[:j], box, rhost, sender[j + 1:len(sender) - 4])


def verp_bounce_sender(sender: str) -> str:
    """Where a bounce of a message from `sender` goes: a VERP sender
    ``owner-@host-@[]`` bounces to ``owner-@host`` (qmail-send)."""
    return sender[:-4] if len(sender) >= 5 and sender.endswith("-@[]") else sender
