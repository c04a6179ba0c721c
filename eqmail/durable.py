"""durable -- fsyncs shared between concurrent writers (group commit).

SUMMARY
    Making a new file's name durable takes an fsync of its directory.  When
    many sessions commit at once, one fsync that starts after all of their
    names exist covers them all.  `fsync_dir(path)` returns once an fsync of
    `path` that began after the call has completed: either one it ran
    itself, or one another thread ran meanwhile.  Callers are threadpool
    threads (it blocks); the hub never calls it.  `fsync_file(path)` does
    the same for a file that several threads change in place (the done
    marks of one message's recipients: one fsync for those that finish
    together).

CORRECTNESS
    A caller's directory entry exists before it calls; it waits for an
    fsync that *starts* after its call, so that fsync covers the entry.  A
    failed fsync is raised in the thread that ran it and counts for nobody
    else: the waiters run their own.

LATER
    `fsync_dir_soon(path)` returns at once and has `path` fsync'd within
    `SOON` seconds by a background thread (one fsync for everything queued
    meanwhile), and at exit.  For what only needs to reach the disk
    eventually: a finished message's removal (qmail makes no fsync there).

STANDARDS
    The durability rules of ARCHITECTURE.md; POSIX fsync(2) on a directory
    (Linux: makes its entries durable).
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Optional, Set

#: Seconds within which fsync_dir_soon() has a directory fsync'd.
SOON = 0.5


class _Group:
    __slots__ = ("started", "completed", "running", "cond", "users")

    def __init__(self):
        self.started = 0      # generations begun
        self.completed = 0    # highest generation finished without error
        self.running = False
        self.cond = threading.Condition(threading.Lock())
        self.users = 0        # threads in fsync_file for it (files only)


_groups: Dict[str, _Group] = {}
_groups_lock = threading.Lock()


def _fsync(path: str, directory: bool = True) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, fill, mode: int = 0o644) -> None:
    """Write the file `path` whole or not at all: `fill(f)` writes into
    ``path.tmp`` (created with `mode`), which is fsync'd and renamed over
    `path`, then the directory is fsync'd.  On any error the temporary
    file is removed and the old `path` stays.  Blocking; raises OSError
    (and whatever `fill` raises)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` that exist now durable.
    Blocking; raises OSError from the fsync this thread ran."""
    with _groups_lock:
        group = _groups.get(path)
        if group is None:
            group = _groups[path] = _Group()
    _shared(group, path, True)


def fsync_file(path: str) -> None:
    """Make what was written to the file `path` before the call durable,
    sharing the fsync with other threads that wrote to it meanwhile.  The
    group of a file lives only while a thread is in here (queue files are
    many).  Blocking; raises OSError from the fsync this thread ran."""
    with _groups_lock:
        group = _groups.get(path)
        if group is None:
            group = _groups[path] = _Group()
        group.users += 1
    try:
        _shared(group, path, False)
    finally:
        with _groups_lock:
            group.users -= 1
            if group.users == 0 and _groups.get(path) is group:
                del _groups[path]


def _shared(group: _Group, path: str, directory: bool) -> None:
    cond = group.cond
    with cond:
        need = group.started + 1  # an fsync that begins after this point
        while True:
            if group.completed >= need:
                return
            if not group.running:
                group.running = True
                group.started += 1
                mine = group.started
                break
            cond.wait()
    ok = False
    try:
        _fsync(path, directory)
        ok = True
    finally:
        with cond:
            group.running = False
            if ok:
                group.completed = max(group.completed, mine)
            cond.notify_all()


_soon: Set[str] = set()
_soon_lock = threading.Lock()
_soon_wake = threading.Event()
_soon_thread: Optional[threading.Thread] = None


def fsync_dir_soon(path: str) -> None:
    """Have directory `path` fsync'd within SOON seconds (and at exit);
    returns at once.  An fsync that fails is logged and not retried."""
    _later(path)


def fsync_file_soon(path: str) -> None:
    """Have the file `path` fsync'd within SOON seconds (and at exit), unless
    it is gone by then; returns at once."""
    _later(path + "\0file")


def _later(key: str) -> None:
    global _soon_thread
    with _soon_lock:
        _soon.add(key)
        if _soon_thread is None or not _soon_thread.is_alive():  # also after a fork
            import atexit

            if _soon_thread is None:
                atexit.register(sync_soon_now)
            _soon_thread = threading.Thread(target=_soon_main, name="eqmail fsync later",
                                            daemon=True)
            _soon_thread.start()
    _soon_wake.set()


def sync_soon_now() -> None:
    """fsync every directory fsync_dir_soon() is holding, now (blocking)."""
    with _soon_lock:
        paths = sorted(_soon)
        _soon.clear()
    for path in paths:
        try:
            if path.endswith("\0file"):
                fsync_file(path[:-5])
            else:
                fsync_dir(path)
        except FileNotFoundError:
            pass  # a file finished and removed meanwhile
        except OSError as e:
            from . import log

            log.alert("unable to fsync %s: %s" % (path, e))


def _soon_main() -> None:
    import time

    while True:
        _soon_wake.wait()
        _soon_wake.clear()
        time.sleep(SOON)
        sync_soon_now()
