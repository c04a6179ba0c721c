"""Damaged queue files (eqmail/queue/store.py, DAMAGED FILES): a committed
file that no longer reads as a queue file is moved to queue/bad/ once, with
one alert; a file being written, a crash's junk and a problem with the key
never are."""
from __future__ import annotations

import os

import pytest

from helpers import as_test_user, give_to_user, user_dir
from eqmail.queue import store as store_mod
from eqmail.queue.store import Damaged, NotCommitted, Store

KEY_HEX = b"ab" * 32


def keyed_store(home, birth):
    """A queue whose key was made at `birth` (unix seconds)."""
    lock = os.path.join(str(home), "queue", "lock")
    os.makedirs(lock, exist_ok=True)
    with open(os.path.join(lock, store_mod.KEY_FILE), "wb") as f:
        f.write(b"eqmail-queue-key 1 %d %s\n" % (birth, KEY_HEX))
    return Store.open(str(home))


@pytest.fixture
def old_store(tmp_path):
    """Messages whose IDs are not younger than the key: written through
    tmp/ and linked into mess/ whole, so they need no commit mark -- the
    files whose damage can be told from a write in progress."""
    return keyed_store(tmp_path, 1 << 40)


@pytest.fixture
def store(tmp_path):
    """Messages younger than the key: each must carry its commit mark."""
    return keyed_store(tmp_path, 1000)


def commit(store, data=b"Received: x\nhello\n", sender="s@x.org", rcpts=("a@y",)):
    d = store.draft()
    d.write(data)
    return d.commit(sender, list(rcpts))


def damage(path, how):
    size = os.path.getsize(path)
    if how == "truncated":
        os.truncate(path, size // 2)
    elif how == "zeroed":
        with open(path, "r+b") as f:
            f.write(b"\0" * size)
    elif how == "bit-flipped":
        with open(path, "r+b") as f:
            f.seek(3)
            byte = f.read(1)
            f.seek(3)
            f.write(bytes([byte[0] ^ 0x10]))
    elif how == "trailer-flipped":
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"x")


def alerts(capfd):
    return [l for l in capfd.readouterr().err.splitlines() if "alert:" in l]


def listing(store):
    return {d: sorted(os.listdir(os.path.join(store.qdir, d)))
            for d in ("mess", "bad") if os.path.isdir(os.path.join(store.qdir, d))}


@pytest.mark.parametrize("how", ["truncated", "zeroed", "bit-flipped", "trailer-flipped"])
def test_a_damaged_file_is_moved_to_bad_once_with_one_alert(old_store, capfd, how):
    item = commit(old_store)
    keep = commit(old_store, data=b"Received: y\nintact\n")
    damage(old_store.message_path(item.id), how)
    capfd.readouterr()
    with pytest.raises(Damaged):
        old_store.load(item.id)
    got = [i.id for i in old_store.items(clean=True, at_start=True)]
    assert got == [keep.id]
    assert listing(old_store) == {"mess": [keep.id], "bad": [item.id]}
    said = alerts(capfd)
    assert len(said) == 1, said
    assert "msg %s: damaged queue file" % item.id in said[0]
    assert os.path.join(old_store.qdir, "bad", item.id) in said[0] and "eqmail qbad" in said[0]
    # the next scans neither see it nor say anything
    for _ in range(3):
        assert [i.id for i in old_store.items(clean=True)] == [keep.id]
    assert alerts(capfd) == []
    assert os.stat(old_store.bad).st_mode & 0o777 == 0o700


def test_tools_do_not_move_damaged_files(old_store, capfd):
    item = commit(old_store)
    damage(old_store.message_path(item.id), "zeroed")
    assert list(old_store.items()) == []
    assert old_store.load_committed(item.id) is None
    assert listing(old_store) == {"mess": [item.id]}
    # said once, not at every look
    assert len(alerts(capfd)) == 1


def test_a_file_being_written_is_never_moved(store, capfd):
    """A draft written straight into mess/ has no mark yet: NotCommitted,
    never Damaged, whoever looks and however often."""
    d = store.draft()
    d.write(b"x" * (store_mod.CHUNK + 10))  # the file exists in mess/ now
    assert os.listdir(store.mess) == [d.id]
    other = Store.open(os.path.dirname(store.qdir))  # another process's view
    with pytest.raises(NotCommitted):
        other.load(d.id)
    assert other.set_aside(d.id) is None
    assert other.load_committed(d.id, clean=True) is None
    assert os.listdir(store.mess) == [d.id] and not os.path.exists(store.bad)
    item = d.commit("s@x.org", ["a@y"])
    assert other.load(item.id).recipients == ["a@y"]
    assert alerts(capfd) == []


