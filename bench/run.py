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
from typing import Dict, List, Optional

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

# Targets of issue 7
TARGET_C20 = 1.2          # delivered msg/s at c=20 >= 1.2x Postfix
TARGET_C1 = 1.0           # ... at c=1 >= 1.0x
TARGET_IDLE_MB = 22.0
TARGET_REMOTE_MB = 30.0
TARGET_KB_PER_CONN = 32.0

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
                 label: str = "aiosmtpd"):
        self.python = python
        self.port = port or free_port()
        self.maildir = os.path.join(workdir, label + "-Maildir")
        self.new = os.path.join(self.maildir, "new")
        self.logfile = os.path.join(workdir, label + ".log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "AiosmtpdPeer":
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [self.python, os.path.join(BENCH, "aiosmtpd_peer.py"), "127.0.0.1",
             str(self.port), self.maildir], stdout=log, stderr=subprocess.STDOUT,
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
    `benchuser`."""
    name = "postfix"

    def __init__(self):
        sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
        sys.dont_write_bytecode = True   # leave no __pycache__ in tests/
        from peers import PostfixPeer  # noqa: E402
        self.port = free_port()
        self.peer = PostfixPeer(_SelfSignedCA(), address="127.0.0.1", port=self.port,
                                domain=DOMAIN, hostname="mx." + DOMAIN, user=MAIL_USER,
                                extra_config={"smtpd_tls_security_level": "none",
                                              "smtpd_banner": "$myhostname ESMTP Postfix"})
        _tempdirs.append(self.peer.dir)

    @property
    def new(self) -> str:
        return os.path.join(self.peer.maildir, "new")

    def start(self) -> "PostfixBench":
        _started.append(self)
        self.peer.start()
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


class EqmailPeer:
    name = "eqmail"

    def __init__(self, python: str, workdir: str, pw: pwd.struct_passwd, relay_port: int,
                 resolv_conf: Optional[str]):
        self.python = python
        self.pw = pw
        self.port = free_port()
        self.home = os.path.join(workdir, "eqmail-home")
        self.new = os.path.join(self.home, "alias", "Maildir", "new")
        self.logfile = os.path.join(workdir, "eqmaild.log")
        self.resolv_conf = resolv_conf
        self.proc: Optional[subprocess.Popen] = None
        control = os.path.join(self.home, "control")
        os.makedirs(control)
        files = {"me": DOMAIN, "locals": DOMAIN, "rcpthosts": DOMAIN,
                 # one remote delivery by IP literal, one through DNS (see remote_delivery)
                 "smtproutes": "iplit.test:[127.0.0.1]:%d\n:%s:%d" % (relay_port, RELAY_NAME,
                                                                      relay_port)}
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

    def start(self) -> "EqmailPeer":
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "eqmail.daemon", "--home", self.home, "--foreground",
             "--smtp", "127.0.0.1:%d" % self.port],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.home,
            env=self.env(), **as_user(self.pw))
        log.close()
        _started.append(self)
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


def load_run(peer, smtp_source: List[str], n: int, c: int, sample: bool) -> dict:
    """One smtp-source run against `peer`; accept and delivery times."""
    exe, libdir = smtp_source
    peer.clear()
    os.sync()
    time.sleep(0.3)
    env = dict(os.environ, LD_LIBRARY_PATH=libdir)
    cmd = [exe, "-c", "-l", str(MSG_SIZE), "-m", str(n), "-s", str(c), "-f", SENDER,
           "-t", RCPT, "127.0.0.1:%d" % peer.port]
    timeout = 30 + n / 20.0
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
           "smtp_source_rc": proc.returncode}
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
            "kernel": platform.release(), "harness_python": platform.python_version()}


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

    def add(name, value, goal, met, shown):
        out.append({"target": name, "goal": goal, "value": value, "shown": shown,
                    "met": met})

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
    return out


def markdown(res: dict) -> str:
    s = res["summary"]
    peers = res["peers"]
    mem = res.get("memory", {})
    sto = res.get("storage", {})
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
             "",
             "| metric | eqmail | postfix | aiosmtpd | eqmail/postfix | eqmail/aiosmtpd |",
             "|---|---|---|---|---|---|"]

    def row(name, cells, r1="–", r2="–"):
        lines.append("| %s | %s | %s |" % (name, " | ".join(cells), " | ".join([r1, r2])))

    for c in res["concurrency"]:
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

    mem_row("idle RSS after start (tree)", "idle", "rss_kb")
    mem_row("idle PSS after start (tree)", "idle", "pss_kb")
    mem_row("peak RSS during c=20 (tree)", "peak_c20", "rss_kb")
    mem_row("peak PSS during c=20 (tree)", "peak_c20", "pss_kb")
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
    mem_row("idle RSS after the load runs", "after_load", "rss_kb")

    def sto_row(label, k, digits):
        vals = [sto.get(p, {}).get(k) for p in ("eqmail", "postfix", "aiosmtpd")]
        row(label, [fmt(v, digits) for v in vals],
            *[fmt(ratio(vals[0], v), 2, "×") for v in vals[1:]])

    if sto:
        sto_row("fsync+fdatasync calls per delivered message", "fsync_per_msg", 2)
        sto_row("write_bytes per delivered message (KB, /proc/PID/io)", "write_kb_per_msg", 1)
        sto_row("… less cancelled_write_bytes (KB)", "net_write_kb_per_msg", 1)
        sto_row("disk sectors written per message, whole device (KB)", "device_kb_per_msg", 1)
    lines += ["", "## Targets (issue 7)", "", "| target | goal | measured | met |",
              "|---|---|---|---|"]
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "**unmet**")
        lines.append("| %s | %s | %s | %s |" % (t["target"], t["goal"], t["shown"], met))
    if res.get("notes"):
        lines += ["", "## Notes", ""] + ["- " + n for n in res["notes"]]
    lines += ["", "Raw figures: `%s`. How to read this: bench/README.md." % res["json"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def cleanup(keep: bool = False) -> None:
    while _started:
        thing = _started.pop()
        try:
            thing.stop()
        except Exception as e:  # keep stopping the others
            say("stopping %s: %s" % (getattr(thing, "name", thing), e))
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
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py must run as root (users, Postfix, strace, port 53)", file=sys.stderr)
        return 2
    n = args.messages or (500 if args.quick else 2000)
    runs = args.runs or (1 if args.quick else 3)
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for x in peers:
        if x not in ("eqmail", "postfix", "aiosmtpd"):
            p.error("unknown peer %r" % x)
    signal.signal(signal.SIGTERM, _on_signal)
    t_start = time.monotonic()
    now = datetime.datetime.now()
    res = {"date": now.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "messages": n, "runs_per_peer": runs,
           "concurrency": [1, 20], "peers": peers, "message_size": MSG_SIZE,
           "machine": machine_info(), "runs": [], "memory": {}, "storage": {}, "notes": []}
    try:
        # --- installation
        ensure_tools()
        smtp_source = ensure_smtp_source()
        if "postfix" in peers:
            ensure_postfix()
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

        # --- peers
        far = AiosmtpdPeer(py["peers"], workdir, label="far-end").start()
        dns_proc = None
        resolv = None
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
                objs[name] = EqmailPeer(py["eqmail"], workdir, pw, far.port, resolv).start()
            elif name == "postfix":
                objs[name] = PostfixBench().start()
                res["postfix_version"] = objs[name].version()
            else:
                objs[name] = AiosmtpdPeer(py["peers"], workdir).start()
        for name, peer in objs.items():
            res["memory"].setdefault(name, {})["idle"] = idle_memory(peer, settle=1.5)
            say("%s idle: %s" % (name, res["memory"][name]["idle"]))

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
    except (_Stopped, KeyboardInterrupt) as e:
        say("stopped: %s" % e)
        cleanup(args.keep)
        return 1
    finally:
        cleanup(args.keep)
    res["seconds"] = round(time.monotonic() - t_start, 1)
    res["summary"] = summarise(res)
    os.makedirs(RESULTS, exist_ok=True)
    base = "%s-%s" % (now.strftime("%Y-%m-%d-%H%M"), res["machine"]["host"])
    if args.quick:
        base += "-quick"
    res["json"] = "bench/results/%s.json" % base
    res["targets"] = targets(res)
    with open(os.path.join(RESULTS, base + ".json"), "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    md = markdown(res)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(md)
    print()
    print(md)
    say("done in %.0f s: %s, bench/results/latest.md" % (res["seconds"], res["json"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
