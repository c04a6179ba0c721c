"""Shared test helpers: throwaway homes and a real eqmaild on loopback.

As root (CI) the daemon runs as the unprivileged user ``eqmailtest``,
created here with useradd when missing, as a new user without root would
run it.  Every daemon is started on a free 127.0.0.1 port and stopped by
PID at the end of its test.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

TEST_USER = "eqmailtest"
ROOT = os.geteuid() == 0


def ensure_user(name: str):
    """The passwd entry of the system user `name`, created (no home, no
    shell) when running as root; the current user's entry otherwise."""
    if not ROOT:
        return pwd.getpwuid(os.getuid())
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, timeout=30)
        return pwd.getpwnam(name)


def _test_user():
    """(uid, gid) the daemon runs as; creates the user when root."""
    pw = ensure_user(TEST_USER)
    return pw.pw_uid, pw.pw_gid


def wait_log(daemon, text: str, timeout: float = 15.0) -> bool:
    """Wait until `text` shows up in the daemon's log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in daemon.log():
            return True
        time.sleep(0.05)
    return False


def _reachable_by_others(path: str) -> bool:
    path = os.path.realpath(path)
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Home:
    """A throwaway eqmail home owned by the daemon's user."""

    def __init__(self):
        self.uid, self.gid = _test_user()
        self.path = tempfile.mkdtemp(prefix="eqmail-test-", dir="/tmp")
        os.chmod(self.path, 0o755)
        self.control = os.path.join(self.path, "control")
        self.maildir = os.path.join(self.path, "alias", "Maildir")

    def setup(self, me="mx.example.org", locals_=("mx.example.org", "localhost"),
              rcpthosts=None, **files):
        """Write control files; `files` maps control file names to text."""
        os.makedirs(self.control, exist_ok=True)
        self.write("me", me + "\n")
        self.write("locals", "".join(d + "\n" for d in locals_))
        if rcpthosts is not None:
            self.write("rcpthosts", "".join(d + "\n" for d in rcpthosts))
        for name, text in files.items():
            self.write(name, text)
        return self

    def write(self, name: str, text: str) -> None:
        os.makedirs(self.control, exist_ok=True)
        with open(os.path.join(self.control, name), "w") as f:
            f.write(text)

    def chown(self) -> None:
        if ROOT:
            for top, dirs, files in os.walk(self.path):
                for n in [top] + [os.path.join(top, x) for x in dirs + files]:
                    os.lchown(n, self.uid, self.gid)

    def messages(self):
        """Bytes of every message in alias/Maildir/new, oldest first."""
        new = os.path.join(self.maildir, "new")
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def wait_messages(self, count: int, timeout: float = 15.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            msgs = self.messages()
            if len(msgs) >= count:
                return msgs
            time.sleep(0.05)
        return self.messages()

    def queued(self):
        d = os.path.join(self.path, "queue", "mess")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


class Daemon:
    """A real eqmaild process on a free loopback port, as the test user."""

    def __init__(self, home: Home, extra_args=(), env=None):
        self.home = home
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.env = dict(env or {})  # extra environment, e.g. EQMAIL_RESOLV_CONF
        self.proc = None
        self.logfile = os.path.join(home.path, "daemon.log")

    def command(self):
        return [sys.executable, "-m", "eqmail.daemon", "--home", self.home.path,
                "--foreground", "--smtp", "127.0.0.1:%d" % self.port] + self.extra_args

    def start(self, wait: bool = True):
        if ROOT and not _reachable_by_others(sys.executable):
            pytest.fail("the daemon tests run eqmaild as user %s, who cannot run %s: "
                        "use tests/run" % (TEST_USER, sys.executable))
        self.home.chown()
        kwargs = {}
        if ROOT:
            kwargs = dict(user=self.home.uid, group=self.home.gid, extra_groups=[])
        env = {"PATH": "/usr/bin:/bin", "HOME": self.home.path, "LANG": "C.UTF-8"}
        env.update(self.env)
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.home.path, env=env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, **kwargs)
        log.close()
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 15.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("eqmaild exited with %s:\n%s"
                                     % (self.proc.returncode, self.log()))
            try:
                # the port is bound before the daemon serves: wait for a greeting
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if s.makefile("rb").readline().startswith(b"220 "):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("eqmaild did not listen within %s s:\n%s" % (timeout, self.log()))

    def log(self) -> str:
        """The daemon's log so far: lines logged before the call are in it
        (the daemon writes them within eqmail.log.WRITE_DELAY seconds)."""
        from eqmail import log

        time.sleep(log.WRITE_DELAY + 0.04)
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("eqmaild ignored SIGTERM for %s s" % timeout)

    def kill9(self):
        self.proc.kill()
        self.proc.wait(5)


