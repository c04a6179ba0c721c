"""eqmail.durable: group directory fsync."""
import os
import threading

import pytest

from eqmail import durable


def test_concurrent_callers_share_fsyncs(tmp_path, monkeypatch):
    calls = []
    gate = threading.Event()
    real = durable._fsync

    def slow(path, *how):
        calls.append(path)
        gate.wait(2)
        real(path, *how)

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

    def tracked(path, *how):
        order.append("start")
        started.set()
        release.wait(2)
        real(path, *how)
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

    def spy(path, *how):
        calls.append((path, time.monotonic()))
        real(path, *how)

    monkeypatch.setattr(durable, "_fsync", spy)
    t0 = time.monotonic()
    for _ in range(20):  # removals in a burst: one fsync covers them
        durable.fsync_dir_soon(str(tmp_path))
    assert time.monotonic() - t0 < durable.SOON / 2
    deadline = time.monotonic() + 5
    while not any(p == str(tmp_path) for p, _ in calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(durable.SOON * 2)
    calls = [c for c in calls if c[0].startswith(str(tmp_path))]  # not earlier tests' files
    assert [p for p, _ in calls] == [str(tmp_path)]
    assert calls[0][1] - t0 < durable.SOON + 1.0


def test_sync_soon_now_runs_what_is_pending(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(durable, "_fsync", lambda path, *how: calls.append(path))
    monkeypatch.setattr(durable, "SOON", 30)  # the thread would wait long
    durable.fsync_dir_soon(str(tmp_path / "a"))
    durable.sync_soon_now()
    assert calls == [str(tmp_path / "a")]


def test_fsync_file_is_shared_and_forgets_the_file_afterwards(tmp_path, monkeypatch):
    calls = []
    gate = threading.Event()
    real = durable._fsync
    f = tmp_path / "queuefile"
    f.write_bytes(b"x")

    def slow(path, *how):
        calls.append((path, how))
        gate.wait(2)
        real(path, *how)

    monkeypatch.setattr(durable, "_fsync", slow)
    threads = [threading.Thread(target=durable.fsync_file, args=(str(f),)) for _ in range(10)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert 1 <= len(calls) <= 3 and all(how == (False,) for _, how in calls)
    assert str(f) not in durable._groups  # one group per queue file would grow for ever


def test_fsync_file_soon_skips_a_file_removed_meanwhile(tmp_path, monkeypatch):
    alerts = []
    from eqmail import log

    monkeypatch.setattr(log, "alert", alerts.append)
    monkeypatch.setattr(durable, "SOON", 30)
    f = tmp_path / "gone"
    f.write_bytes(b"x")
    durable.fsync_file_soon(str(f))
    f.unlink()
    durable.sync_soon_now()
    assert alerts == []
