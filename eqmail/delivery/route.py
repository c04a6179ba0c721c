"""delivery.route -- which channel a recipient takes (qmail-send's rewriting).

STANDARDS
    qmail-send(8), qmail-control(5): envnoathost, percenthack, locals,
    virtualdomains (behaviour reference section 5.4).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import address
from ..control import Config

LOCAL = "local"
REMOTE = "remote"


@dataclass(frozen=True)
class Route:
    """channel is LOCAL or REMOTE; for LOCAL, `local` is the local part that
    qmail-lspawn would see (with a virtualdomains prefix) and `domain` the
    recipient's domain; `address` is the rewritten recipient."""

    channel: str
    address: str
    local: str
    domain: str


def route(config: Config, recipient: str) -> Route:
    """Rewrite `recipient` as qmail-send does and pick its channel.

    1. no ``@``: append ``@envnoathost``;
    2. domain in percenthack: the last ``%`` of the local part becomes ``@``
       (repeatedly);
    3. domain in locals: local, address kept;
    4. virtualdomains (full address, exact domain, ``.suffix`` longest first,
       empty key): ``dom:pfx`` makes it local as ``pfx-<local>``; an empty
       prefix means "not virtual";
    5. otherwise remote.
    """
    addr = recipient
    if "@" not in addr:
        addr = "%s@%s" % (addr, config.envnoathost)
    while True:
        local, domain = address.split(addr)
        if address.domain_key(domain) in config.percenthack and "%" in local:
            i = local.rfind("%")
            addr = "%s@%s" % (local[:i], local[i + 1:])
            continue
        break
    local, domain = address.split(addr)
    if address.domain_key(domain) in config.locals:
        return Route(LOCAL, addr, local, domain)
    prefix = config.virtual_prefix(addr)
    if prefix:
        return Route(LOCAL, addr, "%s-%s" % (prefix, local), domain)
    return Route(REMOTE, addr, local, domain)


def error_key(recipient: str, channel: str) -> str:
    """The key of `recipient`'s last temporary failure (the scheduler keeps
    them for eqmail queue list): the address for a local one, ``@domain``
    for a remote one (one SMTP transaction a domain)."""
    if channel == REMOTE:
        return "@" + recipient.rpartition("@")[2].lower()
    return recipient.lower()
