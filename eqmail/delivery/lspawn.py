"""delivery.lspawn -- run a local delivery with the recipient's uid (qmail-lspawn's role).

SUMMARY
    `LocalRunner` is the one way the queue's local deliveries are run.
    eqmaild makes one at start (eqmail.daemon) and hands it to the
    scheduler, which knows nothing of the processes behind it.
    `runner.deliver(config, msgid, msgpath, sender, local, domain, finish)`
    delivers one message to one local recipient and returns
    ``(LocalResult, removed)``:

    * with an `offload` set (eqmail.workers.Pool.deliver: a local-delivery
      worker, when session workers run), that process delivers when it is
      up;
    * otherwise the target is resolved in the threadpool, and a target
      whose uid is eqmaild's is delivered right there, in-process;
    * another uid, when eqmaild dropped root: through the privileged
      `helper` (eqmail.privsep);
    * another uid, when eqmaild is root: in a forked child that opens the
      message, closes every other descriptor, drops to the target's gid
      (as its only group) and uid, delivers, and reports back as JSON on a
      pipe;
    * otherwise (uid 0, or an unprivileged daemon asked to deliver as
      someone else): a temporary failure that says why.

    `runner.deliver_many(...)` does several recipients of one message in
    one threadpool call (the scheduler's batches of a fan-out).

    `runner.in_process` tells whether this process delivers as itself
    (not root, no helper): then its SMTP sessions may write local mail
    during DATA (eqmail.delivery.direct), and a local-delivery worker may
    take the queue's deliveries.

STANDARDS
    qmail-lspawn(8): ``Not allowed to perform deliveries as root.``

SECURITY
    The child trusts nothing it did not open as root: the message
    descriptor is opened before the privileges are dropped, the queue and
    the listening sockets are closed.  The parent parses the child's report
    as JSON (never pickle) and checks its types, so a child taken over by
    the user can at worst report a wrong result for that user's own mail.
    After setuid the kernel marks the child non-dumpable: the user cannot
    ptrace it.
"""
from __future__ import annotations

import json
import os
import time

from . import SUCCESS, deferred
from .local import PROGRAM_TIMEOUT, LocalResult, deliver
from .users import Target
from ..durable import fsync_dir
from ..threads import run

#: A child that has not reported after this many seconds is killed.
CHILD_TIMEOUT = PROGRAM_TIMEOUT + 300
#: The child's report is at most this many bytes.
MAX_REPORT = 1 << 20


def _unopened(e: Exception) -> LocalResult:
    """The temporary failure for a queued message that cannot be opened."""
    return LocalResult(deferred("Unable to open the queued message: %s. (#4.3.0)"
                                % (getattr(e, "strerror", None) or e)))


def _deliver_path(config, msgpath, sender, local, domain, target) -> LocalResult:
    """In-process delivery (eqmaild's own uid): confined to the home."""
    from ..queue.store import open_message

    try:
        f = open_message(msgpath)
    except (OSError, ValueError) as e:
        return _unopened(e)
    with f:
        return deliver(config, f, sender, local, domain, target, confined=True)


def resolve_and_deliver(config, msgpath, sender, local, domain, then=None):
    """Blocking (a threadpool thread, or the local-delivery worker): find
    the target and, when it is this process's own uid, deliver right away
    (one thread hop for the common case), then call `then()` if given and
    the delivery succeeded without forwards.  Returns a LocalResult, or the
    Target when another uid must deliver."""
    from .users import UsersError, resolve

    try:
        target = resolve(config, local)
    except UsersError as e:
        return LocalResult(deferred("%s (#4.3.0)" % e))
    if target.uid != 0 and target.uid == os.geteuid():
        lr = _deliver_path(config, msgpath, sender, local, domain, target)
        if then is not None and lr.result.kind == SUCCESS and not lr.forwards:
            then()
        return lr
    return target


