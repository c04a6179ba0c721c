#!/usr/bin/env python3
"""eqmail's benchmark: eqmaild side by side with Postfix and a minimal aiosmtpd server.

USAGE (as root, from anywhere in the repository):

    python3 bench/run.py [--quick] [--messages N] [--runs R] [--peers eqmail,postfix,aiosmtpd]
                         [--python PATH]

    default   3 runs of 2,000 messages at concurrency 1 and 20 per peer (about 4-5 min)
    --quick   1 run of 500 messages (about 1 min): a check that everything works

What it does (bench/README.md explains how to read the results):

  * installs what is missing: Debian's postfix package unpacked into
    /tmp/eqmail-bench-cache (smtp-source, the load generator), Postfix itself
    (the recipe of shared/spec/benchmark.md, without starting the system
    instance), strace, a virtualenv /opt/eqmail-bench-venv (Debian's
    python3, this repository and aiosmtpd) when the current interpreter cannot
    be run by the unprivileged user the daemon needs, and the users
    `eqmailbench` (runs eqmaild) and `benchuser` (Postfix's Maildir);
  * starts three peers on loopback, high ports, each with a Maildir:
    eqmaild (fresh home under /tmp, control/me = bench.test), a Postfix
    instance of its own (postfix -c DIR, tests/integration/peers.py
    PostfixPeer) and bench/aiosmtpd_peer.py (fsync'd Maildir writes);
  * drives each with smtp-source -l 4096 -m N -s 1 and -s 20, runs interleaved,
    and times the accept (smtp-source's wall time) and the delivery (until the
    last file is in Maildir/new);
  * measures memory (RSS and PSS of each process tree: idle, peak under c=20,
    eqmaild with 200 idle SMTP connections, after a remote delivery) and
    storage (fsync calls with strace -f -c, write_bytes of /proc/PID/io, the
    disk's own sectors written) per delivered message;
  * writes bench/results/<date>-<host>.json and bench/results/latest.md and
    prints the table; stops everything it started and removes its temp dirs.

The eqmail measured is the one the chosen interpreter imports: the current
interpreter when the daemon's user can run it and it has eqmail, else the
bench virtualenv, into which this repository is re-installed whenever its
source changed.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
CACHE = "/tmp/eqmail-bench-cache"
VENV = "/opt/eqmail-bench-venv"
DAEMON_USER = "eqmailbench"
MAIL_USER = "benchuser"
DOMAIN = "bench.test"
SENDER = "bench@bench.test"
RCPT = "benchuser@bench.test"
MSG_SIZE = 4096
DNS_ADDRESS = "127.0.0.154"     # the DNS responder for the remote delivery (port 53)
RELAY_NAME = "relay.bench.test"
IDLE_CONNECTIONS = 200
IDLE_RETURN_TIMEOUT = 90        # s: how long the return to idle is watched after the load
PARTS = ("main", "fanout", "budget", "queue", "defences", "chunking")

# Targets of issue 7
TARGET_C20 = 1.2          # delivered msg/s at c=20 >= 1.2x Postfix
TARGET_C1 = 1.0           # ... at c=1 >= 1.0x
TARGET_IDLE_MB = 22.0
TARGET_REMOTE_MB = 30.0
TARGET_KB_PER_CONN = 32.0
# Targets of issue 19 (item 6)
TARGET_TREE_PSS_MB = 25
#: issue 19 item 1: delivered msg/s at c=20 against Postfix's, small tree
TARGET_C20_SMALL = 1.3
TARGET_TREE_RSS_MB = 32
TARGET_IDLE_RETURN_S = 60
TARGET_FSYNC = 2.0
TARGET_DISK_KB = 24
TARGET_QUEUE_BYTES = 200
TARGET_QUEUE_CPU_PCT = 1
TARGET_RESTART_S = 1

_started: List[object] = []     # things to stop, newest last
_tempdirs: List[str] = []


def say(text: str) -> None:
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), text), flush=True)


def sh(cmd, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True,
                          text=True, **kw)


def mkdtemp(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    _tempdirs.append(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_greeting(port: int, timeout: float, proc: Optional[subprocess.Popen] = None,
                  what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited with %s before greeting" % (what, proc.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.makefile("rb").readline().startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("%s did not greet on port %d within %s s" % (what, port, timeout))


def stop_proc(proc: Optional[subprocess.Popen], timeout: float = 15.0) -> None:
    """TERM, then KILL, one child of ours by its PID."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def count_files(path: str) -> int:
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return 0


def empty_dir(path: str) -> None:
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass


# ---------------------------------------------------------------- installation

_apt_updated = False


def apt_install(packages: List[str], env_extra: Optional[dict] = None) -> None:
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", **(env_extra or {}))
    if not _apt_updated:
        say("apt-get update")
        sh(["apt-get", "update", "-qq"], check=False, env=env)
        _apt_updated = True
    say("apt-get install %s" % " ".join(packages))
    sh(["apt-get", "install", "-y", "-qq", "-o", "Dpkg::Options::=--force-confdef",
        "-o", "Dpkg::Options::=--force-confold"] + packages, env=env)


def ensure_smtp_source() -> List[str]:
    """smtp-source from Debian's postfix package, unpacked (not installed)."""
    root = os.path.join(CACHE, "pf")
    exe = os.path.join(root, "usr", "sbin", "smtp-source")
    if not os.access(exe, os.X_OK):
        os.makedirs(CACHE, exist_ok=True)
        for old in glob.glob(os.path.join(CACHE, "postfix_*.deb")):
            os.unlink(old)
        say("apt-get download postfix (for smtp-source)")
        res = sh(["apt-get", "download", "postfix"], check=False, cwd=CACHE)
        if res.returncode != 0:
            global _apt_updated
            sh(["apt-get", "update", "-qq"], check=False)
            _apt_updated = True
            sh(["apt-get", "download", "postfix"], cwd=CACHE)
        deb = sorted(glob.glob(os.path.join(CACHE, "postfix_*.deb")))[-1]
        shutil.rmtree(root, ignore_errors=True)
        sh(["dpkg", "-x", deb, root])
    env_lib = os.path.join(root, "usr", "lib", "postfix")
    return [exe, env_lib]


def ensure_postfix() -> None:
    if os.access("/usr/sbin/postfix", os.X_OK):
        return
    # the recipe of shared/spec/benchmark.md: no daemon may start on port 25
    own_policy = not os.path.exists("/usr/sbin/policy-rc.d")
    if own_policy:
        with open("/usr/sbin/policy-rc.d", "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod("/usr/sbin/policy-rc.d", 0o755)
    try:
        subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type "
                       "select Local only\n", text=True, check=False, timeout=60)
        apt_install(["postfix"])
    finally:
        if own_policy:
            os.unlink("/usr/sbin/policy-rc.d")
    # should the package have started the system instance anyway, stop it
    if os.path.exists("/etc/postfix/main.cf"):
        sh(["postfix", "stop"], check=False, timeout=60)


def ensure_tools() -> None:
    if not shutil.which("strace"):
        apt_install(["strace"])
    if not shutil.which("openssl"):
        apt_install(["openssl"])


