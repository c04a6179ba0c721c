"""The durable queue (eqmail.queue.store) and the retry schedule.

Behaviour reference sections 5.2 and 5.3, test vector T45, and the
format and crash states documented in eqmail/queue/store.py.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest

from helpers import as_test_user, give_to_user, user_dir
from eqmail.delivery.route import LOCAL, REMOTE
from eqmail.queue import store as store_mod
from eqmail.queue.scheduler import next_retry
from eqmail.queue.store import (TRAILER_SIZE, Item, QueueError, Store, data_copy,
                                decode_envelope, encode_envelope, encode_queue_file,
                                encode_trailer, open_message)

KEY = b"\xab" * 32  # the key of keyed_store()


def keyed_store(home, birth):
    """A queue whose key was made at `birth` (unix seconds): IDs younger
    than it are written straight into mess/ (COMMIT MARK), others in tmp/."""
    lock = os.path.join(str(home), "queue", "lock")
    os.makedirs(lock, exist_ok=True)
    with open(os.path.join(lock, store_mod.KEY_FILE), "wb") as f:
        f.write(b"eqmail-queue-key 1 %d %s\n" % (birth, b"ab" * 32))
    return Store.open(str(home))


@pytest.fixture
def store(tmp_path):
    """The common case: the key is older than every message."""
    return keyed_store(tmp_path, 1000)


@pytest.fixture
def user_store():
    """`store` in a directory the test user owns and can reach, for
    as_test_user() (root's tmp_path is out of its reach)."""
    with user_dir("eqmail-store-") as d:
        s = keyed_store(d, 1000)
        give_to_user(d)
        yield s


@pytest.fixture
def tmp_store(tmp_path):
    """Messages written through tmp/ (IDs not younger than the key)."""
    return keyed_store(tmp_path, 1 << 40)


def files(store):
    return {d: sorted(os.listdir(os.path.join(store.qdir, d)))
            for d in ("mess", "tmp")}


def empty(store):
    return files(store) == {"mess": [], "tmp": []}


def data_of(store, msgid):
    with open_message(store.message_path(msgid)) as f:
        return f.read()


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
    for d in ("mess", "tmp", "bounce", "spare", "lock"):
        assert (q / d).is_dir()
        assert (os.stat(q / d).st_mode & 0o777) == 0o700
    assert not (q / "envelope").exists()  # version 1 only
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
    assert data_of(store, item.id) == data
    # one file: the data, the envelope, the trailer naming the envelope's offset
    with open(store.message_path(item.id), "rb") as f:
        raw = f.read()
    env, _ = encode_envelope(item.birth, os.getuid(), os.getpid(), "s@x.org",
                             ["a@y", "b@z", "c@w"])
    # the commit mark: keyed BLAKE2b-128 of ID NUL, data, envelope, data size
    mark = hashlib.blake2b(item.id.encode() + b"\0" + data + env + b"%d" % len(data),
                           key=KEY, digest_size=16, person=b"eqmail-queue").hexdigest()
    assert raw == data + env + b"K" + mark.encode() + b"\0" + encode_trailer(len(data))
    assert raw[-TRAILER_SIZE:] == b"\nEQMAIL-QUEUE-2 %015d\n" % len(data)
    assert [raw[o:o + 1] for o in item.offsets] == [b"T", b"T", b"T"]
    assert files(store) == {"mess": [item.id], "tmp": []}
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
    assert data_of(store, item.id) == data
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


@pytest.mark.parametrize("cut", [1, TRAILER_SIZE, 10_000])
def test_load_without_a_trailer_raises_value_error(store, cut):
    item = commit(store)
    path = store.message_path(item.id)
    size = os.path.getsize(path)
    os.truncate(path, max(0, size - cut))
    with pytest.raises(ValueError):
        store.load(item.id)
    with pytest.raises(ValueError):
        open_message(path)


def test_trailer_offset_beyond_the_file_is_refused(store):
    item = commit(store)
    path = store.message_path(item.id)
    with open(path, "r+b") as f:
        f.seek(-TRAILER_SIZE, os.SEEK_END)
        f.write(encode_trailer(10 ** 9))
    with pytest.raises(ValueError):
        store.load(item.id)


def test_message_window_reads_only_the_data(store):
    data = b"Received: x\n\nline one\nline two\n"
    item = commit(store, data=data)
    with open_message(store.message_path(item.id)) as f:
        assert f.read(4) == b"Rece"
        assert f.tell() == 4
        assert f.seek(0, os.SEEK_END) == len(data)
        assert f.read() == b""
        f.seek(0)
        assert list(f) == [b"Received: x\n", b"\n", b"line one\n", b"line two\n"]
        f.seek(-9, os.SEEK_END)
        assert f.read() == b"line two\n"
        with pytest.raises(OSError):
            f.fileno()  # its descriptor's end is not the message's
        f.seek(3)
        copy = data_copy(f)
    with copy:
        assert copy.tell() == 0
        assert os.read(copy.fileno(), 1000) == data  # a program sees only the data


def test_draft_never_takes_a_committed_name(store, monkeypatch):
    taken = commit(store, data=b"first\n")
    names = iter([taken.id, "1.2.3"])
    monkeypatch.setattr(store, "new_id", lambda: next(names))
    d = store.draft()
    d.write(b"second\n")
    assert d.commit("s", ["r"]).id == "1.2.3"
    assert store.open_drafts == set()
    assert data_of(store, taken.id) == b"first\n"
    assert data_of(store, "1.2.3") == b"second\n"


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


@pytest.mark.parametrize("direct", [True, False])
def test_abort_leaves_nothing(tmp_path, direct):
    store = keyed_store(tmp_path, 1000 if direct else 1 << 40)
    d = store.draft()
    d.write(b"x" * (store_mod.CHUNK + 10))  # some of it is on disk already
    assert files(store) == ({"mess": [d.id], "tmp": []} if direct
                            else {"mess": [], "tmp": [d.id]})
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
    assert files(store) == {"mess": [item.id], "tmp": []}


# -- commit failures ----------------------------------------------------------------------


def test_commit_failure_link_leaves_nothing(tmp_store, monkeypatch):
    store = tmp_store
    import errno

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "refused", dst)

    d = store.draft()
    d.write(b"data\n")
    monkeypatch.setattr(store_mod.os, "link", refuse)
    with pytest.raises(QueueError) as ei:
        d.commit("s", ["r"])
    assert ei.value.text == "qq trouble creating files in queue (#4.3.0)"
    assert os.listdir(store.mess) == [] and os.listdir(store.tmp) == []
    assert store.open_drafts == set()


