"""The session table eqmaild and its session workers share
(eqmail.concurrency): concurrencyincoming and concurrencyperip across
processes."""
from __future__ import annotations

import os
import time

import pytest

from eqmail import concurrency
from eqmail.concurrency import SLOTS, SessionTable, address_key


@pytest.fixture
def table(tmp_path):
    t = SessionTable.create(str(tmp_path))
    yield t
    t.close()


def test_limits_in_all_and_per_address(table):
    assert table.enter(0, "192.0.2.1", 3, 2) == (True, 1, 1)
    assert table.enter(1, "192.0.2.1", 3, 2) == (True, 2, 2)
    # a third from that address: over concurrencyperip, and nothing counted
    assert table.enter(1, "192.0.2.1", 3, 2) == (False, 3, 3)
    assert table.total() == 2
    assert table.enter(1, "2001:db8::1", 3, 2) == (True, 3, 1)
    # a fourth in all: over concurrencyincoming
    assert table.enter(0, "2001:db8::2", 3, 2) == (False, 4, 1)
    table.leave(1, "192.0.2.1")
    assert table.enter(0, "192.0.2.1", 3, 2) == (True, 3, 2)
    for owner, ip in ((0, "192.0.2.1"), (0, "192.0.2.1"), (1, "2001:db8::1")):
        table.leave(owner, ip)
    assert table.total() == 0


def test_ipv4_mapped_addresses_count_as_ipv4(table):
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7")
    assert table.enter(0, "192.0.2.7", 10, 1)[0]
    assert table.enter(1, "::ffff:192.0.2.7", 10, 1) == (False, 2, 2)


def test_an_address_that_is_not_one_is_still_counted_apart(table):
    key = address_key("not an address")
    assert len(key) == 16 and key not in (address_key("0.0.0.0"), address_key("::"))
    assert table.enter(0, "not an address", 10, 1)[0]
    assert table.enter(0, "192.0.2.1", 10, 1)[0]
    assert not table.enter(0, "not an address", 10, 1)[0]


def test_owner_sessions_and_last_change(table):
    assert table.owner(2) == (0, 0.0)
    before = time.monotonic()
    table.enter(2, "192.0.2.1", 10, 10)
    table.enter(2, "192.0.2.2", 10, 10)
    sessions, last = table.owner(2)
    assert sessions == 2 and before <= last <= time.monotonic()
    table.leave(2, "192.0.2.2")
    assert table.owner(2)[0] == 1
    assert table.owner(0) == (0, 0.0)


def test_clear_forgets_one_owner_only(table):
    table.enter(1, "192.0.2.1", 10, 10)
    table.enter(1, "192.0.2.2", 10, 10)
    table.enter(2, "192.0.2.1", 10, 10)
    assert table.clear(1) == 2
    assert table.owner(1) == (0, 0.0)
    assert table.total() == 1
    assert table.enter(0, "192.0.2.1", 10, 2) == (True, 2, 2)  # owner 2's still counts


def test_free_slots_are_used_again(table):
    for i in range(50):
        assert table.enter(0, "192.0.2.%d" % (i % 5), 100, 100)[0]
        table.leave(0, "192.0.2.%d" % (i % 5))
    assert table._high() == 1


def test_a_full_table_refuses(table):
    for i in range(SLOTS):
        assert table.enter(0, "10.%d.%d.1" % (i >> 8, i & 255), 10 ** 6, 10)[0]
    assert table.enter(0, "192.0.2.1", 10 ** 6, 10)[0] is False
    assert table.enter(0, "10.0.0.1", 10 ** 6, 10)[0]  # a slot it has already


