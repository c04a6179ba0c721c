"""eqmaild as a program: command line, signals, reloads, failures, listeners."""
from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, free_port, wait_log
from eqmail.smtp import reply


def run(args, **kw):
    return subprocess.run([sys.executable, "-m"] + args, capture_output=True,
                          timeout=30, **kw)


def test_help_texts_list_everything():
    out = run(["eqmail.daemon", "--help"])
    assert out.returncode == 0
    text = out.stdout.decode()
    for opt in ("--home", "--foreground", "--pidfile", "--smtp", "[::1]:2525", "EQMAIL_HOME"):
        assert opt in text
    out = run(["eqmail", "--help"])
    assert out.returncode == 0
    text = out.stdout.decode()
    tools = ("smtpd", "config-fast", "maildirmake", "qstat", "qread", "queue", "newu",
             "inject", "sendmail")
    for name in tools + ("EQMAIL_HOME", "mailq"):
        assert name in text
    for name in tools:
        sub = run(["eqmail", name, "--help"])
        assert sub.returncode == 0 and b"usage: " in sub.stdout and name.encode() in sub.stdout
    assert run(["eqmail", "nosuchtool"]).returncode == 64


def test_sighup_rereads_control_files_and_keeps_last_good(daemon, home):
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.helo("x")
        s.mail("a@example.com")
        assert s.rcpt("u@other.example")[0] == 553
    home.write("rcpthosts", "localhost\nother.example\n")
    daemon.signal(signal.SIGHUP)
    assert wait_log(daemon, "control files reloaded")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.helo("x")
        s.mail("a@example.com")
        assert s.rcpt("u@other.example")[0] == 250
    # a malformed file: one clear line naming file and line; old config stays
    home.write("rcpthosts", "localhost\nbad domain.example\n")
    daemon.signal(signal.SIGHUP)
    assert wait_log(daemon, "keeping the last good configuration")
    line = [l for l in daemon.log().splitlines() if "last good" in l][-1]
    assert "control/rcpthosts line 2" in line
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.helo("x")
        s.mail("a@example.com")
        assert s.rcpt("u@other.example")[0] == 250


def test_missing_rcpthosts_means_locals_only_not_open_relay(home, daemon_factory):
    home.setup()  # no rcpthosts file
    d = daemon_factory(home)
    assert "control/rcpthosts is missing" in d.log()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.helo("x")
        s.mail("a@example.com")
        assert s.rcpt("joe@localhost")[0] == 250
        assert s.rcpt("joe@mx.example.org")[0] == 250
        assert s.rcpt("victim@elsewhere.example") == (553, reply.NOGATEWAY.text.encode())


def test_bad_control_file_at_start_exits_78_naming_file_and_line(home, daemon_factory):
    home.setup(databytes="lots\n")
    d = daemon_factory(home, start=False)
    d.start(wait=False)
    assert d.proc.wait(20) == 78
    assert "control/databytes line 1" in d.log()
    assert "Traceback" not in d.log()


