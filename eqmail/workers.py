"""workers -- extra SMTP session processes (and a local-delivery process)
that eqmaild starts under load.

SUMMARY
    CPython runs the Python code of one process on one core at a time, and
    eqmaild is one process: its hub runs every SMTP session and the
    scheduler.  On a machine with more than one core, when eqmaild is busy,
    it starts up to ``--workers`` session workers (Postfix's master starts
    smtpd processes on demand in the same way) and hands new connections to
    them.  A worker runs the session exactly as eqmaild would (the same
    `eqmail.smtp.session.Session`, control files and queue) and commits the
    message to the queue itself; eqmaild keeps accepting, applying
    control/smtprules and the concurrency limits, scheduling and delivering.

WHEN
    At a new connection, at most once a second, eqmaild looks at the CPU
    time it used (all its threads) since the last look.  When that is at
    least ``--worker-load`` of one core (default 0.5; 0 starts one at the
    first connection) and fewer than ``--workers`` workers run, it starts
    one.  A connection goes to the ready worker with the fewest sessions
    unless that worker already has more than `SHARE` times as many as
    eqmaild (plus one), because eqmaild also schedules and delivers;
    otherwise eqmaild serves it.  A worker without a session for
    ``--worker-idle`` seconds (default 60; Postfix's max_idle is 100) is
    told to stop, so an idle eqmaild is one process again (its memory
    figure).  ``--workers 0`` (the default on a single core) never starts
    one.

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

HAND-OVER (a SOCK_SEQPACKET socket pair, one record per message)
    eqmaild -> worker
        ``s`` + JSON ``{"n": N, "kind": "smtp"|"submission"|"smtps",
        "env": {...}}`` with the client's socket attached (SCM_RIGHTS).
        The environment is the one eqmaild built (TCPREMOTEIP, TCPLOCALIP,
        TCPLOCALPORT, TCPLOCALHOST, TLSREQUIRED, the smtprules variables).
    worker -> eqmaild
        ``r`` ready; ``d`` + N: session N ended (its place in
        concurrencyincoming and concurrencyperip is free again); ``c`` +
        JSON of the committed `Item` (``C`` + queue ID when that would be
        too large: eqmaild reads the envelope from the queue file).
    The local-delivery worker's records are described in
    eqmail.delivery.worker (``l`` requests, ``p``/``l`` answers).
    End of file from eqmaild (it stops, or retires an idle worker): the
    worker stops like eqmaild on SIGTERM -- its sessions get 421 at their
    next command outside a mail transaction -- and exits when they have
    ended (at most `SESSION_GRACE` seconds).  End of file from the worker
    (it exited or died): its sessions count as ended.

PROCESS
    Started with posix_spawn (no Python code runs in the child before
    exec, as eqmaild has threads) as ``python -c`` calling `main`, with the
    channel on descriptor 3 and, when eqmaild logs to a file, that file on
    descriptor 4.  It runs as eqmaild's user (the service user once
    privileges are dropped: it reads the network too), ignores SIGINT (a
    terminal's ^C goes to eqmaild, which stops it), re-reads the control
    files on SIGHUP (eqmaild forwards its own) and stops on SIGTERM.  A
    committed message is durable before the worker answers 250, whatever
    happens to eqmaild afterwards: a message eqmaild never heard of is
    found by its next queue scan or at its next start.

STANDARDS
    unix(7) SCM_RIGHTS; Postfix master(8) (process limits, max_idle).
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

#: Seconds after a worker failed to start or died before another is tried.
RESPAWN_DELAY = 10
#: Seconds a stopping worker waits for its sessions (as eqmaild does).
SESSION_GRACE = 10
#: Seconds a record may wait for room on the channel; then the connection
#: is served by eqmaild (a worker that does not read is stuck).
SEND_TIMEOUT = 10
#: Seconds a new worker has to say it is ready before it is killed.
READY_TIMEOUT = 30
#: Largest record on the channel, in bytes.
MAX_RECORD = 65536
#: Largest answer to a local delivery, in bytes (as a delivery child's report).
MAX_ANSWER = 1 << 20
#: A worker takes a connection unless it has more than SHARE times as many
#: sessions as eqmaild (plus one): eqmaild also schedules and delivers.
SHARE = 3
#: The descriptors a worker finds its channel and its log file on.
CHANNEL_FD = 3
LOG_FD = 4


def default_count() -> int:
    """Workers to allow by default: one on a multi-core machine, none on
    a single core (where a second process only costs memory)."""
    return 1 if (os.cpu_count() or 1) > 1 else 0


def serve_connection(config, store, sock, kind: str, env: Dict[str, str],
                     stopping: Callable[[], bool], checkpassword) -> None:
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

        Session(config, store, conn["sock"].recv, _sender(conn["sock"]), env,
                stopping=stopping,
                starttls=starttls if ctx is not None and kind != "smtps" else None,
                tls_cipher=cipher, checkpassword=checkpassword,
                submission=kind == "submission").run()
    except OSError:
        pass
    finally:
        tls.close(conn["sock"])


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
                 "parts", "last")

    def __init__(self, pid: int, role: str, chan) -> None:
        import gevent.lock

        self.pid = pid
        self.role = role            # "session" or "local"
        self.chan = chan            # gevent socket, eqmaild's end
        self.lock = gevent.lock.Semaphore()  # one sender at a time
        self.ready = False          # said "r"
        self.retiring = False       # told to stop (its channel half-closed)
        self.active = 0             # sessions (deliveries) handed over and not ended
        # session number -> Event; delivery number -> AsyncResult
        self.waiting: Dict[int, object] = {}
        self.parts: Dict[int, bytearray] = {}  # delivery answers arriving in parts
        self.last = time.monotonic()  # last hand-over (or start)

    @property
    def name(self) -> str:
        return "%s worker %d" % ("local delivery" if self.role == "local" else "session",
                                 self.pid)


class Pool:
    """eqmaild's session workers: starts them under load, hands connections
    over, hears about commits and ended sessions, retires idle ones.

    `on_commit(item)` is called in eqmaild for every message a worker
    committed (the scheduler's `add`); `store` reads the envelope when the
    worker only sent the ID.
    """

    def __init__(self, home: str, store, on_commit: Callable, max_workers: int,
                 load: float, checkpassword, idle: float = 60,
                 local_deliveries: bool = False) -> None:
        self.home = home
        self.store = store
        self.on_commit = on_commit
        self.max_workers = max(0, max_workers)
        self.load = load
        self.idle = idle
        self.checkpassword = checkpassword
        # a local-delivery worker as well (eqmaild delivers as itself)
        self.local_deliveries = local_deliveries and self.max_workers > 0
        self.workers: List[_Worker] = []  # session workers
        self.local: Optional[_Worker] = None  # the local-delivery worker
        self._numbers = itertools.count(1)
        self._t0 = time.monotonic()
        self._cpu0 = _cpu_seconds()
        self._no_spawn_until = 0.0
        self._monitor = None
        self.stopping = False

    # -- hand-over ---------------------------------------------------------------

    def offer(self, sock, kind: str, env: Dict[str, str], local_sessions: int):
        """Hand the accepted connection `sock` to a worker if one should take
        it.  Returns an Event that is set when the worker's session ended
        (eqmaild may close its own copy of the socket at once), or None:
        serve it here.  `local_sessions` is the count eqmaild serves itself.
        May start a worker (for later connections).  Never raises."""
        if self.max_workers == 0 or self.stopping:
            return None
        self._maybe_spawn()
        best = None
        for w in self.workers:
            if w.ready and not w.retiring and (best is None or w.active < best.active):
                best = w
        if best is None or best.active > SHARE * (local_sessions + 1):
            return None
        import gevent
        import gevent.event

        n = next(self._numbers)
        done = gevent.event.Event()
        record = b"s" + json.dumps({"n": n, "kind": kind, "env": env}).encode("ascii")
        best.waiting[n] = done
        best.active += 1
        best.last = time.monotonic()
        try:
            with gevent.Timeout(SEND_TIMEOUT):  # a worker that stopped reading
                with best.lock:
                    socket.send_fds(best.chan, [record], [sock.fileno()])
        except (OSError, ValueError, gevent.Timeout) as e:
            best.waiting.pop(n, None)
            best.active -= 1
            log.warning("unable to hand a connection to worker %d: %s" % (best.pid, e))
            return None
        return done

    def _maybe_spawn(self) -> None:
        now = time.monotonic()
        if now - self._t0 >= 1.0 or self.load <= 0:
            cpu = _cpu_seconds()
            busy = (cpu - self._cpu0) / max(now - self._t0, 1e-6)  # cores used
            self._t0, self._cpu0 = now, cpu
            if busy < self.load or now < self._no_spawn_until:
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

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dest, what = log.destination()
        actions = [(os.POSIX_SPAWN_DUP2, theirs.fileno(), CHANNEL_FD)]
        if dest == "fd":
            actions.append((os.POSIX_SPAWN_DUP2, what, LOG_FD))
        conf = {"home": self.home, "checkpassword": self.checkpassword, "role": role,
                "log": dest, "ident": what if dest == "syslog" else None}
        argv = [sys.executable, "-c", "import sys; from eqmail.workers import main; "
                "sys.exit(main(sys.argv[1:]))", json.dumps(conf)]
        try:
            pid = os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions)
        except OSError as e:
            ours.close()
            theirs.close()
            self._no_spawn_until = time.monotonic() + RESPAWN_DELAY
            log.alert("unable to start a %s worker: %s"
                      % ("local delivery" if role == "local" else "session", e))
            return None
        theirs.close()
        chan = gevent.socket.socket(ours.family, ours.type, fileno=ours.detach())
        w = _Worker(pid, role, chan)
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
                if kind == b"d":
                    done = w.waiting.pop(int(rest), None)
                    if done is not None:
                        w.active -= 1
                        done.set()
                elif kind == b"c":
                    self.on_commit(Item(**json.loads(rest)))
                elif kind == b"C":
                    self._commit_by_id(rest.decode("ascii"))
                elif kind in (b"l", b"p"):
                    self._answer(w, kind, rest)
                elif kind == b"r":
                    w.ready = True
            except Exception as e:  # a bad record must not stop the listening
                log.alert("%s: bad record: %s: %s" % (w.name, type(e).__name__, e))
        for done in list(w.waiting.values()):
            if w.role == "local":
                done.set(None)  # deliver(): the worker died
            else:
                done.set()
        w.waiting.clear()
        if w.role == "session":
            w.active = 0
        if w in self.workers:
            self.workers.remove(w)
        if self.local is w:
            self.local = None
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
                elif not w.retiring and w.active == 0 and now - w.last >= self.idle:
                    self._retire(w)

    def _retire(self, w: _Worker) -> None:
        """Tell `w` to stop: no more hand-overs, end of file on its channel."""
        w.retiring = True
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
    """A session worker: ``argv[0]`` is JSON ``{"home", "checkpassword",
    "log": "stderr"|"fd"|"syslog"|"null", "ident"}``; the channel is on
    descriptor 3.  Returns the exit code (0 after a clean stop, 78 when the
    control files cannot be read, 64 on bad arguments)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        conf = json.loads(argv[0])
        home = conf["home"]
    except (IndexError, ValueError, KeyError, TypeError):
        sys.stderr.write("eqmail worker: started by eqmaild only\n")
        return 64
    dest = conf.get("log")
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
    import gevent.socket

    from .control import ConfigError, ConfigHolder
    from .queue.store import Store

    try:
        holder = ConfigHolder(home)
        store = Store.open(home, create=False)
    except (ConfigError, OSError) as e:
        log.alert("session worker: unable to start: %s" % e)
        return 78
    hub = gevent.get_hub()
    hub.threadpool.maxsize = 20
    log.start_batching()
    chan = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=CHANNEL_FD)
    lock = gevent.lock.Semaphore()
    state = {"stopping": False, "chan": True}

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
    gevent.signal_handler(signal.SIGHUP, holder.reload)
    gevent.signal_handler(signal.SIGTERM, stop.set)
    pool = gevent.pool.Pool()

    def one(n: int, fd: int, kind: str, env: Dict[str, str]) -> None:
        try:
            sock = gevent.socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
        else:
            serve_connection(holder.current, store, sock, kind, env,
                             lambda: state["stopping"], conf.get("checkpassword"))
        finally:
            send(b"d%d" % n)

    def receive() -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(chan, MAX_RECORD, 1)
            except OSError:
                break
            if not data:
                break
            try:
                req = json.loads(data[1:])
                n, kind, env = int(req["n"]), str(req["kind"]), dict(req["env"])
            except (ValueError, KeyError, TypeError):
                for fd in fds:
                    os.close(fd)
                continue
            if not fds:
                send(b"d%d" % n)
                continue
            for fd in fds[1:]:
                os.close(fd)
            pool.spawn(one, n, fds[0], kind, env)
        stop.set()

    if not send(b"r"):
        return 0
    reader = gevent.spawn(receive)
    stop.wait()
    state["stopping"] = True
    pool.join(timeout=SESSION_GRACE)
    pool.kill(timeout=1)
    reader.kill(block=False)
    log.flush()
    return 0