def test_a_worker_sees_and_changes_the_same_counts(table):
    """A child process that inherits the descriptor (as posix_spawn's dup2
    gives it) counts in the same table, under the same lock: two processes
    racing for the last places never get more than the limit."""
    rounds = 300

    def churn(t, owner):
        for _ in range(2000):
            if t.enter(owner, "192.0.2.1", 400, 1000)[0]:
                t.leave(owner, "192.0.2.1")

    go_r, go_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker"
        try:
            child = SessionTable.attach(table.fd)
            os.read(go_r, 1)
            churn(child, 1)
            got = sum(child.enter(1, "192.0.2.1", 400, 1000)[0] for _ in range(rounds))
            os.write(got_w, b"%d" % got)
        finally:
            os._exit(0)
    os.write(go_w, b"x")
    churn(table, 0)
    got = sum(table.enter(0, "192.0.2.1", 400, 1000)[0] for _ in range(rounds))
    os.waitpid(pid, 0)
    theirs = int(os.read(got_r, 20))
    for fd in (go_r, go_w, got_r, got_w):
        os.close(fd)
    assert got + theirs == 400
    assert table.total() == 400
    assert table.owner(0)[0] == got and table.owner(1)[0] == theirs
    assert table.enter(0, "192.0.2.1", 400, 1000) == (False, 401, 401)


def test_attach_refuses_a_descriptor_too_small(tmp_path):
    path = tmp_path / "small"
    path.write_bytes(b"x")
    fd = os.open(str(path), os.O_RDWR)
    try:
        with pytest.raises(OSError):
            SessionTable.attach(fd)
    finally:
        os.close(fd)


def test_without_memfd_an_unlinked_file_then_private_memory(tmp_path, monkeypatch):
    def no_memfd(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(concurrency.os, "memfd_create", no_memfd)
    t = SessionTable.create(str(tmp_path))
    try:
        assert t.fd >= 0 and os.fstat(t.fd).st_nlink == 0
        assert os.listdir(str(tmp_path)) == []
    finally:
        t.close()
    t = SessionTable.create(str(tmp_path / "missing"))  # no O_TMPFILE either
    try:
        assert t.fd == -1
        assert t.enter(0, "192.0.2.1", 1, 1)[0]
        assert not t.enter(0, "192.0.2.2", 1, 1)[0]
    finally:
        t.close()


def test_a_table_no_worker_shares_is_private_memory_without_a_lock(tmp_path, monkeypatch):
    """eqmaild without workers (the default): no descriptor, no fcntl lock
    per session, the same counting."""
    locks = []
    monkeypatch.setattr(concurrency.fcntl, "lockf", lambda *a: locks.append(a))
    t = SessionTable.create(str(tmp_path), shared=False)
    try:
        assert t.fd == -1
        assert t.enter(0, "192.0.2.1", 2, 1)[0]
        assert not t.enter(0, "192.0.2.1", 2, 1)[0]  # per address
        assert t.enter(0, "192.0.2.2", 2, 1)[0]
        assert not t.enter(0, "192.0.2.3", 2, 1)[0]  # in all
        t.leave(0, "192.0.2.1")
        assert t.enter(0, "192.0.2.3", 2, 1)[0]
        assert locks == []
    finally:
        t.close()


def test_the_heap_goes_back_once_a_burst_of_sessions_is_over(tmp_path, monkeypatch):
    """After heap.SESSIONS_BURST sessions at once, the last one to leave
    makes eqmaild give the freed heap back a second later; a quiet spell
    after a small load does not."""
    import gevent

    from eqmail import heap, workers

    calls = []
    monkeypatch.setattr(heap, "give_back", lambda: calls.append(1))
    monkeypatch.setattr(workers, "_quiet", workers._AfterBurst())
    table = SessionTable.create(str(tmp_path), shared=False)

    def burst(n):
        for i in range(n):
            counted, total, _ = table.enter(0, "10.0.%d.%d" % (i // 200, i % 200), 1000, 1000)
            assert counted
            workers._quiet.note(total)
        for i in range(n):
            table.leave(0, "10.0.%d.%d" % (i // 200, i % 200))
            workers._quiet.left(table)

    burst(heap.SESSIONS_BURST - 1)
    gevent.sleep(1.3)
    assert calls == []
    burst(heap.SESSIONS_BURST)
    assert calls == []  # not at once: a second later
    gevent.sleep(1.3)
    assert calls == [1]
    # sessions again within that second: nothing is given back while they run
    burst(heap.SESSIONS_BURST)
    table.enter(0, "10.9.9.9", 1000, 1000)
    gevent.sleep(1.3)
    assert calls == [1]
    table.close()