def test_port_in_use_exits_69(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        d = daemon_factory(home, start=False)
        d.port = blocker.getsockname()[1]
        d.start(wait=False)
        assert d.proc.wait(20) == 69
        assert "unable to listen on 127.0.0.1:%d" % d.port in d.log()
    finally:
        blocker.close()


def test_ipv6_listener(home, daemon_factory):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    home.setup(rcpthosts=("localhost",))
    port6 = free_port()
    d = daemon_factory(home, extra_args=["--smtp", "[::1]:%d" % port6])
    with smtplib.SMTP("::1", port6, timeout=20) as s:
        s.sendmail("a@example.com", ["six@localhost"], b"Subject: v6\r\n\r\nover IPv6\r\n")
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, d.log()
    assert b"(::1)" in msgs[0]


def test_unwritable_queue_gives_4xx_never_250(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    d = daemon_factory(home)
    mess = os.path.join(home.path, "queue", "mess")
    os.chmod(mess, 0o500)
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.helo("x")
            s.mail("a@example.com")
            s.rcpt("joe@localhost")
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.data(b"Subject: lost?\r\n\r\nx\r\n")
            # refused at DATA already, before the 354
            assert (e.value.smtp_code, e.value.smtp_error) == (451, reply.QQT_FAILURE.text.encode())
    finally:
        os.chmod(mess, 0o700)
    assert home.queued() == []


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_full_disk_gives_4xx_never_250(daemon_factory, home):
    mnt = home.path
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", mnt], check=True)
    try:
        home.setup(rcpthosts=("localhost",))
        d = daemon_factory(home)
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1500  # ~1.5 MB
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
            s.helo("x")
            s.mail("a@example.com")
            s.rcpt("joe@localhost")
            code, text = s.data(big)
            assert code == 451, text
            assert text == b"qq write error or disk full (#4.3.0)"
            # the space is back after the failed draft: a small one passes
            s.mail("a@example.com")
            s.rcpt("joe@localhost")
            assert s.data(b"Subject: small\r\n\r\nfits\r\n")[0] == 250
        assert len(home.wait_messages(1)) == 1
        d.stop()
    finally:
        subprocess.run(["umount", "-l", mnt])


def test_sigalrm_retries_deferred_deliveries_now(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    d = daemon_factory(home)
    new = os.path.join(home.maildir, "new")
    os.chmod(new, 0o500)  # delivery defers: next local retry ~100 s later
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.sendmail("a@example.com", ["joe@localhost"], b"Subject: retry\r\n\r\nx\r\n")
        assert wait_log(d, "deferral:")
    finally:
        os.chmod(new, 0o700)
    time.sleep(0.5)
    assert home.messages() == []
    d.signal(signal.SIGALRM)
    assert len(home.wait_messages(1, timeout=10)) == 1, d.log()


def test_queuelifetime_turns_deferral_into_failure(home, daemon_factory):
    """A relayed (remote) recipient whose relay refuses connections is
    deferred; after queuelifetime the next attempt fails and the message
    leaves."""
    closed = free_port()  # nothing listens there: connection refused
    home.setup(rcpthosts=("localhost",), queuelifetime="2\n",
               smtproutes=":[127.0.0.1]:%d\n" % closed)
    d = daemon_factory(home)
    env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "127.0.0.1", "RELAYCLIENT": "",
           "HOME": home.path}
    kw = dict(user=home.uid, group=home.gid, extra_groups=[]) if ROOT else {}
    out = subprocess.run([sys.executable, "-m", "eqmail", "smtpd", "--home", home.path],
                         input=b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<r@far.example>\r\n"
                               b"DATA\r\nSubject: far\r\n\r\nx\r\n.\r\nQUIT\r\n",
                         capture_output=True, timeout=30, env=env, cwd=home.path, **kw)
    assert b"\r\n250 ok " in out.stdout, out
    assert wait_log(d, "to remote r@far.example")
    assert wait_log(d, "deferral: Sorry, I wasn't able to establish an SMTP connection")
    time.sleep(2.1)  # now > birth + 2
    d.signal(signal.SIGALRM)
    assert wait_log(d, "has been in the queue too long"), d.log()
    msgid = re.search(r"new msg (\S+)", d.log()).group(1)
    assert wait_log(d, "end msg " + msgid)
    assert msgid not in home.queued()
    # what is left is the bounce to a@example.com, deferred in its turn
    assert wait_log(d, "bounce msg " + msgid)


def test_pidfile_written_refuses_second_start_and_removed(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    pidfile = os.path.join(home.path, "eqmaild.pid")
    d = daemon_factory(home, extra_args=["--pidfile", pidfile])
    with open(pidfile) as f:
        assert int(f.read()) == d.proc.pid
    second = daemon_factory(home, extra_args=["--pidfile", pidfile], start=False)
    second.start(wait=False)
    assert second.proc.wait(20) == 75
    assert "names a running eqmaild" in second.log()
    assert d.stop() == 0
    assert not os.path.exists(pidfile)


def test_detaches_without_foreground(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    pidfile = os.path.join(home.path, "eqmaild.pid")
    d = daemon_factory(home, extra_args=["--pidfile", pidfile], start=False)
    d.command = lambda: [a for a in type(d).command(d) if a != "--foreground"]
    d.start(wait=False)
    assert d.proc.wait(20) == 0  # the parent returns at once
    deadline = time.time() + 10
    while not os.path.exists(pidfile) and time.time() < deadline:
        time.sleep(0.05)
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.sendmail("a@example.com", ["joe@localhost"], b"Subject: bg\r\n\r\nx\r\n")
        assert len(home.wait_messages(1)) == 1
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 20
    while os.path.exists(pidfile) and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(pidfile)


@pytest.mark.skipif(not ROOT, reason="the root defaults need root")
def test_root_defaults_listen_on_port_25_ipv4_and_ipv6(home):
    for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.create_connection((addr, 25), timeout=1):
                pytest.skip("something already listens on port 25")
        except OSError:
            pass
    home.setup(rcpthosts=("localhost",))
    proc = subprocess.Popen([sys.executable, "-m", "eqmail.daemon", "--home", home.path,
                             "--foreground"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for addr in ("127.0.0.1", "::1"):
            deadline = time.time() + 15
            while True:
                try:
                    with socket.create_connection((addr, 25), timeout=2) as s:
                        assert s.makefile("rb").readline().startswith(b"220 mx.example.org")
                    break
                except OSError:
                    if proc.poll() == 69:
                        pytest.skip("port 25 is taken on some address (another test's peer?)")
                    if time.time() > deadline or proc.poll() is not None:
                        if addr == "::1":
                            pytest.skip("no IPv6 loopback")
                        raise
                    time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(20)
