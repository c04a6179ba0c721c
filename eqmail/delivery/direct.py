"""delivery.direct -- local mail written once: into its mailboxes during DATA.

SUMMARY
    `deliver(config, data, sender, recipients)` is called by the SMTP
    session after the final dot and before its reply.  For each recipient
    that qmail-send would give to the local channel and whose delivery is
    in this process's hands (its uid is eqmaild's, as for the in-process
    route of delivery.lspawn) and writes files only (every line of its
    dot-qmail file, or of control/defaultdelivery, a Maildir or an mbox),
    it runs qmail-local's lines right away, each file fsync'd as usual, and
    reports the success.  Every other recipient -- remote, another uid, a
    program or forward line, a refusal, a looping message, a temporary
    failure of any kind, an mbox locked by someone else -- is left to the
    durable queue, which then does exactly what it always did (its
    deliveries, retries, bounces and their texts).  So the message is
    written once, to its mailboxes, instead of to the queue and then to
    the mailboxes: one fsync of the file and one of the directory, no
    queue file, no done mark.

DURABILITY
    The session answers 250 only after every direct delivery finished
    (file and directory fsync'd, as delivery.local does) and the queue
    commit for the rest, if any, succeeded.  A crash before the 250 loses
    nothing acknowledged; the client sends again and a mailbox may get the
    message twice (at least once, as after any crash).  A failed queue
    commit for the rest gives 451 after some mailboxes got the message:
    the same.

WHEN
    Only for messages the session holds in memory (smaller than the
    queue's CHUNK, 64 KB: a larger one is already on its way to a queue
    file), at most `MAX_RECIPIENTS` local recipients (a larger fan-out goes
    through the queue's parallel local deliveries, so the client is not
    kept waiting), without QMAILQUEUE, and when neither control/directlocal
    nor control/concurrencylocal is 0 (which holds local deliveries).
    Never as root or with a privileged helper: those deliveries change
    uid (delivery.lspawn).

THE HUB
    The session calls `deliver` on the gevent hub: the decisions (route,
    users, the dot-qmail file, the loop check) are made there, and each
    file line is one threadpool job (local.execute's `wait`: tmp/, write,
    fsync, link into new/, fsync of new/; for an mbox lock, append,
    fsync).  Each system call a thread makes while the hub runs Python is
    a GIL hand-over; with the whole delivery in a thread there were 140
    futex calls per message at c=20, with the decisions on the hub 38 and
    about a tenth less CPU.  (Creating the file on the hub was tried: the
    open waits for the file system journal while other sessions' fsyncs
    commit it, and the hub stalled.)

STANDARDS
    qmail-local(8), dot-qmail(5), maildir(5); RFC 5321 section 6.1 (the
    responsibility taken with the 250).
"""
from __future__ import annotations

import io
import os
from typing import List, Optional, Sequence

from . import SUCCESS
from .. import address
from ..control import Config
from .local import Plan, call_here, execute, header_has_line, plan
from .route import LOCAL, route
from .users import UsersError, resolve

#: A message to more local recipients than this goes through the queue.
MAX_RECIPIENTS = 10


def candidates(config: Config, recipients: Sequence[str]) -> bool:
    """Might any of `recipients` be delivered directly?  Cheap (control
    data only, no file system): True when at least one takes the local
    channel and there are at most MAX_RECIPIENTS such."""
    n = 0
    for rcpt in recipients:
        if route(config, rcpt).channel == LOCAL:
            n += 1
    return 0 < n <= MAX_RECIPIENTS


def deliver(config: Config, data: bytes, sender: str,
            recipients: Sequence[str], wait=call_here) -> List[Optional[str]]:
    """Deliver `data` (the whole message as it would be queued: LF line
    ends, the Received line first) from `sender` to every recipient of
    `recipients` that may be delivered directly (see the module
    docstring).  Returns, per recipient, the delivery report
    (``did 1+0+0/``, as qmail-local's) when it is done, else None: the
    queue must take that recipient.  `wait(func, *args)` runs the writer
    of each file line (tmp/, write, fsync, link, fsync of new/; see
    local.execute): eqmail.threads.run when called on the gevent hub, as
    the SMTP session does; by default the call blocks on them itself.
    Never raises for delivery problems."""
    me = os.geteuid()
    out: List[Optional[str]] = [None] * len(recipients)
    if me == 0:
        return out
    msg = io.BytesIO(data)
    for i, rcpt in enumerate(recipients):
        rt = route(config, rcpt)
        if rt.channel != LOCAL:
            continue
        try:
            target = resolve(config, rt.local)
        except UsersError:
            continue
        if target.uid != me:
            continue
        p = plan(config, address.verp_sender(sender, rcpt), rt.local, rt.domain, target)
        if not isinstance(p, Plan) or not p.files_only:
            continue
        try:
            if header_has_line(msg, p.dtline):
                continue  # looping: the queue bounces it, with qmail's text
        except OSError:
            continue
        lr = execute(p, msg, confined=True, lock_wait=0, wait=wait)
        if lr.result.kind == SUCCESS and not lr.forwards:
            out[i] = lr.result.text
    return out
