"""eqmail.durable: group directory fsync."""
import os
import threading

import pytest

from eqmail import durable


def test_concurrent_callers_share_fsyncs(tmp_path, monkeypatch):
    calls = []
    gate = threading.Event()
    real = durable._fsync

    def slow(path):
        calls.append(path)
        gate.wait(2)
        real(path)

    monkeypatch.setattr(durable, "_fsync", slow)
    threads = [threading.Thread(target=durable.fsync_dir, args=(str(tmp_path),))
               for _ in range(10)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    # the first runs alone; everyone who came while it ran shares the next
    assert 1 <= len(calls) <= 3


def test_a_caller_waits_for_an_fsync_that_began_after_it(tmp_path, monkeypatch):
    order = []
    started = threading.Event()
    release = threading.Event()
    real = durable._fsync

    def tracked(path):
        order.append("start")
        started.set()
        release.wait(2)
        real(path)
        order.append("end")

    monkeypatch.setattr(durable, "_fsync", tracked)
    first = threading.Thread(target=durable.fsync_dir, args=(str(tmp_path),))
    first.start()
    started.wait(2)
    second = threading.Thread(target=lambda: (durable.fsync_dir(str(tmp_path)),
                                              order.append("second returned")))
    second.start()
    release.set()
    first.join(5)
    second.join(5)
    # the second caller came during the first fsync: it needed a new one
    assert order == ["start", "end", "start", "end", "second returned"]


def test_errors_reach_the_thread_that_ran_the_fsync(tmp_path):
    with pytest.raises(OSError):
        durable.fsync_dir(str(tmp_path / "missing"))
    durable.fsync_dir(str(tmp_path))  # the group is usable afterwards
    assert os.path.isdir(tmp_path)


def test_fsync_dir_soon_returns_at_once_and_syncs_once_within_soon(tmp_path, monkeypatch):
    import time

    calls = []
    real = durable._fsync

    def spy(path):
        calls.append((path, time.monotonic()))
        real(path)

    monkeypatch.setattr(durable, "_fsync", spy)
    t0 = time.monotonic()
    for _ in range(20):  # removals in a burst: one fsync covers them
        durable.fsync_dir_soon(str(tmp_path))
    assert time.monotonic() - t0 < durable.SOON / 2
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(durable.SOON * 2)
    assert [p for p, _ in calls] == [str(tmp_path)]
    assert calls[0][1] - t0 < durable.SOON + 1.0


def test_sync_soon_now_runs_what_is_pending(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(durable, "_fsync", calls.append)
    monkeypatch.setattr(durable, "SOON", 30)  # the thread would wait long
    durable.fsync_dir_soon(str(tmp_path / "a"))
    durable.sync_soon_now()
    assert calls == [str(tmp_path / "a")]