@pytest.mark.parametrize("which", ["mess", "tmp"])
def test_draft_failure_without_queue_dir(store, which):
    shutil.rmtree(os.path.join(store.qdir, which))
    with pytest.raises(QueueError) as ei:
        store.draft()  # before any data: SMTP refuses DATA with 451
    assert "(#4.3.0)" in ei.value.text


@pytest.mark.parametrize("direct", [True, False])
def test_commit_failure_after_link_takes_the_message_back(tmp_path, monkeypatch, direct):
    import errno

    store = keyed_store(tmp_path, 1000 if direct else 1 << 40)
    store.one_fsync = False  # mess/ is fsync'd for a direct commit too

    def fail(path):
        raise OSError(errno.EIO, "I/O error")

    d = store.draft()
    d.write(b"data\n")
    monkeypatch.setattr(store_mod, "fsync_dir", fail)
    with pytest.raises(QueueError) as ei:
        d.commit("s", ["r"])
    assert ei.value.text == "qq write error or disk full (#4.3.0)"
    assert empty(store)  # a 451'd message is never delivered


def test_commit_on_a_file_system_without_hard_links(tmp_store, monkeypatch):
    import errno

    store = tmp_store
    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(store_mod.os, "link", no_links)
    item = commit(store)
    assert files(store) == {"mess": [item.id], "tmp": []}
    assert store.load(item.id).recipients == ["a@y", "b@z"]


# Root ignores permissions: as root, the tests of a queue directory or file
# that is not writable use the queue as the unprivileged test user.

def commit_id(store, **kw):
    return commit(store, **kw).id


def test_draft_into_read_only_mess_raises_queue_error(user_store):
    store = user_store
    os.chmod(store.mess, 0o500)
    try:
        with pytest.raises(QueueError):
            as_test_user(commit, store, b"x", "s", ["r"])
    finally:
        os.chmod(store.mess, 0o700)
    assert empty(store)
    msgid = as_test_user(commit_id, store)  # mess/ writable again: the same user queues
    assert files(store) == {"mess": [msgid], "tmp": []}


