"""Helpers for the packaging tests: the installed entry points, throwaway
homes whose alias user is unprivileged, swaks, and processes found by the
home they serve (so that a test stops only what it started, by PID).

The tests run the console scripts of the virtualenv that runs pytest
(``/opt/eqmail-test-venv`` under tests/run as root), because that is what an
init script or xinetd execs: ``VENV/bin/eqmaild`` through its #! line.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import TEST_USER, _reachable_by_others, ensure_user, free_port  # noqa: F401

ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INIT_SCRIPT = os.path.join(REPO, "init", "eqmaild")
INIT_DEFAULT = os.path.join(REPO, "init", "eqmaild.default")
XINETD_SERVICE = os.path.join(REPO, "init", "xinetd.d", "eqmail-smtp")
#: What `service` and init give an init script: no inherited HOME, a plain PATH.
SCRIPT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def need_root(what: str) -> None:
    if not ROOT:
        pytest.skip("%s needs root" % what)


def entry_point(name: str) -> str:
    """VENV/bin/NAME of the interpreter running the tests, usable by others."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.access(path, os.X_OK):
        pytest.fail("%s is missing: install eqmail into the test virtualenv "
                    "(tests/run does)" % path)
    if not _reachable_by_others(path) or not _reachable_by_others(os.path.realpath(sys.executable)):
        pytest.fail("%s is not reachable by other users: use tests/run" % path)
    return path


def make_home(owner_uid: int, owner_gid: int, whole: bool = False) -> str:
    """A home with control files for mx.example.org and localhost and the
    alias user's catch-all Maildir, alias/ owned by `owner` (qmail never
    delivers as root); everything owned by `owner` when `whole`."""
    home = tempfile.mkdtemp(prefix="eqmail-pkg-", dir="/tmp")
    os.chmod(home, 0o755)
    control = os.path.join(home, "control")
    os.makedirs(control)
    for name, text in (("me", "mx.example.org\n"),
                       ("locals", "mx.example.org\nlocalhost\n"),
                       ("rcpthosts", "mx.example.org\nlocalhost\n")):
        with open(os.path.join(control, name), "w") as f:
            f.write(text)
    alias = os.path.join(home, "alias")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(alias, "Maildir", sub), mode=0o700)
    with open(os.path.join(alias, ".qmail-default"), "w") as f:
        f.write("./Maildir/\n")
    if whole:  # HOME/log: where the xinetd service's sessions log
        os.makedirs(os.path.join(home, "log"), mode=0o750)
    chown_tree(home if whole else alias, owner_uid, owner_gid)
    return home


def chown_tree(top: str, uid: int, gid: int) -> None:
    for d, dirs, files in os.walk(top):
        for n in [d] + [os.path.join(d, x) for x in dirs + files]:
            os.lchown(n, uid, gid)


def delivered(home: str):
    new = os.path.join(home, "alias", "Maildir", "new")
    return sorted(os.path.join(new, n) for n in os.listdir(new)) if os.path.isdir(new) else []


def wait_delivered(home: str, count: int = 1, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        files = delivered(home)
        if len(files) >= count:
            return files
        time.sleep(0.1)
    return delivered(home)


def greeting(port: int, timeout: float = 10.0) -> bytes:
    """The first line the server on 127.0.0.1:`port` sends (b"" if none)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                line = s.makefile("rb").readline()
                if line:
                    s.sendall(b"QUIT\r\n")
                    return line
        except OSError:
            pass
        time.sleep(0.1)
    return b""


SMTP_LINE = re.compile(r"^<-  \d{3}[ -]")


def swaks(port: int, to: str, expect_ok: bool = True, timeout: float = 60.0) -> str:
    """Send one message with swaks to 127.0.0.1:`port`; returns its output."""
    if shutil.which("swaks") is None:
        pytest.fail("swaks is missing (tests/run installs it as root)")
    r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port),
                        "--from", "sender@example.com", "--to", to,
                        "--helo", "client.example.com",
                        "--header", "Subject: packaging test", "--timeout", "30"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout)
    out = r.stdout.decode("utf-8", "replace")
    if expect_ok:
        assert r.returncode == 0, "swaks failed (%d):\n%s" % (r.returncode, out)
    return out


def server_lines(swaks_output: str):
    """What the server sent, as swaks shows it (`<-` lines)."""
    return [l for l in swaks_output.splitlines() if l.startswith("<-")]


# -- processes ------------------------------------------------------------------------

def _cmdline(pid: int) -> bytes:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state_ppid(pid: int):
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rpartition(")")[2].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None, None


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    state, _ = _state_ppid(pid)
    return state is not None and state != "Z"


def processes_of(home: str):
    """PIDs of live processes whose command line names `home`."""
    needle = home.encode()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and needle in _cmdline(int(name)):
            if alive(int(name)):
                out.append(int(name))
    return out


def daemons_of(home: str):
    """The top-level eqmaild processes for `home`: matching processes whose
    parent is not one of them (a delivery child or a helper forked by the
    daemon is not a second daemon)."""
    pids = set(processes_of(home))
    tops = []
    for pid in pids:
        _, ppid = _state_ppid(pid)
        if ppid not in pids and b"eqmaild" in _cmdline(pid):
            tops.append(pid)
    return sorted(tops)


def wait_gone(pids, timeout: float = 15.0) -> list:
    deadline = time.time() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.time() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def kill_all(pids) -> None:
    """SIGTERM, then SIGKILL after a bound, each by PID."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if alive(p)]
        for p in left:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        if not wait_gone(left, 10.0):
            return


def read_log(home: str) -> str:
    try:
        with open(os.path.join(home, "log", "eqmaild.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def wait_log(home: str, text: str, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in read_log(home):
            return True
        time.sleep(0.1)
    return False
