"""workers -- extra SMTP session processes (and a local-delivery process)
that eqmaild starts under load.

SUMMARY
    CPython runs the Python code of one process on one core at a time, and
    eqmaild is one process: its hub runs every SMTP session and the
    scheduler.  On a machine with more than one core, when eqmaild is busy,
    it starts up to ``--workers`` session workers.  Like Postfix's smtpd
    processes, a worker accepts connections itself, on the listening
    sockets eqmaild bound (it gets copies of them), and runs the session
    exactly as eqmaild would (`serve_client`: control/smtprules, the
    concurrency limits, the same `eqmail.smtp.session.Session`, control
    files and queue), committing the message to the queue itself.  No
    process stands between the client and its greeting.  eqmaild keeps
    scheduling and delivering, and hears of each commit.

WHO ACCEPTS
    While a session worker is ready, eqmaild stops accepting and leaves it
    to the workers: eqmaild's hub, busy with the previous message's
    delivery, would delay the next greeting.  It accepts as well while
    every ready worker holds more than `SHARE` times as many sessions as
    eqmaild (plus one), looked at every `SHARE_POLL` seconds, so that under
    many concurrent sessions both processes serve them; and alone again
    when no worker is left.  Where several processes accept, the kernel
    gives each connection to one of them.  control/concurrencyincoming and
    control/concurrencyperip hold for all of them together: each process
    counts its sessions in a table in shared memory
    (eqmail.concurrency.SessionTable) before the greeting.

WHEN
    At a session eqmaild counted, at most once a second, eqmaild looks at
    the CPU time it used (all its threads) since the last look.  When that
    is at least ``--worker-load`` of one core (default 0.5; 0 starts one at
    the first connection) and fewer than ``--workers`` workers run, it
    starts one.  A worker does the same with its own CPU time and asks for
    another (``m``).  A worker without a session for ``--worker-idle``
    seconds (default 30; Postfix's max_idle is 100; eqmaild reads it from
    the session table) is told to stop, so an idle eqmaild is one process
    again (its memory figure).  ``--workers 0``, the default, never starts
    one: a worker is a second Python process of about 23 MB RSS, which
    doubles the mail system's memory when the board is busiest, for about
    a quarter more messages a second at c=20 on two cores (bench/; the
    figures are in the README's Performance section).  Servers with memory
    to spare may allow them.

LOCAL DELIVERIES
    With the first session worker eqmaild also starts one local-delivery
    worker (eqmail.delivery.worker), when it delivers in its own process:
    not as root, without the privileged helper (eqmail.privsep).  Each
    local delivery then goes there (``Pool.deliver``) with the queue ID,
    envelope sender, local part and domain, and comes back as the
    `LocalResult`; eqmaild still schedules, logs, records the results and
    queues forwards.  The worker is retired when idle, like the others.  A
    delivery it had in flight when it died is a temporary failure (it may
    have happened: at least once, as after a crash).

CHANNEL (a SOCK_SEQPACKET socket pair, one record per message)
    worker -> eqmaild
        ``r`` ready (a session worker accepts from now on); ``m`` busy:
        start another worker if allowed; ``c`` + JSON of the committed
        `Item` (``C`` + queue ID when that would be too large: eqmaild
        reads the envelope from the queue file).
    The local-delivery worker's records are described in
    eqmail.delivery.worker (``l`` requests, ``p``/``l`` answers).
    End of file from eqmaild (it stops, or retires an idle worker, after
    accepting again itself): the worker closes its listeners and stops like
    eqmaild on SIGTERM -- its sessions get 421 at their next command
    outside a mail transaction -- and exits when they have ended (at most
    `SESSION_GRACE` seconds).  End of file from the worker (it exited or
    died): once it is reaped, eqmaild clears its sessions from the table.

PROCESS
    Started with posix_spawn (no Python code runs in the child before
    exec, as eqmaild has threads) as ``python -c`` calling `main`, with the
    channel on descriptor 3, when eqmaild logs to a file that file on
    descriptor 4, the session table on 5 and the listeners from 6 on.  It
    runs as eqmaild's user (the service user once privileges are dropped:
    it reads the network too), ignores SIGINT (a terminal's ^C goes to
    eqmaild, which stops it), re-reads the control files on SIGHUP
    (eqmaild forwards its own) and stops on SIGTERM.  A committed message
    is durable before the worker answers 250, whatever happens to eqmaild
    afterwards: a message eqmaild never heard of is found by its next queue
    scan or at its next start.

STANDARDS
    Postfix master(8) (process limits, max_idle) and smtpd(8) (processes
    that accept on a shared socket); posix_spawn(3); accept(2).
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from . import log
from .cpu import spare, unpinned

#: Seconds after a worker failed to start or died before another is tried.
RESPAWN_DELAY = 10
#: Seconds a stopping worker waits for its sessions (as eqmaild does).
SESSION_GRACE = 10
#: Seconds a record may wait for room on the channel (a process that does
#: not read is stuck).
SEND_TIMEOUT = 10
#: Seconds a new worker has to say it is ready before it is killed.
READY_TIMEOUT = 30
#: Largest record on the channel, in bytes.
MAX_RECORD = 65536
#: Largest answer to a local delivery, in bytes (as a delivery child's report).
MAX_ANSWER = 1 << 20
#: eqmaild accepts as well while every session worker holds more than SHARE
#: times as many sessions as eqmaild (plus one); looked at every SHARE_POLL s.
SHARE = 3
SHARE_POLL = 0.05
#: The descriptors a worker finds its channel, its log file, the session
#: table and its listeners (LISTEN_FD, LISTEN_FD + 1, ...) on.
CHANNEL_FD = 3
LOG_FD = 4
TABLE_FD = 5
LISTEN_FD = 6


def session_pool(config):
    """A gevent Pool for the SMTP sessions of one process, sized by
    `fit_session_pool`: a full pool stops the accepting until a session
    ends (connections wait in the kernel's backlog)."""
    import gevent.pool

    pool = gevent.pool.Pool(1)
    fit_session_pool(pool, config)
    return pool


def fit_session_pool(pool, config) -> None:
    """Size `pool` for `config` (at start and on every reload, so that a
    SIGHUP gives the service a restart would): room for every session
    concurrencyincoming allows, as many more that are told 421 at once,
    and 50.  Growing wakes a listener that stopped on a full pool;
    shrinking takes effect as sessions end."""
    size = 2 * config.concurrencyincoming + 50
    grow = size - pool.size
    pool.size = size
    # gevent's StreamServer waits on the pool's semaphore when the pool is
    # full (as gevent.baseserver itself reaches it); a semaphore with more
    # permits than the size is harmless: the server asks pool.full() first
    for _ in range(max(0, grow)):
        pool._semaphore.release()
    # one descriptor per session, and room for the queue, deliveries and
    # plugins: the soft limit (often 1024) goes up to the hard one
    import resource

    want = size + 2 * config.concurrencylocal + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < want:
            log.warning("only %d file descriptors (RLIMIT_NOFILE) for %d sessions: raise "
                        "the hard limit or lower control/concurrencyincoming"
                        % (new, config.concurrencyincoming))


def serve_connection(config, store, sock, kind: str, env: Dict[str, str],
                     stopping: Callable[[], bool], checkpassword,
                     direct: bool = False,
                     stressed: Optional[Callable[[], bool]] = None) -> None:
    """Run one SMTP session on the accepted socket `sock` (gevent socket).

    `kind` is the listener ("smtp", "submission" or "smtps": TLS first);
    `env` the session's environment, built by eqmaild.  Offers STARTTLS
    when control/servercert.pem is usable.  Closes the connection (a TLS
    one with close_notify).  Never raises for the client's behaviour.
    Used by eqmaild for the sessions it serves and by the workers.
    """
    import gevent

    from .smtp import tls
    from .smtp.session import Session

    conn = {"sock": sock}
    ip = env.get("TCPREMOTEIP", "")
    try:
        ctx = tls.server_context(config.home, config.tlsserverciphers)
        cipher = None
        if kind == "smtps":
            if ctx is None:
                log.alert("smtps: no usable control/servercert.pem; closing %s" % ip)
                return
            try:
                with gevent.Timeout(config.timeoutsmtpd):
                    conn["sock"] = ctx.wrap_socket(sock, server_side=True)
            except BaseException as e:
                if isinstance(e, (KeyboardInterrupt, SystemExit, gevent.GreenletExit)):
                    raise
                log.line("smtpd: TLS handshake with %s failed: %s" % (ip, log.clean(str(e))))
                return
            cipher = tls.cipher_name(conn["sock"])

        def starttls():
            conn["sock"] = ctx.wrap_socket(conn["sock"], server_side=True)
            return conn["sock"].recv, _sender(conn["sock"]), tls.cipher_name(conn["sock"])

        session = Session(config, store, conn["sock"].recv, _sender(conn["sock"]), env,
                          stopping=stopping,
                          starttls=starttls if ctx is not None and kind != "smtps" else None,
                          tls_cipher=cipher, checkpassword=checkpassword,
                          submission=kind == "submission", direct=direct,
                          stressed=stressed)
        _live.add(session)
        try:
            session.run()
        finally:
            _live.discard(session)
    except OSError:
        pass
    finally:
        tls.close(conn["sock"])


def serve_client(holder, store, table, owner: int, sock, addr, kind: str,
                 stopping: Callable[[], bool], checkpassword,
                 started: Optional[Callable[[], None]] = None,
                 direct: bool = False) -> None:
    """One connection that process `owner` (0: eqmaild, else a session
    worker) accepted from `addr` on a `kind` listener: control/smtprules
    (deny: 553), then concurrencyincoming and concurrencyperip counted in
    the shared `table` (eqmail.concurrency; beyond: 421), then the SMTP
    session (`serve_connection`) with the environment tcpserver would give
    (TCPREMOTEIP, TCPLOCALIP, TCPLOCALPORT, TCPLOCALHOST, TLSREQUIRED=1 on
    submission, the rule's variables).  `started()` is called once the
    session is counted.  `direct`: local mail may be delivered during DATA
    (eqmail.delivery.direct; this process delivers as itself).  Closes `sock`; never raises for the client's
    behaviour."""
    from .smtp import reply

    config = holder.current
    ip = plain_ip(addr[0])
    try:
        rule = config.client_rule(ip)
        if rule is not None and not rule.allow:
            log.line("smtpd: denied by control/smtprules: %s" % ip)
            say(sock, reply.DENIED)
            return
        counted, total, per_ip = table.enter(owner, ip, config.concurrencyincoming,
                                             config.concurrencyperip)
        if not counted:
            log.line("smtpd: too many connections (%d, %d from %s)" % (total, per_ip, ip))
            say(sock, reply.TOO_MANY_CONNECTIONS)
            return
        _quiet.note(total)
        from .control import STRESS_SHARE

        threshold = max(1, int(config.concurrencyincoming * STRESS_SHARE))
        _stress_onset(total, threshold, config)
        try:
            if started is not None:
                started()
            local = sock.getsockname()
            env = {"TCPREMOTEIP": ip, "TCPLOCALIP": plain_ip(local[0]),
                   "TCPLOCALPORT": str(local[1]), "TCPLOCALHOST": config.me}
            if kind == "submission":
                env["TLSREQUIRED"] = "1"  # the submission listener's default
            if os.environ.get("QMAILQUEUE"):  # eqmaild's own, as qmail-smtpd inherits it
                env["QMAILQUEUE"] = os.environ["QMAILQUEUE"]
            env.update(rule.env if rule is not None else ())
            serve_connection(config, store, sock, kind, env, stopping, checkpassword,
                             direct, lambda: table.total() >= threshold)
        finally:
            table.leave(owner, ip)
            _quiet.left(table)
            if _stress["on"]:
                _stress_onset(table.total(), threshold, config)
    except OSError:
        pass
    finally:
        sock.close()


#: The SMTP sessions of this process (bounded by concurrencyincoming).
_live: set = set()
_stress = {"on": False}


def _stress_onset(total: int, threshold: int, config) -> None:
    """Load-adaptive limits (Postfix's stress mode): when the sessions reach
    `threshold` (control.STRESS_SHARE of concurrencyincoming), every session
    of this process that waits for its client waits at most
    control/timeoutstress seconds more, and later reads as long as the load
    stays; so idle connections cannot lock real clients out for
    timeoutsmtpd.  Logged once each time it begins and ends."""
    if total >= threshold:
        if not _stress["on"] and config.timeoutstress:
            _stress["on"] = True
            log.line("smtpd: stress: %d sessions of %d: clients get at most %d s a read"
                     % (total, config.concurrencyincoming, config.timeoutstress))
            # one timer for all: weak references, so that a session that
            # ends meanwhile is not kept
            import weakref

            import gevent

            stalled = [(weakref.ref(session), n) for session in list(_live)
                       for n in (session.stalled_read(),) if n is not None]
            if stalled:
                gevent.spawn_later(config.timeoutstress, _expire_stalled, stalled)
    elif _stress["on"] and total < threshold // 2:
        _stress["on"] = False
        log.line("smtpd: stress over: %d sessions" % total)


def _expire_stalled(stalled) -> None:
    for ref, reads in stalled:
        session = ref()
        if session is not None:
            session.expire(reads)


class _AfterBurst:
    """Once the sessions counted in the table fall to none after at least
    heap.SESSIONS_BURST were open at once, give the freed heap back a
    second later if they are still none (eqmail.heap)."""

    __slots__ = ("busiest",)

    def __init__(self) -> None:
        self.busiest = 0

    def note(self, total: int) -> None:
        if total > self.busiest:
            self.busiest = total

    def left(self, table) -> None:
        from . import heap

        if self.busiest >= heap.SESSIONS_BURST and table.total() == 0:
            self.busiest = 0
            import gevent

            gevent.spawn_later(1, lambda: table.total() or heap.give_back())


_quiet = _AfterBurst()


def say(sock, r) -> None:
    """Send one reply before hanging up; never raises."""
    try:
        sock.settimeout(5)
        sock.sendall(r.render())
    except OSError:
        pass


def plain_ip(ip: str) -> str:
    """IPv4-mapped IPv6 addresses are shown as IPv4 (as tcp-env does)."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


class CpuLoad:
    """Whether this process used at least `threshold` of one core (all its
    threads) since the last look, looked at most once a second; with a
    threshold of 0, always."""

    __slots__ = ("threshold", "t0", "cpu0")

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.t0 = time.monotonic()
        self.cpu0 = _cpu_seconds()

    def busy(self) -> bool:
        if self.threshold <= 0:
            return True
        now = time.monotonic()
        if now - self.t0 < 1.0:
            return False
        cpu = _cpu_seconds()
        used = (cpu - self.cpu0) / (now - self.t0)  # cores
        self.t0, self.cpu0 = now, cpu
        return used >= self.threshold


def _sender(sock):
    """sendall() for SMTP replies: one send() call, and gevent's sendall
    (which asks the kernel for SO_SNDBUF every time) only for what a short
    write left.  Replies are small; the socket has the session's timeout."""
    send, sendall = sock.send, sock.sendall

    def send_all(data) -> None:
        n = send(data)
        if n < len(data):
            sendall(memoryview(data)[n:])
    return send_all


def _item_record(item) -> bytes:
    """The ``c`` record for a committed Item (``C`` + ID when too large)."""
    # vars(), not dataclasses.asdict(): Item's fields are flat (str, int,
    # lists of str/int/bool), and asdict deep-copies them all
    data = json.dumps(vars(item)).encode("ascii")
    if len(data) + 1 > MAX_RECORD:
        return b"C" + item.id.encode("ascii")
    return b"c" + data


# -- eqmaild's side ---------------------------------------------------------------------

class _Worker:
    """One worker process as eqmaild sees it."""

    __slots__ = ("pid", "role", "chan", "lock", "ready", "retiring", "active", "waiting",
                 "parts", "last", "owner")

    def __init__(self, pid: int, role: str, chan, owner: int = 0) -> None:
        import gevent.lock

        self.pid = pid
        self.role = role            # "session" or "local"
        self.chan = chan            # gevent socket, eqmaild's end
        self.owner = owner          # a session worker's index in the SessionTable
        self.lock = gevent.lock.Semaphore()  # one sender at a time
        self.ready = False          # said "r"
        self.retiring = False       # told to stop (its channel half-closed)
        self.active = 0             # deliveries handed over and not answered
        self.waiting: Dict[int, object] = {}  # delivery number -> AsyncResult
        self.parts: Dict[int, bytearray] = {}  # delivery answers arriving in parts
        self.last = time.monotonic()  # last delivery handed over (or start)

    @property
    def name(self) -> str:
        return "%s worker %d" % ("local delivery" if self.role == "local" else "session",
                                 self.pid)


class Pool:
    """eqmaild's workers: starts them under load, hears about commits, runs
    local deliveries in the local-delivery worker, retires idle ones.

    `on_commit(item)` is called in eqmaild for every message a worker
    committed (the scheduler's `add`); `store` reads the envelope when the
    worker only sent the ID.  `table` is the SessionTable the workers count
    their sessions in (None: no session workers can start).  Session
    workers accept on the listeners given to `listen`.
    """

    def __init__(self, home: str, store, on_commit: Callable, max_workers: int,
                 load: float, checkpassword, idle: float = 30,
                 local_deliveries: bool = False, table=None) -> None:
        self.home = home
        self.store = store
        self.on_commit = on_commit
        self.max_workers = max(0, max_workers) if table is not None else 0
        self.load = load
        self.idle = idle
        self.checkpassword = checkpassword
        self.table = table
        # a local-delivery worker as well (eqmaild delivers as itself)
        self.direct = local_deliveries  # sessions may deliver local mail in DATA
        self.local_deliveries = local_deliveries and self.max_workers > 0
        self.workers: List[_Worker] = []  # session workers
        self.local: Optional[_Worker] = None  # the local-delivery worker
        self.listeners: List[Tuple[str, object]] = []  # (kind, listening socket)
        self.on_accepting: Optional[Callable[[bool], None]] = None
        self._accepting = True   # what on_accepting was last told
        self._sharing = None     # the greenlet that looks at the sessions (_share)
        self._numbers = itertools.count(1)
        self._load = CpuLoad(load)
        self._no_spawn_until = 0.0
        self._monitor = None
        self.stopping = False

    # -- accepting -----------------------------------------------------------------

    def listen(self, listeners: List[Tuple[str, object]],
               on_accepting: Callable[[bool], None]) -> None:
        """The listeners session workers accept on: (kind, socket) pairs.
        `on_accepting(False)` is called when a session worker is ready
        (eqmaild then stops accepting: the worker does, without eqmaild's
        hub between the client and its greeting), `on_accepting(True)` when
        none is left that accepts, or every one holds more than SHARE times
        eqmaild's sessions (see `_accepting_changed`)."""
        self.listeners = list(listeners)
        self.on_accepting = on_accepting

    def _accepting_changed(self) -> None:
        """Tell eqmaild whether it should accept too: when no session worker
        accepts, or every one that does holds more than SHARE times as many
        sessions as eqmaild (plus one).  While a worker accepts, this is
        looked at again every SHARE_POLL seconds."""
        ready = self._accepting_workers()
        here = True
        if ready:
            mine = self.table.owner(0)[0]
            here = all(self.table.owner(w.owner)[0] > SHARE * (mine + 1) for w in ready)
            if self._sharing is None and not self.stopping:
                import gevent
                self._sharing = gevent.spawn(self._share)
        if here != self._accepting and not self.stopping and self.on_accepting is not None:
            self._accepting = here
            self.on_accepting(here)

    def _accepting_workers(self) -> List[_Worker]:
        """The session workers that accept: ready, not retiring."""
        return [w for w in self.workers if w.ready and not w.retiring]

    def _share(self) -> None:
        import gevent

        try:
            while not self.stopping and self._accepting_workers():
                gevent.sleep(SHARE_POLL)
                self._accepting_changed()
        finally:
            self._sharing = None

    def busy(self) -> None:
        """Called by eqmaild at each session it counted: start a session
        worker (and the local-delivery worker) when eqmaild used at least
        `load` of a core over the last second.  Never raises."""
        if self.max_workers and not self.stopping and self._load.busy():
            self.more()

    def more(self) -> None:
        """Start another session worker if fewer than `max_workers` run
        (and the local-delivery worker if there is none): eqmaild is busy,
        or a worker said it is (``m``)."""
        if self.stopping or time.monotonic() < self._no_spawn_until:
            return
        if sum(1 for w in self.workers if not w.retiring) < self.max_workers:
            self.spawn()
        if self.local_deliveries and self.local is None:
            self.spawn("local")

    def spawn(self, role: str = "session") -> Optional[_Worker]:
        """Start one worker now: a session worker, or with `role` "local" the
        local-delivery worker.  Returns it, or None when it could not be
        started (logged; no new try for RESPAWN_DELAY seconds)."""
        import gevent
        import gevent.socket

        import fcntl

        from .concurrency import OWNERS

        owner = 0
        if role == "session":
            used = {w.owner for w in self.workers}
            owner = next((o for o in range(1, OWNERS) if o not in used), 0)
            if not owner:
                log.warning("no room for another session worker in the session table")
                return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dest, what = log.destination()
        # what the worker gets, and on which descriptor; every source is
        # first copied above the targets, so no dup2 overwrites another's source
        wanted = [(theirs.fileno(), CHANNEL_FD)]
        if dest == "fd":
            wanted.append((what, LOG_FD))
        listen = []
        if role == "session":
            wanted.append((self.table.fd, TABLE_FD))
            for i, (kind, lsock) in enumerate(self.listeners):
                wanted.append((lsock.fileno(), LISTEN_FD + i))
                listen.append([kind, LISTEN_FD + i])
        conf = {"home": self.home, "checkpassword": self.checkpassword, "role": role,
                "log": dest, "ident": what if dest == "syslog" else None,
                "owner": owner, "listen": listen, "load": self.load,
                "direct": self.direct, "cpu": spare(max(0, owner - 1))}
        argv = [sys.executable, "-c", "import sys; from eqmail.workers import main; "
                "sys.exit(main(sys.argv[1:]))", json.dumps(conf)]
        copies: List[int] = []
        try:
            above = LISTEN_FD + len(self.listeners)
            for fd, _ in wanted:
                copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above))
            actions = [(os.POSIX_SPAWN_DUP2, copy, target)
                       for copy, (_, target) in zip(copies, wanted)]
            with unpinned():  # a worker is there to use the other cores
                pid = os.posix_spawn(sys.executable, argv, dict(os.environ),
                                     file_actions=actions)
        except OSError as e:
            ours.close()
            self._no_spawn_until = time.monotonic() + RESPAWN_DELAY
            log.alert("unable to start a %s worker: %s"
                      % ("local delivery" if role == "local" else "session", e))
            return None
        finally:
            theirs.close()
            for fd in copies:
                os.close(fd)
        chan = gevent.socket.socket(ours.family, ours.type, fileno=ours.detach())
        w = _Worker(pid, role, chan, owner)
        if role == "local":
            self.local = w
            log.status("started %s" % w.name)
        else:
            self.workers.append(w)
            log.status("started %s (%d of at most %d)"
                       % (w.name, len(self.workers), self.max_workers))
        gevent.spawn(self._listen, w)
        if self._monitor is None:
            self._monitor = gevent.spawn(self._retire_idle)
        return w

    # -- local deliveries ----------------------------------------------------------

    def deliver(self, msgid: str, sender: str, local: str, domain: str,
                finish: bool) -> Optional[Tuple[object, bool]]:
        """Run one local delivery in the local-delivery worker (see
        eqmail.delivery.worker for `finish`).  Cooperative.  Returns
        (LocalResult, removed) -- removed: the worker removed the message
        from the queue -- or None when no worker is ready to take it: deliver
        it here.  A worker that dies or does not answer in time gives a
        temporary failure (the delivery may have happened: at least once)."""
        w = self.local
        if w is None or not w.ready or w.retiring or self.stopping:
            return None
        import gevent
        import gevent.event

        from .delivery import deferred
        from .delivery.local import LocalResult
        from .delivery.lspawn import CHILD_TIMEOUT

        n = next(self._numbers)
        record = b"l" + json.dumps({"n": n, "id": msgid, "sender": sender, "local": local,
                                    "domain": domain, "finish": finish}).encode("ascii")
        if len(record) > MAX_RECORD:
            return None
        got = gevent.event.AsyncResult()
        w.waiting[n] = got
        w.active += 1
        w.last = time.monotonic()
        try:
            try:
                with gevent.Timeout(SEND_TIMEOUT):
                    with w.lock:
                        w.chan.send(record)
            except (OSError, gevent.Timeout) as e:
                log.warning("unable to hand a delivery to %s: %s" % (w.name, e))
                return None
            answer = got.get(timeout=CHILD_TIMEOUT)
        except gevent.Timeout:
            answer = None
        finally:
            w.waiting.pop(n, None)
            w.parts.pop(n, None)
            w.active -= 1
            w.last = time.monotonic()
        try:
            return LocalResult.from_dict(answer["result"]), answer["removed"] is True
        except (TypeError, KeyError, ValueError, AttributeError):
            why = "died or timed out" if answer is None else "gave a bad answer"
            return LocalResult(deferred("Unable to deliver: the local delivery worker "
                                        "%s. (#4.3.0)" % why)), False

    def _answer(self, w: _Worker, kind: bytes, rest: bytes) -> None:
        """A part (``p``) or the end (``l``) of a delivery answer."""
        head, _, part = rest.partition(b" ")
        n = int(head)
        got = w.waiting.get(n)
        if got is None:
            return
        buf = w.parts.setdefault(n, bytearray())
        if len(buf) + len(part) > MAX_ANSWER:
            w.parts.pop(n, None)
            w.waiting.pop(n, None)
            got.set(None)
            return
        buf += part
        if kind == b"l":
            w.parts.pop(n, None)
            w.waiting.pop(n, None)
            try:
                got.set(json.loads(bytes(buf).decode("utf-8", "surrogateescape")))
            except ValueError:
                got.set(None)

    def _listen(self, w: _Worker) -> None:
        """Read the worker's records until it goes away, then reap it."""
        from . import children
        from .queue.store import Item

        while True:
            try:
                data = w.chan.recv(MAX_RECORD)
            except OSError:
                data = b""
            if not data:
                break
            kind, rest = data[:1], data[1:]
            try:
                if kind == b"c":
                    self.on_commit(Item(**json.loads(rest)))
                elif kind == b"C":
                    self._commit_by_id(rest.decode("ascii"))
                elif kind in (b"l", b"p"):
                    self._answer(w, kind, rest)
                elif kind == b"r":
                    w.ready = True
                    self._accepting_changed()
                elif kind == b"m":
                    self.more()
            except Exception as e:  # a bad record must not stop the listening
                log.alert("%s: bad record: %s: %s" % (w.name, type(e).__name__, e))
        for done in list(w.waiting.values()):
            done.set(None)  # deliver(): the worker died
        w.waiting.clear()
        w.ready = False
        if self.local is w:
            self.local = None
        self._accepting_changed()  # eqmaild accepts again if no worker does
        try:
            w.chan.close()
        except OSError:
            pass
        status = children.wait(w.pid, time.time() + SESSION_GRACE + 5)
        if status is None:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except OSError:
                pass
            status = children.wait(w.pid, time.time() + 5)
        if w in self.workers:
            self.workers.remove(w)
            self.table.clear(w.owner)  # it is gone, and so are its sessions
        clean = status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if clean and w.retiring:
            log.status("%s stopped" % w.name)
        else:
            self._no_spawn_until = time.monotonic() + RESPAWN_DELAY
            how = "did not stop" if status is None else (
                "exited %d" % os.WEXITSTATUS(status) if os.WIFEXITED(status)
                else "killed by signal %d" % os.WTERMSIG(status))
            log.alert("%s %s" % (w.name, how))

    def _commit_by_id(self, msgid: str) -> None:
        from . import threads

        try:
            item = threads.run(self.store.load, msgid)
        except (OSError, ValueError) as e:
            log.alert("unable to read queue envelope %s: %s" % (msgid, e))
            return
        self.on_commit(item)

    def _retire_idle(self) -> None:
        import gevent

        while not self.stopping:
            gevent.sleep(min(5.0, self.idle / 2))
            now = time.monotonic()
            for w in self._all():
                if not w.ready and now - w.last >= READY_TIMEOUT:
                    log.alert("%s not ready after %d s; killing it" % (w.name, READY_TIMEOUT))
                    w.ready = True  # once
                    w.retiring = True
                    try:
                        os.kill(w.pid, signal.SIGKILL)
                    except OSError:
                        pass
                elif not w.retiring and self._idle(w, now):
                    self._retire(w)

    def _idle(self, w: _Worker, now: float) -> bool:
        """No session (delivery) in `w` for `idle` seconds."""
        active, last = w.active, w.last
        if w.role == "session":
            active, started = self.table.owner(w.owner)
            last = max(last, started)
        return active == 0 and now - last >= self.idle

    def _retire(self, w: _Worker) -> None:
        """Tell `w` to stop: eqmaild accepts again if no other worker does,
        then end of file on the worker's channel."""
        w.retiring = True
        self._accepting_changed()
        try:
            w.chan.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- signals and stop --------------------------------------------------------

    def _all(self) -> List[_Worker]:
        return self.workers + ([self.local] if self.local is not None else [])

    def signal(self, signum: int) -> None:
        """Pass `signum` (SIGHUP: re-read the control files) on to every worker."""
        for w in self._all():
            try:
                os.kill(w.pid, signum)
            except OSError:
                pass

    def stop(self, grace: float) -> bool:
        """Stop every worker; wait up to `grace` seconds for them to exit.
        True when none is left."""
        import gevent

        self.stopping = True
        if self._monitor is not None:
            self._monitor.kill(block=False)
        for w in self._all():
            self._retire(w)
        deadline = time.monotonic() + grace
        while self._all() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        return not self._all()


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- the worker's side ------------------------------------------------------------------