@pytest.mark.parametrize("which", ["mess"])
def test_commit_into_read_only_dir_raises_queue_error(user_store, which):
    store = user_store
    path = os.path.join(store.qdir, which)

    def draft_then_commit():
        d = store.draft()
        d.write(b"x\n")
        os.chmod(path, 0o500)
        d.commit("s", ["r"])

    try:
        with pytest.raises(QueueError):
            as_test_user(draft_then_commit)
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
    assert data == b"V2\0B100\0u5\0p7\0Fs@x\0Ta@y\0Tb@z\0"
    assert [data[o:o + 1] for o in offsets] == [b"T", b"T"]
    assert data[offsets[0]:].startswith(b"Ta@y\0")
    assert data[offsets[1]:].startswith(b"Tb@z\0")


def test_decode_envelope():
    item = decode_envelope("1.2.3", b"V2\0B100\0u5\0p7\0Fs@x\0Ta@y\0Db@z\0Tc@w\0")
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
    item = decode_envelope("i", b"V2\0Xfuture\0B5\0Zzz\0Fs\0Ta\0Qnew\0Tb\0\0")
    assert item.birth == 5 and item.sender == "s"
    assert item.recipients == ["a", "b"]
    assert item.done == [False, False]
    assert item.uid == -1 and item.pid == -1


@pytest.mark.parametrize("data", [
    b"",
    b"V1\0B1\0Fs\0Ta\0",              # version 1 (converted by upgrade_v1)
    b"u0\0p1\0Fs\0Ta\0",            # qmail's intd format, no version
    b"V2",                           # no NUL after the version
    b"V2\0B1\0Fs\0Ta",               # truncated last record
    b"V2\0Fs\0Ta\0",                 # no birth
    b"V2\0B1\0Ta\0",                 # no sender
    b"V2\0Bxyz\0Fs\0Ta\0",           # birth not a number
    b"V2\0B1\0uabc\0Fs\0Ta\0",        # uid not a number
])
def test_decode_malformed_raises_value_error(data):
    with pytest.raises(ValueError):
        decode_envelope("i", data)


def test_items_skip_bad_envelopes(store):
    good = commit(store)
    with open(os.path.join(store.mess, "1.1.1"), "wb") as f:
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
    with open(store.message_path(item.id), "rb") as f:
        raw = f.read()
    env, mark = store_mod.split_mark(raw[item.size:-TRAILER_SIZE])
    assert env.endswith(b"\0Da@y\0Db@z\0Dc@w\0") and len(mark) == 32
    assert raw[item.size:].startswith(b"V2\0")
    assert data_of(store, item.id) == b"Received: x\nhello\n"  # the data untouched


def test_mark_done_is_idempotent(store):
    item = commit(store)
    store.mark_done(item, 0)
    store.mark_done(item, 0)
    assert store.load(item.id).done == [True, False]


def test_remove_deletes_the_file(store):
    keep = commit(store)
    item = commit(store)
    store.remove(item)
    assert not os.path.exists(store.message_path(item.id))
    assert store.ids() == [keep.id]
    with pytest.raises(OSError):
        store.load(item.id)
    store.remove(item)  # already gone: harmless
    assert files(store) == {"mess": [keep.id], "tmp": []}


# -- spare files ------------------------------------------------------------------------------


def test_a_finished_file_is_reused_by_the_next_draft(store):
    big = commit(store, data=b"Received: x\n" + b"o" * 5000, rcpts=("old@y",))
    inode = os.stat(store.message_path(big.id)).st_ino
    store.remove(big)
    assert len(os.listdir(store.spare)) == 1
    assert not os.path.exists(store.message_path(big.id))
    item = commit(store, data=b"Received: x\nnew\n", rcpts=("new@y",))
    assert os.listdir(store.spare) == []
    st = os.stat(store.message_path(item.id))
    assert st.st_ino == inode  # the same file, no new inode
    assert st.st_mode & 0o777 == 0o600
    # cut to the new size: nothing of the old message is left
    with open(store.message_path(item.id), "rb") as f:
        raw = f.read()
    assert b"o" * 10 not in raw and b"old@y" not in raw
    assert len(raw) == st.st_size
    assert data_of(store, item.id) == b"Received: x\nnew\n"
    got = store.load(item.id)
    assert (got.recipients, got.done) == (["new@y"], [False])
    assert files(store) == {"mess": [item.id], "tmp": []}