def ensure_user(name: str, home: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        say("useradd %s" % name)
        sh(["useradd", "--system", "--home-dir", home, "--no-create-home",
            "--shell", "/usr/sbin/nologin", name])
        return pwd.getpwnam(name)


def as_user(pw: pwd.struct_passwd) -> dict:
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def source_stamp() -> str:
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(REPO, "eqmail", "**", "*.py"), recursive=True))
    for path in files + [os.path.join(REPO, "pyproject.toml")]:
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def probe(python: str, pw: pwd.struct_passwd, modules: str) -> Optional[str]:
    """Where `python` run as `pw` imports eqmail from (None: it cannot)."""
    code = "import %s; import eqmail; print(eqmail.__file__)" % modules
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True,
                             timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/"},
                             **as_user(pw))
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def ensure_venv() -> str:
    """/opt/eqmail-bench-venv with this repository and aiosmtpd, up to date."""
    py = os.path.join(VENV, "bin", "python")
    if not os.access(py, os.X_OK):
        if not os.access("/usr/bin/python3", os.X_OK) or \
                sh(["/usr/bin/python3", "-c", "import ensurepip, venv"], check=False).returncode:
            apt_install(["python3", "python3-venv"])
        say("creating %s" % VENV)
        sh(["/usr/bin/python3", "-m", "venv", VENV])
    stamp_file = os.path.join(VENV, ".eqmail-source-stamp")
    stamp = source_stamp()
    try:
        with open(stamp_file) as f:
            old = f.read().strip()
    except OSError:
        old = ""
    if old != stamp or sh([py, "-c", "import aiosmtpd, eqmail"], check=False,
                          cwd="/").returncode:
        say("pip install %s aiosmtpd into %s" % (REPO, VENV))
        sh([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "aiosmtpd"])
        sh([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
            "--force-reinstall", "--no-deps", REPO])
        sh([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", REPO])
        with open(stamp_file, "w") as f:
            f.write(stamp + "\n")
    os.chmod(VENV, 0o755)
    return py


def choose_python(pw: pwd.struct_passwd, forced: Optional[str]) -> Dict[str, str]:
    venv_py = ensure_venv()   # always: aiosmtpd and the DNS responder run from it
    if forced:
        where = probe(forced, pw, "gevent, dns")
        if not where:
            raise SystemExit("--python %s: %s cannot import eqmail, gevent, dns with it"
                             % (forced, DAEMON_USER))
        return {"eqmail": forced, "peers": venv_py, "eqmail_module": where}
    where = probe(sys.executable, pw, "gevent, dns")
    if where:
        return {"eqmail": sys.executable, "peers": venv_py, "eqmail_module": where}
    say("%s cannot be run by %s with eqmail: using %s" % (sys.executable, DAEMON_USER, venv_py))
    where = probe(venv_py, pw, "gevent, dns")
    if not where:
        raise SystemExit("%s cannot import eqmail as %s" % (venv_py, DAEMON_USER))
    return {"eqmail": venv_py, "peers": venv_py, "eqmail_module": where}


# ---------------------------------------------------------------- /proc


def process_tree(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists("/proc/%d" % pid):
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def _kb_field(path: str, field: str) -> int:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory(pids: List[int]) -> Dict[str, float]:
    """Sum of VmRSS and of Pss over `pids`, in KB."""
    rss = sum(_kb_field("/proc/%d/status" % p, b"VmRSS:") for p in pids)
    pss = sum(_kb_field("/proc/%d/smaps_rollup" % p, b"Pss:") for p in pids)
    return {"rss_kb": rss, "pss_kb": pss, "processes": len(pids)}


def io_written(pids: List[int]) -> Dict[str, int]:
    out = {"write_bytes": 0, "cancelled_write_bytes": 0, "wchar": 0}
    for p in pids:
        try:
            with open("/proc/%d/io" % p) as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in out:
                        out[k] += int(v)
        except OSError:
            pass
    return out


def device_of(path: str) -> Optional[str]:
    """The block device (name in /proc/diskstats) holding `path`."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                parts = line.split()
                if int(parts[0]) == major and int(parts[1]) == minor:
                    return parts[2]
    except OSError:
        pass
    return None


def device_sectors_written(dev: Optional[str]) -> Optional[int]:
    if not dev:
        return None
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if parts[2] == dev:
                return int(parts[9])
    return None


class PeakSampler:
    """Samples the memory of a process tree every 50 ms in a thread."""

    def __init__(self, root: int, interval: float = 0.05):
        self.root, self.interval = root, interval
        self.peak = {"rss_kb": 0, "pss_kb": 0, "processes": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        pids = process_tree(self.root)
        n = 0
        while not self._stop.is_set():
            if n % 10 == 0:
                pids = process_tree(self.root)
            m = memory(pids)
            n += 1
            for k in ("rss_kb", "pss_kb", "processes"):
                self.peak[k] = max(self.peak[k], m[k])
            self.samples = n
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------- peers


class AiosmtpdPeer:
    name = "aiosmtpd"

    def __init__(self, python: str, workdir: str, port: Optional[int] = None,
                 label: str = "aiosmtpd", cgroup=None):
        self.python = python
        self.cgroup = cgroup
        self.port = port or free_port()
        self.maildir = os.path.join(workdir, label + "-Maildir")
        self.new = os.path.join(self.maildir, "new")
        self.logfile = os.path.join(workdir, label + ".log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "AiosmtpdPeer":
        log = open(self.logfile, "ab")
        cmd = [self.python, os.path.join(BENCH, "aiosmtpd_peer.py"), "127.0.0.1",
               str(self.port), self.maildir]
        if self.cgroup is not None:
            cmd = self.cgroup.wrap(cmd)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd="/")
        log.close()
        _started.append(self)
        wait_greeting(self.port, 30, self.proc, "aiosmtpd")
        return self

    def pid(self) -> int:
        return self.proc.pid

    def clear(self) -> None:
        empty_dir(self.new)

    def stop(self) -> None:
        stop_proc(self.proc)


class _SelfSignedCA:
    """What PostfixPeer asks of its CA: a certificate and key on disk (TLS is
    switched off in the benchmark, but the files must exist)."""

    def issue(self, names, directory=None, key_mode=0o644):
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
            "-out", cert, "-days", "2", "-subj", "/CN=%s" % names[0]], timeout=60)
        os.chmod(cert, 0o644)
        os.chmod(key, key_mode)
        return cert, key


class PostfixBench:
    """A Postfix instance of its own (tests/integration/peers.py PostfixPeer)
    on 127.0.0.1:PORT, final destination for bench.test, Maildir delivery to
    `benchuser` (recipient_delimiter +, so that benchuser+N is benchuser).
    `extra` overrides main.cf settings; with `cgroup`, `postfix start` runs
    inside it, so the master and every daemon it forks are born there."""
    name = "postfix"

    def __init__(self, extra: Optional[Dict[str, str]] = None, cgroup=None,
                 resolv_conf: Optional[str] = None):
        sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
        sys.dont_write_bytecode = True   # leave no __pycache__ in tests/
        import peers  # noqa: E402
        self.cgroup = cgroup
        self.resolv_conf = resolv_conf
        bench = self

        class _Peer(peers.PostfixPeer):
            def master_cf(peer) -> str:
                return bench.master_cf(super().master_cf())

            def _postfix(peer, *args, timeout: float = 60.0, check: bool = True):
                if not (args and args[0] == "start" and (cgroup is not None or resolv_conf)):
                    return super()._postfix(*args, timeout=timeout, check=check)
                env = dict(os.environ, MAIL_CONFIG=peer.config_dir)
                cmd = [peers.POSTFIX, "-c", peer.config_dir] + list(args)
                if resolv_conf:
                    # the master and all it spawns in a mount namespace of their
                    # own, where /etc/resolv.conf names the bench's DNS responder
                    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                           resolv_conf] + cmd
                if cgroup is not None:
                    cmd = cgroup.wrap(cmd)
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                     env=env)
                if check and res.returncode != 0:
                    raise RuntimeError("postfix %s failed (%s):\n%s%s\n%s"
                                       % (" ".join(args), res.returncode, res.stdout,
                                          res.stderr, peer.log()))
                return res

        self.port = free_port()
        config = {"smtpd_tls_security_level": "none",
                  "smtpd_banner": "$myhostname ESMTP Postfix",
                  "recipient_delimiter": "+"}
        config.update(extra or {})
        self.peer = _Peer(_SelfSignedCA(), address="127.0.0.1", port=self.port,
                          domain=DOMAIN, hostname="mx." + DOMAIN, user=MAIL_USER,
                          extra_config=config)
        _tempdirs.append(self.peer.dir)

    def master_cf(self, base: str) -> str:
        """master.cf: PostfixPeer's, unchanged here (see PostscreenBench)."""
        return base

    @property
    def new(self) -> str:
        return os.path.join(self.peer.maildir, "new")

    def start(self) -> "PostfixBench":
        _started.append(self)
        self.peer.start(timeout=60)
        self.clear()
        return self

    def pid(self) -> int:
        return self.peer.master_pid()

    def clear(self) -> None:
        self.peer.clear()

    def stop(self) -> None:
        self.peer.remove()   # stop, then remove its directory and benchuser's Maildir

    def version(self) -> str:
        res = sh(["postconf", "-c", self.peer.config_dir, "-h", "mail_version"], check=False)
        return res.stdout.strip()

    def postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.peer._postfix(*args, timeout=timeout)

    def queued(self) -> int:
        """Messages in the queue (incoming, active, deferred, maildrop, hold)."""
        n = 0
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            for _, _, files in os.walk(os.path.join(self.peer.queue_dir, sub)):
                n += len(files)
        return n

    def deferred(self) -> int:
        n = 0
        for _, _, files in os.walk(os.path.join(self.peer.queue_dir, "deferred")):
            n += len(files)
        return n


POLICYD_SPF = "/usr/bin/policyd-spf"


class PostscreenBench(PostfixBench):
    """Postfix as a public MX (issue 21): postscreen in front of smtpd
    (DNSBL bl.bench.test enforced, the pregreet test enforced; the deep
    protocol tests stay off: a client that passes them must reconnect) and
    policyd-spf (Debian's postfix-policyd-spf-python) as the SPF policy
    service at RCPT, which prepends Received-SPF.  policyd-spf reads its
    own configuration (`spf_conf`): Debian's, but skip_addresses names
    only 192.0.2.1 (Debian's skips 127.0.0.0/8, and every bench client is
    127.0.0.1; an empty value crashes policyd-spf 2.0.2).  Postfix and policyd-spf resolve through /etc/resolv.conf:
    `postfix start` runs in a mount namespace where `resolv_conf` is
    mounted over it (the master and everything it spawns stay there).
    postscreen's teaser banner is off and its greet wait is 1 s so that
    PostfixPeer's start-up check (it wants "220 " in the first line, within
    2 s) passes; they matter only for a client postscreen does not know."""
    name = "postfix-postscreen"

    def __init__(self, dnsbl: str, resolv_conf: str, workdir: str):
        self.spf_conf = os.path.join(workdir, "policyd-spf.conf")
        with open(self.spf_conf, "w") as f:
            f.write("debugLevel = 1\nTestOnly = 1\nHELO_reject = Fail\n"
                    "Mail_From_reject = Fail\nPermError_reject = False\n"
                    "TempError_Defer = False\nskip_addresses = 192.0.2.1/32\n")
        os.chmod(self.spf_conf, 0o644)
        super().__init__(extra={
            "postscreen_dnsbl_sites": dnsbl,
            "postscreen_dnsbl_action": "enforce",
            "postscreen_greet_action": "enforce",
            "postscreen_greet_banner": "",
            "postscreen_greet_wait": "1s",
            "postscreen_pipelining_enable": "no",
            "postscreen_non_smtp_command_enable": "no",
            "postscreen_bare_newline_enable": "no",
            "smtpd_recipient_restrictions": "reject_unauth_destination, "
                                            "check_policy_service unix:private/policyd-spf",
            "policyd-spf_time_limit": "3600"}, resolv_conf=resolv_conf)

    def master_cf(self, base: str) -> str:
        lines = base.splitlines()
        assert lines[0].split()[1:2] == ["inet"] and lines[0].split()[-1] == "smtpd"
        listener = lines[0].split()[0]
        svc = [(listener, "inet", "n", "-", "n", "-", "1", "postscreen"),
               ("smtpd", "pass", "-", "-", "n", "-", "-", "smtpd"),
               ("dnsblog", "unix", "-", "-", "n", "-", "0", "dnsblog"),
               ("tlsproxy", "unix", "-", "-", "n", "-", "0", "tlsproxy"),
               ("policyd-spf", "unix", "-", "n", "n", "-", "0", "spawn",
                "user=nobody", "argv=%s" % POLICYD_SPF, self.spf_conf)]
        return "".join(" ".join(x) + "\n" for x in svc) + "\n".join(lines[1:]) + "\n"

    def log_count(self, needle: str) -> int:
        try:
            with open(self.peer.logfile, "rb") as f:
                return f.read().count(needle.encode())
        except OSError:
            return 0

    def log_lines(self, needle: str, most: int) -> List[str]:
        try:
            with open(self.peer.logfile, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        return [x[:300] for x in lines if needle in x][:most]


class EqmailPeer:
    name = "eqmail"

    def __init__(self, python: str, workdir: str, pw: pwd.struct_passwd,
                 relay_port: Optional[int], resolv_conf: Optional[str],
                 label: str = "eqmail", cgroup=None, controls: Optional[dict] = None,
                 args: Sequence[str] = ()):
        self.python = python
        self.args = list(args)
        self.pw = pw
        self.cgroup = cgroup
        self.port = free_port()
        self.home = os.path.join(workdir, label + "-home")
        self.new = os.path.join(self.home, "alias", "Maildir", "new")
        self.logfile = os.path.join(workdir, label + "d.log")
        self.resolv_conf = resolv_conf
        self.proc: Optional[subprocess.Popen] = None
        control = os.path.join(self.home, "control")
        os.makedirs(control)
        files = {"me": DOMAIN, "locals": DOMAIN, "rcpthosts": DOMAIN}
        if relay_port:
            # one remote delivery by IP literal, one through DNS (see remote_delivery)
            files["smtproutes"] = "iplit.test:[127.0.0.1]:%d\n:%s:%d" % (
                relay_port, RELAY_NAME, relay_port)
        files.update(controls or {})
        for name, text in files.items():
            with open(os.path.join(control, name), "w") as f:
                f.write(text + "\n")
        for d, _, fs in os.walk(self.home):
            os.chown(d, pw.pw_uid, pw.pw_gid)
            for f in fs:
                os.chown(os.path.join(d, f), pw.pw_uid, pw.pw_gid)
        os.chmod(self.home, 0o755)

    def env(self) -> dict:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.home, "LANG": "C.UTF-8"}
        if self.resolv_conf:
            env["EQMAIL_RESOLV_CONF"] = self.resolv_conf
        return env

    def start(self, wait: bool = True) -> "EqmailPeer":
        log = open(self.logfile, "ab")
        cmd = [self.python, "-m", "eqmail.daemon", "--home", self.home, "--foreground",
               "--smtp", "127.0.0.1:%d" % self.port] + self.args
        if self.cgroup is not None:
            self.proc = subprocess.Popen(
                self.cgroup.wrap(cmd, self.pw.pw_uid, self.pw.pw_gid), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.home,
                env=self.env())
        else:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, env=self.env(), **as_user(self.pw))
        log.close()
        if self not in _started:
            _started.append(self)
        if not wait:
            return self
        try:
            wait_greeting(self.port, 60, self.proc, "eqmaild")
        except RuntimeError as e:
            raise RuntimeError("%s; its log ends:\n%s" % (e, self.log_tail()))
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.logfile, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pid(self) -> int:
        return self.proc.pid

    def clear(self) -> None:
        empty_dir(self.new)

    def stop(self) -> None:
        stop_proc(self.proc, timeout=20)

    def queued(self) -> int:
        return count_files(os.path.join(self.home, "queue", "mess"))

    def log_summary(self) -> dict:
        """alert and warning lines of eqmaild's log (counts, the first few)."""
        try:
            with open(self.logfile, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return {}
        out = {}
        for kind in ("alert", "warning"):
            found = [x for x in lines if (" %s: " % kind) in x or x.startswith(kind + ": ")]
            out[kind + "s"] = len(found)
            out["first_" + kind + "s"] = [x[:300] for x in found[:5]]
        out["tracebacks"] = sum(1 for x in lines if x.startswith("Traceback"))
        return out

    def log_count(self, needle: str) -> int:
        try:
            with open(self.logfile, "rb") as f:
                return f.read().count(needle.encode())
        except OSError:
            return 0

    def smtpd_session(self, rcpt: str) -> str:
        """One message to `rcpt` through `eqmail smtpd` with RELAYCLIENT set,
        as the daemon's user; returns the session's output."""
        body = ("From: %s\r\nTo: %s\r\nSubject: bench remote\r\n\r\nremote delivery\r\n"
                % (SENDER, rcpt))
        dialogue = ("HELO bench.test\r\nMAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n%s.\r\nQUIT\r\n"
                    % (SENDER, rcpt, body))
        env = dict(self.env(), RELAYCLIENT="", TCPREMOTEIP="127.0.0.1", TCPLOCALIP="127.0.0.1",
                   TCPLOCALPORT="25")
        res = subprocess.run([self.python, "-m", "eqmail", "smtpd", "--home", self.home],
                             input=dialogue.encode(), capture_output=True, timeout=60,
                             cwd=self.home, env=env, **as_user(self.pw))
        return res.stdout.decode("utf-8", "replace")


# ---------------------------------------------------------------- measurements


def load_run(peer, smtp_source: List[str], n: int, c: int, sample: bool,
             timeout: Optional[float] = None) -> dict:
    """One smtp-source run against `peer`; accept and delivery times
    (given up after `timeout` s, default 30 s + 50 ms a message)."""
    exe, libdir = smtp_source
    peer.clear()
    os.sync()
    time.sleep(0.3)
    env = dict(os.environ, LD_LIBRARY_PATH=libdir)
    cmd = [exe, "-c", "-l", str(MSG_SIZE), "-m", str(n), "-s", str(c), "-f", SENDER,
           "-t", RCPT, "127.0.0.1:%d" % peer.port]
    timeout = timeout or 30 + n / 20.0
    sampler = PeakSampler(peer.pid()) if sample else None
    if sampler:
        sampler.__enter__()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    accept = delivered = None
    count = 0
    try:
        while time.monotonic() - t0 < timeout:
            if accept is None and proc.poll() is not None:
                accept = time.monotonic() - t0
            count = count_files(peer.new)
            if count >= n:
                delivered = time.monotonic() - t0
                break
            time.sleep(0.01)
        if accept is None:
            try:
                proc.wait(max(1.0, timeout - (time.monotonic() - t0)))
                accept = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        if sampler:
            sampler.__exit__()
    err = proc.stderr.read().decode("utf-8", "replace").strip()
    proc.stderr.close()
    out = {"peer": peer.name, "c": c, "messages": n, "accept_s": accept,
           "delivered_s": delivered, "delivered_count": count,
           "accept_msgs_s": n / accept if accept and proc.returncode == 0 else None,
           "delivered_msgs_s": n / delivered if delivered else None,
           "smtp_source_rc": proc.returncode, "t_end": time.monotonic()}
    if err:
        out["smtp_source_stderr"] = err[-500:]
    if sampler:
        out["peak"] = dict(sampler.peak, samples=sampler.samples)
    return out


def strace_counts(text: str) -> Dict[str, int]:
    """Calls per syscall from strace -c's table."""
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync") and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    return counts


def storage_run(peer, smtp_source: List[str], n: int, dev: Optional[str]) -> dict:
    """A c=20 run of `n` messages with strace -f -c on the peer's tree and
    /proc/PID/io before/after: fsyncs and bytes written per message."""
    peer.clear()
    os.sync()
    time.sleep(0.5)
    pids = process_tree(peer.pid())
    cmd = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync"]
    for p in pids:
        cmd += ["-p", str(p)]
    strace = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attach
    io0 = io_written(process_tree(peer.pid()))
    sec0 = device_sectors_written(dev)
    run = load_run(peer, smtp_source, n, 20, sample=False)
    time.sleep(1.0)  # the queue's clean-up after the last delivery
    io1 = io_written(process_tree(peer.pid()))
    sec1 = device_sectors_written(dev)
    strace.send_signal(signal.SIGINT)
    try:
        _, err = strace.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        strace.kill()
        _, err = strace.communicate()
    err = err.decode("utf-8", "replace")
    calls = strace_counts(err)
    delivered = run["delivered_count"] or 1
    fsyncs = sum(calls.values())
    out = {"messages": n, "delivered": run["delivered_count"], "fsync_calls": calls,
           "fsync_per_msg": fsyncs / delivered,
           "write_bytes": io1["write_bytes"] - io0["write_bytes"],
           "cancelled_write_bytes": io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"],
           "wchar": io1["wchar"] - io0["wchar"]}
    out["write_kb_per_msg"] = out["write_bytes"] / 1024.0 / delivered
    out["net_write_kb_per_msg"] = (out["write_bytes"] - out["cancelled_write_bytes"]) \
        / 1024.0 / delivered
    if sec0 is not None and sec1 is not None:
        out["device"] = dev
        out["device_kb_per_msg"] = (sec1 - sec0) * 512 / 1024.0 / delivered
    if not calls:
        out["strace_output"] = err[-1500:]
    return out


def idle_memory(peer, settle: float = 1.0) -> dict:
    time.sleep(settle)
    return memory(process_tree(peer.pid()))


def idle_connections(peer: EqmailPeer, n: int = IDLE_CONNECTIONS) -> dict:
    """Open `n` SMTP connections, read each greeting, hold them; the memory
    increase per connection.  Sources spread over 127.0.0.2-5 so that
    concurrencyperip (100) is not what is measured."""
    before = idle_memory(peer)
    socks = []
    greeted = 0
    try:
        for i in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.%d" % (2 + i % 4), 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", peer.port))
        for s in socks:
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(512)
                if not chunk:
                    break
                line += chunk
            if line.startswith(b"220"):
                greeted += 1
        with_conns = idle_memory(peer)
    finally:
        for s in socks:
            s.close()
    after = idle_memory(peer, settle=2.0)
    return {"connections": n, "greeted": greeted, "before": before, "with": with_conns,
            "after_close": after,
            "rss_kb_per_conn": (with_conns["rss_kb"] - before["rss_kb"]) / n,
            "pss_kb_per_conn": (with_conns["pss_kb"] - before["pss_kb"]) / n}


def remote_delivery(peer: EqmailPeer, far: AiosmtpdPeer, rcpt: str, expect: int) -> dict:
    """One message to `rcpt` (outside domain) via eqmail smtpd, waited for at
    the far end; then the daemon's idle memory."""
    t0 = time.monotonic()
    transcript = peer.smtpd_session(rcpt)
    accepted = "250 ok" in transcript
    delivered = False
    while time.monotonic() - t0 < 60:
        if count_files(far.new) >= expect:
            delivered = True
            break
        time.sleep(0.05)
    out = {"rcpt": rcpt, "accepted": accepted, "delivered": delivered,
           "seconds": time.monotonic() - t0}
    if not (accepted and delivered):
        out["transcript"] = transcript[-800:]
    out["memory"] = idle_memory(peer, settle=2.0)
    return out


# ---------------------------------------------------------------- issue 19: budget, fan-out, queue

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUDGET_MEMORY = 64 << 20
#: (label, CPU set, quota per CPU): 1 CPU at 20 %, 2 CPUs at 20 % each
BUDGETS = [("1cpu-20pct", "0", 0.2), ("2cpu-20pct", "0-1", 0.2)]
BUDGET_NAMES = {"1cpu-20pct": "1 CPU at 20 %, 64 MB", "2cpu-20pct": "2 CPUs at 20 % each, 64 MB"}
FANOUT_RCPTS = 500
QUEUE_RCPT = "someone@remote.test"


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of the tree: every live process's own time and
    that of the children it has reaped."""
    total = 0
    for pid in process_tree(root):
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        total += sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
    return total / float(CLK_TCK)


def back_to_idle(peers: Dict[str, object], idle: Dict[str, dict], since: Dict[str, float],
                 timeout: float) -> dict:
    """After the load: seconds until each peer's tree is back to the process
    count it had before the load with an RSS at most 25 % above its RSS then
    (`idle`: the figures just before the load runs; polled every 0.5 s, up
    to `timeout`), and its memory then (or at the timeout).  The seconds
    count from `since[name]`, the end of that peer's last load run."""
    t0 = time.monotonic()
    out = {name: None for name in peers}
    last = {}
    while time.monotonic() - t0 < timeout and any(v is None for v in out.values()):
        for name, peer in peers.items():
            if out[name] is not None:
                continue
            m = memory(process_tree(peer.pid()))
            last[name] = m
            i = idle.get(name) or {}
            if m["processes"] <= i.get("processes", 1) and \
                    m["rss_kb"] <= 1.25 * i.get("rss_kb", 0):
                out[name] = {"seconds": round(time.monotonic() - since.get(name, t0), 1),
                             "memory": m}
        time.sleep(0.5)
    for name in peers:
        if out[name] is None:
            out[name] = {"seconds": None, "memory": last.get(name),
                         "timeout": round(time.monotonic() - since.get(name, t0))}
    return out


class CgroupSampler(threading.Thread):
    """The peak of a cgroup's anonymous memory (memory.stat), every 50 ms."""

    def __init__(self, cg):
        super().__init__(daemon=True)
        self.cg = cg
        self.peak_anon = 0
        self.peak_charged = 0
        self._stop_ev = threading.Event()

    def run(self):
        while not self._stop_ev.is_set():
            try:
                m = self.cg.memory_now()
                self.peak_anon = max(self.peak_anon, m["anon"])
                self.peak_charged = max(self.peak_charged, m["charged"])
            except (OSError, KeyError, ValueError):
                pass
            self._stop_ev.wait(0.05)

    def finish(self):
        self._stop_ev.set()
        self.join(5)


def peer_alive(peer) -> bool:
    proc = getattr(peer, "proc", None)
    if proc is not None:
        return proc.poll() is None
    pid = peer.pid()
    return bool(pid) and os.path.exists("/proc/%d" % pid)


def budget_phase(py: Dict[str, str], pw, workdir: str, smtp_source: List[str],
                 peers: List[str], n: int, runs: int) -> dict:
    """Each peer alone in a cgroup per budget of BUDGETS (64 MB each), `runs`
    c=20 runs of `n` messages; the load generator stays outside."""
    import cgroups
    out = {"cgroups": cgroups.describe(), "memory_limit": BUDGET_MEMORY, "messages": n,
           "runs": runs, "budgets": {}}
    if cgroups.version() is None:
        out["error"] = "no usable cgroups on this machine"
        return out
    for label, cpus, share in BUDGETS:
        res_b = out["budgets"].setdefault(label, {"cpus": cpus, "cpu_share": share})
        for name in peers:
            cg = cgroups.Cgroup("eqmail-bench-%s-%s-%d" % (name, label, os.getpid()), cpus,
                                share, BUDGET_MEMORY)
            r: dict = {"runs": []}
            res_b[name] = r
            peer = None
            try:
                cg.create()
                _started.append(cg)
                say("budget %s: %s in %s" % (label, name, cg.procs_files()))
                t0 = time.monotonic()
                if name == "eqmail":
                    peer = EqmailPeer(py["eqmail"], workdir, pw, None, None,
                                      label="eqmail-" + label, cgroup=cg).start()
                elif name == "postfix":
                    peer = PostfixBench(cgroup=cg).start()
                else:
                    peer = AiosmtpdPeer(py["peers"], workdir, label="aiosmtpd-" + label,
                                        cgroup=cg).start()
                r["start_s"] = round(time.monotonic() - t0, 2)
                r["idle"] = idle_memory(peer, settle=1.5)
                sampler = CgroupSampler(cg)
                sampler.start()
                for i in range(runs):
                    lr = load_run(peer, smtp_source, n, 20, sample=True)
                    lr.pop("t_end", None)
                    lr["run"] = i
                    r["runs"].append(lr)
                    say("budget %s %-8s run %d: delivered %s msg/s (%d/%d)" % (
                        label, name, i + 1, fmt(lr["delivered_msgs_s"]),
                        lr["delivered_count"], n))
                    if not peer_alive(peer):
                        break
                sampler.finish()
                r["peak_anon_bytes"] = sampler.peak_anon
                r["alive"] = peer_alive(peer)
                r["cgroup"] = cg.stats()
                if name == "eqmail":
                    r["log"] = peer.log_summary()
                r["tree_peak"] = {k: max(x.get("peak", {}).get(k, 0) for x in r["runs"])
                                  for k in ("rss_kb", "pss_kb", "processes")}
                r["delivered_msgs_s"] = spread([x["delivered_msgs_s"] for x in r["runs"]])
                say("budget %s %-8s peak %.1f MB charged, %.1f MB anon, OOM kills %s, "
                    "CPU %.1f s, alive %s" % (label, name, (r["cgroup"]["peak_bytes"] or 0) / 2**20,
                                              r["peak_anon_bytes"] / 2**20,
                                              r["cgroup"]["oom_kills"], r["cgroup"]["cpu_s"],
                                              r["alive"]))
            except Exception as e:   # one peer's failure must not stop the others
                r["error"] = "%s: %s" % (type(e).__name__, e)
                say("budget %s %s: %s" % (label, name, r["error"]))
                try:
                    r["cgroup"] = cg.stats()
                except Exception:
                    pass
            finally:
                if peer is not None:
                    try:
                        peer.stop()
                    finally:
                        if peer in _started:
                            _started.remove(peer)
                try:
                    cg.remove()
                except Exception as e:
                    r.setdefault("error", "cgroup removal: %s" % e)
                if cg in _started and not cg.created:
                    _started.remove(cg)
    return out


def fanout_run(peer, n: int = FANOUT_RCPTS) -> dict:
    """One 4 KB message to `n` recipients benchuser+1 ... benchuser+N@bench.test
    in one SMTP transaction; the time from the 250 after DATA until the n-th
    file is in the Maildir's new/."""
    import smtplib
    peer.clear()
    os.sync()
    time.sleep(0.3)
    rcpts = ["%s+%d@%s" % (MAIL_USER, i, DOMAIN) for i in range(1, n + 1)]
    body = ("From: %s\r\nTo: %s\r\nSubject: fan-out\r\n\r\n" % (SENDER, rcpts[0]))
    body += ("x" * 76 + "\r\n") * ((MSG_SIZE - len(body)) // 78)
    out = {"recipients": n}
    s = smtplib.SMTP("127.0.0.1", peer.port, timeout=120)
    try:
        s.ehlo("bench.test")
        s.mail(SENDER)
        accepted = 0
        for r in rcpts:
            if s.rcpt(r)[0] == 250:
                accepted += 1
        out["accepted_rcpts"] = accepted
        t_data = time.monotonic()
        code, text = s.data(body.encode())
        t250 = time.monotonic()
        out["data_reply"] = "%d %s" % (code, text.decode("utf-8", "replace")[:100])
        out["data_s"] = t250 - t_data
        try:
            s.quit()
        except smtplib.SMTPException:
            pass
    finally:
        s.close()
    count = 0
    out["seconds"] = None
    if code == 250 and accepted:
        while time.monotonic() - t250 < 300:
            count = count_files(peer.new)
            if count >= accepted:
                out["seconds"] = time.monotonic() - t250
                break
            time.sleep(0.01)
    out["delivered"] = count
    return out


def smtp_sink(smtp_source: List[str], port: int):
    """Postfix's smtp-sink on 127.0.0.1:port (from the unpacked package)."""
    exe = os.path.join(os.path.dirname(smtp_source[0]), "smtp-sink")
    proc = subprocess.Popen([exe, "-u", "nobody", "127.0.0.1:%d" % port, "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, LD_LIBRARY_PATH=smtp_source[1]))

    class _S:
        name = "smtp-sink"

        def stop(self):
            stop_proc(proc)
            if self in _started:
                _started.remove(self)
    sink = _S()
    _started.append(sink)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return sink
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("smtp-sink exited with %s" % proc.returncode)
            time.sleep(0.05)
    raise RuntimeError("smtp-sink does not listen on %d" % port)


def inject(peer, smtp_source: List[str], n: int, rcpt: str) -> dict:
    exe, libdir = smtp_source
    cmd = [exe, "-l", str(MSG_SIZE), "-m", str(n), "-s", "20", "-f", SENDER, "-t", rcpt,
           "127.0.0.1:%d" % peer.port]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + n / 10.0,
                         env=dict(os.environ, LD_LIBRARY_PATH=libdir))
    s = time.monotonic() - t0
    return {"messages": n, "seconds": s, "msgs_s": n / s, "rc": res.returncode,
            "stderr": res.stderr[-500:]}


def wait_for(cond, timeout: float, interval: float = 0.2) -> Optional[float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def idle_cpu(peer, seconds: float) -> dict:
    c0 = tree_cpu_seconds(peer.pid())
    time.sleep(seconds)
    c1 = tree_cpu_seconds(peer.pid())
    return {"seconds": seconds, "cpu_s": c1 - c0, "pct": 100.0 * (c1 - c0) / seconds}


def queue_phase_eqmail(py: Dict[str, str], pw, workdir: str, smtp_source: List[str], n: int,
                       cpu_seconds: float, retire_timeout: float) -> dict:
    dead = free_port()
    r: dict = {"messages": n, "relay_port": dead}
    sink = None
    eq = EqmailPeer(py["eqmail"], workdir, pw, None, None, label="eqmail-queue",
                    controls={"smtproutes": ":[127.0.0.1]:%d" % dead,
                              "smtprules": '127.0.0.1:allow,RELAYCLIENT=""'}).start()
    try:
        r["idle"] = idle_memory(eq, settle=1.5)
        say("queue eqmail: injecting %d messages for a relay that is down" % n)
        r["inject"] = inject(eq, smtp_source, n, QUEUE_RCPT)
        t = wait_for(lambda: eq.log_count(": deferral:") >= n, 120 + n / 50.0, 0.5)
        r["all_deferred_after_inject_s"] = t
        r["queued"] = eq.queued()
        r["deferrals"] = eq.log_count(": deferral:")
        r["after_inject"] = memory(process_tree(eq.pid()))
        say("queue eqmail: injected in %.1f s, %d queued, %d deferrals; waiting for the "
            "tree to be one process again" % (r["inject"]["seconds"], r["queued"],
                                               r["deferrals"]))
        t0 = time.monotonic()
        t = wait_for(lambda: memory(process_tree(eq.pid()))["processes"]
                     <= r["idle"]["processes"], retire_timeout, 0.5)
        r["workers_retired_s"] = t if t is None else round(time.monotonic() - t0, 1)
        r["waiting"] = idle_memory(eq, settle=2.0)
        r["rss_bytes_per_msg"] = (r["waiting"]["rss_kb"] - r["idle"]["rss_kb"]) * 1024.0 / n
        r["pss_bytes_per_msg"] = (r["waiting"]["pss_kb"] - r["idle"]["pss_kb"]) * 1024.0 / n
        r["idle_cpu"] = idle_cpu(eq, cpu_seconds)
        say("queue eqmail: waiting RSS %s (idle %s), %.0f B/msg; idle CPU %.2f %%"
            % (fmt(r["waiting"]["rss_kb"] / 1024.0, 1, " MB"),
               fmt(r["idle"]["rss_kb"] / 1024.0, 1, " MB"), r["rss_bytes_per_msg"],
               r["idle_cpu"]["pct"]))
        # restart: SIGTERM .. exit, start .. greeting and "started" (queue loaded)
        started_before = eq.log_count(" started in ")
        tries_before = eq.log_count("starting delivery")
        t0 = time.monotonic()
        eq.proc.send_signal(signal.SIGTERM)
        eq.proc.wait(60)
        t_exit = time.monotonic()
        eq.start(wait=False)
        greet = loaded = None
        while time.monotonic() - t_exit < 120 and (greet is None or loaded is None):
            if eq.proc.poll() is not None:
                raise RuntimeError("eqmaild exited %s after the restart:\n%s"
                                   % (eq.proc.returncode, eq.log_tail()))
            if loaded is None and eq.log_count(" started in ") > started_before:
                loaded = time.monotonic()
            if greet is None:
                try:
                    with socket.create_connection(("127.0.0.1", eq.port), timeout=5) as s:
                        s.settimeout(5)
                        if s.makefile("rb").readline().startswith(b"220"):
                            greet = time.monotonic()
                            s.sendall(b"QUIT\r\n")
                except OSError:
                    pass
            time.sleep(0.01)
        r["restart"] = {"stop_s": t_exit - t0,
                        "greeting_s": None if greet is None else greet - t_exit,
                        "loaded_s": None if loaded is None else loaded - t_exit,
                        "total_s": None if greet is None or loaded is None
                        else max(greet, loaded) - t0}
        r["after_restart"] = idle_memory(eq, settle=3.0)
        r["tries_after_restart"] = eq.log_count("starting delivery") - tries_before
        r["rss_bytes_per_msg_restarted"] = \
            (r["after_restart"]["rss_kb"] - r["idle"]["rss_kb"]) * 1024.0 / n
        r["queued_after_restart"] = eq.queued()
        say("queue eqmail: restart %s s (stop %.2f, greeting %s, loaded %s); RSS %s; "
            "%d deliveries tried in the 3 s after" % (
                fmt(r["restart"]["total_s"], 2), r["restart"]["stop_s"],
                fmt(r["restart"]["greeting_s"], 2), fmt(r["restart"]["loaded_s"], 2),
                fmt(r["after_restart"]["rss_kb"] / 1024.0, 1, " MB"),
                r["tries_after_restart"]))
        # drain
        sink = smtp_sink(smtp_source, dead)
        q0 = eq.queued()
        t0 = time.monotonic()
        os.kill(eq.pid(), signal.SIGALRM)
        t = wait_for(lambda: eq.queued() == 0, 120 + q0 / 20.0, 0.1)
        r["drain"] = {"messages": q0, "seconds": t, "msgs_s": q0 / t if t else None,
                      "left": eq.queued(), "successes": eq.log_count(": success:")}
        r["after_drain"] = idle_memory(eq, settle=2.0)
        say("queue eqmail: drained %d in %s s (%s msg/s); RSS after %s"
            % (q0, fmt(t, 1), fmt(r["drain"]["msgs_s"]),
               fmt(r["after_drain"]["rss_kb"] / 1024.0, 1, " MB")))
        r["log"] = eq.log_summary()
    finally:
        eq.stop()
        _started.remove(eq)
        if sink:
            sink.stop()
    return r


#: Issue 21: the checks of a public MX, all on (greetdelay stays 0: it is a
#: pause by design, not a cost).  Their DNS questions go to the bench's DNS
#: responder, which answers NXDOMAIN: not listed, SPF none, no DMARC record.
DEFENCE_CONTROLS = {"rbls": "bl.bench.test", "spfbehavior": "1", "authcheck": "1",
                    "greydelay": "1", "strictpipelining": "1", "tarpitdelay": "0"}
DEFENCE_LIBS = ("pyspf", "dkimpy", "authheaders", "publicsuffix2")


#: the plugins' configuration: eqmail's own checks off, except the two
#: that are part of the SMTP dialogue and cannot be a plugin
SPP_CONTROLS = {"strictpipelining": "1", "tarpitdelay": "0",
                "smtpplugins": "[connection]\nplugins/rbl\n[mail]\nplugins/spf\n"
                               "[rcpt]\nplugins/grey",
                "smtprules": ':allow,QMAILQUEUE="plugins/dkim"'}
#: the columns of the defences part, in the report's order
DEFENCE_CONFIGS = ("off", "on", "plugins", "postscreen")
#: Messages of the one run of the plugins column (about 3 sessions a second
#: on two cores: 2,000 would add half an hour to the bench).
PLUGIN_MESSAGES = 200
DEFENCE_NAMES = {"off": "eqmail, checks off", "on": "eqmail, checks in-process",
                 "plugins": "eqmail, the same checks as forked qmail-spp plugins",
                 "postscreen": "Postfix + postscreen + policyd-spf"}


def dns_counts(proc: subprocess.Popen) -> dict:
    """The questions bench/dns_peer.py has answered so far (SIGUSR1)."""
    import select

    try:
        proc.send_signal(signal.SIGUSR1)
        if select.select([proc.stdout], [], [], 5.0)[0]:
            return json.loads(proc.stdout.readline())
    except (OSError, ValueError):
        pass
    return {}


def dns_delta(after: dict, before: dict) -> dict:
    out = {"queries": after.get("queries", 0) - before.get("queries", 0)}
    for k in ("types", "suffixes"):
        out[k] = {x: n - before.get(k, {}).get(x, 0) for x, n in after.get(k, {}).items()
                  if n - before.get(k, {}).get(x, 0)}
    return out


def delivered_headers(new: str) -> dict:
    """The trace fields the checks add, in one delivered message of `new`:
    name -> the field's first 160 characters."""
    out = {}
    try:
        name = sorted(os.listdir(new))[0]
        with open(os.path.join(new, name), "rb") as f:
            head = f.read(65536).split(b"\n\n", 1)[0].decode("utf-8", "replace")
    except (OSError, IndexError):
        return out
    for line in head.replace("\n\t", " ").replace("\n ", " ").splitlines():
        field = line.split(":", 1)[0]
        if field.lower() in ("received-spf", "authentication-results") and field not in out:
            out[field] = " ".join(line.split())[:160]
    return out


def spp_setup(peer: "EqmailPeer", py_e: str, resolv: str, pw) -> None:
    """HOME/plugins: bench/spp_plugins.py and one small launcher a mode
    (qmail-spp runs a plugin without arguments), owned by the daemon's
    user (the module's .pyc is cached there after the first run)."""
    d = os.path.join(peer.home, "plugins")
    os.makedirs(d)
    shutil.copy(os.path.join(BENCH, "spp_plugins.py"), d)
    common = ["--resolv", resolv]
    modes = {"rbl": ["--zone", DEFENCE_CONTROLS["rbls"]],
             "spf": ["--authserv", DOMAIN],
             "grey": ["--db", os.path.join(d, "grey.sqlite"),
                      "--delay", DEFENCE_CONTROLS["greydelay"]],
             "dkim": ["--authserv", DOMAIN, "--queue", py_e]}
    for mode, extra in modes.items():
        path = os.path.join(d, mode)
        with open(path, "w") as f:
            f.write("#!%s\nimport sys\nsys.path.insert(0, %r)\nfrom spp_plugins import main\n"
                    "sys.exit(main(%r))\n" % (py_e, d, [mode] + common + extra))
        os.chmod(path, 0o755)
    for x in [d] + [os.path.join(d, f) for f in os.listdir(d)]:
        os.chown(x, pw.pw_uid, pw.pw_gid)


def warm_up(port: int, times: int) -> List[int]:
    """`times` sessions up to RCPT, 1.3 s apart (the greylist delay is 1 s):
    the RCPT reply codes.  The one triplet of the load is then known to a
    greylist, and the client to postscreen's cache."""
    import smtplib

    codes = []
    for attempt in range(times):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("bench.test")
            c.docmd("MAIL FROM:<%s>" % SENDER)
            code, _ = c.docmd("RCPT TO:<%s>" % RCPT)
        codes.append(code)
        if attempt + 1 < times:
            time.sleep(1.3)
    return codes


def defence_runs(peer, label: str, r: dict, smtp_source: List[str], n: int,
                 runs: int) -> None:
    """`runs` c=20 runs of `n` messages: delivered msg/s, CPU ms a session
    (the whole tree, children reaped included), the tree's peak RSS."""
    r.setdefault("runs", [])
    for i in range(runs):
        cpu0 = tree_cpu_seconds(peer.pid())
        # forked plugins may manage only a few sessions a second: wait long
        lr = load_run(peer, smtp_source, n, 20, sample=True, timeout=60 + n)
        cpu = tree_cpu_seconds(peer.pid()) - cpu0
        lr["cpu_ms_per_msg"] = 1000.0 * cpu / n
        r["runs"].append(lr)
        say("defences %s run %d: %s msg/s (%d/%d), %.2f CPU ms a session, peak RSS %s%s"
            % (label, i + 1, fmt(lr["delivered_msgs_s"]), lr["delivered_count"], n,
               lr["cpu_ms_per_msg"], _mbv(lr["peak"]["rss_kb"] / 1024.0),
               "" if lr["smtp_source_rc"] == 0 else " smtp-source exit %s: %s" % (
                   lr["smtp_source_rc"], lr.get("smtp_source_stderr", ""))))
    r["headers"] = delivered_headers(peer.new)


def defences_phase(py: Dict[str, str], pw, workdir: str, smtp_source: List[str], n: int,
                   runs: int, with_postfix: bool = False) -> dict:
    """eqmail with every check of issue 21 off, on (in-process), and the
    same checks as forked qmail-spp plugins (bench/spp_plugins.py); with
    `with_postfix`, Postfix with postscreen and policyd-spf: idle RSS
    (checks configured, not yet used), delivered msg/s at c=20
    (smtp-source sends one message a session: sessions/s), CPU ms per
    session and the tree's peak RSS; the DNS questions each asked."""
    py_e = py["eqmail"]
    if sh([py_e, "-c", "import spf, dkim, authheaders, publicsuffix2"], check=False,
          cwd="/").returncode:
        say("pip install %s into %s" % (" ".join(DEFENCE_LIBS), VENV))
        sh([py_e, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
           + list(DEFENCE_LIBS), check=False)
    resolv = os.path.join(workdir, "resolv-defences.conf")
    with open(resolv, "w") as f:
        f.write("nameserver %s\n" % DNS_ADDRESS)
    os.chmod(resolv, 0o644)
    dns_proc = subprocess.Popen([py["peers"], os.path.join(BENCH, "dns_peer.py"), DNS_ADDRESS,
                                 RELAY_NAME, "127.0.0.1"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd="/")
    out: dict = {"controls": DEFENCE_CONTROLS, "messages": n,
                 "spp_controls": {k: v for k, v in SPP_CONTROLS.items()}}
    try:
        if dns_proc.stdout.readline().strip() != b"ready":
            out["error"] = "the DNS responder did not start"
            return out
        configs = [("off", {}), ("on", DEFENCE_CONTROLS), ("plugins", SPP_CONTROLS)]
        for label, controls in configs:
            dns0 = dns_counts(dns_proc)
            peer = EqmailPeer(py_e, workdir, pw, None, resolv, label="eqmail-def-" + label,
                              controls=controls)
            if label == "plugins":
                spp_setup(peer, py_e, resolv, pw)
            peer.start(wait=False)
            try:
                # idle before any connection: a greeting would run the DNSBL
                # look-up (connect mode) and so "use" the checks
                deadline = time.monotonic() + 60
                while peer.log_count("started in") < 1 and time.monotonic() < deadline:
                    time.sleep(0.1)
                r = out[label] = {"idle": idle_memory(peer, settle=1.5), "runs": []}
                wait_greeting(peer.port, 60, peer.proc, "eqmaild")
                if label != "off":
                    # the one triplet of the load: greylisted once, then known
                    r["greylist_codes"] = warm_up(peer.port, 2)
                    say("defences %s: greylisting warm-up, RCPT replies %s"
                        % (label, r["greylist_codes"]))
                # the plugins manage a few sessions a second: fewer of them,
                # once, keep the whole bench within its time
                pn, pruns = (min(n, PLUGIN_MESSAGES), 1) if label == "plugins" else (n, runs)
                r["messages"] = pn
                defence_runs(peer, label, r, smtp_source, pn, pruns)
                r["log"] = peer.log_summary()
                if label == "plugins":
                    r["qmailqueue_said"] = peer.log_count("QMAILQUEUE")
            finally:
                peer.stop()
                r = out.get(label)
                if r is not None:
                    r["dns"] = dns_delta(dns_counts(dns_proc), dns0)
                    say("defences %s: headers %s; DNS questions %s"
                        % (label, r.get("headers"), r["dns"]))
        if with_postfix:
            if not os.access(POLICYD_SPF, os.X_OK):
                apt_install(["postfix-policyd-spf-python"])
            dns0 = dns_counts(dns_proc)
            pf = PostscreenBench(DEFENCE_CONTROLS["rbls"], resolv, workdir)
            r = out["postscreen"] = {"version": pf.version() or None}
            try:
                try:
                    pf.start()
                except Exception as e:  # the eqmail columns are still worth a report
                    r["error"] = str(e)[-1500:]
                    say("defences postscreen: %s" % r["error"])
                    return out
                r["idle"] = idle_memory(pf, settle=1.5)
                r["warm_up_codes"] = warm_up(pf.port, 1)
                defence_runs(pf, "postscreen", r, smtp_source, n, runs)
                time.sleep(1.0)  # postlogd
                r["log"] = {k: pf.log_count(k) for k in (
                    "postscreen[", "CONNECT from", "PASS NEW", "PASS OLD", "DNSBL rank",
                    "policyd-spf", "warning:", "fatal:", "reject:")}
                r["log"]["first_warnings"] = pf.log_lines("warning:", 5)
            finally:
                pf.stop()
                _started.remove(pf)
                r["dns"] = dns_delta(dns_counts(dns_proc), dns0)
                say("defences postscreen: headers %s; log %s; DNS questions %s"
                    % (r.get("headers"), r.get("log"), r["dns"]))
    finally:
        stop_proc(dns_proc)
    return out


def queue_phase_postfix(smtp_source: List[str], n: int, cpu_seconds: float) -> dict:
    dead = free_port()
    r: dict = {"messages": n, "relay_port": dead}
    sink = None
    pf = PostfixBench(extra={
        "relayhost": "[127.0.0.1]:%d" % dead, "default_transport": "smtp",
        "relay_transport": "smtp", "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        # Postfix's defaults again (the test peer retries every 10-20 s)
        "queue_run_delay": "300s", "minimal_backoff_time": "300s",
        "maximal_backoff_time": "4000s"}).start()
    try:
        r["idle"] = idle_memory(pf, settle=1.5)
        say("queue postfix: injecting %d messages for a relay that is down" % n)
        r["inject"] = inject(pf, smtp_source, n, QUEUE_RCPT)
        t = wait_for(lambda: pf.deferred() >= n, 120 + n / 50.0, 0.5)
        r["all_deferred_after_inject_s"] = t
        r["queued"] = pf.queued()
        r["waiting"] = idle_memory(pf, settle=2.0)
        r["rss_bytes_per_msg"] = (r["waiting"]["rss_kb"] - r["idle"]["rss_kb"]) * 1024.0 / n
        r["pss_bytes_per_msg"] = (r["waiting"]["pss_kb"] - r["idle"]["pss_kb"]) * 1024.0 / n
        r["idle_cpu"] = idle_cpu(pf, cpu_seconds)
        say("queue postfix: injected in %.1f s, %d queued (%d deferred); idle CPU %.2f %%"
            % (r["inject"]["seconds"], r["queued"], pf.deferred(), r["idle_cpu"]["pct"]))
        t0 = time.monotonic()
        pf.peer.stop()
        t_exit = time.monotonic()
        pf.postfix("start")
        pf.peer.started = True
        wait_greeting(pf.port, 60, None, "postfix")
        t1 = time.monotonic()
        r["restart"] = {"stop_s": t_exit - t0, "greeting_s": t1 - t_exit, "total_s": t1 - t0}
        r["after_restart"] = idle_memory(pf, settle=3.0)
        say("queue postfix: restart %.2f s" % r["restart"]["total_s"])
        sink = smtp_sink(smtp_source, dead)
        q0 = pf.queued()
        t0 = time.monotonic()
        sh(["postqueue", "-c", pf.peer.config_dir, "-f"], check=False)
        t = wait_for(lambda: pf.queued() == 0, 120 + q0 / 20.0, 0.1)
        r["drain"] = {"messages": q0, "seconds": t, "msgs_s": q0 / t if t else None,
                      "left": pf.queued()}
        time.sleep(1.0)  # postlogd
        try:
            with open(pf.peer.logfile, "rb") as f:
                r["drain"]["successes"] = f.read().count(b"status=sent")
        except OSError:
            pass
        r["after_drain"] = idle_memory(pf, settle=2.0)
        say("queue postfix: drained %d in %s s (%s msg/s)"
            % (q0, fmt(t, 1), fmt(r["drain"]["msgs_s"])))
    finally:
        pf.stop()
        _started.remove(pf)
        if sink:
            sink.stop()
    return r


# ---------------------------------------------------------------- report


def spread(values: List[Optional[float]]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "values": vals}


def machine_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"host": socket.gethostname(), "nproc": os.cpu_count(), "cpu": model,
            "kernel": platform.release(), "harness_python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    return ("{:,.%df}" % digits).format(v) + unit


def fmt_spread(s: dict, digits=0) -> str:
    if not s or s.get("median") is None:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"], digits)
    return "%s (%s–%s)" % (fmt(s["median"], digits), fmt(s["min"], digits),
                           fmt(s["max"], digits))


def ratio(a, b) -> Optional[float]:
    if a is None or not b:
        return None
    return a / b


def summarise(res: dict) -> dict:
    """Medians, spreads and per-run ratios from the raw runs."""
    summary = {}
    runs = res["runs"]
    for c in res["concurrency"]:
        for peer in res["peers"]:
            rs = [r for r in runs if r["peer"] == peer and r["c"] == c]
            for key in ("accept_msgs_s", "delivered_msgs_s"):
                summary["%s_c%d_%s" % (peer, c, key)] = spread([r[key] for r in rs])
        for other in res["peers"]:
            if other == "eqmail" or "eqmail" not in res["peers"]:
                continue
            for key in ("accept_msgs_s", "delivered_msgs_s"):
                per_run = []
                for i in range(res["runs_per_peer"]):
                    a = [r for r in runs if r["peer"] == "eqmail" and r["c"] == c
                         and r["run"] == i]
                    b = [r for r in runs if r["peer"] == other and r["c"] == c and r["run"] == i]
                    if a and b:
                        per_run.append(ratio(a[0][key], b[0][key]))
                summary["ratio_%s_c%d_%s" % (other, c, key)] = spread(per_run)
    return summary


def targets(res: dict) -> List[dict]:
    s = res["summary"]
    eq = res.get("memory", {}).get("eqmail", {})
    out = []

    def add(name, value, goal, met, shown, issue=7):
        out.append({"target": name, "goal": goal, "value": value, "shown": shown,
                    "met": met, "issue": issue})

    if "main" not in res.get("parts", PARTS):
        return out + targets19(res) + targets21(res) + targets22(res)
    for c, goal in ((20, TARGET_C20), (1, TARGET_C1)):
        r = s.get("ratio_postfix_c%d_delivered_msgs_s" % c, {}).get("median")
        add("delivered msg/s at c=%d vs Postfix" % c, r, "≥ %.1f×" % goal,
            None if r is None else r >= goal, fmt(r, 2, "×"))
    idle = eq.get("idle", {}).get("rss_kb")
    idle_mb = idle / 1024.0 if idle else None
    add("idle RSS of eqmaild (before any remote delivery)", idle_mb,
        "≤ %d MB" % TARGET_IDLE_MB, None if idle_mb is None else idle_mb <= TARGET_IDLE_MB,
        fmt(idle_mb, 1, " MB"))
    rem = eq.get("after_remote_dns") or eq.get("after_remote_literal") or {}
    rem_kb = rem.get("memory", {}).get("rss_kb") if rem.get("delivered") else None
    rem_mb = rem_kb / 1024.0 if rem_kb else None
    add("idle RSS after a remote delivery (DNS code loaded)", rem_mb,
        "≤ %d MB" % TARGET_REMOTE_MB, None if rem_mb is None else rem_mb <= TARGET_REMOTE_MB,
        fmt(rem_mb, 1, " MB"))
    conn = eq.get("idle_connections", {})
    kb = conn.get("rss_kb_per_conn") if conn.get("greeted") == conn.get("connections") else None
    add("RSS per idle SMTP connection", kb, "≤ %d KB" % TARGET_KB_PER_CONN,
        None if kb is None else kb <= TARGET_KB_PER_CONN, fmt(kb, 1, " KB"))
    fs = res.get("storage", {}).get("eqmail", {}).get("fsync_per_msg")
    add("every message fsync'd before 250", fs, "durable",
        None, "not checked here (tests); %s fsync/msg" % fmt(fs, 2))
    return out + targets19(res) + targets21(res) + targets22(res)


def _median(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def budget_summary(b: dict) -> dict:
    """Per peer: median delivered msg/s, peak charged and anonymous memory,
    OOM kills, alive."""
    out = {}
    for name in ("eqmail", "postfix", "aiosmtpd"):
        r = b.get(name)
        if not r:
            continue
        cg = r.get("cgroup") or {}
        out[name] = {"msgs_s": (r.get("delivered_msgs_s") or {}).get("median"),
                     "delivered": sum(x["delivered_count"] for x in r.get("runs", [])),
                     "sent": sum(x["messages"] for x in r.get("runs", [])),
                     "peak_mb": (cg.get("peak_bytes") or 0) / 2.0**20 or None,
                     "anon_mb": (r.get("peak_anon_bytes") or 0) / 2.0**20 or None,
                     "oom_kills": cg.get("oom_kills"), "limit_hits": cg.get("limit_hits"),
                     "alive": r.get("alive"), "error": r.get("error"),
                     "cpu_s": cg.get("cpu_s"), "throttled_s": cg.get("throttled_s"),
                     "tree_peak": r.get("tree_peak") or {}, "idle": r.get("idle") or {},
                     "start_s": r.get("start_s")}
    return out


def targets21(res: dict) -> List[dict]:
    """Issue 21: checks configured but not yet used cost at most 1 MB of
    idle RSS."""
    d = res.get("defences") or {}
    if not (d.get("off") and d.get("on")):
        return []
    extra = (d["on"]["idle"]["rss_kb"] - d["off"]["idle"]["rss_kb"]) / 1024.0
    return [{"target": "idle RSS with every check of issue 21 configured, not yet used, "
                       "minus with none", "goal": "≤ 1 MB", "value": extra,
             "shown": "%+.1f MB" % extra, "met": extra <= 1.0, "issue": 21}]


def targets19(res: dict) -> List[dict]:
    """The goals of issue 19 item 6: the router budget, the process tree at
    c=20, storage per message, the fan-out and the queue."""
    out = []
    parts = res.get("parts", PARTS)

    def add(name, value, goal, met, shown):
        out.append({"target": name, "goal": goal, "value": value, "shown": shown,
                    "met": met, "issue": 19})

    if "budget" in parts:
        for label, cpus, share in BUDGETS:
            b = budget_summary(res.get("budget", {}).get("budgets", {}).get(label, {}))
            e, a = b.get("eqmail", {}), b.get("aiosmtpd", {})
            ok = None
            if e and a and e.get("msgs_s") is not None and a.get("msgs_s") is not None:
                ok = e["msgs_s"] >= a["msgs_s"] and not e.get("oom_kills") and \
                    bool(e.get("alive"))
            elif e and (e.get("error") or not e.get("alive") or e.get("msgs_s") is None):
                ok = False
            what = BUDGET_NAMES[label]
            shown = "%s vs %s msg/s (%s×); OOM kills %s; %s" % (
                fmt(e.get("msgs_s")), fmt(a.get("msgs_s")),
                fmt(ratio(e.get("msgs_s"), a.get("msgs_s")), 2),
                e.get("oom_kills", "–"),
                "alive" if e.get("alive") else "died" if e else "–")
            add("router budget (%s): eqmail's delivered msg/s at c=20 ≥ aiosmtpd's, no OOM "
                "kill" % what, e.get("msgs_s"), "≥ aiosmtpd, 0 OOM", ok, shown)
    if "main" in parts:
        r = res["summary"].get("ratio_postfix_c20_delivered_msgs_s", {}).get("median")
        add("delivered msg/s at c=20 vs Postfix, with the tree within the peaks below "
            "(eqmail's default: one process)", r, "≥ %.1f×" % TARGET_C20_SMALL,
            None if r is None else r >= TARGET_C20_SMALL, fmt(r, 2, "×"))
        eq = res.get("memory", {}).get("eqmail", {})
        pk = eq.get("peak_c20") or {}
        for k, label, goal in (("pss_kb", "PSS", TARGET_TREE_PSS_MB),
                               ("rss_kb", "RSS", TARGET_TREE_RSS_MB)):
            v = pk.get(k) / 1024.0 if pk.get(k) else None
            add("whole tree's peak %s at c=20 (2 cores)" % label, v, "≤ %d MB" % goal,
                None if v is None else v <= goal, fmt(v, 1, " MB"))
        b = eq.get("back_to_idle") or {}
        t = b.get("seconds") if b else None
        add("back to idle after the c=20 load (process count and RSS ≤ 1.25 × those "
            "before the load)", t,
            "≤ %d s" % TARGET_IDLE_RETURN_S,
            None if not b else (t is not None and t <= TARGET_IDLE_RETURN_S),
            ("%s s" % fmt(t, 1)) if t is not None else
            ("not within %s s (%s)" % (b.get("timeout"), _mem_short(b.get("memory")))
             if b else "–"))
        st = res.get("storage", {}).get("eqmail", {})
        fs = st.get("fsync_per_msg")
        add("fsync + fdatasync per delivered message", fs, "≤ %.1f" % TARGET_FSYNC,
            None if fs is None else fs <= TARGET_FSYNC, fmt(fs, 2))
        kb = st.get("device_kb_per_msg")
        add("disk KB written per 4 KB message (whole device)", kb,
            "≤ %d KB" % TARGET_DISK_KB, None if kb is None else kb <= TARGET_DISK_KB,
            "%s (write_bytes %s KB)" % (fmt(kb, 1, " KB"), fmt(st.get("write_kb_per_msg"), 1)))
    if "fanout" in parts:
        fo = res.get("fanout", {})
        e = _median(r["seconds"] for r in fo.get("eqmail", []))
        p = _median(r["seconds"] for r in fo.get("postfix", []))
        failed = any(r["seconds"] is None for r in fo.get("eqmail", []))
        add("fan-out: one message to %d local recipients, 250 → last Maildir file"
            % FANOUT_RCPTS, e, "≤ Postfix",
            False if failed else (None if e is None or p is None else e <= p),
            "%s s vs %s s" % (fmt(e, 2), fmt(p, 2)))
    if "queue" in parts:
        q = res.get("queue", {})
        e, p = q.get("eqmail", {}), q.get("postfix", {})
        n = q.get("messages")
        v = e.get("rss_bytes_per_msg")
        add("RSS per queued message (%s waiting for a dead relay)" % fmt(n), v,
            "≤ %d B" % TARGET_QUEUE_BYTES, None if v is None else v <= TARGET_QUEUE_BYTES,
            "%s B (after a restart: %s B)" % (fmt(v), fmt(e.get("rss_bytes_per_msg_restarted"))))
        v = (e.get("idle_cpu") or {}).get("pct")
        add("idle CPU while they wait", v, "≤ %d %%" % TARGET_QUEUE_CPU_PCT,
            None if v is None else v <= TARGET_QUEUE_CPU_PCT, fmt(v, 2, " %"))
        v = (e.get("restart") or {}).get("total_s")
        add("restart (SIGTERM → greeting and queue loaded)", v, "< %d s" % TARGET_RESTART_S,
            None if not e else (v is not None and v < TARGET_RESTART_S), fmt(v, 2, " s"))
        ve = (e.get("drain") or {}).get("msgs_s")
        vp = (p.get("drain") or {}).get("msgs_s")
        met = None
        if e:
            met = False if ve is None else (None if vp is None else ve >= vp)
        add("drain after SIGALRM (Postfix: postqueue -f) to a fast sink", ve, "≥ Postfix", met,
            "%s vs %s msg/s (%s×)" % (fmt(ve), fmt(vp), fmt(ratio(ve, vp), 2)))
    return out


def _mem_short(m: Optional[dict]) -> str:
    if not m:
        return "–"
    return "%d processes, %s" % (m.get("processes", 0), fmt(m.get("rss_kb", 0) / 1024.0, 1,
                                                           " MB RSS"))


def markdown(res: dict) -> str:
    s = res["summary"]
    peers = res["peers"]
    mem = res.get("memory", {})
    m = res["machine"]
    lines = ["# eqmail benchmark: %s%s" % (res["date"], " (--quick)" if res.get("quick") else ""),
             "",
             "eqmail %s (git %s). "
             "Machine: %s, %d cores (%s), kernel %s; eqmail's Python %s (%s); "
             "Postfix %s; load: smtp-source, %d × %d B to one local recipient, "
             "%d run(s) per peer and concurrency%s." % (
                 res.get("eqmail_version") or "?", res.get("eqmail_git") or "?",
                 m["host"], m["nproc"], m["cpu"], m["kernel"], res["eqmail_python_version"],
                 res["eqmail_python"], res.get("postfix_version") or "–", res["messages"],
                 MSG_SIZE, res["runs_per_peer"],
                 " (median, min–max in brackets)" if res["runs_per_peer"] > 1 else ""),
             ""]
    if m.get("loadavg_start") and m.get("loadavg_end"):
        lines[-2] += (" Load average (1, 5, 15 min) at the start %s, at the end %s; "
                      "the run took %s s." % (
                          ", ".join("%.2f" % x for x in m["loadavg_start"]),
                          ", ".join("%.2f" % x for x in m["loadavg_end"]),
                          fmt(res.get("seconds"))))
    parts = res.get("parts", PARTS)
    if "main" in parts:
        lines += ["| metric | eqmail | postfix | aiosmtpd | eqmail/postfix | eqmail/aiosmtpd |",
                  "|---|---|---|---|---|---|"]

    def row(name, cells, r1="–", r2="–"):
        lines.append("| %s | %s | %s |" % (name, " | ".join(cells), " | ".join([r1, r2])))

    for c in (res["concurrency"] if "main" in parts else []):
        for key, label in (("accept_msgs_s", "accepted"), ("delivered_msgs_s", "delivered")):
            cells = [fmt_spread(s.get("%s_c%d_%s" % (p, c, key), {}))
                     if p in peers else "–" for p in ("eqmail", "postfix", "aiosmtpd")]
            r = [fmt_spread(s.get("ratio_%s_c%d_%s" % (o, c, key), {}), 2)
                 for o in ("postfix", "aiosmtpd")]
            row("c=%d %s msg/s" % (c, label), cells, *r)

    def mb(d, k="rss_kb"):
        return fmt(d.get(k) / 1024.0, 1, " MB") if d and d.get(k) else "–"

    def mem_row(label, key, k):
        vals = [mem.get(p, {}).get(key) for p in ("eqmail", "postfix", "aiosmtpd")]
        cells = [mb(v, k) for v in vals]
        r = [fmt(ratio(vals[0].get(k) if vals[0] else None, v.get(k) if v else None), 2, "×")
             for v in vals[1:]]
        row(label, cells, *r)

    if "main" in parts:
        main_rows(res, row, mem_row, mb)
    lines += extra_sections(res)
    lines += ["", "## Targets (issue 7; issue 19 item 6; issue 21)", "", "| target | goal | measured | met |",
              "|---|---|---|---|"]
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "**unmet**")
        lines.append("| %s | %s | %s | %s |" % (t["target"], t["goal"], t["shown"], met))
    notes = list(res.get("notes") or [])
    logs = dict(res.get("eqmail_logs") or {})
    for label, b in ((res.get("budget") or {}).get("budgets") or {}).items():
        if (b.get("eqmail") or {}).get("log"):
            logs["budget " + label] = b["eqmail"]["log"]
    if ((res.get("queue") or {}).get("eqmail") or {}).get("log"):
        logs["queue"] = res["queue"]["eqmail"]["log"]
    if logs:
        notes.append("eqmaild's logs: " + "; ".join(
            "%s %d alert(s), %d warning(s)%s" % (
                k, v.get("alerts", 0), v.get("warnings", 0),
                (" (first: %s)" % v["first_alerts"][0][:160]) if v.get("first_alerts") else "")
            for k, v in logs.items()) + ".")
    if notes:
        lines += ["", "## Notes", ""] + ["- " + n for n in notes]
    lines += ["", "Raw figures: `%s`. How to read this: bench/README.md." % res["json"]]
    return "\n".join(lines) + "\n"


def _mbv(v) -> str:
    return fmt(v, 1, " MB") if v else "–"


def extra_sections(res: dict) -> List[str]:
    """The tables of the router budget, the fan-out and the queue."""
    lines: List[str] = []
    peers3 = ("eqmail", "postfix", "aiosmtpd")
    bud = res.get("budget")
    if bud:
        lines += ["", "## Router budget: each peer alone in a cgroup (%s)"
                  % (bud.get("cgroups") or "").split(" (")[0],
                  "",
                  "%d × %d B at c=20, %d run(s) per peer and budget; memory limit %d MB; the "
                  "load generator outside the cgroup." % (
                      bud.get("messages", 0), MSG_SIZE, bud.get("runs", 0),
                      bud.get("memory_limit", 0) >> 20), ""]
        if bud.get("error"):
            lines.append("Not run: %s" % bud["error"])
        else:
            lines += ["| budget | metric | eqmail | postfix | aiosmtpd | eqmail/aiosmtpd |",
                      "|---|---|---|---|---|---|"]
            for label, _, _ in BUDGETS:
                b = budget_summary(bud.get("budgets", {}).get(label, {}))
                if not b:
                    continue

                def brow(metric, f, r=None):
                    cells = []
                    for p in peers3:
                        x = b.get(p)
                        cells.append("–" if not x else
                                     ("error: %s" % x["error"][:80] if x.get("error") and
                                      metric.startswith("delivered") else f(x)))
                    rr = "–"
                    if r and b.get("eqmail") and b.get("aiosmtpd"):
                        rr = fmt(ratio(r(b["eqmail"]), r(b["aiosmtpd"])), 2, "×")
                    lines.append("| %s | %s | %s | %s |" % (BUDGET_NAMES[label], metric,
                                                            " | ".join(cells), rr))
                brow("delivered msg/s", lambda x: "%s (%d/%d)" % (
                    fmt(x["msgs_s"]), x["delivered"], x["sent"]), lambda x: x["msgs_s"])
                brow("cgroup peak memory (charged, page cache included)",
                     lambda x: _mbv(x["peak_mb"]))
                brow("cgroup peak anonymous memory (sampled)", lambda x: _mbv(x["anon_mb"]))
                brow("tree peak RSS / PSS", lambda x: "%s / %s" % (
                    _mbv(x["tree_peak"].get("rss_kb", 0) / 1024.0),
                    _mbv(x["tree_peak"].get("pss_kb", 0) / 1024.0)))
                brow("OOM kills; limit hits; alive at the end", lambda x: "%s; %s; %s" % (
                    x["oom_kills"], x["limit_hits"], "yes" if x["alive"] else "**no**"))
                brow("CPU s used (throttled s)", lambda x: "%s (%s)" % (
                    fmt(x["cpu_s"], 1), fmt(x["throttled_s"], 1)))
                brow("CPU ms per delivered message",
                     lambda x: fmt(1000.0 * x["cpu_s"] / x["delivered"], 2)
                     if x["cpu_s"] and x["delivered"] else "–",
                     lambda x: x["cpu_s"] / x["delivered"]
                     if x["cpu_s"] and x["delivered"] else None)
                brow("start until greeting (s)", lambda x: fmt(x["start_s"], 2))
    fo = res.get("fanout")
    if fo:
        lines += ["", "## Fan-out: one 4 KB message to %d local recipients" % fo["recipients"],
                  "",
                  "`benchuser+1` … `benchuser+%d@bench.test` in one SMTP transaction; eqmail: "
                  "the alias user's `.qmail-default` (one Maildir file per recipient); Postfix: "
                  "`recipient_delimiter = +`, local delivery to benchuser's Maildir (one file "
                  "per recipient). Median (min–max) of the runs." % fo["recipients"], "",
                  "| metric | eqmail | postfix | eqmail/postfix |", "|---|---|---|---|"]
        e = [r["seconds"] for r in fo.get("eqmail", [])]
        p = [r["seconds"] for r in fo.get("postfix", [])]
        lines.append("| from the 250 until the last Maildir file (s) | %s | %s | %s |" % (
            fmt_spread(spread(e), 2), fmt_spread(spread(p), 2),
            fmt(ratio(_median(e), _median(p)), 2, "×")))
        e = [r["recipients"] / r["seconds"] for r in fo.get("eqmail", []) if r["seconds"]]
        p = [r["recipients"] / r["seconds"] for r in fo.get("postfix", []) if r["seconds"]]
        lines.append("| deliveries/s | %s | %s | – |" % (fmt_spread(spread(e)),
                                                         fmt_spread(spread(p))))
        e = [r["data_s"] for r in fo.get("eqmail", [])]
        p = [r["data_s"] for r in fo.get("postfix", [])]
        lines.append("| DATA until the 250 (s) | %s | %s | – |" % (
            fmt_spread(spread(e), 3), fmt_spread(spread(p), 3)))
    dfn = res.get("defences")
    if dfn and dfn.get("off") and dfn.get("on"):
        lines += defences_section(dfn)
    if (res.get("chunking") or {}).get("eqmail"):
        lines += chunking_section(res["chunking"])
    q = res.get("queue")
    if q and (q.get("eqmail") or q.get("postfix")):
        e, p = q.get("eqmail") or {}, q.get("postfix") or {}
        n = q["messages"]
        lines += ["", "## Queue: %s messages deferred to a relay that is down" % fmt(n), "",
                  "Injected with smtp-source (c=20, 4 KB, relaying allowed for 127.0.0.1) to "
                  "`someone@remote.test`; eqmail routes everything to `[127.0.0.1]:PORT` "
                  "(control/smtproutes), Postfix has `relayhost = [127.0.0.1]:PORT`; nothing "
                  "listens on PORT (connection refused) until the drain, when smtp-sink does.",
                  "", "| metric | eqmail | postfix | eqmail/postfix |", "|---|---|---|---|"]

        def qrow(label, f, r=None):
            ce = f(e) if e else "–"
            cp = f(p) if p else "–"
            rr = fmt(ratio(r(e), r(p)), 2, "×") if r and e and p else "–"
            lines.append("| %s | %s | %s | %s |" % (label, ce, cp, rr))

        def g(d, *keys):
            for k in keys:
                d = (d or {}).get(k)
            return d

        qrow("injection msg/s (all answered 250: smtp-source exit)", lambda d: "%s (exit %s)" % (
            fmt(g(d, "inject", "msgs_s")), g(d, "inject", "rc")),
            lambda d: g(d, "inject", "msgs_s"))
        qrow("until every message had its first try (s after injection)",
             lambda d: fmt(g(d, "all_deferred_after_inject_s"), 1))
        qrow("idle RSS before (tree)", lambda d: _mbv(g(d, "idle", "rss_kb") / 1024.0))
        qrow("RSS right after the injection (tree; processes)", lambda d: "–" if not
             d.get("after_inject") else "%s; %d" % (
                 _mbv(g(d, "after_inject", "rss_kb") / 1024.0),
                 g(d, "after_inject", "processes")))
        qrow("session workers retired after (s)", lambda d: fmt(g(d, "workers_retired_s"), 1)
             if "workers_retired_s" in d else "–")
        qrow("RSS with them waiting (tree; processes)", lambda d: "%s; %d" % (
            _mbv(g(d, "waiting", "rss_kb") / 1024.0), g(d, "waiting", "processes")))
        qrow("… (RSS waiting − idle RSS) / messages", lambda d: fmt(d.get("rss_bytes_per_msg"),
                                                                     0, " B"))
        qrow("… the same with PSS", lambda d: fmt(d.get("pss_bytes_per_msg"), 0, " B"))
        qrow("idle CPU while they wait (CPU s / wall s)", lambda d: "%s (%s / %s s)" % (
            fmt(g(d, "idle_cpu", "pct"), 2, " %"), fmt(g(d, "idle_cpu", "cpu_s"), 2),
            fmt(g(d, "idle_cpu", "seconds"))))
        qrow("restart: SIGTERM until exit (s)", lambda d: fmt(g(d, "restart", "stop_s"), 2))
        qrow("restart: start until SMTP greeting (s)",
             lambda d: fmt(g(d, "restart", "greeting_s"), 2))
        qrow("restart: start until the queue is loaded (s; eqmail's \"started\" log line)",
             lambda d: fmt(g(d, "restart", "loaded_s"), 2))
        qrow("restart total: SIGTERM until greeting and queue loaded (s)",
             lambda d: fmt(g(d, "restart", "total_s"), 2), lambda d: g(d, "restart", "total_s"))
        qrow("RSS after the restart, queue loaded (tree)", lambda d: _mbv(
            g(d, "after_restart", "rss_kb") / 1024.0))
        qrow("… (RSS − idle RSS) / messages", lambda d: fmt(
            d.get("rss_bytes_per_msg_restarted"), 0, " B") if "rss_bytes_per_msg_restarted"
            in d else "–")
        qrow("deliveries started in the 3 s after the restart", lambda d: fmt(
            d.get("tries_after_restart")) if "tries_after_restart" in d else "–")
        qrow("drain: SIGALRM / postqueue -f until the queue is empty (s)",
             lambda d: fmt(g(d, "drain", "seconds"), 1) + (
                 "" if not g(d, "drain", "left") else " (%d left)" % g(d, "drain", "left")))
        qrow("… delivered to the sink (log lines: eqmail success, Postfix status=sent)",
             lambda d: fmt(g(d, "drain", "successes")))
        qrow("drain msg/s", lambda d: fmt(g(d, "drain", "msgs_s")),
             lambda d: g(d, "drain", "msgs_s"))
        qrow("RSS 2 s after the drain (tree)", lambda d: _mbv(
            g(d, "after_drain", "rss_kb") / 1024.0))
        qrow("… − idle RSS (not given back)", lambda d: _mbv(
            (g(d, "after_drain", "rss_kb") - g(d, "idle", "rss_kb")) / 1024.0)
            if d.get("after_drain") else "–")
    return lines


def chunking_run(peer, py_peers: str, mode: str, n: int, c: int = 20) -> dict:
    """`n` messages (4 KB, one a session) to `peer` by bench/bdat_client.py
    with DATA or BDAT; accepted msg/s, and the seconds until all were
    delivered."""
    peer.clear()
    os.sync()
    time.sleep(0.3)
    t0 = time.monotonic()
    res = sh([py_peers, os.path.join(BENCH, "bdat_client.py"), "127.0.0.1", str(peer.port),
              mode, str(n), str(c), str(MSG_SIZE), SENDER, RCPT], check=False, cwd="/")
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"mode": mode, "error": (res.stderr or res.stdout)[-500:]}
    out["delivered_s"] = wait_for(lambda: count_files(peer.new) >= out["accepted"],
                                  30 + n / 20.0, 0.02)
    if out["delivered_s"] is not None:
        out["delivered_s"] = time.monotonic() - t0
    return out


def chunking_phase(objs: dict, py_peers: str, n: int, runs: int) -> dict:
    """Issue 22: the same client sends the same messages with DATA and with
    BDAT, alternating, to eqmail and to Postfix (both offer CHUNKING)."""
    out: dict = {"messages": n, "c": 20}
    for i in range(runs):
        for name in ("eqmail", "postfix"):
            peer = objs.get(name)
            if peer is None:
                continue
            for mode in (("data", "bdat") if i % 2 == 0 else ("bdat", "data")):
                r = chunking_run(peer, py_peers, mode, n)
                out.setdefault(name, {}).setdefault(mode, []).append(r)
                say("chunking %s %s run %d: %s msg/s accepted (%s/%d)%s"
                    % (name, mode, i + 1, fmt(r.get("msgs_s")), r.get("accepted"), n,
                       " " + r["error"] if r.get("error") else ""))
    return out


def chunking_section(ch: dict) -> List[str]:
    lines = ["", "## DATA and BDAT (issue 22): the same messages, the same client", "",
             "bench/bdat_client.py (asyncio, c=%d, %d × 4 KB a run, one message a "
             "session): MAIL, RCPT and DATA pipelined with the message after the 354, or "
             "MAIL, RCPT and `BDAT size LAST` with the message in one write. Accepted "
             "msg/s, median (min–max) of the runs." % (ch.get("c", 20), ch["messages"]), "",
             "| peer | DATA msg/s | BDAT msg/s | BDAT/DATA |", "|---|---|---|---|"]
    for name in ("eqmail", "postfix"):
        r = ch.get(name)
        if not r:
            continue
        d = [x.get("msgs_s") for x in r.get("data", []) if x.get("msgs_s")]
        b = [x.get("msgs_s") for x in r.get("bdat", []) if x.get("msgs_s")]
        lines.append("| %s | %s | %s | %s |" % (name, fmt_spread(spread(d)),
                                                  fmt_spread(spread(b)),
                                                  fmt(ratio(_median(b), _median(d)), 2, "×")))
    return lines


def targets22(res: dict) -> List[dict]:
    """Issue 22: BDAT accepts at DATA's rate or better (5 % for noise)."""
    e = (res.get("chunking") or {}).get("eqmail") or {}
    d = _median([x.get("msgs_s") for x in e.get("data", [])])
    b = _median([x.get("msgs_s") for x in e.get("bdat", [])])
    if not d or not b:
        return []
    r = b / d
    return [{"target": "eqmail accepts with BDAT at DATA's rate or better (c=20, 4 KB)",
             "goal": "≥ 0.95× DATA", "value": r, "shown": fmt(r, 2, "×"), "met": r >= 0.95,
             "issue": 22}]


def defences_section(dfn: dict) -> List[str]:
    """The table of issue 21: eqmail's checks off, in-process, as forked
    qmail-spp plugins, and Postfix with postscreen and policyd-spf."""
    cols = [c for c in DEFENCE_CONFIGS if (dfn.get(c) or {}).get("runs")]
    pf = dfn.get("postscreen") or {}
    lines = ["", "## Defences of a public MX (issue 21): eqmail's checks off, in-process, "
             "as qmail-spp plugins; Postfix with postscreen and policyd-spf", "",
             "In-process: %s (control files). Plugins: eqmail's own checks off except "
             "strictpipelining 1 (part of the dialogue, no plugin can do it), and "
             "bench/spp_plugins.py forked per command with the same libraries (dnspython, "
             "pyspf, dkimpy, authheaders): `[connection]` DNSBL bl.bench.test, `[mail]` SPF "
             "(`H` Received-SPF), `[rcpt]` greylisting (sqlite, 1 s), and a QMAILQUEUE "
             "wrapper (control/smtprules) that verifies DKIM/DMARC, prepends "
             "Authentication-Results and execs `eqmail queue`; with QMAILQUEUE set eqmaild "
             "does not deliver during DATA (direct local delivery is off), every message "
             "goes through the queue. Postfix: postscreen (DNSBL bl.bench.test and the "
             "pregreet test enforced; pipelining, non-SMTP and bare-newline tests off, as "
             "they make a client that passes reconnect; no teaser banner, greet wait 1 s) "
             "and `check_policy_service` policyd-spf at RCPT (spawned as nobody, Debian's "
             "settings but skip_addresses 192.0.2.1/32: Debian's skips 127.0.0.0/8); its DNS questions reach the same "
             "responder through a resolv.conf mounted in Postfix's own mount namespace. "
             "The DNS answers are NXDOMAIN (not listed, SPF none, no DMARC record), so the "
             "figures are each MTA's own cost plus a local DNS round trip each. Warm-up "
             "before the runs: the one greylist triplet of the load is greylisted once "
             "(eqmail), and postscreen sees the client once and caches its pass (all load "
             "comes from 127.0.0.1; a DNSBL result is kept postscreen_dnsbl_min_ttl, 60 s, "
             "then looked up again). smtp-source sends one message a session: msg/s are "
             "sessions/s. %d × 4 KB at c=20, median (min–max) of the runs; the plugins "
             "column: one run of %s."
             % (", ".join("%s %s" % kv for kv in sorted(dfn["controls"].items())),
                dfn["messages"], (dfn.get("plugins") or {}).get("messages", dfn["messages"])),
             ""]
    if pf.get("error"):
        lines += ["Postfix + postscreen did not run: %s" % pf["error"].splitlines()[0][:300], ""]
    lines += ["| metric | %s | in-process/off | in-process/plugins | in-process/Postfix |"
              % " | ".join(DEFENCE_NAMES[c] for c in cols),
              "|---|%s---|---|---|" % ("---|" * len(cols))]

    def vals(c, f):
        return [f(r) for r in (dfn.get(c) or {}).get("runs", []) if f(r) is not None]

    def med(c, f):
        return _median(vals(c, f))

    def drow(label, f, digits=0):
        cells = [fmt_spread(spread(vals(c, f)), digits) for c in cols]
        rs = [fmt(ratio(med("on", f), med(o, f)), 2, "×") if o in cols else "–"
              for o in ("off", "plugins", "postscreen")]
        lines.append("| %s | %s | %s |" % (label, " | ".join(cells), " | ".join(rs)))

    def sessions(r):
        return r["delivered_msgs_s"]

    def cpu(r):
        return r["cpu_ms_per_msg"]

    def peak(r):
        return r["peak"]["rss_kb"] / 1024.0

    drow("delivered msg/s (= sessions/s) at c=20", sessions)
    drow("CPU ms per session (the whole tree)", cpu, 2)
    drow("peak tree RSS during the load (MB)", peak, 1)
    drow("peak tree PSS during the load (MB; shared pages counted once)",
         lambda r: r["peak"]["pss_kb"] / 1024.0 if r["peak"].get("pss_kb") else None, 1)
    idle = {c: dfn[c]["idle"]["rss_kb"] / 1024.0 for c in cols if dfn[c].get("idle")}
    rs = [fmt(ratio(idle.get("on"), idle.get(o)), 2, "×") if o in idle else "–"
          for o in ("plugins", "postscreen")]
    off = "%+.1f MB" % (idle["on"] - idle["off"]) if "on" in idle and "off" in idle else "–"
    lines.append("| idle RSS after start (eqmail: before any connection; Postfix: after its "
                 "start-up check) (MB) | %s | %s | %s |" % (
                     " | ".join(fmt(idle.get(c), 1) for c in cols), off, " | ".join(rs)))
    lines.append("| warm-up: RCPT replies | %s | – | – | – |" % " | ".join(
        ", ".join(str(x) for x in (dfn[c].get("greylist_codes") or
                                   dfn[c].get("warm_up_codes") or [])) or "–" for c in cols))
    lines.append("| DNS questions (all runs and the warm-up): total; to bl.bench.test | %s "
                 "| – | – | – |" % " | ".join(
                     "%s; %s" % (fmt(g.get("queries")), fmt(g.get("suffixes", {}).get(
                         "bl.bench.test", 0))) if g else "–"
                     for g in ((dfn[c].get("dns") or {}) for c in cols)))
    lines.append("| trace fields in a delivered message | %s | – | – | – |" % " | ".join(
        "–" if "headers" not in dfn[c] else ", ".join(sorted(dfn[c]["headers"])) or "none"
        for c in cols))
    said = []
    for o, name in (("plugins", "the same checks as forked plugins"),
                    ("postscreen", "Postfix with postscreen and policyd-spf")):
        a, b = med("on", sessions), med(o, sessions)
        ca, cb = med("on", cpu), med(o, cpu)
        if a and b and ca and cb:
            said.append("%s× the sessions/s of %s, with %s its CPU per session"
                        % (fmt(a / b, 2), name, "%s×" % fmt(ca / cb, 2) if ca >= cb * 0.5
                           else "1/%s of" % fmt(cb / ca)))
    if said:
        lines += ["", "eqmail with its checks in-process: " + "; ".join(said) + "."]
    if "postscreen" in cols:
        lines += ["", "The Postfix column does less than eqmail's: policyd-spf checks SPF "
                  "(of the HELO name and of the sender) but there is no DKIM/DMARC check "
                  "(that would be a milter such as OpenDKIM/OpenDMARC) and no greylisting "
                  "(postgrey, another policy service); postscreen's DNSBL and pregreet tests "
                  "stand for eqmail's rbls and strictpipelining."]
    lg = pf.get("log")
    if lg:
        lines += ["", "Postfix's log: %s postscreen lines (%s CONNECT, %s PASS NEW, %s PASS "
                  "OLD, %s DNSBL rank); %s warnings, %s rejects (postlogd's datagram socket "
                  "may drop lines under load)." % (
                      lg.get("postscreen["), lg.get("CONNECT from"), lg.get("PASS NEW"),
                      lg.get("PASS OLD"), lg.get("DNSBL rank"), lg.get("warning:"),
                      lg.get("reject:"))]
    return lines


def main_rows(res: dict, row, mem_row, mb) -> None:
    mem = res.get("memory", {})
    sto = res.get("storage", {})
    mem_row("idle RSS after start (tree)", "idle", "rss_kb")
    mem_row("idle PSS after start (tree)", "idle", "pss_kb")
    mem_row("peak RSS during c=20 (tree)", "peak_c20", "rss_kb")
    mem_row("peak PSS during c=20 (tree)", "peak_c20", "pss_kb")
    w1 = res.get("workers1")
    if w1:
        pf = [r["delivered_msgs_s"] for r in res.get("runs", [])
              if r["peer"] == "postfix" and r["c"] == 20 and r["delivered_msgs_s"]]
        pfm = statistics.median(pf) if pf else None
        row("eqmail --workers 1 (opt-in): c=20 delivered msg/s; tree peak RSS / PSS",
            ["%s (%s× Postfix); %s / %s" % (
                fmt(w1.get("median")), fmt(ratio(w1.get("median"), pfm), 2),
                mb(w1["peak"], "rss_kb"), mb(w1["peak"], "pss_kb")),
             "–", "–"])
    eq = mem.get("eqmail", {})
    conn = eq.get("idle_connections")
    if conn:
        row("RSS / PSS per idle SMTP connection (%d open, %d greeted)"
            % (conn["connections"], conn["greeted"]),
            ["%s / %s" % (fmt(conn["rss_kb_per_conn"], 1, " KB"),
                          fmt(conn["pss_kb_per_conn"], 1, " KB")), "–", "–"])
    for key, label in (("after_remote_literal", "idle RSS / PSS after a remote delivery "
                        "(smtproutes [127.0.0.1])"),
                       ("after_remote_dns", "idle RSS / PSS after a remote delivery "
                        "through DNS (dnspython loaded)")):
        r = eq.get(key)
        if r:
            cell = "%s / %s" % (mb(r["memory"]), mb(r["memory"], "pss_kb")) \
                if r["delivered"] else "not delivered"
            row(label, [cell, "–", "–"])
    mem_row("idle RSS after the load runs (2 s after)", "after_load", "rss_kb")
    backs = [mem.get(p, {}).get("back_to_idle") for p in ("eqmail", "postfix", "aiosmtpd")]
    if any(backs):
        row("back to idle after the load (s; then processes, RSS)",
            ["–" if not b else "%s; %s" % (
                fmt(b["seconds"], 1) if b["seconds"] is not None
                else "not in %d" % b.get("timeout", 0), _mem_short(b.get("memory")))
             for b in backs])

    def sto_row(label, k, digits):
        vals = [sto.get(p, {}).get(k) for p in ("eqmail", "postfix", "aiosmtpd")]
        row(label, [fmt(v, digits) for v in vals],
            *[fmt(ratio(vals[0], v), 2, "×") for v in vals[1:]])

    if sto:
        sto_row("fsync+fdatasync calls per delivered message", "fsync_per_msg", 2)
        sto_row("write_bytes per delivered message (KB, /proc/PID/io)", "write_kb_per_msg", 1)
        sto_row("… less cancelled_write_bytes (KB)", "net_write_kb_per_msg", 1)
        sto_row("disk sectors written per message, whole device (KB)", "device_kb_per_msg", 1)


# ---------------------------------------------------------------- main


def start_main_peers(res: dict, py: Dict[str, str], pw, workdir: str, peers: List[str],
                     with_remote: bool) -> dict:
    """The peers of the main part (and the fan-out), their idle memory; with
    `with_remote`, the far end and the DNS responder for eqmail's remote
    deliveries (kept in res["_far"], res["_dns"])."""
    far = None
    dns_proc = None
    resolv = None
    if with_remote:
        far = AiosmtpdPeer(py["peers"], workdir, label="far-end").start()
        if "eqmail" in peers:
            resolv = os.path.join(workdir, "resolv.conf")
            with open(resolv, "w") as f:
                f.write("nameserver %s\n" % DNS_ADDRESS)
            os.chmod(resolv, 0o644)
            try:
                dns_proc = subprocess.Popen(
                    [py["peers"], os.path.join(BENCH, "dns_peer.py"), DNS_ADDRESS,
                     RELAY_NAME, "127.0.0.1"], stdout=subprocess.PIPE,
                    stderr=open(os.path.join(workdir, "dns.log"), "ab"), cwd="/")

                class _P:
                    name = "dns"

                    def stop(self_inner):
                        stop_proc(dns_proc)
                _started.append(_P())
                if dns_proc.stdout.readline().strip() != b"ready":
                    raise RuntimeError("exit %s" % dns_proc.wait(5))
            except Exception as e:
                res["notes"].append("the DNS responder did not start (%s): no remote "
                                    "delivery through DNS" % e)
                dns_proc = None
    objs = {}
    say("starting peers: %s" % ", ".join(peers))
    for name in peers:
        if name == "eqmail":
            objs[name] = EqmailPeer(py["eqmail"], workdir, pw, far.port if far else None,
                                    resolv).start()
        elif name == "postfix":
            objs[name] = PostfixBench().start()
        else:
            objs[name] = AiosmtpdPeer(py["peers"], workdir).start()
    for name, peer in objs.items():
        res["memory"].setdefault(name, {})["idle"] = idle_memory(peer, settle=1.5)
        say("%s idle: %s" % (name, res["memory"][name]["idle"]))

    res["_far"], res["_dns"] = far, dns_proc
    return objs


def main_part(res: dict, args, objs: dict, smtp_source: List[str], n: int, runs: int,
              dev: Optional[str]) -> None:
    """Remote deliveries and idle connections (eqmail), the load runs, the
    return to idle, the storage runs."""
    far, dns_proc = res.pop("_far"), res.pop("_dns")
    # --- eqmail only: remote deliveries, idle connections
    if "eqmail" in objs:
        eq = objs["eqmail"]
        mem = res["memory"]["eqmail"]
        say("eqmail: remote delivery via smtproutes [127.0.0.1]")
        mem["after_remote_literal"] = remote_delivery(eq, far, "someone@iplit.test", 1)
        if dns_proc is not None:
            say("eqmail: remote delivery via DNS (%s)" % RELAY_NAME)
            mem["after_remote_dns"] = remote_delivery(eq, far, "someone@dns.test", 2)
        say("eqmail: %d idle connections" % IDLE_CONNECTIONS)
        mem["idle_connections"] = idle_connections(eq)

    # --- load: runs interleaved over peers
    for name, peer in objs.items():   # the baseline of the return to idle
        res["memory"][name]["before_load"] = idle_memory(peer, settle=0.5)
    for i in range(runs):
        for c in res["concurrency"]:
            for name, peer in objs.items():
                r = load_run(peer, smtp_source, n, c, sample=(c == 20))
                r["run"] = i
                res["runs"].append(r)
                say("run %d c=%-2d %-8s accept %s msg/s, delivered %s msg/s (%d/%d)%s"
                    % (i + 1, c, name, fmt(r["accept_msgs_s"]), fmt(r["delivered_msgs_s"]),
                       r["delivered_count"], n,
                       "" if r["smtp_source_rc"] == 0 else
                       " smtp-source exit %s: %s" % (r["smtp_source_rc"],
                                                     r.get("smtp_source_stderr", ""))))
                if r["delivered_s"] is None:
                    res["notes"].append("%s c=%d run %d: only %d of %d delivered in time"
                                        % (name, c, i + 1, r["delivered_count"], n))
                if "peak" in r:
                    pk = res["memory"][name].setdefault("peak_c20", {"rss_kb": 0,
                                                                     "pss_kb": 0})
                    for k in ("rss_kb", "pss_kb"):
                        pk[k] = max(pk[k], r["peak"][k])
    for name, peer in objs.items():
        res["memory"][name]["after_load"] = idle_memory(peer, settle=2.0)
    say("waiting for the peers to be back to idle (at most %d s)" % IDLE_RETURN_TIMEOUT)
    last_end = {}
    for r in res["runs"]:
        last_end[r["peer"]] = max(last_end.get(r["peer"], 0.0), r.pop("t_end", 0.0))
    back = back_to_idle(objs, {name: res["memory"][name]["before_load"] for name in objs},
                        last_end, IDLE_RETURN_TIMEOUT)
    for name, b in back.items():
        res["memory"][name]["back_to_idle"] = b
        say("%s: back to idle after %s s: %s" % (name, fmt(b["seconds"], 1), b["memory"]))

    # --- storage
    for name, peer in objs.items():
        say("%s: storage run (strace, %d messages, c=20)" % (name, args.storage_messages))
        res["storage"][name] = storage_run(peer, smtp_source, args.storage_messages, dev)
        say("%s: %s" % (name, {k: v for k, v in res["storage"][name].items()
                                if k.endswith("per_msg")}))
    if "postfix" in objs:
        res["notes"].append("Postfix's /proc/PID/io counts only processes alive at the "
                            "end of the storage run (short-lived ones are missed); "
                            "its fsync count covers the whole tree (strace -f).")
    res["notes"].append("whole-device sectors include the file system journal and "
                        "anything else writing to %s at the time." % dev)
    if "eqmail" in objs:
        res["eqmail_logs"] = {"main": objs["eqmail"].log_summary()}
        res["workers1"] = workers_run(objs["eqmail"], smtp_source, n, runs)


def workers_run(eq, smtp_source: List[str], n: int, runs: int) -> dict:
    """The opt-in process model beside the default: eqmaild with
    ``--workers 1`` (a session worker and a local-delivery worker under
    load), c=20 runs; delivered msg/s (median) and the tree's peak."""
    w = EqmailPeer(eq.python, os.path.dirname(eq.home), eq.pw, None, None,
                   label="eqmail-w1", args=["--workers", "1"]).start()
    out = {"delivered_msgs_s": [], "peak": {"rss_kb": 0, "pss_kb": 0}}
    try:
        for i in range(runs):
            r = load_run(w, smtp_source, n, 20, sample=True)
            out["delivered_msgs_s"].append(r["delivered_msgs_s"])
            for k in ("rss_kb", "pss_kb"):
                out["peak"][k] = max(out["peak"][k], (r.get("peak") or {}).get(k, 0))
            say("run %d c=20 eqmail --workers 1: delivered %s msg/s"
                % (i + 1, fmt(r["delivered_msgs_s"])))
    finally:
        w.stop()
    vals = [v for v in out["delivered_msgs_s"] if v is not None]
    out["median"] = statistics.median(vals) if vals else None
    return out


def stop_started() -> None:
    while _started:
        thing = _started.pop()
        try:
            thing.stop()
        except Exception as e:  # keep stopping the others
            say("stopping %s: %s" % (getattr(thing, "name", thing), e))


def cleanup(keep: bool = False) -> None:
    stop_started()
    if keep:
        say("kept: %s" % " ".join(_tempdirs))
    else:
        for d in _tempdirs:
            shutil.rmtree(d, ignore_errors=True)
    _tempdirs.clear()


class _Stopped(Exception):
    pass


def _on_signal(signum, frame):
    raise _Stopped("signal %d" % signum)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="eqmail vs Postfix vs aiosmtpd (run as root)")
    p.add_argument("--quick", action="store_true", help="1 run of 500 messages")
    p.add_argument("--messages", type=int, help="messages per run (default 2000)")
    p.add_argument("--runs", type=int, help="runs per peer and concurrency (default 3)")
    p.add_argument("--peers", default="eqmail,postfix,aiosmtpd",
                   help="comma-separated subset of eqmail,postfix,aiosmtpd")
    p.add_argument("--python", help="interpreter for eqmaild (default: this one if the "
                   "daemon's user can run it, else %s)" % VENV)
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directories (homes, logs, Maildirs)")
    p.add_argument("--storage-messages", type=int, default=500,
                   help="messages of the strace'd c=20 run (default 500)")
    p.add_argument("--only", help="comma-separated parts to run: %s (default: all; the "
                   "table then shows only their rows and goes to results/partial.md)"
                   % ",".join(PARTS))
    p.add_argument("--budget-messages", type=int,
                   help="messages per c=20 run in each cgroup budget (default 2000, "
                   "--quick 300)")
    p.add_argument("--budget-runs", type=int,
                   help="runs per peer and budget (default 3, --quick 1; the median counts)")
    p.add_argument("--queue-messages", type=int,
                   help="messages deferred to the dead relay (default 20000, --quick 2000)")
    p.add_argument("--report", metavar="JSON",
                   help="print the table of a saved results file again (with this "
                   "version's layout and targets) and run nothing")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        saved["targets"] = targets(saved)
        print(markdown(saved), end="")
        return 0
    if os.geteuid() != 0:
        print("bench/run.py must run as root (users, Postfix, strace, port 53)", file=sys.stderr)
        return 2
    n = args.messages or (500 if args.quick else 2000)
    runs = args.runs or (1 if args.quick else 3)
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for x in peers:
        if x not in ("eqmail", "postfix", "aiosmtpd"):
            p.error("unknown peer %r" % x)
    parts = list(PARTS)
    if args.only:
        parts = [x.strip() for x in args.only.split(",") if x.strip()]
        for x in parts:
            if x not in PARTS:
                p.error("unknown part %r (%s)" % (x, ",".join(PARTS)))
    signal.signal(signal.SIGTERM, _on_signal)
    t_start = time.monotonic()
    now = datetime.datetime.now()
    res = {"date": now.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "messages": n, "runs_per_peer": runs,
           "concurrency": [1, 20], "peers": peers, "message_size": MSG_SIZE,
           "machine": machine_info(), "runs": [], "memory": {}, "storage": {}, "notes": [],
           "parts": parts}
    try:
        # --- installation
        ensure_tools()
        smtp_source = ensure_smtp_source()
        if "postfix" in peers:
            ensure_postfix()
            res["postfix_version"] = sh(["postconf", "-d", "-h", "mail_version"],
                                        check=False).stdout.strip()
        pw = ensure_user(DAEMON_USER, "/nonexistent")
        py = choose_python(pw, args.python)
        res["eqmail_python"] = py["eqmail"]
        res["eqmail_module"] = py["eqmail_module"]
        res["eqmail_python_version"] = sh([py["eqmail"], "-c", "import platform; "
                                           "print(platform.python_version())"]).stdout.strip()
        res["eqmail_version"] = sh([py["eqmail"], "-c", "import eqmail; print(eqmail.__version__)"],
                                   check=False, cwd="/").stdout.strip()
        git = sh(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False)
        res["eqmail_git"] = git.stdout.strip()
        res["eqmail_source_sha256"] = source_stamp()
        workdir = mkdtemp("eqmail-bench-")
        dev = device_of(workdir)

        # --- peers for the main part and the fan-out
        objs = {}
        if "main" in parts or "fanout" in parts or "chunking" in parts:
            objs = start_main_peers(res, py, pw, workdir, peers, "main" in parts)
        if "main" in parts:
            main_part(res, args, objs, smtp_source, n, runs, dev)
        # --- issue 22: DATA and BDAT, the same client and messages
        if "chunking" in parts:
            res["chunking"] = chunking_phase(objs, py["peers"], n, runs)

        # --- fan-out: one message to FANOUT_RCPTS local recipients
        if "fanout" in parts:
            fo = res["fanout"] = {"recipients": FANOUT_RCPTS}
            for i in range(runs):
                for name in ("eqmail", "postfix"):
                    if name in objs:
                        r = fanout_run(objs[name])
                        fo.setdefault(name, []).append(r)
                        say("fan-out %s run %d: %s s from the 250 to the %d-th file (%d "
                            "accepted, %d delivered)" % (name, i + 1, fmt(r["seconds"], 2),
                                                         r["accepted_rcpts"],
                                                         r["accepted_rcpts"], r["delivered"]))
        stop_started()   # the budget and queue parts start peers of their own

        # --- router budget: each peer alone in a cgroup
        if "budget" in parts:
            res["budget"] = budget_phase(py, pw, workdir, smtp_source, peers,
                                         args.budget_messages or (300 if args.quick else 2000),
                                         args.budget_runs or (1 if args.quick else 3))

        # --- queue: messages deferred to a relay that is down, then the drain
        if "queue" in parts:
            qn = args.queue_messages or (2000 if args.quick else 20000)
            cpu_s = 5.0 if args.quick else 20.0
            q = res["queue"] = {"messages": qn}
            if "eqmail" in peers:
                q["eqmail"] = queue_phase_eqmail(py, pw, workdir, smtp_source, qn, cpu_s,
                                                 retire_timeout=120.0)
            if "postfix" in peers:
                q["postfix"] = queue_phase_postfix(smtp_source, qn, cpu_s)
        # --- issue 21: the defences of a public MX, off and on
        if "defences" in parts and "eqmail" in peers:
            res["defences"] = defences_phase(py, pw, workdir, smtp_source, n, runs,
                                             with_postfix="postfix" in peers)
    except (_Stopped, KeyboardInterrupt) as e:
        say("stopped: %s" % e)
        cleanup(args.keep)
        return 1
    finally:
        cleanup(args.keep)
    res["seconds"] = round(time.monotonic() - t_start, 1)
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["summary"] = summarise(res)
    os.makedirs(RESULTS, exist_ok=True)
    base = "%s-%s" % (now.strftime("%Y-%m-%d-%H%M"), res["machine"]["host"])
    if args.quick:
        base += "-quick"
    if args.only:
        base += "-" + "-".join(parts)
    res["json"] = "bench/results/%s.json" % base
    res["targets"] = targets(res)
    with open(os.path.join(RESULTS, base + ".json"), "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    md = markdown(res)
    table = "latest.md" if set(parts) == set(PARTS) else "partial.md"
    with open(os.path.join(RESULTS, table), "w") as f:
        f.write(md)
    print()
    print(md)
    say("done in %.0f s: %s, bench/results/%s" % (res["seconds"], res["json"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