def resolve_and_deliver_many(config, msgpath, jobs):
    """resolve_and_deliver for several recipients of one message, in one
    blocking call that opens the message once: `jobs` is a list of
    ``(sender, local, domain)``.  Returns, per job, a LocalResult, or the
    Target when another uid must deliver."""
    from ..queue.store import open_message
    from .users import UsersError, resolve

    me = os.geteuid()
    out = []
    f = None
    later: set = set()  # Maildir new/ directories: one fsync each at the end
    try:
        for sender, local, domain in jobs:
            try:
                target = resolve(config, local)
            except UsersError as e:
                out.append(LocalResult(deferred("%s (#4.3.0)" % e)))
                continue
            if target.uid == 0 or target.uid != me:
                out.append(target)
                continue
            if f is None:
                try:
                    f = open_message(msgpath)
                except (OSError, ValueError) as e:
                    out.append(_unopened(e))
                    continue
            out.append(deliver(config, f, sender, local, domain, target, confined=True,
                               later=later))
    finally:
        if f is not None:
            f.close()
    for path in sorted(later):
        try:
            fsync_dir(path)
        except OSError as e:  # the batch's files may not be there after a crash
            failed = LocalResult(deferred("Unable to write to Maildir: %s. (#4.3.0)"
                                          % e.strerror))
            out = [failed if isinstance(r, LocalResult) and r.result.kind == SUCCESS
                   else r for r in out]
    return out


class LocalRunner:
    """qmail-lspawn for the scheduler (see the module docstring).
    `helper`: the privileged helper's request socket (eqmail.privsep), when
    eqmaild dropped root.  `offload`: set by the daemon when session
    workers are allowed, ``(id, sender, local, domain, finish) ->
    (LocalResult, removed)`` or None when no local-delivery worker is up."""

    def __init__(self, helper=None) -> None:
        self.helper = helper
        self.offload = None

    @property
    def in_process(self) -> bool:
        """This process delivers as itself: not root, no helper."""
        return os.geteuid() != 0 and self.helper is None

    def deliver(self, config, msgid: str, msgpath: str, sender: str, local: str,
                domain: str, finish=None):
        """One local delivery; returns ``(LocalResult, removed)``.
        Cooperative.  `finish`: a blocking callable returning True when it
        removed the message; it is called (by the delivery's own threadpool
        call, or the worker does the same) after a delivery that succeeded
        without forwards, when this delivery is the message's last.  Never
        raises for delivery problems."""
        if self.offload is not None:
            got = self.offload(msgid, sender, local, domain, finish is not None)
            if got is not None:
                return got
        removed = []

        def then() -> None:
            if finish():
                removed.append(True)

        got = run(resolve_and_deliver, config, msgpath, sender, local, domain,
                  then if finish is not None else None)
        if isinstance(got, LocalResult):
            return got, bool(removed)
        return self.spawn(config, msgpath, sender, local, domain, got), False

    def deliver_many(self, config, msgid: str, msgpath: str, jobs) -> list:
        """Several local deliveries of one message, one after the other in
        one threadpool call (a fan-out: one thread hop and one open of the
        message for them all, instead of one each); `jobs` is a list of
        ``(sender, local, domain)``.  Returns their LocalResults in order.
        Targets of another uid go on as `deliver` sends them.  Cooperative;
        never raises for delivery problems.  Not with an `offload` (the
        scheduler then hands out one recipient at a time)."""
        got = run(resolve_and_deliver_many, config, msgpath, jobs)
        return [g if isinstance(g, LocalResult) else self.spawn(config, msgpath, *job, g)
                for job, g in zip(jobs, got)]

    def spawn(self, config, msgpath: str, sender: str, local: str, domain: str,
              target: Target) -> LocalResult:
        """Deliver as `target`'s uid (see the module docstring).  Cooperative:
        waits on the threadpool, the helper or the child's pipe, never blocks
        the hub."""
        me = os.geteuid()
        if target.uid == me and me != 0:
            return run(_deliver_path, config, msgpath, sender, local, domain, target)
        if target.uid != 0 and me != 0 and self.helper is not None:
            return _via_helper(self.helper, msgpath, sender, local, domain)
        if target.uid != 0 and me == 0:
            return _fork_as(config, msgpath, sender, local, domain, target)
        return refusal(target)


def refusal(target: Target) -> LocalResult:
    """The temporary failure for a target this process may not deliver as
    itself: uid 0 (qmail-lspawn refuses root), or another uid when this
    process is not root (and has no privileged helper)."""
    if target.uid == 0:
        return LocalResult(deferred("Not allowed to perform deliveries as root. (#4.3.0)"))
    return LocalResult(deferred(
        "Unable to deliver as uid %d: eqmaild runs as uid %d, not root. (#4.3.0)"
        % (target.uid, os.geteuid())))


