"""verify -- where an address would go, without sending (sendmail -bv).

SUMMARY
    `explain(config, address)` follows a recipient the way the queue
    would: qmail-send's routing (locals, virtualdomains, envnoathost),
    then for a local address qmail-lspawn's choice of user (users/assign,
    a system user, the alias user) and qmail-local's dot-qmail file,
    control/defaultdelivery, /etc/aliases, ~/.forward and the mail spool;
    forwards are followed in turn (at most MAX_DEPTH deep, each address
    once).  A remote address shows its smtproutes entry or "MX of
    domain".  Nothing is delivered or queued.

    What the caller may not read (another user's home as an ordinary
    user) is reported as such: run it as root to see everything.

STANDARDS
    sendmail(8) -bv; qmail-send(8), qmail-lspawn(8), qmail-local(8).
"""
from __future__ import annotations

import os
from typing import List, Set, Tuple

MAX_DEPTH = 8

#: Worst outcome of a walk: 0 deliverable, 111 temporary trouble, 100 bounces.
OK, TEMPORARY, PERMANENT = 0, 111, 100


def _system_users(config) -> bool:
    """Whether eqmaild resolves system users: it does when it runs as root,
    which shows as a queue owned by another user than the alias home."""
    try:
        return os.stat(config.path("queue")).st_uid != os.stat(config.path("alias")).st_uid
    except OSError:
        return os.geteuid() == 0


def explain(config, address: str) -> Tuple[List[str], int]:
    """Lines describing where `address` goes, and the worst outcome
    (OK, TEMPORARY or PERMANENT).  Blocking (stat, open)."""
    out: List[str] = []
    worst = _walk(config, address, 0, set(), out, _system_users(config))
    return out, worst


def _walk(config, recipient: str, depth: int, seen: Set[str], out: List[str],
          system_users: bool) -> int:
    from .delivery import FAILURE, SUCCESS, aliases, local, users
    from .delivery.route import LOCAL, route

    pad = "  " * depth
    if "@" not in recipient:
        recipient = "%s@%s" % (recipient, config.defaulthost)
    rt = route(config, recipient)
    if rt.address.lower() in seen:
        out.append("%s%s: already shown above" % (pad, rt.address))
        return OK
    seen.add(rt.address.lower())
    if depth > MAX_DEPTH:
        out.append("%s%s: forwarded more than %d times: not followed" % (pad, rt.address,
                                                                          MAX_DEPTH))
        return OK
    if rt.channel != LOCAL:
        r = config.smtproute(rt.domain)
        if r is not None and r.relay:
            how = "relay %s%s (control/smtproutes)" % (r.relay, ":%d" % r.port if r.port else "")
        else:
            how = "MX of %s" % rt.domain
        out.append("%s%s: remote, %s" % (pad, rt.address, how))
        return OK
    try:
        target = users.resolve(config, rt.local, system_users=system_users)
    except users.UsersError as e:
        out.append("%s%s: local, but: %s (temporary failure)" % (pad, rt.address, e))
        return TEMPORARY
    if target.home == config.path("alias") and target.dash:
        who = "alias user (%s)" % target.home
    else:
        who = "user %s (uid %d, home %s)" % (target.user, target.uid, target.home)
    out.append("%s%s: local, %s" % (pad, rt.address, who))
    p = local.plan(config, "", rt.local, rt.domain, target)
    if isinstance(p, local.LocalResult):
        r = p.result
        kind = "bounces" if r.kind == FAILURE else "temporary failure"
        out.append("%s  %s: %s" % (pad, kind, r.text))
        return PERMANENT if r.kind == FAILURE else TEMPORARY
    if p.source:
        out.append("%s  from %s" % (pad, p.source))
    worst = OK
    for line in p.lines:
        if line.startswith("|"):
            out.append("%s  program %s" % (pad, line[1:]))
        elif line.startswith("/") or line.startswith("."):
            path = line if line.startswith("/") else os.path.join(target.home, line)
            kind = "Maildir" if line.endswith("/") else "mbox"
            out.append("%s  %s %s" % (pad, kind, os.path.normpath(path) +
                                      ("/" if line.endswith("/") else "")))
        elif line.startswith("+"):
            continue
        else:
            address = line[1:] if line.startswith("&") else line
            out.append("%s  forward to %s" % (pad, address))
            worst = max(worst, _walk(config, address, depth + 2, seen, out, system_users))
    return worst
