"""eqmail.log: synchronous lines by default, batched off the hub in the daemon."""
import os
import re
import subprocess
import sys
import threading
import time

import gevent
import pytest

from eqmail import log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(autouse=True)
def restore():
    yield
    log.stop_batching()
    log.to_stderr()
    log.set_prefix("")


class FileLog:
    """log.to_file() on a temporary file, with os.write wrapped so every
    write to that file is recorded (and can be slowed down or held)."""

    def __init__(self, tmp_path, monkeypatch, delay=0.0, gate=None, fail=None):
        self.path = str(tmp_path / "eqmaild.log")
        log.to_file(self.path)
        st = os.stat(self.path)
        self.ident = (st.st_dev, st.st_ino)
        self.writes = []          # bytes of each write, in order
        self.threads = set()      # threads that wrote
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay, self.gate, self.fail = delay, gate, fail
        self.mu = threading.Lock()
        real = os.write

        def write(fd, data):
            try:
                st = os.fstat(fd)
            except OSError:
                return real(fd, data)
            if (st.st_dev, st.st_ino) != self.ident:
                return real(fd, data)
            with self.mu:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.gate is not None:
                    self.gate.wait(10)
                if self.delay:
                    time.sleep(self.delay)
                if self.fail is not None and self.fail.is_set():
                    raise OSError(5, "Input/output error")
                n = real(fd, data)
                self.writes.append(bytes(data[:n]))
                self.threads.add(threading.get_ident())
                return n
            finally:
                with self.mu:
                    self.in_flight -= 1

        monkeypatch.setattr(os, "write", write)

    def lines(self):
        """The logged texts, without the timestamp."""
        with open(self.path) as f:
            raw = f.read().splitlines()
        for one in raw:
            assert re.match(STAMP + " ", one), one
        return [one[20:] for one in raw]


def settle(cond, timeout=5.0):
    """Let the hub run until cond() holds."""
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        gevent.sleep(0.002)


# -- synchronous (tools, tests, eqmail smtpd, before the hub) -----------------

class FakeStderr:
    def __init__(self):
        self.calls = []

    def write(self, s):
        self.calls.append(("write", s))

    def flush(self):
        self.calls.append(("flush",))


def test_sync_stderr_writes_and_flushes_each_line(monkeypatch):
    err = FakeStderr()
    monkeypatch.setattr(sys, "stderr", err)
    log.set_prefix("p: ")
    log.new_msg("1.2.3")
    assert len(err.calls) == 2
    assert re.fullmatch(STAMP + r" p: new msg 1\.2\.3\n", err.calls[0][1])
    assert err.calls[1] == ("flush",)
    log.end_msg("1.2.3")
    assert len(err.calls) == 4 and err.calls[2][1].endswith(" p: end msg 1.2.3\n")


def test_sync_file_is_one_write_per_line_at_once(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch)
    for i in range(3):
        log.line("line %d" % i)
        assert len(f.writes) == i + 1          # written before line() returned
    assert f.lines() == ["line 0", "line 1", "line 2"]
    assert f.threads == {threading.get_ident()}


def test_sync_never_raises(tmp_path, monkeypatch):
    fail = threading.Event()
    fail.set()
    FileLog(tmp_path, monkeypatch, fail=fail)
    log.line("lost")            # EIO: swallowed
    log.flush()                 # nothing pending, no batching: a no-op


def test_flush_without_batching_is_a_noop(monkeypatch):
    err = FakeStderr()
    monkeypatch.setattr(sys, "stderr", err)
    log.flush()
    assert err.calls == []


# -- batching in the hub --------------------------------------------------------