def _via_helper(helper, msgpath: str, sender: str, local: str,
                domain: str) -> LocalResult:
    import gevent
    import gevent.socket

    from ..privsep import request

    try:
        answer = request(helper, os.path.basename(msgpath), sender, local, domain)
    except OSError as e:
        return LocalResult(deferred("Unable to reach the delivery helper: %s. (#4.3.0)"
                                    % e.strerror))
    sock = gevent.socket.socket(fileno=answer.detach())
    data = b""
    try:
        with gevent.Timeout(CHILD_TIMEOUT, False):
            while len(data) <= MAX_REPORT:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        sock.close()
    if not data:
        return LocalResult(deferred("Unable to deliver: the delivery helper's child "
                                    "crashed or timed out. (#4.3.0)"))
    try:
        return LocalResult.from_dict(json.loads(data.decode("utf-8", "surrogateescape")))
    except (ValueError, AttributeError):
        return LocalResult(deferred("Unable to deliver: bad report from the delivery "
                                    "helper. (#4.3.0)"))


def _fork_as(config, msgpath, sender, local, domain, target) -> LocalResult:
    import gevent
    import gevent.os

    try:
        msgfd = os.open(msgpath, os.O_RDONLY)
    except OSError as e:
        return _unopened(e)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no gevent, no logging, only os._exit
        code = 111
        try:
            _child(config, msgfd, w, sender, local, domain, target)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(msgfd)
    gevent.os.make_nonblocking(r)
    data = b""
    deadline = time.time() + CHILD_TIMEOUT
    try:
        with gevent.Timeout(CHILD_TIMEOUT, False):
            while len(data) <= MAX_REPORT:
                chunk = gevent.os.nb_read(r, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
    status = _reap(pid, deadline)
    if status is None or not data:
        return LocalResult(deferred("Unable to deliver: the delivery child %s. (#4.3.0)"
                                    % ("timed out" if status is None else "crashed")))
    try:
        return LocalResult.from_dict(json.loads(data.decode("utf-8", "surrogateescape")))
    except (ValueError, AttributeError):
        return LocalResult(deferred("Unable to deliver: bad report from the delivery "
                                    "child. (#4.3.0)"))


def _reap(pid: int, deadline: float):
    """Wait for the child without blocking the hub; kill it after `deadline`.
    Returns its wait status, or None when it had to be killed."""
    from ..children import wait

    status = wait(pid, deadline)
    if status is None:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
        wait(pid, time.time() + 5)
    return status


def _spool_group(config, target: Target):
    """The group of control/mailspool's directory (Debian's mail) when it
    differs from the target's own, else None."""
    if not getattr(config, "mailspool", "") or target.dash:
        return None
    try:
        gid = os.stat(config.mailspool).st_gid
    except OSError:
        return None
    return None if gid in (target.gid, 0) else gid


def _child(config, msgfd: int, w: int, sender, local, domain, target: Target) -> None:
    import signal

    from ..cpu import unpin

    unpin()  # its programs may use every CPU (eqmail.cpu)

    for sig in (signal.SIGHUP, signal.SIGALRM, signal.SIGTERM, signal.SIGINT,
                signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)  # the daemon's (or helper's) are not ours
    keep = {0, 1, 2, msgfd, w}
    top = max(keep)
    for fd in range(3, top):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    os.closerange(top + 1, 65536)
    os.setgroups([target.gid])
    spool_gid = _spool_group(config, target)
    if spool_gid is not None:
        # the spool's group only as the saved set-group-ID: taken for the
        # spool mbox alone, gone before any program (delivery.local)
        os.setresgid(target.gid, target.gid, spool_gid)
    else:
        os.setgid(target.gid)
    os.setuid(target.uid)
    if spool_gid is not None:
        from .local import allow_spool_group

        allow_spool_group(spool_gid)
    os.chdir("/")
    from ..queue.store import message_window

    try:
        f = message_window(msgfd)
    except (OSError, ValueError) as e:
        result = LocalResult(deferred("Unable to open the queued message: %s. (#4.3.0)" % e))
    else:
        with f:
            result = deliver(config, f, sender, local, domain, target)
    payload = json.dumps(result.to_dict()).encode("utf-8", "surrogateescape")
    view = memoryview(payload)
    while view:
        view = view[os.write(w, view):]
