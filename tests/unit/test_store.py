"""The durable queue (eqmail.queue.store) and the retry schedule.

Behaviour reference sections 5.2 and 5.3, test vector T45, and the
format and crash states documented in eqmail/queue/store.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from eqmail.delivery.route import LOCAL, REMOTE
from eqmail.queue import store as store_mod
from eqmail.queue.scheduler import next_retry
from eqmail.queue.store import (Item, QueueError, Store, decode_envelope,
                                encode_envelope)

ROOT = os.geteuid() == 0


@pytest.fixture
def store(tmp_path):
    return Store.open(str(tmp_path))


def files(store):
    return {d: sorted(os.listdir(os.path.join(store.qdir, d)))
            for d in ("mess", "tmp", "envelope")}


def empty(store):
    return files(store) == {"mess": [], "tmp": [], "envelope": []}


def commit(store, data=b"Received: x\nhello\n", sender="s@x.org", rcpts=("a@y", "b@z"), **kw):
    d = store.draft()
    d.write(data)
    return d.commit(sender, list(rcpts), **kw)


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- layout ---------------------------------------------------------------------------


def test_open_creates_layout(tmp_path):
    s = Store.open(str(tmp_path))
    q = tmp_path / "queue"
    for d in ("mess", "tmp", "envelope", "lock"):
        assert (q / d).is_dir()
        assert (os.stat(q / d).st_mode & 0o777) == 0o700
    assert os.path.exists(s.trigger)
    import stat
    assert stat.S_ISFIFO(os.stat(s.trigger).st_mode)
    # opening again is fine
    Store.open(str(tmp_path))


def test_open_without_create_needs_queue(tmp_path):
    with pytest.raises(OSError):
        Store.open(str(tmp_path / "nothing"), create=False)
    Store.open(str(tmp_path))
    assert Store.open(str(tmp_path), create=False).qdir == str(tmp_path / "queue")


# -- draft / commit / load -------------------------------------------------------------


def test_round_trip(store):
    data = b"Received: from x\n  by y\nSubject: s\n\nbody\n" + bytes(range(256))
    t0 = int(time.time())
    d = store.draft()
    assert d.id in store.open_drafts
    for i in range(0, len(data), 7):
        d.write(data[i:i + 7])
    item = d.commit("s@x.org", ["a@y", "b@z", "c@w"])
    t1 = int(time.time())
    assert d.id not in store.open_drafts
    assert item.id == d.id
    assert item.sender == "s@x.org"
    assert item.recipients == ["a@y", "b@z", "c@w"]
    assert item.done == [False, False, False]
    assert item.size == len(data)
    assert t0 <= item.birth <= t1
    assert item.uid == os.getuid() and item.pid == os.getpid()

    loaded = store.load(item.id)
    assert loaded.id == item.id
    assert loaded.sender == "s@x.org"
    assert loaded.recipients == ["a@y", "b@z", "c@w"]
    assert loaded.done == [False, False, False]
    assert loaded.birth == item.birth
    assert loaded.size == len(data)
    assert loaded.offsets == item.offsets
    assert loaded.uid == os.getuid() and loaded.pid == os.getpid()
    assert loaded.pending() == [0, 1, 2]
    with open(store.message_path(item.id), "rb") as f:
        assert f.read() == data
    assert files(store) == {"mess": [item.id], "tmp": [], "envelope": [item.id]}
    assert store.ids() == [item.id]
    assert [i.id for i in store.items()] == [item.id]


def test_id_format(store):
    d = store.draft()
    t, p, s = d.id.split(".")
    assert abs(int(t) - time.time()) < 5
    assert int(p) == os.getpid()
    assert int(s) >= 1
    d.abort()


def test_large_message_written_in_chunks(store):
    data = os.urandom(store_mod.CHUNK * 3 + 123)
    d = store.draft()
    for i in range(0, len(data), 10000):
        d.write(data[i:i + 10000])
    item = d.commit("", ["a@y"])
    with open(store.message_path(item.id), "rb") as f:
        assert f.read() == data
    assert store.load(item.id).size == len(data)
    assert store.load(item.id).sender == ""


def test_commit_explicit_uid_pid_and_empty_recipients(store):
    item = commit(store, rcpts=(), uid=77, pid=4242)
    loaded = store.load(item.id)
    assert (loaded.uid, loaded.pid) == (77, 4242)
    assert loaded.recipients == [] and loaded.pending() == []


def test_unusual_addresses_round_trip(store):
    rcpts = ["x y@example.org", "caf\u00e9@example.org", "postmaster", "weird\udcff@x"]
    item = commit(store, sender="\u00e9@b", rcpts=rcpts)
    loaded = store.load(item.id)
    assert loaded.sender == "\u00e9@b"
    assert loaded.recipients == rcpts


def test_on_commit_callback(store):
    seen = []
    store.on_commit = seen.append
    item = commit(store)
    assert [i.id for i in seen] == [item.id]


def test_load_missing_mess_size(store):
    item = commit(store)
    os.unlink(store.message_path(item.id))
    assert store.load(item.id).size == -1


def test_load_missing_envelope(store):
    with pytest.raises(OSError):
        store.load("1.2.3")


def test_commit_twice_refused(store):
    d = store.draft()
    d.write(b"x")
    d.commit("s", ["r"])
    with pytest.raises(QueueError):
        d.commit("s", ["r"])
    assert len(store.ids()) == 1


def test_drafts_have_distinct_ids(store):
    drafts = [store.draft() for _ in range(20)]
    assert len({d.id for d in drafts}) == 20
    for d in drafts:
        d.abort()
    assert empty(store)


# -- abort ------------------------------------------------------------------------------


def test_abort_leaves_nothing(store):
    d = store.draft()
    d.write(b"x" * (store_mod.CHUNK + 10))  # some of it is on disk already
    assert os.listdir(store.mess) == [d.id]
    d.abort()
    assert empty(store)
    assert store.open_drafts == set()
    d.abort()  # twice is harmless
    with pytest.raises(QueueError):
        d.commit("s", ["r"])
    assert empty(store)


def test_abort_after_commit_is_noop(store):
    d = store.draft()
    d.write(b"x")
    item = d.commit("s", ["r"])
    d.abort()
    assert files(store) == {"mess": [item.id], "tmp": [], "envelope": [item.id]}


# -- commit failures ----------------------------------------------------------------------


def test_commit_failure_rename_leaves_nothing(store):
    d = store.draft()
    d.write(b"data\n")
    shutil.rmtree(store.envelope)
    with pytest.raises(QueueError) as ei:
        d.commit("s", ["r"])
    assert ei.value.text == "qq trouble creating files in queue (#4.3.0)"
    assert os.listdir(store.mess) == [] and os.listdir(store.tmp) == []
    assert store.open_drafts == set()


def test_draft_failure_without_mess_dir(store):
    shutil.rmtree(store.mess)
    with pytest.raises(QueueError) as ei:
        store.draft()
    assert "(#4.3.0)" in ei.value.text


@pytest.mark.skipif(ROOT, reason="root ignores permissions")
def test_draft_into_read_only_mess_raises_queue_error(store):
    os.chmod(store.mess, 0o500)
    try:
        with pytest.raises(QueueError):
            d = store.draft()
            d.write(b"x")
            d.commit("s", ["r"])
    finally:
        os.chmod(store.mess, 0o700)
    assert empty(store)


@pytest.mark.skipif(ROOT, reason="root ignores permissions")
@pytest.mark.parametrize("which", ["tmp", "envelope"])
def test_commit_into_read_only_dir_raises_queue_error(store, which):
    d = store.draft()
    d.write(b"x\n")
    path = os.path.join(store.qdir, which)
    os.chmod(path, 0o500)
    try:
        with pytest.raises(QueueError):
            d.commit("s", ["r"])
    finally:
        os.chmod(path, 0o700)
    assert empty(store)


def test_write_error_kept_and_raised_by_commit(store, monkeypatch):
    import errno

    d = store.draft()

    def fail(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_all", fail)
    d.write(b"x" * (store_mod.CHUNK + 1))  # flushes, fails, keeps the error
    d.write(b"more")
    with pytest.raises(QueueError) as ei:
        d.commit("s", ["r"])
    assert ei.value.text == "qq write error or disk full (#4.3.0)"
    monkeypatch.undo()
    assert empty(store)


# -- envelope format -------------------------------------------------------------------------


def test_encode_envelope_bytes():
    data, offsets = encode_envelope(100, 5, 7, "s@x", ["a@y", "b@z"])
    assert data == b"V1\0B100\0u5\0p7\0Fs@x\0Ta@y\0Tb@z\0"
    assert [data[o:o + 1] for o in offsets] == [b"T", b"T"]
    assert data[offsets[0]:].startswith(b"Ta@y\0")
    assert data[offsets[1]:].startswith(b"Tb@z\0")


def test_decode_envelope():
    item = decode_envelope("1.2.3", b"V1\0B100\0u5\0p7\0Fs@x\0Ta@y\0Db@z\0Tc@w\0")
    assert isinstance(item, Item)
    assert item.id == "1.2.3"
    assert (item.birth, item.uid, item.pid, item.sender) == (100, 5, 7, "s@x")
    assert item.recipients == ["a@y", "b@z", "c@w"]
    assert item.done == [False, True, False]
    assert item.pending() == [0, 2]


def test_decode_round_trip():
    data, offsets = encode_envelope(123456, 0, 1, "", ["x", "y@z"])
    item = decode_envelope("i", data)
    assert (item.birth, item.uid, item.pid, item.sender) == (123456, 0, 1, "")
    assert item.recipients == ["x", "y@z"]
    assert item.offsets == offsets


def test_decode_skips_unknown_records():
    item = decode_envelope("i", b"V1\0Xfuture\0B5\0Zzz\0Fs\0Ta\0Qnew\0Tb\0\0")
    assert item.birth == 5 and item.sender == "s"
    assert item.recipients == ["a", "b"]
    assert item.done == [False, False]
    assert item.uid == -1 and item.pid == -1


@pytest.mark.parametrize("data", [
    b"",
    b"V2\0B1\0Fs\0Ta\0",
    b"u0\0p1\0Fs\0Ta\0",            # qmail's intd format, no version
    b"V1",                           # no NUL after the version
    b"V1\0B1\0Fs\0Ta",               # truncated last record
    b"V1\0Fs\0Ta\0",                 # no birth
    b"V1\0B1\0Ta\0",                 # no sender
    b"V1\0Bxyz\0Fs\0Ta\0",           # birth not a number
    b"V1\0B1\0uabc\0Fs\0Ta\0",        # uid not a number
])
def test_decode_malformed_raises_value_error(data):
    with pytest.raises(ValueError):
        decode_envelope("i", data)


def test_items_skip_bad_envelopes(store):
    good = commit(store)
    with open(os.path.join(store.envelope, "1.1.1"), "wb") as f:
        f.write(b"garbage")
    assert sorted(store.ids()) == sorted([good.id, "1.1.1"])
    assert [i.id for i in store.items()] == [good.id]


# -- progress: mark_done, remove ------------------------------------------------------------


def test_mark_done_persists(store):
    item = commit(store, rcpts=("a@y", "b@z", "c@w"))
    store.mark_done(item, 1)
    assert item.done == [False, True, False]
    loaded = store.load(item.id)
    assert loaded.done == [False, True, False]
    assert loaded.pending() == [0, 2]
    assert loaded.recipients == ["a@y", "b@z", "c@w"]
    # mark the others through the reloaded item
    store.mark_done(loaded, 0)
    store.mark_done(loaded, 2)
    again = store.load(item.id)
    assert again.done == [True, True, True]
    assert again.pending() == []
    with open(os.path.join(store.envelope, item.id), "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\0Da@y\0Db@z\0Dc@w\0")
    assert raw.startswith(b"V1\0")


def test_mark_done_is_idempotent(store):
    item = commit(store)
    store.mark_done(item, 0)
    store.mark_done(item, 0)
    assert store.load(item.id).done == [True, False]


def test_remove_deletes_both_files(store):
    keep = commit(store)
    item = commit(store)
    store.remove(item)
    assert not os.path.exists(os.path.join(store.envelope, item.id))
    assert not os.path.exists(store.message_path(item.id))
    assert store.ids() == [keep.id]
    with pytest.raises(OSError):
        store.load(item.id)
    store.remove(item)  # already gone: harmless
    assert files(store) == {"mess": [keep.id], "tmp": [], "envelope": [keep.id]}


# -- ids --------------------------------------------------------------------------------------


def test_ids_ordering(store):
    names = ["100.5.2", "99.7.1", "100.5.10", "100.40.1", "1000.1.1", "100.5.1"]
    for n in names:
        open(os.path.join(store.envelope, n), "wb").close()
    open(os.path.join(store.envelope, ".hidden"), "wb").close()
    assert store.ids() == ["99.7.1", "100.5.1", "100.5.2", "100.5.10", "100.40.1",
                           "1000.1.1"]


def test_ids_only_committed(store):
    d = store.draft()
    d.write(b"x")
    assert store.ids() == []
    item = d.commit("s", ["r"])
    assert store.ids() == [item.id]


def test_ids_commit_order(store):
    ids = [commit(store).id for _ in range(12)]
    assert store.ids() == ids


# -- recovery -------------------------------------------------------------------------------


def put(path, data=b"junk"):
    with open(path, "wb") as f:
        f.write(data)


def test_recover_removes_mess_without_envelope_of_dead_writer(store):
    name = "%d.%d.1" % (int(time.time()), dead_pid())
    put(os.path.join(store.mess, name))
    assert store.recover(at_start=False) == 1
    assert empty(store)


def test_recover_removes_tmp_file(store):
    pid = dead_pid()
    name = "%d.%d.1" % (int(time.time()), pid)
    put(os.path.join(store.mess, name))
    put(os.path.join(store.tmp, name))
    other = "%d.%d.2" % (int(time.time()), pid)
    put(os.path.join(store.tmp, other))
    assert store.recover(at_start=True) == 3
    assert empty(store)


def test_recover_keeps_committed_messages(store):
    item = commit(store)
    # a committed message written by a process that is gone
    name = "%d.%d.1" % (int(time.time()), dead_pid())
    put(os.path.join(store.mess, name))
    data, _ = encode_envelope(1, 0, 1, "s", ["r"])
    put(os.path.join(store.envelope, name), data)
    # and an old one
    old = "1000.%d.1" % dead_pid()
    put(os.path.join(store.mess, old))
    put(os.path.join(store.envelope, old), data)
    past = time.time() - store_mod.JUNK_AGE - 3600
    os.utime(os.path.join(store.mess, old), (past, past))
    assert store.recover(at_start=True) == 0
    assert store.recover(at_start=False) == 0
    assert sorted(files(store)["mess"]) == sorted([item.id, name, old])
    assert sorted(store.ids()) == sorted([item.id, name, old])


def test_recover_keeps_open_draft(store):
    d = store.draft()
    d.write(b"partial")
    assert store.recover(at_start=False) == 0
    assert os.listdir(store.mess) == [d.id]
    assert store.recover(at_start=True) == 0  # open here: never junk
    assert os.listdir(store.mess) == [d.id]
    item = d.commit("s", ["r"])
    assert store.load(item.id).recipients == ["r"]


def test_recover_own_pid_junk(store):
    name = "%d.%d.999" % (int(time.time()), os.getpid())
    put(os.path.join(store.mess, name))
    # this process is the writer and still runs: kept while running
    assert store.recover(at_start=False) == 0
    assert os.listdir(store.mess) == [name]
    # at start, this pid's files come from an earlier process
    assert store.recover(at_start=True) == 1
    assert empty(store)


def test_recover_live_writer_kept_until_junk_age(store):
    live = subprocess.Popen(["sleep", "30"])
    try:
        name = "%d.%d.1" % (int(time.time()), live.pid)
        path = os.path.join(store.mess, name)
        put(path)
        assert store.recover(at_start=True) == 0
        assert os.path.exists(path)
        past = time.time() - store_mod.JUNK_AGE - 60
        os.utime(path, (past, past))
        assert store.recover(at_start=True) == 1
        assert not os.path.exists(path)
    finally:
        live.kill()
        live.wait()


def test_recover_odd_names_and_non_files(store):
    put(os.path.join(store.mess, "garbage"))
    os.mkdir(os.path.join(store.mess, "1.2.3"))
    assert store.recover(at_start=False) == 1
    assert os.listdir(store.mess) == ["1.2.3"]


def test_recover_after_partial_commit(store):
    # state 3: mess + tmp written by a writer that died before the rename
    pid = dead_pid()
    name = "%d.%d.1" % (int(time.time()), pid)
    put(os.path.join(store.mess, name), b"Received: x\nhi\n")
    data, _ = encode_envelope(int(time.time()), 0, pid, "s", ["r"])
    put(os.path.join(store.tmp, name), data)
    keep = commit(store)
    assert store.recover(at_start=True) == 2
    assert files(store) == {"mess": [keep.id], "tmp": [], "envelope": [keep.id]}


# -- scheduler.next_retry (T45) ---------------------------------------------------------------


def _attempts(birth, channel, count):
    t = birth
    out = [t - birth]
    for _ in range(count - 1):
        t = next_retry(birth, t, channel)
        out.append(t - birth)
    return out


@pytest.mark.parametrize("birth", [0, 1_700_000_000])
def test_t45_local_schedule(birth):
    assert _attempts(birth, LOCAL, 5) == [0, 100, 400, 900, 1600]


@pytest.mark.parametrize("birth", [0, 1_700_000_000])
def test_t45_remote_schedule(birth):
    assert _attempts(birth, REMOTE, 7) == [0, 400, 1600, 3600, 6400, 10000, 14400]


@pytest.mark.parametrize("start,expected", [
    (0, 100), (100, 400), (400, 900), (900, 1600), (1600, 2500),
    (1, 121), (99, 361), (101, 400), (399, 841),
])
def test_next_retry_local_points(start, expected):
    assert next_retry(0, start, LOCAL) == expected


@pytest.mark.parametrize("start,expected", [
    (0, 400), (400, 1600), (1600, 3600), (3600, 6400), (6400, 10000), (10000, 14400),
    (14400, 19600), (500, 1764),
])
def test_next_retry_remote_points(start, expected):
    assert next_retry(0, start, REMOTE) == expected


def test_next_retry_late_start_and_clock_skew():
    birth = 5000.0
    # a delivery that starts late keeps to the grid of isqrt(age)
    assert next_retry(birth, birth + 150.5, LOCAL) == birth + 484
    # a clock that went backwards counts as age 0
    assert next_retry(birth, birth - 100, LOCAL) == birth + 100
    assert next_retry(birth, birth - 100, REMOTE) == birth + 400
    # next is always in the future
    for now in range(0, 20000, 37):
        assert next_retry(birth, birth + now, LOCAL) > birth + now
        assert next_retry(birth, birth + now, REMOTE) > birth + now
