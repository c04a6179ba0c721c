"""The scheduler keeps deferred messages on disk, not in memory (issue:
footprint, "a queue that grows on disk"): a real Store and Scheduler in
this process, remote deliveries to a relay that refuses connections."""
from __future__ import annotations

import os
import socket
import time

import gevent
import pytest

from eqmail.control import ConfigHolder
from eqmail.queue import scheduler as sched_mod
from eqmail.queue.scheduler import Scheduler, pack_id, unpack_id
from eqmail.queue.store import Store


@pytest.mark.parametrize("msgid", ["1796511126.17246.861", "0.0.0", "4294967295.1.2"])
def test_pack_id_round_trips(msgid):
    assert unpack_id(pack_id(msgid)) == msgid


@pytest.mark.parametrize("msgid", ["01.2.3", "1.2", "1.2.3.4", "4294967296.1.2", "a.b.c", "1..2"])
def test_pack_id_refuses_what_it_cannot_give_back(msgid):
    assert pack_id(msgid) is None


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


@pytest.fixture
def home(tmp_path):
    c = tmp_path / "control"
    c.mkdir()
    (c / "me").write_text("mx.example.org\n")
    (c / "locals").write_text("mx.example.org\n")
    (c / "smtproutes").write_text(":127.0.0.1:%d\n" % dead_port())
    (c / "timeoutconnect").write_text("1\n")
    return str(tmp_path)


def commit(store, n):
    ids = []
    for i in range(n):
        d = store.draft()
        d.write(b"Received: test\nSubject: %d\n\nbody\n" % i)
        ids.append(d.commit("s@mx.example.org", ["r%d@far.test" % i]).id)
    return ids


def wait(cond, timeout=20.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline
        gevent.sleep(0.05)


def test_deferred_messages_are_parked_and_come_back_when_due(home, monkeypatch):
    monkeypatch.setattr(sched_mod, "ACTIVE_MAX", 10)
    store = Store.open(home)
    s = Scheduler(ConfigHolder(home), store)
    s.start()
    most = [0]

    def watch():
        while True:
            most[0] = max(most[0], len(s.entries))
            gevent.sleep(0.001)

    watcher = gevent.spawn(watch)
    try:
        ids = commit(store, 30)
        wait(lambda: s.parked() == 30 and not s.entries)
        assert most[0] <= 10  # never more than ACTIVE_MAX in memory
        now = time.time()
        for msgid in ids:  # the next try (remote: about 400 s on) is on disk
            assert os.stat(store.message_path(msgid)).st_mtime > now + 300
        # SIGALRM: every parked message is read back and tried again
        s.retry_now()
        wait(lambda: s.parked() == 30 and not s.entries and s.inflight["remote"] == 0)
        assert most[0] <= 10
    finally:
        watcher.kill()
        s.stop(5)

    # a restart keeps them on disk, with their schedule: nothing is tried
    s2 = Scheduler(ConfigHolder(home), Store.open(home))
    s2.start()
    try:
        assert s2.parked() == 30 and not s2.entries
        gevent.sleep(0.5)
        assert s2.inflight["remote"] == 0 and s2.parked() == 30
    finally:
        s2.stop(5)


def test_a_restart_keeps_the_oldest_due_messages_and_parks_the_rest(home, monkeypatch):
    """At start the queue directory is walked unsorted: the messages due
    now are still taken oldest first up to ACTIVE_MAX, the others due now
    are parked due at once, and those whose next try is ahead stay parked
    with it."""
    monkeypatch.setattr(sched_mod, "ACTIVE_MAX", 10)
    store = Store.open(home)
    ids = commit(store, 40)
    now = time.time()
    due, ahead = ids[:25], ids[25:]
    for msgid in due:  # never tried: due now
        os.utime(store.message_path(msgid), (now - 60, now - 60))
    for msgid in ahead:  # deferred: the next try (qmail's schedule) in an hour
        os.utime(store.message_path(msgid), (now + 3600, now + 3600))
    s = Scheduler(ConfigHolder(home), Store.open(home))
    s.start()  # its loop has not run yet: nothing started
    try:
        assert sorted(s.entries) == sorted(due[:10])
        assert s.parked() == 30
        keys = sorted(s._parked)
        assert [k >> sched_mod._DUE for k in keys[:15]] == [0] * 15  # due now
        # ahead: the earlier of the file's mtime and qmail's schedule from
        # the message's age (a new remote message: about 400 s)
        assert all(now + 300 < k >> sched_mod._DUE <= now + 3601 for k in keys[15:])
        parked_ids = sorted(sched_mod.unpack_id(k & sched_mod._ID_MASK) for k in keys)
        assert parked_ids == sorted(due[10:] + ahead)
    finally:
        s.stop(5)
