"""daemon -- eqmaild: the SMTP listeners and the queue scheduler in one process.

SYNOPSIS
    eqmaild [--home DIR] [--foreground] [--pidfile FILE] [--smtp ADDR:PORT]...
            [--submission ADDR:PORT]... [--smtps ADDR:PORT]... [--checkpassword CMD]
            [--user USER] [--workers N] [--worker-load FRACTION]
            [--worker-idle SECONDS] [--cpu auto|any|N]

DESCRIPTION
    Binds the SMTP listeners, then serves every connection with the same
    session engine as ``eqmail smtpd``, commits accepted mail to the durable
    queue and delivers it (the roles of tcpserver + qmail-smtpd, qmail-queue
    and qmail-send).  A home without control/me gets the embedded default
    configuration (see `paths.init_home`).

    Listeners (each repeatable; ``[::1]:2525`` for IPv6): ``--smtp``,
    ``--submission`` (AUTH before MAIL, TLSREQUIRED=1 by default) and
    ``--smtps`` (TLS from the first byte).  Default when none is given:
    SMTP on 127.0.0.1:2525 and submission on 127.0.0.1:2587 when not root;
    0.0.0.0/[::] ports 25 and 587 as root.  control/smtprules decides per
    client (deny, or environment such as RELAYCLIENT); concurrencyincoming
    and concurrencyperip cap the sessions (421 beyond).  AUTH uses
    ``--checkpassword`` (default: eqmail chkpw and HOME/users/passwd).

    eqmaild is one process by default.  With ``--workers N`` it starts, under
    load, up to N session workers, which accept on the same listeners, and
    (when it does not run as root) one local-delivery worker that runs its
    local deliveries (eqmail.workers); they stop again after
    ``--worker-idle`` seconds without work.

    Its threads stay on one CPU (``--cpu``, default ``auto``: the
    highest-numbered one it may use), where the GIL hands over between
    them for a fifth less CPU than across cores; the programs it starts
    may use every CPU, and each worker keeps its threads on one of the
    other CPUs (eqmail.cpu).

SIGNALS
    SIGHUP   re-read the control files (the last good ones stay on error);
             passed on to the workers
    SIGALRM  retry every queued message now
    SIGTERM, SIGINT
             stop accepting; sessions get 421 at their next command outside
             a mail transaction; deliveries in flight finish (bounded); exit 0

EXIT CODES (sysexits.h)
    0 clean stop; 64 bad usage; 66 home missing or unusable; 67 --user
    names no user; 69 an address cannot be bound (port in use); 73 the
    pidfile cannot be written (a missing directory is made); 75 pidfile
    names a running eqmaild; 77 privileges cannot be dropped; 78 bad
    control file.

SECURITY
    Started as root, eqmaild binds, forks the root delivery helper and runs
    as the service user (--user, default ``eqmail`` when it exists; see
    eqmail.privsep).  Without such a user it keeps root and says so.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from typing import List, Tuple

from . import __version__, log
from .paths import HOME_RULE, init_home, resolve_home

EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_NOUSER = 67
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

#: Most local injections (eqmail sendmail/inject/queue) served at once.
MAX_PICKUP = 50
#: Seconds SIGTERM waits for sessions, then for deliveries in flight.
SESSION_GRACE = 10
DELIVERY_GRACE = 60

DEFAULT_USER_LISTEN = {"smtp": ["127.0.0.1:2525"], "submission": ["127.0.0.1:2587"]}
DEFAULT_ROOT_LISTEN = {"smtp": ["0.0.0.0:25", "[::]:25"],
                       "submission": ["0.0.0.0:587", "[::]:587"]}


def read_listen(path: str) -> dict:
    """control/listen: the listeners when no --smtp, --submission or
    --smtps is given, one per line, ``smtp ADDR:PORT``, ``submission
    ADDR:PORT`` or ``smtps ADDR:PORT`` (``#`` comments); the package's
    debconf answers write it.  Returns {kind: [spec]}; {} when the file is
    missing or empty.  Raises ValueError naming the file and line.  Read
    at start only: a change needs a restart."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ValueError("%s: %s" % (path, e.strerror))
    out: dict = {}
    for n, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, spec = line.partition(" ")
        spec = spec.strip()
        if kind not in ("smtp", "submission", "smtps") or not spec:
            raise ValueError("%s line %d: expected smtp|submission|smtps ADDR:PORT, got %r"
                             % (path, n, line))
        try:
            parse_listen(spec)
        except ValueError as e:
            raise ValueError("%s line %d: %s" % (path, n, e))
        out.setdefault(kind, []).append(spec)
    return out


def parse_listen(text: str) -> Tuple[int, str, int]:
    """``ADDR:PORT`` or ``[IPV6]:PORT`` -> (family, address, port).
    Raises ValueError."""
    import ipaddress

    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [IPV6]:PORT, got %r" % text)
        ipaddress.IPv6Address(host)
        family = socket.AF_INET6
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected ADDR:PORT, got %r" % text)
        ipaddress.IPv4Address(host)
        family = socket.AF_INET
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("bad port in %r" % text)
    return family, host, int(port)


def bind(spec: str) -> socket.socket:
    """A listening socket for ``ADDR:PORT``.  Raises ValueError, OSError."""
    family, host, port = parse_listen(spec)
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's help formatter, given the terminal width as shutil would
    find it ($COLUMNS, else the terminal, else 80): argparse would import
    shutil for it, and with it bz2 and lzma -- 0.6 MB of idle RSS."""
    try:
        width = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            width = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            width = 80
    return argparse.HelpFormatter(prog, width=max(width, 20) - 2)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """Bad usage exits 64 (EX_USAGE), as the EXIT CODES above say."""
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, "%s: error: %s\n" % (self.prog, message))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="eqmaild",
        description="eqmail daemon: SMTP listeners, durable queue and deliveries "
                    "in one process.",
        epilog=HOME_RULE + " A home without "
               "control/me is created with the embedded default configuration. "
               "Signals: HUP reloads control files, ALRM retries the queue now, "
               "TERM stops cleanly.")
    p.add_argument("--home", metavar="DIR", help="the eqmail home (control/, queue/, alias/)")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("--pidfile", metavar="FILE", help="write the daemon's pid here")
    p.add_argument("--smtp", metavar="ADDR:PORT", action="append", default=None,
                   help="SMTP listener, repeatable; IPv6 as [::1]:2525 "
                        "(default: the lines of HOME/control/listen, `smtp ADDR:PORT`, "
                        "`submission ...`, `smtps ...`; without it 127.0.0.1:2525, or "
                        "0.0.0.0:25 and [::]:25 as root)")
    p.add_argument("--submission", metavar="ADDR:PORT", action="append", default=None,
                   help="submission listener (RFC 6409): AUTH before MAIL, TLSREQUIRED=1 "
                        "by default; repeatable (default 127.0.0.1:2587, or 0.0.0.0:587 "
                        "and [::]:587 as root)")
    p.add_argument("--smtps", metavar="ADDR:PORT", action="append", default=None,
                   help="implicit-TLS listener (port 465 style, RFC 8314), repeatable; "
                        "needs control/servercert.pem (none by default)")
    p.add_argument("--checkpassword", metavar="COMMAND",
                   help="checkpassword program and subprogram for SMTP AUTH, as one "
                        "string, e.g. '/usr/local/bin/checkpassword /bin/true' (default: "
                        "eqmail chkpw with HOME/users/passwd; 'none' turns AUTH off)")
    p.add_argument("--user", metavar="USER",
                   help="started as root: bind, then run as USER (default: eqmail, when "
                        "that user exists; `eqmail mkusers` creates it); deliveries to other "
                        "users go through a small root helper")
    p.add_argument("--workers", metavar="N", type=_count, default=0,
                   help="most session worker processes started when busy, to use more "
                        "cores at the cost of about 23 MB each; with the first, a "
                        "local-delivery worker too unless eqmaild runs as root (default 0: "
                        "always one process)")
    p.add_argument("--worker-load", metavar="FRACTION", type=_fraction, default=0.5,
                   help="start a worker when eqmaild used at least this share of one "
                        "core over the last second (default 0.5; 0 = at the first "
                        "connection)")
    p.add_argument("--worker-idle", metavar="SECONDS", type=_seconds, default=30,
                   help="stop a worker after this long without a session or delivery "
                        "(default 30: the tree is back to one process within a minute "
                        "of the load ending)")
    p.add_argument("--cpu", metavar="auto|any|N", type=_cpu, default=-1,
                   help="keep eqmaild's threads on one CPU: auto (default: the "
                        "highest-numbered CPU it may use), any (no pinning) or a CPU "
                        "number; the programs it starts use every CPU")
    p.add_argument("--version", action="version", version="eqmaild " + __version__)
    return p


def _cpu(text: str):
    from .cpu import parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _ranged(convert, low, high, what: str):
    """An argparse type: `convert` the text, refuse what is not within
    [low, high] (NaN included) with one clear message."""
    def check(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError("not %s from %s to %s: %r"
                                             % (what, low, high, text))
        return value
    return check


_count = _ranged(int, 0, 64, "a count")
_seconds = _ranged(float, 0.1, 86400, "a number of seconds")
_fraction = _ranged(float, 0.0, 64.0, "a share of a core")


def fatal(code: int, text: str) -> int:
    log.flush()  # batched lines first (no-op when not batching)
    sys.stderr.write("eqmaild: fatal: %s\n" % text)
    return code


def _pid_running(pidfile: str) -> int:
    """The pid in `pidfile` if it names a live eqmaild, else 0."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return 0
    if pid <= 0 or pid == os.getpid():
        return 0
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read()
    except OSError:
        return 0
    return pid if b"eqmail" in cmd else 0


def prepare_pidfile(path: str) -> None:
    """Make the directory of `path` when it is missing (as ``mkdir -p``,
    mode 755), and check that a pidfile can be written there.  Raises
    OSError."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied", directory)


def write_pidfile(path: str) -> None:
    """Write this process's pid into `path` atomically.  Raises OSError."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.replace(tmp, path)


def detach() -> None:
    """Become a daemon: fork twice, new session, stdio on /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


#: Set (with MALLOC_ARENA_MAX) by eqmaild for its own re-execution.
_ARENA_MARK = "EQMAIL_ONE_ARENA"


def one_malloc_arena() -> None:
    """glibc gives each thread that allocates under contention a malloc
    arena of its own, and the threadpool's threads (fsync, Maildir writes)
    leave freed memory in each: about 0.5 MB of RSS more under a c=20 load.
    glibc reads MALLOC_ARENA_MAX only when a process starts, so eqmaild runs
    itself again (same pid, same arguments: sys.orig_argv) with it set to
    1, then takes the variable out of its environment so that the programs
    it starts (plugins, .qmail programs) do not inherit it, and gives
    itself back the process name of the first exec.  Not where the
    C library is not glibc (musl on OpenWrt has no arenas), not when the
    admin set MALLOC_ARENA_MAX, and never a second time.  Never raises: if
    the exec fails, eqmaild goes on as it is."""
    comm = os.environ.pop(_ARENA_MARK, None)
    if comm is not None:
        os.environ.pop("MALLOC_ARENA_MAX", None)  # ours: read by glibc already
        _set_comm(comm)
        return
    if "MALLOC_ARENA_MAX" in os.environ or not getattr(sys, "orig_argv", None):
        return
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return  # not glibc
    env = dict(os.environ, MALLOC_ARENA_MAX="1")
    env[_ARENA_MARK] = _get_comm() or "python3"
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        pass


def _get_comm() -> str:
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _set_comm(comm: str) -> None:
    """The process name (/proc/PID/comm) the first exec gave, e.g.
    ``eqmaild`` for the console script run through its #! line: the init
    script finds the daemon by it (start-stop-daemon --name)."""
    if comm and comm != _get_comm():
        try:
            with open("/proc/self/comm", "w") as f:
                f.write(comm[:15])
        except OSError:
            pass


def main(argv: List[str] = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the command line, not a caller's list
        one_malloc_arena()
    # a reload or flush that comes before the handlers exist must not kill us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    home = resolve_home(args.home)
    is_root = os.geteuid() == 0
    given = {"smtp": args.smtp, "submission": args.submission, "smtps": args.smtps}
    defaults = not any(given.values())
    if defaults:
        try:
            given = read_listen(os.path.join(home, "control", "listen"))
        except ValueError as e:
            return fatal(EX_CONFIG, str(e))
        if given:
            defaults = False
        else:
            given = DEFAULT_ROOT_LISTEN if is_root else DEFAULT_USER_LISTEN
    listen = [(kind, spec) for kind, specs in given.items() for spec in specs or ()]
    for kind, spec in listen:
        try:
            parse_listen(spec)
        except ValueError as e:
            return fatal(EX_USAGE, "--%s: %s" % (kind, e))
    if args.checkpassword == "none":
        checkpassword = None
    elif args.checkpassword:
        import shlex
        checkpassword = shlex.split(args.checkpassword)
        if len(checkpassword) == 1:
            checkpassword.append("/bin/true")
    else:
        checkpassword = [sys.executable, "-m", "eqmail.chkpw", "--home", home, "/bin/true"]
    run_as = None
    if is_root:
        from .privsep import SERVICE_USER, lookup

        try:
            run_as = lookup(args.user or SERVICE_USER)
        except KeyError:
            if args.user:
                return fatal(EX_NOUSER, "no user %s (eqmail mkusers creates the users)"
                             % args.user)
        if run_as is not None and run_as.pw_uid == 0:
            run_as = None
    elif args.user:
        return fatal(EX_USAGE, "--user needs eqmaild to be started as root")
    if args.pidfile:
        args.pidfile = os.path.abspath(args.pidfile)
        running = _pid_running(args.pidfile)
        if running:
            return fatal(EX_TEMPFAIL, "%s names a running eqmaild (pid %d)"
                         % (args.pidfile, running))

    if not os.path.isdir(os.path.dirname(home.rstrip("/")) or "/"):
        return fatal(EX_NOINPUT, "home %s: its parent directory does not exist" % home)
    try:
        created = init_home(home)
    except OSError as e:
        return fatal(EX_NOINPUT, "unable to set up home %s: %s" % (home, e))

    from .control import ConfigError, ConfigHolder, check_smtpplugins

    try:
        holder = ConfigHolder(home)
    except ConfigError as e:
        return fatal(EX_CONFIG, "bad control file: %s" % e)
    except OSError as e:
        return fatal(EX_CONFIG, "unable to read control files: %s" % e)
    problems = check_smtpplugins(home)
    if problems:
        return fatal(EX_CONFIG, "bad control file: %s" % "; ".join(problems))

    if args.pidfile:
        try:
            prepare_pidfile(args.pidfile)
        except OSError as e:
            return fatal(EX_CANTCREAT, "unable to write the pidfile %s: %s"
                         % (args.pidfile, e.strerror or e))

    sockets = []
    for kind, spec in listen:
        try:
            sockets.append((kind, spec, bind(spec)))
        except OSError as e:
            if spec.startswith("[::]") and defaults and e.errno in (
                    errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                log.warning("no IPv6 on this host: not listening on %s" % spec)
                continue
            return fatal(EX_UNAVAILABLE, "unable to listen on %s: %s" % (spec, e.strerror))

    if not args.foreground:
        detach()
        if os.path.exists("/dev/log"):
            log.to_syslog("eqmaild")
        else:
            os.makedirs(os.path.join(home, "log"), exist_ok=True)
            log.to_file(os.path.join(home, "log", "eqmaild.log"))
    if args.pidfile:
        try:
            write_pidfile(args.pidfile)
        except OSError as e:
            log.alert("unable to write the pidfile %s: %s" % (args.pidfile, e.strerror or e))
            return fatal(EX_CANTCREAT, "unable to write the pidfile %s: %s"
                         % (args.pidfile, e.strerror or e))
    helper = None
    if run_as is not None:
        # bound as root; now the root helper for deliveries, then nobody
        # reading the network keeps root (eqmail.privsep)
        from .privsep import drop, prepare_home, start_helper
        # what every session needs is imported while root can still read it
        # (the service user must be able to read the Python installation for
        # what loads later, e.g. dnspython at the first remote delivery)
        import importlib
        for name in ("gevent.pool", "gevent.server", "gevent.ssl", "eqmail.queue.pickup",
                     "eqmail.queue.scheduler", "eqmail.smtp.session", "eqmail.smtp.spp",
                     "eqmail.smtp.tls", "eqmail.smtp.auth", "eqmail.children",
                     "eqmail.concurrency", "eqmail.workers"):
            importlib.import_module(name)

        try:
            prepare_home(home, run_as, log.status)
            helper = start_helper(home, args.pidfile)
            drop(run_as)
        except OSError as e:
            return fatal(EX_NOPERM, "unable to drop privileges to %s: %s"
                         % (run_as.pw_name, e))
        log.status("running as user %s; deliveries to other users through the "
                   "root helper" % run_as.pw_name)
    try:
        return serve(holder, sockets, created, checkpassword, args.workers, args.worker_load,
                     args.worker_idle, helper, args.cpu)
    finally:
        log.flush()
        if args.pidfile:
            try:
                with open(args.pidfile) as f:
                    if f.read().strip() == str(os.getpid()):
                        os.unlink(args.pidfile)
            except OSError:
                pass


LISTENER_NAMES = {"smtp": "SMTP", "smtps": "SMTP over TLS (smtps)",
                  "submission": "submission"}


def _certificate(path: str):
    """{path, not_after (Unix time)} of the server certificate, None without
    one; {path, error} when it cannot be read."""
    if not os.path.exists(path):
        return None
    try:
        import ssl

        info = ssl._ssl._test_decode_cert(path)  # the stdlib's own PEM reader
        return {"path": path, "not_after": ssl.cert_time_to_seconds(info["notAfter"])}
    except Exception as e:  # an odd file must not break the status request
        return {"path": path, "error": str(e)[:200]}


def serve(holder, sockets, created: bool, checkpassword=None, max_workers: int = 0,
          worker_load: float = 0.5, worker_idle: float = 30, helper=None,
          cpu: int = None) -> int:
    """Run the listeners and the scheduler until SIGTERM/SIGINT, with up to
    `max_workers` session workers when busy (eqmail.workers).  `helper`:
    the privileged delivery helper's socket, when root was dropped.  The
    processes are decided here: this process, the workers, the helper;
    local deliveries go through one LocalRunner (eqmail.delivery.lspawn).
    `cpu`: eqmail.cpu.pin's choice for this process's threads."""
    import gevent
    import gevent.event
    import gevent.pool
    import gevent.server
    import gevent.socket

    from .queue.scheduler import Scheduler
    from .queue.store import Store

    config = holder.current
    try:
        from .cpu import pin

        pinned = pin(cpu)
    except (OSError, ValueError) as e:
        log.warning("unable to keep the threads on one CPU: %s" % e)
    else:
        if pinned is not None:
            log.status("threads on CPU %d" % pinned)
    hub = gevent.get_hub()
    hub.threadpool.maxsize = max(20, config.concurrencylocal + 10)
    log.start_batching()  # one write per loop iteration, from a writer thread
    if created:
        log.status("created the embedded default configuration in %s" % holder.home)
    if os.geteuid() == 0:
        log.warning("running as root: no eqmail user (eqmail mkusers creates it, or "
                    "give --user): the SMTP service keeps root")
        try:
            if os.stat(os.path.join(holder.home, "alias")).st_uid == 0:
                log.warning("alias/ belongs to root: deliveries to the alias user are "
                            "deferred (qmail never delivers as root); chown it to an "
                            "unprivileged user")
        except OSError:
            pass

    from .delivery.lspawn import LocalRunner

    store = Store.open(holder.home, create=True)
    runner = LocalRunner(helper)
    scheduler = Scheduler(holder, store, runner)
    stop_event = gevent.event.Event()
    state = {"stopping": False}
    from .workers import fit_session_pool, session_pool

    pool = session_pool(config)  # SMTP sessions in this process

    def reload():
        if holder.reload():
            fit_session_pool(pool, holder.current)
        from .control import check_smtpplugins

        for problem in check_smtpplugins(holder.home):
            log.alert("bad control file: %s: MAIL and RCPT get 451 qmail-spp failure "
                      "until it is mended" % problem)
        scheduler.wake()
        workers.signal(signal.SIGHUP)

    gevent.signal_handler(signal.SIGHUP, reload)
    gevent.signal_handler(signal.SIGALRM, scheduler.retry_now)
    gevent.signal_handler(signal.SIGTERM, stop_event.set)
    gevent.signal_handler(signal.SIGINT, stop_event.set)

    from .concurrency import SessionTable
    from .workers import Pool, serve_client

    # the sessions of eqmaild and its workers (concurrencyincoming, concurrencyperip)
    # (memory of this process alone, without a lock, when no worker may start)
    table = SessionTable.create(os.path.join(holder.home, "queue", "lock"),
                                shared=max_workers > 0)
    if table.fd < 0 and max_workers:
        log.warning("no memfd_create and no O_TMPFILE: no session workers")
    # Local deliveries move to a worker too, when they run in this process
    # (not root, no privileged helper: eqmail.delivery.worker).
    workers = Pool(holder.home, store, scheduler.add, max_workers, worker_load,
                   checkpassword, worker_idle,
                   local_deliveries=runner.in_process,
                   table=table if table.fd >= 0 else None)
    if workers.local_deliveries:
        runner.offload = workers.deliver
    stopping = lambda: state["stopping"]  # noqa: E731

    def handle(sock, addr, kind):
        serve_client(holder, store, table, 0, sock, addr, kind, stopping, checkpassword,
                     workers.busy, workers.direct)

    servers = []
    for kind, spec, s in sockets:
        gs = gevent.socket.socket(s.family, s.type, fileno=s.detach())
        server = gevent.server.StreamServer(
            gs, lambda sock, addr, kind=kind: handle(sock, addr, kind), spawn=pool)
        server.start()
        servers.append(server)
        log.status("listening for %s on %s" % (LISTENER_NAMES[kind], spec))

    def accepting(here: bool) -> None:
        """Session workers accept on the same listeners; while one is ready,
        eqmaild leaves the accepting to them."""
        if state["stopping"]:  # the listeners are closed
            return
        for server in servers:
            if here:
                server.start_accepting()
            else:
                server.stop_accepting()

    workers.listen([(kind, server.socket) for (kind, _, _), server in zip(sockets, servers)],
                   accepting)

    from .queue import pickup

    import time

    started_at = time.time()

    def status() -> dict:
        """What `eqmail status` shows of this eqmaild (the `!status` request)."""
        import time

        from . import stats

        return {"pid": os.getpid(), "version": __version__, "home": holder.home,
                "started": started_at, "now": time.time(),
                "listeners": [[LISTENER_NAMES[kind], spec] for kind, spec, _ in sockets],
                "queue": scheduler.summary(),
                "last_hour": stats.totals(3600), "last_day": stats.totals(86400),
                "workers": [w.pid for w in workers.workers if getattr(w, "pid", None)],
                "alerts": list(stats.alerts),
                "certificate": _certificate(os.path.join(holder.home, "control",
                                                         "servercert.pem"))}

    pickup_server = None
    flusher = pickup.Flusher(scheduler.retry_now)
    try:
        psock = pickup.listen(holder.home)
        gps = gevent.socket.socket(psock.family, psock.type, fileno=psock.detach())
        pickup_server = gevent.server.StreamServer(
            gps, lambda sock, addr: pickup.serve_client(sock, store, flusher,
                                                        scheduler.admin, status,
                                                        lambda: scheduler.last_errors),
            spawn=gevent.pool.Pool(MAX_PICKUP))
        pickup_server.start()
    except OSError as e:
        log.warning("no local injection socket %s: %s" % (pickup.socket_path(holder.home), e))

    scheduler.start()
    log.status("eqmaild %s started in %s, pid %d" % (__version__, holder.home, os.getpid()))

    stop_event.wait()
    log.status("stopping: no new connections")
    state["stopping"] = True
    for server in servers + ([pickup_server] if pickup_server else []):
        server.close()
    if not workers.stop(SESSION_GRACE + 5):
        log.warning("session workers still running; exiting anyway")
    pool.join(timeout=SESSION_GRACE)
    pool.kill(timeout=1)
    if not scheduler.stop(DELIVERY_GRACE):
        log.warning("deliveries still running after %d s; exiting anyway" % DELIVERY_GRACE)
    log.status("exiting")
    log.flush()
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