def main(argv: List[str]) -> int:
    """A worker: ``argv[0]`` is JSON ``{"home", "checkpassword", "role":
    "session"|"local", "log": "stderr"|"fd"|"syslog"|"null", "ident",
    "owner": its index in the session table, "listen": [[kind, descriptor],
    ...], "load": share of a core}``; the channel is on descriptor 3, the
    session table on 5.  Returns the exit code (0 after a clean stop, 78
    when the control files, the queue or the session table cannot be used,
    64 on bad arguments)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        conf = json.loads(argv[0])
        home = conf["home"]
        if conf.get("role") != "local":
            owner = int(conf["owner"])
            listen = [(str(kind), int(fd)) for kind, fd in conf["listen"]]
            load = float(conf["load"])
    except (IndexError, ValueError, KeyError, TypeError):
        sys.stderr.write("eqmail worker: started by eqmaild only\n")
        return 64
    dest = conf.get("log")
    if isinstance(conf.get("cpu"), int):
        from .cpu import pin

        try:
            pin(conf["cpu"])  # before any thread starts (eqmail.cpu)
        except (OSError, ValueError):
            pass  # eqmaild's mask changed meanwhile: the kernel chooses
    if dest == "fd":
        log.to_fd(LOG_FD)
    elif dest == "syslog":
        log.to_syslog(conf.get("ident") or "eqmaild")
    elif dest == "null":
        log.to_null()
    if conf.get("role") == "local":
        from .delivery import worker
        return worker.main(home)

    import gevent
    import gevent.event
    import gevent.lock
    import gevent.pool
    import gevent.server
    import gevent.socket

    from .concurrency import SessionTable
    from .control import ConfigError, ConfigHolder
    from .queue.store import Store

    # what eqmaild gave (dup2 leaves it inheritable) stays out of the programs
    # this process starts (spp plugins, checkpassword)
    for fd in [CHANNEL_FD, TABLE_FD] + [fd for _, fd in listen] + (
            [LOG_FD] if dest == "fd" else []):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    try:
        holder = ConfigHolder(home)
        store = Store.open(home, create=False)
        table = SessionTable.attach(TABLE_FD)
    except (ConfigError, OSError) as e:
        log.alert("session worker: unable to start: %s" % e)
        return 78
    hub = gevent.get_hub()
    hub.threadpool.maxsize = 20
    log.start_batching()
    chan = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=CHANNEL_FD)
    lock = gevent.lock.Semaphore()
    state = {"stopping": False, "chan": True}
    stopping = lambda: state["stopping"]  # noqa: E731
    checkpassword = conf.get("checkpassword")
    direct = conf.get("direct") is True

    def send(record: bytes) -> bool:
        if not state["chan"]:
            return False
        try:
            with gevent.Timeout(SEND_TIMEOUT):  # eqmaild stopped reading: stuck
                with lock:
                    chan.send(record)
            return True
        except (OSError, gevent.Timeout):
            state["chan"] = False
            return False

    def committed(item) -> None:
        if not send(_item_record(item)):
            store.poke()  # eqmaild gone or going: its scan finds the message

    store.on_commit = committed
    stop = gevent.event.Event()
    pool = session_pool(holder.current)  # as eqmaild's

    def reload() -> None:
        if holder.reload():
            fit_session_pool(pool, holder.current)

    gevent.signal_handler(signal.SIGHUP, reload)
    gevent.signal_handler(signal.SIGTERM, stop.set)
    cpu = CpuLoad(load)

    def started() -> None:
        if cpu.busy():
            send(b"m")  # eqmaild may start another worker

    servers = []
    for kind, fd in listen:
        try:
            lsock = gevent.socket.socket(fileno=fd)
        except OSError as e:
            log.alert("session worker: no listener on descriptor %d: %s" % (fd, e))
            return 78
        server = gevent.server.StreamServer(
            lsock, lambda sock, addr, kind=kind: serve_client(
                holder, store, table, owner, sock, addr, kind, stopping, checkpassword,
                started, direct), spawn=pool)
        server.start()
        servers.append(server)

    def receive() -> None:
        """eqmaild sends nothing; end of file: stop."""
        while True:
            try:
                if not chan.recv(MAX_RECORD):
                    break
            except OSError:
                break
        stop.set()

    if not send(b"r"):
        return 0
    reader = gevent.spawn(receive)
    stop.wait()
    for server in servers:  # eqmaild accepts again (or stops)
        server.close()
    state["stopping"] = True
    pool.join(timeout=SESSION_GRACE)
    pool.kill(timeout=1)
    reader.kill(block=False)
    log.flush()
    return 0