def test_a_reused_file_grows_for_a_larger_message(store):
    small = commit(store, data=b"Received: x\ns\n")
    store.remove(small)
    data = b"Received: x\n" + b"L" * (store_mod.CHUNK * 2 + 17)
    item = commit(store, data=data)
    assert data_of(store, item.id) == data
    assert store.load(item.id).recipients == ["a@y", "b@z"]


def test_spare_files_are_bounded_in_count_and_size(store, monkeypatch):
    monkeypatch.setattr(store_mod, "SPARES", 2)
    items = [commit(store) for _ in range(4)]
    for item in items:
        store.remove(item)
    assert len(os.listdir(store.spare)) == 2
    assert store.ids() == []
    assert sorted(os.listdir(store.spare)) == ["0", "1"]
    # a drain (nothing taken from spare/) keeps no more names than slots
    assert len(store._spare_names) == 2
    huge = commit(store, data=b"Received: x\n" + b"h" * (store_mod.SPARE_SIZE + 1))
    assert len(os.listdir(store.spare)) == 1  # the commit took one
    store.remove(huge)
    assert len(os.listdir(store.spare)) == 1  # too large to keep: unlinked
    assert not os.path.exists(store.message_path(huge.id))


def test_recover_trims_spare_files(store, monkeypatch):
    for name in ("0", "2", "3", "4", "1.1.1"):
        put(os.path.join(store.spare, name))
    monkeypatch.setattr(store_mod, "SPARES", 3)
    store.recover(at_start=True)
    assert sorted(os.listdir(store.spare)) == ["0", "2"]


