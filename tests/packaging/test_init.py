"""init/eqmaild, the LSB init script: start-stop-daemon with eqmaild's own
pidfile, matched with --pidfile and --name (the process is python3 running
VENV/bin/eqmaild, so /proc/PID/exe is the interpreter and only comm names
the daemon).

As root only, on loopback: the script runs with a defaults file of the
test's own (EQMAILD_DEFAULTS) that points DAEMON at the test virtualenv's
eqmaild, HOME at a throwaway home and PIDFILE at a temporary file; nothing
under /etc or /run is touched.  Every process the tests start is found by
its home and stopped by PID at the end.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from packaging_helpers import (INIT_DEFAULT, INIT_SCRIPT, SCRIPT_ENV, TEST_USER, alive,
                               daemons_of, ensure_user, entry_point,
                               free_port, greeting, kill_all, make_home, need_root,
                               processes_of, read_log, swaks, wait_delivered, wait_gone,
                               wait_log)


def run_script(defaults: str, action: str, timeout: float = 90.0):
    env = dict(SCRIPT_ENV, EQMAILD_DEFAULTS=defaults)
    r = subprocess.run(["/bin/sh", INIT_SCRIPT, action], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace")


class Setup:
    def __init__(self):
        self.user = ensure_user(TEST_USER)
        self.daemon = entry_point("eqmaild")
        self.home = make_home(self.user.pw_uid, self.user.pw_gid)
        self.tmp = tempfile.mkdtemp(prefix="eqmail-init-")  # root's, 0700: like /run
        self.pidfile = os.path.join(self.tmp, "eqmaild.pid")
        self.port = free_port()
        self.defaults = os.path.join(self.tmp, "eqmaild")
        with open(self.defaults, "w") as f:
            f.write('DAEMON=%s\nHOME=%s\nPIDFILE=%s\nDAEMON_ARGS="--smtp 127.0.0.1:%d"\n'
                    % (self.daemon, self.home, self.pidfile, self.port))

    def run(self, action):
        return run_script(self.defaults, action)

    def pid(self) -> int:
        with open(self.pidfile) as f:
            return int(f.read().strip())

    def logs_to_file(self) -> bool:
        # detached, eqmaild logs to syslog when /dev/log exists
        return not os.path.exists("/dev/log")

    def cleanup(self):
        kill_all(processes_of(self.home))
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def setup():
    need_root("the init script test (start-stop-daemon, other users)")
    s = Setup()
    yield s
    s.cleanup()


def _why(s: Setup, out: str) -> str:
    return "script output:\n%s\neqmaild log:\n%s" % (out, read_log(s.home))


def test_lifecycle(setup):
    s = setup
    rc, out = s.run("status")
    assert rc == 3, "status before start: LSB 3 expected\n" + out

    rc, out = s.run("start")
    assert rc == 0, _why(s, out)
    assert os.path.exists(s.pidfile), "no pidfile after start\n" + _why(s, out)
    pid = s.pid()
    assert alive(pid), _why(s, out)
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        assert b"eqmaild" in f.read()
    with open("/proc/%d/comm" % pid) as f:
        # what --name matches: the basename of the script exec'd through #!
        assert f.read().strip() == "eqmaild"
    assert os.readlink("/proc/%d/exe" % pid).startswith("/usr/bin/python3")
    assert daemons_of(s.home) == [pid]
    assert greeting(s.port).startswith(b"220 "), _why(s, out)

    swaks(s.port, "joe@localhost")
    files = wait_delivered(s.home, 1)
    assert len(files) == 1, "not delivered to alias/Maildir/new\n" + _why(s, out)
    # delivered as the alias user (alias/ belongs to it), never as root
    assert os.stat(files[0]).st_uid == s.user.pw_uid
    with open(files[0], "rb") as f:
        assert b"Subject: packaging test" in f.read()

    # a second start: exit 0, no second daemon, the same pid
    rc, out = s.run("start")
    assert rc == 0, _why(s, out)
    assert "already running" in out
    assert s.pid() == pid
    time.sleep(0.5)
    assert daemons_of(s.home) == [pid], "a second eqmaild was started"

    rc, out = s.run("status")
    assert rc == 0, out
    assert str(pid) in out

    rc, out = s.run("reload")
    assert rc == 0, _why(s, out)
    if s.logs_to_file():
        assert wait_log(s.home, "control files reloaded"), _why(s, out)
    assert s.pid() == pid and alive(pid)
    assert daemons_of(s.home) == [pid]

    rc, out = s.run("force-reload")
    assert rc == 0, _why(s, out)
    assert s.pid() == pid and alive(pid)

    rc, out = s.run("flush")
    assert rc == 0, _why(s, out)
    if s.logs_to_file():
        assert wait_log(s.home, "retrying"), _why(s, out)
    assert alive(pid)

    rc, out = s.run("restart")
    assert rc == 0, _why(s, out)
    assert not alive(pid)
    pid2 = s.pid()
    assert pid2 != pid and alive(pid2)
    assert daemons_of(s.home) == [pid2]
    assert greeting(s.port).startswith(b"220 ")

    started = time.time()
    rc, out = s.run("stop")
    assert rc == 0, _why(s, out)
    assert time.time() - started < 40
    assert not os.path.exists(s.pidfile), "pidfile left after stop"
    assert not alive(pid2), "eqmaild still running after stop"
    left = wait_gone(processes_of(s.home), 15.0)
    assert not left, "processes left after stop: %s" % left
    assert greeting(s.port, timeout=1) == b""

    rc, out = s.run("stop")
    assert rc == 0, "stop when not running must exit 0 (LSB)\n" + out
    assert "not running" in out

    rc, out = s.run("status")
    assert rc == 3, out

    rc, out = s.run("reload")
    assert rc == 7, "reload when not running: LSB 7\n" + out


def test_dead_daemon_with_pidfile(setup):
    """status says 1 for a pidfile whose daemon died; start replaces it."""
    s = setup
    rc, out = s.run("start")
    assert rc == 0, _why(s, out)
    pid = s.pid()
    os.kill(pid, signal.SIGKILL)
    # until init reaps it, a zombie still counts as running for
    # start-stop-daemon (comm is kept): wait for /proc/PID to go
    deadline = time.time() + 15
    while os.path.exists("/proc/%d" % pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists("/proc/%d" % pid)
    kill_all(processes_of(s.home))  # a helper the daemon may have forked
    # a crash leaves the pidfile behind (unless a helper of the daemon
    # removed it): make sure it names the dead daemon
    with open(s.pidfile, "w") as f:
        f.write("%d\n" % pid)

    rc, out = s.run("status")
    assert rc == 1, "status with a stale pidfile: LSB 1\n" + out

    rc, out = s.run("start")
    assert rc == 0, _why(s, out)
    pid2 = s.pid()
    assert pid2 != pid and alive(pid2)
    assert daemons_of(s.home) == [pid2]

    rc, out = s.run("stop")
    assert rc == 0, _why(s, out)
    assert not alive(pid2)
    assert not os.path.exists(s.pidfile)


def test_start_fails_when_port_taken(setup):
    """A start that cannot listen exits non-zero and leaves nothing running."""
    s = setup
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", s.port))
    blocker.listen(1)
    try:
        rc, out = s.run("start")
    finally:
        blocker.close()
    assert rc not in (0, 1, 3), "start on a taken port must fail\n" + out
    assert "failed" in out
    assert "unable to listen" in out, out  # eqmaild's own error line reaches the console
    assert not processes_of(s.home)
    rc, out = s.run("status")
    assert rc == 3, out


def test_pidfile_only_matching(setup):
    """NAME= (empty) matches on the root-owned pidfile alone, for a DAEMON
    that is not exec'd through its own #! line."""
    s = setup
    with open(s.defaults, "a") as f:
        f.write("NAME=\n")
    rc, out = s.run("start")
    assert rc == 0, _why(s, out)
    pid = s.pid()
    rc, out = s.run("start")
    assert rc == 0 and "already running" in out, _why(s, out)
    assert s.pid() == pid and daemons_of(s.home) == [pid]
    rc, out = s.run("status")
    assert rc == 0, out
    rc, out = s.run("stop")
    assert rc == 0, _why(s, out)
    assert not alive(pid) and not os.path.exists(s.pidfile)
    rc, out = s.run("status")
    assert rc == 3, out


