"""Privilege separation: eqmaild started as root binds, then runs as `eqmail`;
deliveries to other users go through the root helper."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import ROOT, free_port, wait_log

pytestmark = pytest.mark.skipif(not ROOT, reason="privilege separation needs root")

PY = sys.executable
BOB = "eqmailpsbob"


def _uid_of(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


class _Log:
    """Enough of a Daemon for wait_log: the log of a daemon started as root."""

    def __init__(self, path: str):
        self.path = path

    def log(self) -> str:
        with open(self.path, "rb") as f:
            return f.read().decode("utf-8", "replace")


def _start_as_root(home, port: int, *args):
    """`eqmail mkusers`, then eqmaild started as root on `port` with
    ``--user eqmail`` and `args`; returns (process, _Log)."""
    out = subprocess.run([PY, "-m", "eqmail", "mkusers", "--home", home.path],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out
    home.setup(rcpthosts=("localhost",))
    logpath = os.path.join(home.path, "root-daemon.log")
    log = open(logpath, "ab")
    proc = subprocess.Popen([PY, "-m", "eqmail.daemon", "--home", home.path, "--foreground",
                             "--smtp", "127.0.0.1:%d" % port, "--user", "eqmail"]
                            + list(args), stdout=log, stderr=subprocess.STDOUT, cwd="/")
    log.close()
    return proc, _Log(logpath)


@pytest.fixture
def bob():
    """A system user with a Maildir in a home of his own."""
    home = tempfile.mkdtemp(prefix="eqmail-psbob-", dir="/tmp")
    subprocess.run(["useradd", "--no-create-home", "--home-dir", home, "--shell",
                    "/usr/sbin/nologin", BOB], check=True, timeout=30)
    pw = pwd.getpwnam(BOB)
    for sub in ("", "Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        path = os.path.join(home, sub)
        os.makedirs(path, exist_ok=True)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o755)
    yield pw
    subprocess.run(["userdel", BOB], timeout=30)
    shutil.rmtree(home, ignore_errors=True)


def test_root_start_drops_to_eqmail_and_delivers_as_each_user(home, bob):
    port = free_port()
    pidfile = os.path.join(tempfile.mkdtemp(dir="/tmp"), "eqmaild.pid")
    proc, d = _start_as_root(home, port, "--pidfile", pidfile)
    eqmail = pwd.getpwnam("eqmail")
    try:
        assert wait_log(d, "eqmaild 0.1.0 started"), d.log()
        with open(pidfile) as f:
            assert int(f.read()) == proc.pid
        # the network-facing process is the service user, its helper is root
        assert _uid_of(proc.pid) == eqmail.pw_uid
        helpers = _children(proc.pid)
        assert len(helpers) == 1 and _uid_of(helpers[0]) == 0
        assert "running as user eqmail" in d.log()
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail("a@example.com", ["joe@localhost", "%s@localhost" % BOB],
                       b"Subject: privsep\r\n\r\nto two users\r\n")
        deadline = time.time() + 15
        bob_new = os.path.join(bob.pw_dir, "Maildir", "new")
        while time.time() < deadline and not (os.listdir(bob_new) and home.messages()):
            time.sleep(0.05)
        (name,) = os.listdir(bob_new)
        st = os.stat(os.path.join(bob_new, name))
        assert (st.st_uid, st.st_gid) == (bob.pw_uid, bob.pw_gid)
        alias_new = os.path.join(home.maildir, "new")
        (aname,) = os.listdir(alias_new)
        assert os.stat(os.path.join(alias_new, aname)).st_uid == pwd.getpwnam("alias").pw_uid
        # the queue belongs to the service user
        assert os.stat(os.path.join(home.path, "queue", "mess")).st_uid == eqmail.pw_uid
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not os.path.exists(pidfile)  # removed by the root helper
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in helpers):
        time.sleep(0.05)
    assert not any(_alive(p) for p in helpers)  # the helper left with eqmaild


def test_missing_user_is_exit_67(home):
    home.setup(rcpthosts=("localhost",))
    out = subprocess.run([PY, "-m", "eqmail.daemon", "--home", home.path, "--foreground",
                          "--smtp", "127.0.0.1:%d" % free_port(), "--user", "nosuchuser42"],
                         capture_output=True, timeout=30)
    assert out.returncode == 67
    assert b"no user nosuchuser42" in out.stderr


def test_session_worker_runs_as_the_service_user(home, bob):
    """Started as root, eqmaild's session worker reads the network as the
    service user too; what it commits is delivered through the root helper."""
    port = free_port()
    proc, d = _start_as_root(home, port, "--workers", "1", "--worker-load", "0")
    eqmail = pwd.getpwnam("eqmail")
    try:
        assert wait_log(d, "eqmaild 0.1.0 started"), d.log()
        by_worker, sent = None, 0
        for _ in range(50):
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.helo("client.example")
                s.mail("a@example.com")
                assert s.rcpt("%s@localhost" % BOB)[0] == 250
                code, text = s.data(b"Subject: worker\r\n\r\nvia a worker\r\n")
                assert code == 250
            sent += 1
            pid = int(text.decode().rsplit(".", 2)[1])  # queue ID: time.pid.n
            if pid != proc.pid:
                by_worker = pid
                break
            time.sleep(0.05)
        assert by_worker, d.log()
        assert _uid_of(by_worker) == eqmail.pw_uid
        assert by_worker in _children(proc.pid)
        bob_new = os.path.join(bob.pw_dir, "Maildir", "new")
        deadline = time.time() + 15
        while time.time() < deadline and len(os.listdir(bob_new)) < sent:
            time.sleep(0.05)
        names = os.listdir(bob_new)
        assert len(names) == sent, d.log()
        assert all(os.stat(os.path.join(bob_new, n)).st_uid == bob.pw_uid for n in names)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "Traceback" not in d.log()
    # deliveries keep going through the root helper: no local-delivery worker
    assert "local delivery worker" not in d.log()
