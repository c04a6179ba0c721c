"""eqmaild's session workers (eqmail.workers): under load, a second process
accepts on the same listeners and runs the same sessions; the limits count
the sessions of both; eqmaild keeps the scheduling, the signals and the
stop."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import time

import pytest

from helpers import wait_log

MSG = b"Subject: worker test\r\n\r\nhello\r\n"


def start(home, daemon_factory, *args, **control):
    """eqmaild with one session worker allowed from the first connection.
    Local mail goes through the queue (control/directlocal 0), whose
    commits, scheduling and local-delivery worker these tests look at,
    unless `control` says otherwise."""
    control.setdefault("directlocal", "0\n")
    home.setup(rcpthosts=("mx.example.org", "localhost"), **control)
    return daemon_factory(home, ["--workers", "1", "--worker-load", "0"] + list(args))


def worker_pid(d, timeout=15.0) -> int:
    assert wait_log(d, "started session worker ", timeout), d.log()
    return int(re.search(r"started session worker (\d+)", d.log()).group(1))


def send(d, data=MSG):
    """One message to postmaster (the alias user's Maildir); returns the
    final reply text (``ok <time> qp <queue ID>``: the ID holds the pid of
    the process that committed it)."""
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.helo("client.example")
        s.mail("sender@example.com")
        assert s.rcpt("postmaster@mx.example.org")[0] == 250
        code, text = s.data(data)
        assert code == 250, (code, text)
        return text.decode()


def send_until_worker(d, pid, limit=50) -> list:
    """Send messages until one is committed by worker `pid`; returns the replies."""
    replies = []
    for _ in range(limit):
        replies.append(send(d))
        if ".%d." % pid in replies[-1]:
            return replies
        time.sleep(0.05)
    raise AssertionError("no session reached worker %d: %s\n%s" % (pid, replies, d.log()))


def started_worker(home, daemon_factory, *args, **control):
    """eqmaild with a worker that has served a session: (daemon, worker pid)."""
    d = start(home, daemon_factory, *args, **control)
    send(d)  # this connection starts the worker
    pid = worker_pid(d)
    send_until_worker(d, pid)
    return d, pid


@contextlib.contextmanager
def greeted(d, n: int):
    """`n` connections to `d`, each greeted with 220, closed on exit."""
    conns = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            conns.append(s)
            assert s.recv(100).startswith(b"220 ")
        yield conns
    finally:
        for s in conns:
            s.close()


def worker_cpus(pid: int) -> set:
    """The CPUs the main thread of process `pid` (eqmaild or a worker) may
    run on."""
    with open("/proc/%d/status" % pid) as f:
        text = re.search(r"^Cpus_allowed_list:\s*(\S+)", f.read(), re.M).group(1)
    out = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def sessions_in(pid: int) -> int:
    """TCP connections the process holds (its sockets that are not Unix ones)."""
    inodes = set()
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    tcp = set()
    for table in ("/proc/%d/net/tcp" % pid, "/proc/%d/net/tcp6" % pid):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "01":  # ESTABLISHED
                        tcp.add(fields[9])
        except OSError:
            pass
    return len(inodes & tcp)


def gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open("/proc/%d/status" % pid) as f:
                if "\nState:\tZ" in f.read():
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def status_field(pid: int, field: str) -> str:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def test_worker_serves_sessions_commits_and_eqmaild_delivers(home, daemon_factory):
    d = start(home, daemon_factory)
    first = send(d)  # this connection starts the worker; eqmaild serves it
    pid = worker_pid(d)
    assert ".%d." % d.proc.pid in first
    # a child of eqmaild, with eqmaild's user (the unprivileged one under CI)
    assert status_field(pid, "PPid") == str(d.proc.pid)
    assert status_field(pid, "Uid").split()[0] == str(home.uid)
    replies = [first] + send_until_worker(d, pid)
    replies += [send(d) for _ in range(5)]
    msgs = home.wait_messages(len(replies), timeout=20)
    assert len(msgs) == len(replies), d.log()
    assert all(b"hello" in m for m in msgs)
    log = d.log()
    # eqmaild logs every message it heard of, once, whoever committed it
    for r in replies:
        msgid = r.split("qp ")[1].strip()
        assert log.count("new msg %s\n" % msgid) == 1, log
    assert "Traceback" not in log
    assert home.queued() == []


def test_a_worker_delivers_local_mail_during_data_itself(home, daemon_factory):
    """With local mail written once (the default), the session worker
    writes the Maildir file before its 250; eqmaild never hears of it."""
    d = start(home, daemon_factory, directlocal="1\n")
    send(d)
    pid = worker_pid(d)
    replies = send_until_worker(d, pid)
    assert len(home.messages()) == len(replies) + 1  # no waiting
    assert pid in delivered_by(home)
    log = d.log()
    assert "new msg" not in log and "direct msg %s" % replies[-1].split("qp ")[1].strip() in log
    assert home.queued() == []


def test_limits_count_the_sessions_workers_hold(home, daemon_factory):
    d, pid = started_worker(home, daemon_factory, concurrencyincoming="3\n")
    with greeted(d, 3):
        assert sessions_in(pid) >= 1  # the limit spans both processes
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            assert s.recv(200).startswith(b"421 ")
    # the ended sessions free their places in the shared table
    deadline = time.time() + 10
    while True:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            if s.recv(200).startswith(b"220 "):
                break
        assert time.time() < deadline, d.log()
        time.sleep(0.1)


def test_the_ready_worker_accepts_and_eqmaild_leaves_it_the_connections(home,
                                                                        daemon_factory):
    d, pid = started_worker(home, daemon_factory)
    replies = [send(d) for _ in range(8)]
    # one session at a time: never more than SHARE times eqmaild's, so eqmaild
    # does not accept at all
    assert all(".%d." % pid in r for r in replies), replies
    assert len(home.wait_messages(len(replies), timeout=20)) >= len(replies)


def test_the_per_address_limit_counts_both_processes(home, daemon_factory):
    d, pid = started_worker(home, daemon_factory, concurrencyperip="2\n")
    with greeted(d, 2):
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            assert s.recv(200).startswith(b"421 ")
    assert wait_log(d, "smtpd: too many connections (3, 3 from 127.0.0.1)", 10), d.log()


def test_eqmaild_accepts_too_when_the_worker_holds_many_sessions(home, daemon_factory):
    d, pid = started_worker(home, daemon_factory)
    with greeted(d, 5) as held:
        assert sessions_in(pid) == 5  # eqmaild left them to the worker
        time.sleep(0.3)  # 5 > 3 x (0 + 1): eqmaild accepts as well now
        more = []
        # eqmaild and the worker each keep their threads on one CPU
        # (eqmail.cpu), and both are woken for each connection: the one on
        # the CPU the connection comes from runs as soon as the client
        # waits for the greeting, the other's idle CPU must be woken first.
        # This client runs on eqmaild's CPU, so eqmaild wins some of the
        # races (on the worker's CPU the idle worker won them all in two
        # runs of three; left to the kernel, in about one run of ten)
        mine = os.sched_getaffinity(0)
        where = worker_cpus(d.proc.pid)
        if len(where) == 1:
            os.sched_setaffinity(0, where)
        try:
            # where both accept, the kernel wakes both and one wins: eqmaild,
            # which is idle, gets some of these
            for _ in range(60):
                time.sleep(0.01)  # eqmaild's hub looks at the share every 0.05 s
                s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
                more.append(s)
                assert s.recv(100).startswith(b"220 ")
                if sessions_in(d.proc.pid):
                    break
            assert sessions_in(d.proc.pid) >= 1, d.log()
            assert len(held) + len(more) == sessions_in(pid) + sessions_in(d.proc.pid)
        finally:
            os.sched_setaffinity(0, mine)
            for s in more:
                s.close()


def test_what_the_worker_got_is_not_passed_to_its_programs(home, daemon_factory):
    d, pid = started_worker(home, daemon_factory)
    for fd in (3, 5, 6):  # channel, session table, listener
        with open("/proc/%d/fdinfo/%d" % (pid, fd)) as f:
            flags = int(re.search(r"flags:\s*(\d+)", f.read()).group(1), 8)
        assert flags & os.O_CLOEXEC, (fd, oct(flags))
    assert os.readlink("/proc/%d/fd/5" % pid).startswith("/memfd:eqmail-sessions")


def test_sighup_reaches_the_worker(home, daemon_factory):
    d, pid = started_worker(home, daemon_factory)
    home.write("databytes", "50\n")
    d.signal(signal.SIGHUP)
    deadline = time.time() + 10
    while d.log().count("control files reloaded") < 2:  # eqmaild and its worker
        assert time.time() < deadline, d.log()
        time.sleep(0.05)
    for _ in range(6):  # whichever process serves it, the new limit holds
        with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
            s.helo("client.example")
            s.mail("sender@example.com")
            s.rcpt("postmaster@mx.example.org")
            code, _ = s.data(MSG + b"x" * 200 + b"\r\n")
            assert code == 552


def test_sigterm_stops_the_worker_with_eqmaild(home, daemon_factory):
    d, pid = started_worker(home, daemon_factory)
    assert d.stop() == 0
    assert gone(pid, 10)
    assert "session worker %d stopped" % pid in d.log()


def test_idle_worker_stops_and_a_new_one_starts_under_load(home, daemon_factory):
    d = start(home, daemon_factory, "--worker-idle", "0.5")
    send(d)
    pid = worker_pid(d)
    assert wait_log(d, "session worker %d stopped" % pid, 15), d.log()
    assert gone(pid, 10)
    send(d)  # busy again: another worker
    deadline = time.time() + 15
    while len(re.findall(r"started session worker (\d+)", d.log())) < 2:
        assert time.time() < deadline, d.log()
        time.sleep(0.05)


def test_a_dead_worker_frees_its_sessions_and_eqmaild_goes_on(home, daemon_factory):
    d, pid = started_worker(home, daemon_factory, concurrencyincoming="2\n")
    with greeted(d, 2):
        assert sessions_in(pid) >= 1
        os.kill(pid, signal.SIGKILL)
        assert wait_log(d, "session worker %d killed by signal 9" % pid, 10), d.log()
    # its sessions no longer count; eqmaild serves on its own for a while
    reply = send(d)
    assert ".%d." % d.proc.pid in reply
    assert len(home.wait_messages(3, timeout=20)) >= 3


@pytest.mark.parametrize("args", [[], ["--workers", "0"]])
def test_by_default_and_with_workers_zero_eqmaild_stays_one_process(home, daemon_factory,
                                                                     args):
    """No --workers (the default) is --workers 0: even with --worker-load 0
    and the queue path, every session and delivery stays in eqmaild."""
    home.setup(rcpthosts=("mx.example.org", "localhost"), directlocal="0\n")
    d = daemon_factory(home, args + ["--worker-load", "0"])
    for _ in range(5):
        assert ".%d." % d.proc.pid in send(d)
    assert len(home.wait_messages(5)) == 5
    assert "worker" not in d.log()
    assert not subprocess.run(["pgrep", "-P", str(d.proc.pid)],
                              capture_output=True).stdout


def test_worker_options_are_checked(home, daemon_factory):
    home.setup()
    for bad in (["--workers", "-1"], ["--workers", "x"], ["--worker-load", "-0.5"],
                ["--worker-idle", "0"]):
        d = daemon_factory(home, bad, start=False)
        d.start(wait=False)
        assert d.proc.wait(20) == 64, bad


# -- the local-delivery worker (eqmail.delivery.worker) ------------------------------------

def local_worker_pid(d, timeout=15.0) -> int:
    assert wait_log(d, "started local delivery worker ", timeout), d.log()
    return int(re.search(r"started local delivery worker (\d+)", d.log()).group(1))


def delivered_by(home) -> set:
    """Pids of the processes that wrote alias/Maildir/new (``...P<pid>Q...``)."""
    new = os.path.join(home.maildir, "new")
    names = os.listdir(new) if os.path.isdir(new) else []
    return {int(m.group(1)) for m in (re.search(r"P(\d+)Q", n) for n in names) if m}


def started_local_worker(home, daemon_factory, *args, **control):
    """eqmaild whose local-delivery worker has delivered: (daemon, its pid)."""
    d = start(home, daemon_factory, *args, **control)
    send(d)
    pid = local_worker_pid(d)
    for n in range(2, 60):
        send(d)
        home.wait_messages(n, timeout=20)
        if pid in delivered_by(home):
            return d, pid
    raise AssertionError("no delivery by worker %d: %s\n%s"
                         % (pid, delivered_by(home), d.log()))


def dot_qmail(home, name, text):
    path = os.path.join(home.path, "alias", ".qmail-" + name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    if os.geteuid() == 0:
        os.chown(path, home.uid, home.gid)


def send_to(d, rcpt, data=MSG):
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.helo("client.example")
        s.mail("sender@example.com")
        assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(data)
        assert code == 250, (code, text)
        return text.decode().split("qp ")[1].strip()


def wait_log_re(d, pattern, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, d.log())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError("no %r in the log:\n%s" % (pattern, d.log()))


def test_local_worker_delivers_and_removes_the_message(home, daemon_factory):
    d, pid = started_local_worker(home, daemon_factory)
    # a child of eqmaild with eqmaild's user; eqmaild itself delivers no more
    assert status_field(pid, "PPid") == str(d.proc.pid)
    assert status_field(pid, "Uid").split()[0] == str(home.uid)
    before = len(home.messages())
    ids = [send_to(d, "postmaster@mx.example.org") for _ in range(8)]
    msgs = home.wait_messages(before + 8, timeout=20)
    assert len(msgs) == before + 8, d.log()
    deadline = time.time() + 10
    while home.queued():  # the worker removed each finished message
        assert time.time() < deadline, (home.queued(), d.log())
        time.sleep(0.05)
    log = d.log()
    for msgid in ids:
        num = re.search(r"starting delivery (\d+): msg %s to local " % msgid, log).group(1)
        assert log.count("delivery %s: success: " % num) == 1, log
        assert log.count("end msg %s\n" % msgid) == 1, log
    assert "Traceback" not in log


def test_local_worker_runs_programs_and_hands_forwards_back(home, daemon_factory):
    d, pid = started_local_worker(home, daemon_factory)
    out = os.path.join(home.path, "piped.txt")
    dot_qmail(home, "fwd", "|cat > %s\n&postmaster@mx.example.org\n" % out)
    before = len(home.messages())
    send_to(d, "fwd@mx.example.org", b"Subject: fwd\r\n\r\nforward me\r\n")
    msgs = home.wait_messages(before + 1, timeout=20)
    assert len(msgs) == before + 1, d.log()
    assert any(b"forward me" in m for m in msgs), d.log()
    with open(out, "rb") as f:
        assert b"forward me" in f.read()
    assert re.search(r"success: .*forwarded as msg ", d.log()), d.log()


def test_local_worker_refuses_root_as_eqmaild_would(home, daemon_factory):
    d, pid = started_local_worker(home, daemon_factory)
    users = os.path.join(home.path, "users")
    os.makedirs(users, exist_ok=True)
    with open(os.path.join(users, "assign"), "w") as f:
        f.write("=rootbox:root:0:0:/:::\n.\n")
    os.chmod(users, 0o755)
    msgid = send_to(d, "rootbox@mx.example.org")
    num = wait_log_re(d, r"starting delivery (\d+): msg %s to local " % msgid).group(1)
    wait_log_re(d, r"delivery %s: deferral: Not allowed to perform deliveries as root"
                % num)
    assert msgid in home.queued()


def test_a_dead_local_worker_defers_its_deliveries_and_eqmaild_goes_on(home, daemon_factory):
    d, pid = started_local_worker(home, daemon_factory)
    dot_qmail(home, "slow", "|sleep 30\n")
    msgid = send_to(d, "slow@mx.example.org")
    num = wait_log_re(d, r"starting delivery (\d+): msg %s to local " % msgid).group(1)
    deadline = time.time() + 10
    while True:  # the program runs as the worker's child
        sleepers = _children(pid)
        if sleepers:
            break
        assert time.time() < deadline, d.log()
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        assert wait_log(d, "local delivery worker %d killed by signal 9" % pid, 10), d.log()
        wait_log_re(d, r"delivery %s: deferral: Unable to deliver: the local delivery worker "
                    r"died" % num)
    finally:
        for p in sleepers:
            try:
                os.killpg(int(p), signal.SIGKILL)  # the program has a session of its own
            except OSError:
                pass
    before = len(home.messages())
    send(d)  # delivered by eqmaild itself meanwhile
    assert len(home.wait_messages(before + 1, timeout=20)) == before + 1, d.log()
    assert msgid in home.queued()


def _children(pid: int) -> list:
    """Pids of the children of `pid` (all its threads')."""
    out = []
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, task)) as f:
            out += f.read().split()
    return out


def test_local_worker_stops_when_idle_and_with_eqmaild(home, daemon_factory):
    d, pid = started_local_worker(home, daemon_factory, "--worker-idle", "1")
    assert wait_log(d, "local delivery worker %d stopped" % pid, 15), d.log()
    assert gone(pid, 10)
    send(d)  # busy again: another one
    m = wait_log_re(d, r"started local delivery worker (?!%d\b)(\d+)" % pid)
    pid2 = int(m.group(1))
    assert d.stop() == 0
    assert gone(pid2, 10)
    assert "local delivery worker %d stopped" % pid2 in d.log()