@pytest.mark.parametrize("kind", ["dir", "symlink", "fifo", "unwritable"])
def test_a_bad_spare_file_is_dropped(user_store, kind):
    # root writes any file: as root, the queue is used by the unprivileged test user
    store = user_store
    path = os.path.join(store.spare, "7")
    if kind == "dir":
        os.mkdir(path)
    elif kind == "symlink":
        victim = os.path.join(store.qdir, "victim")
        put(victim, b"keep me")
        os.symlink(victim, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        put(path)
        os.chmod(path, 0o400)
    give_to_user(store.qdir)
    msgid = as_test_user(commit_id, store)
    assert data_of(store, msgid) == b"Received: x\nhello\n"
    assert os.listdir(store.spare) == [] and os.listdir(store.mess) == [msgid]
    if kind == "unwritable":  # a new file, not the spare one
        assert os.stat(store.message_path(msgid)).st_mode & 0o777 == 0o600
    if kind == "symlink":
        with open(victim, "rb") as f:
            assert f.read() == b"keep me"
    assert files(store)["tmp"] == []


def test_an_unusable_spare_dir_means_plain_unlinks(store, monkeypatch):
    real = os.rename

    def rename(src, dst):
        if "/spare/" in dst:
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", rename)
    item = commit(store)
    store.remove(item)
    assert store.ids() == [] and os.listdir(store.spare) == []
    assert store.spares_on is False


def test_a_queue_without_spare_dir_still_works(tmp_path):
    Store.open(str(tmp_path))
    os.rmdir(tmp_path / "queue" / "spare")
    s = Store.open(str(tmp_path), create=False)
    item = commit(s)
    s.remove(item)
    assert s.ids() == [] and not (tmp_path / "queue" / "spare").exists()


# -- ids --------------------------------------------------------------------------------------


def test_ids_ordering(store):
    names = ["100.5.2", "99.7.1", "100.5.10", "100.40.1", "1000.1.1", "100.5.1"]
    for n in names:
        open(os.path.join(store.mess, n), "wb").close()
    open(os.path.join(store.mess, ".hidden"), "wb").close()
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


def queue_file(data=b"Received: x\nhi\n", pid=1, name=""):
    """A queue file; with `name`, commit-marked with KEY as that ID."""
    return encode_queue_file(data, int(time.time()), 0, pid, "s", ["r"],
                             key=KEY if name else None, msgid=name)


def test_recover_removes_tmp_of_dead_writer(store):
    name = "%d.%d.1" % (int(time.time()), dead_pid())
    put(os.path.join(store.tmp, name))
    assert store.recover(at_start=False) == 1
    assert empty(store)


def test_recover_removes_tmp_files(store):
    pid = dead_pid()
    put(os.path.join(store.tmp, "%d.%d.1" % (int(time.time()), pid)), queue_file())
    put(os.path.join(store.tmp, "%d.%d.2" % (int(time.time()), pid)))
    assert store.recover(at_start=True) == 2
    assert empty(store)


def test_recover_keeps_committed_messages(store):
    item = commit(store)
    # a committed message written by a process that is gone
    name = "%d.%d.1" % (int(time.time()), dead_pid())
    put(os.path.join(store.mess, name), queue_file(name=name))
    # and an old one, written before the queue had its key (no mark)
    old = "999.%d.1" % dead_pid()
    put(os.path.join(store.mess, old), queue_file())
    past = time.time() - store_mod.JUNK_AGE - 3600
    os.utime(os.path.join(store.mess, old), (past, past))
    assert store.recover(at_start=True) == 0
    assert store.recover(at_start=False) == 0
    assert sorted(files(store)["mess"]) == sorted([item.id, name, old])
    assert sorted(store.ids()) == sorted([item.id, name, old])
    assert store.load(name).recipients == ["r"]


def test_recover_keeps_open_draft(tmp_store):
    store = tmp_store
    d = store.draft()
    d.write(b"partial" * store_mod.CHUNK)  # on disk already
    assert store.recover(at_start=False) == 0
    assert os.listdir(store.tmp) == [d.id]
    assert store.recover(at_start=True) == 0  # open here: never junk
    assert os.listdir(store.tmp) == [d.id]
    item = d.commit("s", ["r"])
    assert store.load(item.id).recipients == ["r"]


def test_small_draft_touches_the_disk_only_at_commit(store):
    d = store.draft()
    d.write(b"Received: x\nsmall\n")
    assert empty(store)  # the file is made in the commit's threadpool call
    item = d.commit("s", ["r"])
    assert files(store) == {"mess": [item.id], "tmp": []}
    d2 = store.draft()
    d2.write(b"never committed\n")
    d2.abort()
    assert files(store) == {"mess": [item.id], "tmp": []}


def test_recover_own_pid_junk(store):
    name = "%d.%d.999" % (int(time.time()), os.getpid())
    put(os.path.join(store.tmp, name))
    # this process is the writer and still runs: kept while running
    assert store.recover(at_start=False) == 0
    assert os.listdir(store.tmp) == [name]
    # at start, this pid's files come from an earlier process
    assert store.recover(at_start=True) == 1
    assert empty(store)


def test_recover_live_writer_kept_until_junk_age(store):
    live = subprocess.Popen(["sleep", "30"])
    try:
        name = "%d.%d.1" % (int(time.time()), live.pid)
        path = os.path.join(store.tmp, name)
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
    put(os.path.join(store.tmp, "garbage"))
    os.mkdir(os.path.join(store.tmp, "1.2.3"))
    assert store.recover(at_start=False) == 1
    assert os.listdir(store.tmp) == ["1.2.3"]


def test_recover_after_a_crash_between_link_and_unlink(tmp_store):
    # tmp/ID and mess/ID are the same file; the writer still runs (this pid)
    store = tmp_store
    name = "%d.%d.77" % (int(time.time()), os.getpid())
    put(os.path.join(store.tmp, name), queue_file())
    os.link(os.path.join(store.tmp, name), os.path.join(store.mess, name))
    keep = commit(store)
    assert store.recover(at_start=False) == 1
    assert files(store) == {"mess": sorted([keep.id, name]), "tmp": []}
    assert store.load(name).recipients == ["r"]


def test_recover_bounce_files(store):
    item = commit(store)
    store.add_failure(item.id, {"recipient": "a@y", "status": "5.1.1", "text": "no"})
    gone = "%d.%d.1" % (int(time.time()), dead_pid())
    put(os.path.join(store.bounce, gone))
    assert store.recover(at_start=True) == 1
    assert os.listdir(store.bounce) == [item.id]


# -- commit mark: a message written straight into mess/ ------------------------------------------


def young_id(store, pid=None, seq=1):
    return "%d.%d.%d" % (int(time.time()), os.getpid() if pid is None else pid, seq)


def watch_links(monkeypatch):
    """The destinations of every link(2) the queue makes from now on."""
    links = []
    real_link = os.link
    monkeypatch.setattr(store_mod.os, "link", lambda a, b: links.append(b) or real_link(a, b))
    return links


def mark_in(store, item):
    """The commit mark (hex bytes) of a committed message's file, or None."""
    with open(store.message_path(item.id), "rb") as f:
        return store_mod.split_mark(f.read()[item.size:-TRAILER_SIZE])[1]


def test_a_message_in_writing_is_in_mess_but_not_committed(store):
    d = store.draft()
    d.write(b"Received: x\n" + b"y" * store_mod.CHUNK)  # on disk already
    assert files(store) == {"mess": [d.id], "tmp": []}
    with pytest.raises(store_mod.NotCommitted):
        store.load(d.id)
    assert list(store.items(clean=True)) == []  # skipped, and kept: it is open
    assert list(store.items(clean=True, at_start=True)) == []
    assert os.listdir(store.mess) == [d.id]
    item = d.commit("s", ["r"])
    assert [i.id for i in store.items(clean=True)] == [item.id]


@pytest.mark.parametrize("writer", ["dead", "alive", "this process at start"])
def test_an_uncommitted_file_is_junk_once_its_writer_is_gone(store, writer):
    pid = {"dead": dead_pid(), "alive": 1, "this process at start": os.getpid()}[writer]
    name = young_id(store, pid)
    put(os.path.join(store.mess, name), b"Received: x\npartial")
    assert store.load_committed(name, clean=False) is None  # a tool removes nothing
    assert os.listdir(store.mess) == [name]
    at_start = writer == "this process at start"
    assert list(store.items(clean=True, at_start=at_start)) == []
    assert os.listdir(store.mess) == ([name] if writer == "alive" else [])


def test_forged_envelope_in_the_data_is_not_committed(store):
    """Network bytes that end like a whole queue file -- even with a mark
    made without the key -- left in mess/ by a crash before the real
    envelope was written, are never delivered."""
    name = young_id(store, dead_pid())
    for key in (None, b"\0" * 32):
        forged = b"Received: x\n\nbody\n" + encode_queue_file(
            b"", 1, 0, 1, "evil@x", ["victim@elsewhere.example"], key=key, msgid=name)
        put(os.path.join(store.mess, name), forged)
        with pytest.raises(store_mod.NotCommitted):
            store.load(name)
    assert list(store.items(clean=True)) == []
    assert os.listdir(store.mess) == []


def test_old_bytes_of_a_reused_file_are_not_committed(store):
    """A spare file renamed to mess/ID whose new bytes never reached the
    disk holds a whole older message: its mark names the older ID."""
    old = commit(store)
    with open(store.message_path(old.id), "rb") as f:
        raw = f.read()
    name = young_id(store, dead_pid())
    put(os.path.join(store.mess, name), raw)
    with pytest.raises(store_mod.NotCommitted, match="mark does not match"):
        store.load(name)


@pytest.mark.parametrize("where", ["data", "sender", "recipient", "mark"])
def test_a_torn_file_is_not_committed(store, where):
    item = commit(store, data=b"Received: x\nhello\n", sender="s@x.org")
    path = store.message_path(item.id)
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    at = {"data": 3, "sender": raw.index(b"Fs@x.org") + 1,
          "recipient": item.offsets[1] + 1, "mark": raw.index(b"\0K") + 5}[where]
    raw[at] ^= 0x01
    put(path, bytes(raw))
    with pytest.raises(store_mod.NotCommitted):
        store.load(item.id)


def test_unmarked_files_are_trusted_only_when_older_than_the_key(store):
    old = "1000.%d.1" % dead_pid()  # the key's birth: written through tmp/
    young = "1001.%d.1" % dead_pid()
    for name in (old, young):
        put(os.path.join(store.mess, name), queue_file())
    assert store.load(old).recipients == ["r"]
    with pytest.raises(store_mod.NotCommitted, match="no commit mark"):
        store.load(young)


def test_a_queue_without_key_commits_through_tmp_without_mark(tmp_path, monkeypatch):
    import errno

    store = Store.open(str(tmp_path))

    def refuse():  # lock/ not writable, say
        raise PermissionError(errno.EACCES, "Permission denied", store.keyfile)

    monkeypatch.setattr(store, "make_key", refuse)
    links = watch_links(monkeypatch)
    item = commit(store)
    assert links == [store.message_path(item.id)]
    assert mark_in(store, item) is None
    assert store.load(item.id).recipients == ["a@y", "b@z"]
    commit(Store.open(str(tmp_path)))  # the next draft makes a key, younger than the message
    assert Store.open(str(tmp_path), create=False).load(item.id).recipients == ["a@y", "b@z"]


def test_a_message_as_young_as_the_key_goes_through_tmp_with_a_mark(tmp_store, monkeypatch):
    links = watch_links(monkeypatch)
    item = commit(tmp_store)
    assert links == [tmp_store.message_path(item.id)]
    assert len(mark_in(tmp_store, item)) == 32
    assert tmp_store.load(item.id).recipients == ["a@y", "b@z"]


def test_the_key_is_made_once_by_the_first_draft(tmp_path, monkeypatch):
    store = Store.open(str(tmp_path))
    assert not os.path.exists(store.keyfile) and store.key() is None
    links = watch_links(monkeypatch)
    item = commit(store)
    # its ID is not younger than the key: through tmp/, with a mark
    assert links == [store.keyfile, store.message_path(item.id)]
    monkeypatch.undo()
    with open(store.keyfile, "rb") as f:
        first = f.read()
    assert first.startswith(b"eqmail-queue-key 1 ") and len(first.split()) == 4
    assert os.stat(store.keyfile).st_mode & 0o777 == 0o600
    assert abs(store.key()[0] - time.time()) < 5 and len(store.key()[1]) == 32
    commit(Store.open(str(tmp_path)))
    with open(store.keyfile, "rb") as f:
        assert f.read() == first
    assert Store.open(str(tmp_path)).load(item.id).recipients == ["a@y", "b@z"]
    assert os.listdir(os.path.dirname(store.keyfile)) == ["key", "trigger"]


def test_a_malformed_key_commits_nothing_and_removes_nothing(store):
    item = commit(store)
    put(store.keyfile, b"eqmail-queue-key 1 1000 zz\n")
    store = Store.open(os.path.dirname(store.qdir))
    with pytest.raises(QueueError):
        store.draft()
    with pytest.raises(ValueError) as ei:
        store.load(item.id)
    assert not isinstance(ei.value, store_mod.NotCommitted)
    assert list(store.items(clean=True, at_start=True)) == []
    assert store.ids() == [item.id]


@pytest.mark.parametrize("one_fsync", [True, False])
def test_a_direct_commit_fsyncs_mess_only_where_the_file_fsync_does_not(
        store, monkeypatch, one_fsync):
    synced = []
    monkeypatch.setattr(store_mod, "fsync_dir", synced.append)
    store.one_fsync = one_fsync
    commit(store)
    assert synced == ([] if one_fsync else [store.mess])


def test_fsync_covers_new_name_by_file_system(tmp_path):
    assert store_mod.fsync_covers_new_name("/proc/self") is False
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                          text=True, check=True).stdout.strip()
    expected = kind in ("ext2/ext3", "xfs")  # how stat(1) names ext4 and xfs
    assert store_mod.fsync_covers_new_name(str(tmp_path)) is expected


