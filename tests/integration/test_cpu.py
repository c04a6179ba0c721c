"""eqmaild's threads on one CPU, the programs it starts on all (eqmail.cpu).

The threads of a running eqmaild (the hub, the threadpool, the log writer)
are read from /proc/PID/task/*/status; a dot-qmail program line prints the
CPUs it may use, which reach the delivery report in the log.
"""
from __future__ import annotations

import os
import re
import smtplib

import pytest

from helpers import wait_log

from test_batteries import alias_home, message

ALLOWED = os.sched_getaffinity(0)


def cpus(text: str) -> set:
    """'0-2,5' -> {0, 1, 2, 5}"""
    out = set()
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def thread_cpus(pid: int) -> dict:
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                status = f.read()
        except FileNotFoundError:
            continue
        out[int(tid)] = cpus(re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M).group(1))
    return out


def deliver_to_program(home, d) -> set:
    """Send a message to the program line; return the CPUs it reported."""
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        assert s.sendmail("cpu@example.com", ["cpu@localhost"],
                          message("cpu", 1)) == {}
    assert wait_log(d, "did 0+0+1/"), d.log()
    # the log shows the program's tab as "_"
    got = re.search(r"did 0\+0\+1/Cpus_allowed_list:[\s_]*([0-9,-]+)", d.log())
    assert got, d.log()
    return cpus(got.group(1))


def started(home, daemon_factory, args=()):
    home.setup(rcpthosts=("localhost",))
    alias_home(home, {".qmail-cpu": "|grep Cpus_allowed_list /proc/self/status\n"})
    d = daemon_factory(home, extra_args=args)
    # a direct delivery: the threadpool has threads after it
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        assert s.sendmail("cpu@example.com", ["joe@localhost"], message("warm", 1)) == {}
    return d


needs_two = pytest.mark.skipif(len(ALLOWED) < 2, reason="one CPU: nothing to pin")


@needs_two
def test_threads_on_one_cpu_and_programs_on_all(home, daemon_factory):
    d = started(home, daemon_factory)
    want = max(ALLOWED)
    assert wait_log(d, "threads on CPU %d" % want), d.log()
    threads = thread_cpus(d.proc.pid)
    assert len(threads) >= 2, threads  # the hub and at least the log writer
    assert set(map(frozenset, threads.values())) == {frozenset({want})}, threads
    assert deliver_to_program(home, d) == ALLOWED
    # the thread that started the program is pinned again afterwards
    assert set(map(frozenset, thread_cpus(d.proc.pid).values())) == {frozenset({want})}


@needs_two
def test_cpu_any_leaves_the_kernel_the_choice(home, daemon_factory):
    d = started(home, daemon_factory, ["--cpu", "any"])
    assert "threads on CPU" not in d.log()
    assert set(map(frozenset, thread_cpus(d.proc.pid).values())) == {frozenset(ALLOWED)}
    assert deliver_to_program(home, d) == ALLOWED


@needs_two
def test_cpu_by_number(home, daemon_factory):
    want = min(ALLOWED)
    d = started(home, daemon_factory, ["--cpu", str(want)])
    assert wait_log(d, "threads on CPU %d" % want), d.log()
    assert set(map(frozenset, thread_cpus(d.proc.pid).values())) == {frozenset({want})}


@needs_two
def test_a_session_worker_keeps_its_threads_on_another_cpu(home, daemon_factory):
    from test_workers import started_worker

    d, pid = started_worker(home, daemon_factory)
    mine = max(ALLOWED)
    assert set(map(frozenset, thread_cpus(d.proc.pid).values())) == {frozenset({mine})}
    theirs = max(ALLOWED - {mine})
    worker = thread_cpus(pid)
    assert len(worker) >= 2, worker
    assert set(map(frozenset, worker.values())) == {frozenset({theirs})}, worker


def test_a_cpu_it_may_not_use_is_a_warning(home, daemon_factory):
    d = started(home, daemon_factory, ["--cpu", "4095"])
    assert wait_log(d, "unable to keep the threads on one CPU: CPU 4095 is not one"), d.log()
    assert set(map(frozenset, thread_cpus(d.proc.pid).values())) == {frozenset(ALLOWED)}


def test_a_bad_choice_is_a_usage_error():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "eqmail.daemon", "--cpu", "two"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 64
    assert "argument --cpu: not auto, any or a CPU number: 'two'" in r.stderr
    assert "Traceback" not in r.stderr