def test_a_marked_file_that_fails_its_mark_is_junk_not_damage(store):
    """Where a mark is required, a bad file cannot be told from a crashed
    write: STATES removes it once its writer is gone; it never goes to bad/."""
    item = commit(store)
    damage(store.message_path(item.id), "bit-flipped")
    with pytest.raises(NotCommitted):
        store.load(item.id)
    assert store.set_aside(item.id) is None
    assert not os.path.exists(store.bad)


def test_a_bad_key_moves_nothing(old_store, capfd):
    item = commit(old_store)
    with open(old_store.keyfile, "wb") as f:
        f.write(b"eqmail-queue-key 1 garbage\n")
    fresh = Store.open(os.path.dirname(old_store.qdir))
    for _ in range(3):
        assert list(fresh.items(clean=True)) == []
    assert listing(fresh) == {"mess": [item.id]}
    said = alerts(capfd)
    assert len(said) == 1 and "malformed queue key" in said[0], said


def test_a_missing_key_moves_nothing(store, capfd):
    item = commit(store)  # carries a mark
    os.unlink(store.keyfile)
    fresh = Store.open(os.path.dirname(store.qdir))
    assert list(fresh.items(clean=True)) == []
    assert listing(fresh) == {"mess": [item.id]}
    assert "no queue key" in " ".join(alerts(capfd))


def test_nothing_moves_while_a_version_1_queue_is_converted(old_store):
    item = commit(old_store)
    damage(old_store.message_path(item.id), "zeroed")
    os.mkdir(os.path.join(old_store.qdir, "envelope"))
    assert old_store.set_aside(item.id) is None
    assert listing(old_store) == {"mess": [item.id]}


def test_a_crash_between_link_and_unlink_is_finished(old_store):
    item = commit(old_store)
    damage(old_store.message_path(item.id), "truncated")
    os.makedirs(old_store.bad, mode=0o700)
    os.link(old_store.message_path(item.id), os.path.join(old_store.bad, item.id))
    path, why = old_store.set_aside(item.id)
    assert path == os.path.join(old_store.bad, item.id) and why
    assert listing(old_store) == {"mess": [], "bad": [item.id]}
    assert os.stat(path).st_nlink == 1


def test_a_name_taken_in_bad_gets_a_suffix(old_store):
    item = commit(old_store)
    damage(old_store.message_path(item.id), "zeroed")
    os.makedirs(old_store.bad, mode=0o700)
    with open(os.path.join(old_store.bad, item.id), "wb") as f:
        f.write(b"an older one")
    path, _ = old_store.set_aside(item.id)
    assert path == os.path.join(old_store.bad, item.id + "-1")
    with open(os.path.join(old_store.bad, item.id), "rb") as f:
        assert f.read() == b"an older one"
    assert old_store.bad_names() == [item.id, item.id + "-1"]


def test_an_unreadable_file_is_alerted_once_and_stays(old_store, capfd):
    name = "%d.1.1" % (1 << 30)
    os.mkdir(os.path.join(old_store.mess, name))  # reading it fails: EISDIR
    for _ in range(3):
        assert old_store.load_committed(name, clean=True) is None
    assert os.path.isdir(os.path.join(old_store.mess, name))
    said = alerts(capfd)
    assert len(said) == 1 and "unable to read queue file %s" % name in said[0], said


def test_examine_and_remove_bad_files(old_store):
    item = commit(old_store, sender="who@x.org", rcpts=("r1@y", "r2@z"))
    damage(old_store.message_path(item.id), "bit-flipped")
    old_store.set_aside(item.id)
    got, why, size = old_store.examine_bad(item.id)
    assert why == "commit mark does not match"
    assert got.sender == "who@x.org" and got.recipients == ["r1@y", "r2@z"]
    assert size == os.path.getsize(os.path.join(old_store.bad, item.id))
    for name in ("../mess/x", "", ".", ".."):
        with pytest.raises(ValueError):
            old_store.bad_path(name)
    with pytest.raises(FileNotFoundError):
        old_store.remove_bad("1.2.3")
    old_store.remove_bad(item.id)
    assert old_store.bad_names() == []


def _open_queue(home):
    try:
        Store.open(home, create=False)
    except OSError as e:
        return type(e).__name__
    return "opened"


def test_open_without_create_says_permission_not_missing():
    """A queue that exists but cannot be read is a PermissionError, not
    "no queue" (ENOENT): the tools then say so (exit 77)."""
    with user_dir("eqmail-damaged-") as d:
        Store.open(d)
        give_to_user(d)
        assert as_test_user(_open_queue, os.path.join(d, "none")) == "FileNotFoundError"
        assert as_test_user(_open_queue, d) == "opened"
        os.chmod(os.path.join(d, "queue"), 0)
        try:
            assert as_test_user(_open_queue, d) == "PermissionError"
        finally:
            os.chmod(os.path.join(d, "queue"), 0o700)