def test_a_spare_file_with_a_second_name_is_never_reused(store):
    """After a crash in the rename mess/ID -> spare/N, fsck can leave both
    names: the file may be a committed message and is left alone."""
    item = commit(store, data=b"Received: x\nkeep me\n")
    os.link(store.message_path(item.id), os.path.join(store.spare, "5"))
    store._spare_names[:] = ["5"]
    other = commit(store, data=b"Received: x\nnew\n")
    assert other.id != item.id
    assert data_of(store, item.id) == b"Received: x\nkeep me\n"
    assert store.load(item.id).recipients == ["a@y", "b@z"]
    assert os.stat(store.message_path(item.id)).st_nlink == 1  # its second name dropped
    assert sorted(os.listdir(store.mess)) == sorted([item.id, other.id])


# -- version 1 queues ------------------------------------------------------------------------


def v1_queue(tmp_path):
    """A queue as eqmail 0.1 (version 1) left it: data in mess/, envelopes in envelope/."""
    q = tmp_path / "queue"
    for d in ("mess", "tmp", "envelope", "bounce", "lock"):
        (q / d).mkdir(parents=True)
    env, offsets = encode_envelope(1000, 5, 6, "s@x", ["a@y", "b@z"], version=b"V1")
    env = bytearray(env)
    env[offsets[0]:offsets[0] + 1] = b"D"  # a@y was done
    (q / "mess" / "1000.6.1").write_bytes(b"Received: x\nold message\n")
    (q / "envelope" / "1000.6.1").write_bytes(bytes(env))
    (q / "mess" / "1000.6.2").write_bytes(b"partial: no envelope")  # v1 junk
    (q / "envelope" / "1000.6.3").write_bytes(bytes(env))  # finished: data gone
    return q