def test_one_loop_iteration_is_one_write(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    for i in range(25):
        log.line("first %d" % i)
    time.sleep(0.05)                           # the writer could run, the hub not
    assert f.writes == []                      # nothing written before the hub runs
    for i in range(25, 50):
        log.line("first %d" % i)
    settle(lambda: len(f.writes) == 1)
    gevent.sleep(0.05)
    assert len(f.writes) == 1
    for i in range(10):
        log.line("second %d" % i)
    settle(lambda: len(f.writes) == 2)
    gevent.sleep(0.05)
    assert len(f.writes) == 2
    assert f.lines() == ["first %d" % i for i in range(50)] + \
        ["second %d" % i for i in range(10)]
    assert threading.get_ident() not in f.threads   # written off the hub


def test_lines_of_many_loop_iterations_share_one_write(tmp_path, monkeypatch):
    monkeypatch.setattr(log, "WRITE_DELAY", 0.5)
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    for i in range(5):
        log.line("line %d" % i)
        gevent.sleep(0.01)                     # a new hub loop iteration each
    assert f.writes == []                      # the writer waits WRITE_DELAY
    settle(lambda: len(f.writes) == 1)
    assert f.lines() == ["line %d" % i for i in range(5)]


def test_greenlets_keep_order_one_write_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(log, "WRITE_DELAY", 0)     # writes while lines come
    f = FileLog(tmp_path, monkeypatch, delay=0.002)   # a slow disk
    log.start_batching()
    seq = iter(range(10 ** 6))

    def worker(g):
        for n in range(100):
            log.line("seq %d g %d n %d" % (next(seq), g, n))
            if n % 3 == 0:
                gevent.sleep(0)
            if n % 10 == 0:
                gevent.sleep(0.001)            # the hub blocks; writes happen

    gevent.joinall([gevent.spawn(worker, g) for g in range(20)])
    settle(lambda: sum(w.count(b"\n") for w in f.writes) == 2000)
    got = [int(one.split()[1]) for one in f.lines()]
    assert got == list(range(2000))            # the order line() was called in
    assert f.max_in_flight == 1                # never two writes at once
    assert 1 < len(f.writes) < 500             # batched, and lines that came
    assert all(w.endswith(b"\n") for w in f.writes)  # during a write went on


def test_threads_and_hub_share_the_writer(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch, delay=0.001)
    log.start_batching()

    def thread_worker(t):
        for n in range(200):
            log.line("thread %d n %d" % (t, n))

    threads = [threading.Thread(target=thread_worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for n in range(200):
        log.line("hub n %d" % n)
        if n % 10 == 0:
            gevent.sleep(0)
    for t in threads:
        t.join(10)
    settle(lambda: len(f.lines()) == 1000)
    lines = f.lines()
    for who in ["hub"] + ["thread %d" % t for t in range(4)]:
        mine = [one for one in lines if one.startswith(who + " n ")]
        assert mine == ["%s n %d" % (who, n) for n in range(200)]
    assert f.max_in_flight == 1


def test_thread_lines_do_not_wait_for_the_hub(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    t = threading.Thread(target=log.line, args=("from a thread",))
    t.start()
    t.join(5)
    deadline = time.time() + 5
    while not f.writes:                        # the hub does not run here
        assert time.time() < deadline
        time.sleep(0.01)
    assert f.lines() == ["from a thread"]


def test_flush_writes_pending_lines_now(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    log.line("a")
    log.line("b")
    assert f.writes == []
    log.flush()
    assert f.lines() == ["a", "b"] and len(f.writes) == 1
    log.flush()                                # nothing pending
    gevent.sleep(0.05)                         # the queued callback finds nothing
    assert len(f.writes) == 1


def test_flush_waits_for_the_write_in_flight(tmp_path, monkeypatch):
    gate = threading.Event()
    f = FileLog(tmp_path, monkeypatch, gate=gate)
    log.start_batching()
    log.line("in flight")
    settle(lambda: f.in_flight == 1)
    log.line("pending")
    threading.Timer(0.2, gate.set).start()
    log.flush()
    assert f.lines() == ["in flight", "pending"]
    assert f.max_in_flight == 1


def test_failing_destination_never_raises_and_writer_survives(tmp_path, monkeypatch):
    fail = threading.Event()
    fail.set()
    f = FileLog(tmp_path, monkeypatch, fail=fail)
    log.start_batching()
    log.line("lost 1")
    gevent.sleep(0.05)
    log.line("lost 2")
    log.flush()
    fail.clear()
    log.line("kept")
    settle(lambda: f.writes)
    assert f.lines() == ["kept"]


def test_drop_bound_and_notice(tmp_path, monkeypatch):
    monkeypatch.setattr(log, "MAX_PENDING", 2000)
    gate = threading.Event()
    f = FileLog(tmp_path, monkeypatch, gate=gate)
    log.start_batching()
    log.line("stuck")
    settle(lambda: f.in_flight == 1)           # the disk hangs
    for n in range(300):
        log.line("line %03d %s" % (n, "x" * 40))
    assert log._pending_size <= 2000 + 80      # memory stays bounded
    gate.set()
    settle(lambda: any(b"dropped" in w for w in f.writes))
    log.line("after")
    settle(lambda: f.lines()[-1:] == ["after"])
    lines = f.lines()
    kept = [one for one in lines if one.startswith("line ")]
    assert 20 <= len(kept) < 300
    assert kept == ["line %03d %s" % (n, "x" * 40) for n in range(len(kept))]
    assert lines == ["stuck"] + kept + ["log: dropped %d lines" % (300 - len(kept)),
                                        "after"]


def test_dropped_notice_on_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(log, "MAX_PENDING", 100)
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    for n in range(10):
        log.line("line %d %s" % (n, "y" * 30))
    log.flush()
    assert f.lines()[-1] == "log: dropped 8 lines"


def test_syslog_gets_one_call_per_line(monkeypatch):
    import syslog

    calls = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: None)
    monkeypatch.setattr(syslog, "syslog",
                        lambda prio, msg: calls.append((msg, threading.get_ident())))
    log.to_syslog("test")
    log.start_batching()
    for i in range(3):
        log.line("sys %d" % i)
    assert calls == []
    settle(lambda: len(calls) == 3)
    assert [re.sub("^" + STAMP + " ", "", m) for m, _ in calls] == \
        ["sys 0", "sys 1", "sys 2"]
    assert not any(m.endswith("\n") for m, _ in calls)
    assert threading.get_ident() not in {t for _, t in calls}


def test_stderr_batched(monkeypatch):
    err = FakeStderr()
    monkeypatch.setattr(sys, "stderr", err)
    log.start_batching()
    log.line("e1")
    log.line("e2")
    assert err.calls == []
    settle(lambda: len(err.calls) == 2)
    assert re.fullmatch(STAMP + " e1\n" + STAMP + " e2\n", err.calls[0][1])
    assert err.calls[1] == ("flush",)


def test_timestamp_is_taken_when_logged(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    monkeypatch.setattr(log.time, "time", lambda: 1000000000.0)
    log.line("then")
    monkeypatch.setattr(log.time, "time", lambda: 1500000000.0)
    log.flush()
    with open(f.path) as fh:
        stamp = fh.read()[:19]
    assert stamp == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1000000000))


def test_stop_batching_goes_back_to_synchronous(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    log.line("batched")
    log.stop_batching()
    assert f.lines() == ["batched"]
    log.line("sync")
    assert f.lines() == ["batched", "sync"] and len(f.writes) == 2


def test_forked_child_logs_synchronously(tmp_path, monkeypatch):
    f = FileLog(tmp_path, monkeypatch)
    log.start_batching()
    log.line("parent, pending")
    pid = os.fork()
    if pid == 0:
        try:
            log.line("child")
            os._exit(0 if not log._batching and not log._pending else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert f.lines() == ["child"]              # at once, without the parent's line
    settle(lambda: len(f.lines()) == 2)
    gevent.sleep(0.05)
    assert f.lines() == ["child", "parent, pending"]


def test_pending_lines_are_written_at_exit(tmp_path):
    code = ("import eqmail, sys; from eqmail import log; "
            "assert eqmail.__file__.startswith(sys.argv[1]); "
            "log.start_batching(); log.line('at exit 1'); log.line('at exit 2')")
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code, ROOT], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(STAMP + " at exit 1\n" + STAMP + " at exit 2\n", r.stderr)
