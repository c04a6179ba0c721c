"""Shared test helpers: throwaway homes and a real eqmaild on loopback.

As root (CI) the daemon runs as the unprivileged user ``eqmailtest``,
created here with useradd when missing, as a new user without root would
run it.  Every daemon is started on a free 127.0.0.1 port and stopped by
PID at the end of its test.

Tests that check how eqmail meets a permission it lacks (root has every
one) run that part through ``as_test_user()``: as root in a forked child
that is ``eqmailtest``, on files in a ``user_dir()`` given to that user
with ``give_to_user()``; as a normal user in the test's own process.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

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


@contextlib.contextmanager
def user_dir(prefix: str = "eqmail-test-"):
    """A throwaway directory under /tmp, mode 755, removed at the end.

    Unlike pytest's tmp_path (under /tmp/pytest-of-root, mode 700, when
    root) the test user can reach it: put there what ``as_test_user()``
    runs on, and ``give_to_user()`` it."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def give_to_user(path: str) -> None:
    """As root: `path` and everything under it owned by the test user, so
    that only the modes a test sets stand in its way.  No-op otherwise."""
    if not ROOT:
        return
    pw = ensure_user(TEST_USER)
    for top, dirs, files in os.walk(path):
        for n in [top] + [os.path.join(top, x) for x in dirs + files]:
            os.lchown(n, pw.pw_uid, pw.pw_gid)


class ChildTraceback(Exception):
    """The traceback, as text, of an exception raised in as_test_user()'s child."""


def as_test_user(func, *args, timeout: float = 60.0, **kwargs):
    """func(*args, **kwargs) as the unprivileged test user; its result.

    As root: in a forked child that drops to TEST_USER's uid and gid (no
    supplementary groups), so that file permissions apply to it.  The
    result comes back pickled; an exception (a failed assert too) is
    raised again here, caused by a ChildTraceback with the child's
    traceback.  The child never returns into pytest: it ends with
    os._exit().  Not root: func runs here, as the test runs today.
    """
    if not ROOT:
        return func(*args, **kwargs)
    pw = ensure_user(TEST_USER)
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it ends here with os._exit
        code = 1
        try:
            os.close(r)
            try:
                if "gevent" in sys.modules:  # a fresh event loop, not the parent's
                    import gevent
                    gevent.reinit()
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
                out = ("ok", func(*args, **kwargs))
            except BaseException as e:  # handed to the parent
                text = traceback.format_exc()
                try:
                    pickle.loads(pickle.dumps(e))
                    out = ("raised", e, text)
                except Exception:
                    out = ("raised", None, text)
            try:
                data = pickle.dumps(out)
            except Exception:
                data = pickle.dumps(("raised", None, "the result of %r cannot be pickled:\n%s"
                                     % (func, traceback.format_exc())))
            with os.fdopen(w, "wb") as f:
                f.write(data)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("%r as user %s took over %s s" % (func, TEST_USER, timeout))
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError("%r as user %s: the child ended (wait status %d) without a result"
                             % (func, TEST_USER, status))
    out = pickle.loads(b"".join(chunks))
    if out[0] == "ok":
        return out[1]
    _, exc, text = out
    if exc is None:
        exc = AssertionError("in the child as user %s:\n%s" % (TEST_USER, text))
    raise exc from ChildTraceback("as user %s:\n%s" % (TEST_USER, text))


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


def wait_greeting(proc, port: int, log, timeout: float = 15.0) -> None:
    """Wait until the eqmaild `proc` greets on 127.0.0.1:`port` (the port is
    bound before the daemon serves).  `log()` gives its log for the
    AssertionError raised when it exits or stays silent."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("eqmaild exited with %s:\n%s" % (proc.returncode, log()))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.makefile("rb").readline().startswith(b"220 "):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("eqmaild did not listen within %s s:\n%s" % (timeout, log()))


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
        give_to_user(self.path)

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
        wait_greeting(self.proc, self.port, self.log, timeout)

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