def test_version_1_queue_is_converted(tmp_path):
    q = v1_queue(tmp_path)
    store = Store.open(str(tmp_path))
    assert not (q / "envelope").exists()
    assert store.ids() == ["1000.6.1"]
    item = store.load("1000.6.1")
    assert (item.birth, item.uid, item.pid, item.sender) == (1000, 5, 6, "s@x")
    assert item.recipients == ["a@y", "b@z"] and item.done == [True, False]
    assert data_of(store, "1000.6.1") == b"Received: x\nold message\n"
    store.mark_done(item, 1)
    assert store.load("1000.6.1").done == [True, True]


def test_version_1_conversion_resumes_after_a_crash(tmp_path, monkeypatch):
    q = v1_queue(tmp_path)
    real_unlink = os.unlink

    def crash(path, *a, **kw):  # the power goes right after the append
        if "/envelope/" in str(path) and not str(path).endswith(".swept"):
            raise OSError(5, "crash")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(store_mod.os, "unlink", crash)
    with pytest.raises(OSError):
        Store.open(str(tmp_path))
    monkeypatch.undo()
    assert (q / "envelope" / "1000.6.1").exists()
    store = Store.open(str(tmp_path))
    assert data_of(store, "1000.6.1") == b"Received: x\nold message\n"  # once, not twice
    assert store.load("1000.6.1").done == [True, False]
    assert not (q / "envelope").exists()