def test_missing_daemon(setup):
    s = setup
    with open(s.defaults, "a") as f:
        f.write("DAEMON=%s\n" % os.path.join(s.tmp, "no-such-eqmaild"))
    rc, out = s.run("start")
    assert rc == 5, "start without the program: LSB 5\n" + out
    rc, out = s.run("stop")
    assert rc == 0, out


# -- the files themselves (no root needed) ------------------------------------------

def test_script_header_and_syntax():
    with open(INIT_SCRIPT) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh\n")
    assert os.access(INIT_SCRIPT, os.X_OK)
    header = text.split("### BEGIN INIT INFO", 1)[1].split("### END INIT INFO", 1)[0]
    fields = dict(re.findall(r"^# ([A-Za-z-]+):\s+(.*)$", header, re.M))
    assert fields["Provides"] == "eqmaild"
    assert fields["Required-Start"].split() == ["$local_fs", "$remote_fs", "$network",
                                                "$syslog"]
    assert fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert fields["Default-Stop"].split() == ["0", "1", "6"]
    for sh in ("sh", "dash", "bash"):
        if shutil.which(sh):
            r = subprocess.run([sh, "-n", INIT_SCRIPT], capture_output=True, timeout=30)
            assert r.returncode == 0, (sh, r.stderr)
    # matched by pidfile and process name, never by --exec (the interpreter)
    assert "--exec" not in re.sub(r"#.*", "", text)
    assert "--make-pidfile" not in re.sub(r"#.*", "", text)
    assert "--retry" in text and "TERM/30/KILL/5" in text
    assert "/lib/lsb/init-functions" in text


def test_defaults_file_is_shell():
    r = subprocess.run(["/bin/sh", "-c", '. "$1" && echo "$HOME|$PIDFILE|$DAEMON_ARGS"',
                        "sh", INIT_DEFAULT], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/var/qmail|/run/eqmaild.pid|"
    with open(INIT_DEFAULT) as f:
        text = f.read()
    # lintian: init.d-script-should-always-start-service
    assert not re.search(r"^\s*ENABLED=", text, re.M)
    assert "#DAEMON_ARGS=\"--user" in text  # privilege separation: an example only


def test_usage():
    r = subprocess.run(["/bin/sh", INIT_SCRIPT, "bogus"], env=dict(SCRIPT_ENV),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "Usage:" in r.stderr