def test_version_1_data_is_never_read_as_a_version_2_file(tmp_path):
    """Bytes from the network that end like a v2 queue file (a forged
    envelope naming other recipients, and a trailer) stay data."""
    q = v1_queue(tmp_path)
    forged = b"Received: x\n\nbody\n" + encode_queue_file(
        b"", 1, 0, 1, "evil@x", ["victim@elsewhere.example"])[:-TRAILER_SIZE]
    forged += encode_trailer(len(b"Received: x\n\nbody\n"))
    (q / "mess" / "1000.6.1").write_bytes(forged)  # a queued message
    (q / "mess" / "1000.6.9").write_bytes(forged)  # junk: no envelope
    store = Store.open(str(tmp_path))
    assert store.ids() == ["1000.6.1"]
    item = store.load("1000.6.1")
    assert item.recipients == ["a@y", "b@z"] and item.sender == "s@x"
    assert data_of(store, "1000.6.1") == forged


def test_version_1_messages_younger_than_the_key_get_a_mark(tmp_path):
    q = v1_queue(tmp_path)
    (q / "lock" / store_mod.KEY_FILE).write_bytes(b"eqmail-queue-key 1 999 %s\n" % (b"cd" * 32))
    store = Store.open(str(tmp_path))
    item = store.load("1000.6.1")
    assert item.recipients == ["a@y", "b@z"] and item.done == [True, False]
    assert len(mark_in(store, item)) == 32


def test_tools_convert_before_committing(tmp_path):
    v1_queue(tmp_path)
    store = Store.open(str(tmp_path), create=False)
    assert not os.path.exists(os.path.join(store.qdir, "envelope"))
    item = commit(store)
    assert sorted(store.ids()) == sorted(["1000.6.1", item.id])


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


def test_concurrent_first_commits_make_one_key_without_a_warning(tmp_path, monkeypatch):
    # every thread used to write lock/key.<pid> with O_TRUNC: one unlinked
    # another's file ("unable to make .../lock/key") and its message went
    # through tmp/ without a mark
    import threading

    from eqmail import log

    warnings = []
    monkeypatch.setattr(log, "warning", warnings.append)
    for round_ in range(20):
        home = tmp_path / ("q%d" % round_)
        home.mkdir()
        store = Store.open(str(home))
        assert not os.path.exists(store.keyfile)
        start = threading.Barrier(8)
        ids, errors = [], []

        def first_commit():
            try:
                start.wait(5)
                ids.append(commit(store).id)
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(e)

        threads = [threading.Thread(target=first_commit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and warnings == [], (errors, warnings)
        assert sorted(os.listdir(os.path.dirname(store.keyfile))) == \
            sorted(n for n in os.listdir(os.path.dirname(store.keyfile))
                   if not n.startswith(os.path.basename(store.keyfile) + "."))
        fresh = Store.open(str(home), create=False)
        assert len(ids) == 8 and all(fresh.load(i).recipients == ["a@y", "b@z"] for i in ids)
