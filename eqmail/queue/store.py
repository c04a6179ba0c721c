"""queue.store -- the durable on-disk queue (qmail-queue's role).

SUMMARY
    `Store.draft()` opens a new message whose bytes are streamed to disk as
    they arrive; `Draft.commit(sender, recipients)` makes it durable and
    returns the committed `Item`.  Only after commit() returns may SMTP
    answer 250 or an injector exit 0.  The scheduler marks recipients done
    with `mark_done()` and removes finished messages with `remove()`.

LAYOUT (under HOME/queue, one filesystem)
    mess/ID        the message: the Received line, then the data, LF line ends
    tmp/ID         an envelope being written
    envelope/ID    the committed envelope and the per-recipient progress
    bounce/ID      permanent failures waiting for the bounce: one JSON object
                   a line (recipient, status, text, remote_mta, diagnostic)
    lock/trigger   a FIFO; one byte written there wakes the daemon's scheduler
    ID = <unix time>.<pid of the writer>.<sequence>, created exclusively.

ENVELOPE FORMAT (version 1; readers skip record types they do not know)
    NUL-terminated records, each one type byte and a value:
    ``V1`` version, ``B<unix seconds>`` birth, ``u<uid>``, ``p<pid>`` of the
    writer, ``F<sender>``, then one record per recipient: ``T<address>``
    while pending, ``D<address>`` when done.  Marking a recipient done
    overwrites its one type byte in place and fsyncs, as qmail-send does
    with its local/remote files.

STATES (after a crash at any instant; compare qmail's INTERNALS S1-S5)
    1. nothing                               clean
    2. mess/ID only (partial or complete)    junk: recovery removes it
    3. mess/ID + tmp/ID                      junk: recovery removes both
    4. mess/ID + envelope/ID                 COMMITTED: delivered at start
    5. envelope/ID with some D records       committed, partly delivered
    6. mess/ID alone after envelope/ID went  junk (message finished)
    Commit goes 1 -> 2 -> 3 -> 4: write and fsync mess/ID, fsync mess/;
    write and fsync tmp/ID; rename tmp/ID to envelope/ID; fsync envelope/.
    A permanent failure is appended to bounce/ID and fsync'd before its
    recipient is marked done.  Finishing goes 5 -> 6 -> 1: the bounce (if
    bounce/ID exists) is committed as a new message, bounce/ID is unlinked,
    then envelope/ID, then mess/ID.  bounce/ID without envelope/ID is junk.
    A recipient whose delivery was in flight at the crash is delivered again
    (at least once); one marked D never is.

SECURITY
    The queue is owned by the daemon's user, mode 0700 dirs and 0600 files;
    nothing here parses network input beyond storing it.  Envelope addresses
    must not contain NUL (address.parse_path() refuses control characters).

GEVENT
    Every write that may wait on the disk (chunks of message data, fsync,
    rename) runs in gevent's threadpool, never on the hub.  Directory
    fsyncs are shared by concurrent commits (eqmail.durable: group commit).
"""
from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

from .. import log
from ..durable import fsync_dir

#: Message data is written to disk in chunks of this many bytes.
CHUNK = 65536

#: Junk older than this (seconds) is removed even if its writer still runs
#: (qmail-send's 36 hours).
JUNK_AGE = 36 * 3600

ENVELOPE_VERSION = b"V1"


class QueueError(Exception):
    """The queue could not take the message; a temporary failure (SMTP 451).

    `text` is the qmail-queue style reason, e.g.
    ``qq write error or disk full (#4.3.0)``.
    """

    def __init__(self, text: str, errno_: Optional[int] = None):
        super().__init__(text)
        self.text = text
        self.errno = errno_


def _offload(func, *args):
    """Run a blocking call in gevent's threadpool (keeps the hub free)."""
    from ..threads import run

    return run(func, *args)


@dataclass
class Item:
    """One committed message as the scheduler sees it."""

    id: str
    birth: int
    sender: str
    recipients: List[str]
    done: List[bool]
    offsets: List[int] = field(repr=False)
    size: int = 0
    uid: int = -1
    pid: int = -1

    def pending(self) -> List[int]:
        """Indexes of the recipients not yet done."""
        return [i for i, d in enumerate(self.done) if not d]


def encode_envelope(birth: int, uid: int, pid: int, sender: str,
                    recipients: Sequence[str]):
    """Return (bytes, offsets of each recipient's type byte)."""
    parts = [ENVELOPE_VERSION, b"B%d" % birth, b"u%d" % uid, b"p%d" % pid,
             b"F" + sender.encode("utf-8", "surrogateescape")]
    data = bytearray(b"\0".join(parts) + b"\0")
    offsets = []
    for r in recipients:
        offsets.append(len(data))
        data += b"T" + r.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(data), offsets


def decode_envelope(msgid: str, data: bytes) -> Item:
    """Parse an envelope file.  Raises ValueError when it is malformed."""
    if not data.startswith(ENVELOPE_VERSION + b"\0"):
        raise ValueError("not a version 1 envelope")
    birth, uid, pid, sender = None, -1, -1, None
    recipients, done, offsets = [], [], []
    pos = 0
    while pos < len(data):
        end = data.find(b"\0", pos)
        if end == -1:
            raise ValueError("truncated record")
        rec = data[pos:end]
        kind, value = rec[:1], rec[1:].decode("utf-8", "surrogateescape")
        if kind == b"B":
            birth = int(value)
        elif kind == b"u":
            uid = int(value)
        elif kind == b"p":
            pid = int(value)
        elif kind == b"F":
            sender = value
        elif kind in (b"T", b"D"):
            recipients.append(value)
            done.append(kind == b"D")
            offsets.append(pos)
        pos = end + 1
    if birth is None or sender is None:
        raise ValueError("no birth or sender record")
    return Item(msgid, birth, sender, recipients, done, offsets, uid=uid, pid=pid)


class Store:
    """The queue under ``HOME/queue``.  Create it with `Store.open()`."""

    def __init__(self, qdir: str):
        self.qdir = qdir
        self.mess = os.path.join(qdir, "mess")
        self.tmp = os.path.join(qdir, "tmp")
        self.envelope = os.path.join(qdir, "envelope")
        self.bounce = os.path.join(qdir, "bounce")
        self.trigger = os.path.join(qdir, "lock", "trigger")
        self._seq = itertools.count(1)
        #: Called with each committed Item by the process that committed it
        #: (the daemon's scheduler); None means "poke the trigger FIFO".
        self.on_commit: Optional[Callable[[Item], None]] = None
        #: Drafts open in this process (never junk while open).
        self.open_drafts: set = set()

    @classmethod
    def open(cls, home: str, create: bool = True) -> "Store":
        """Open (and with `create`, make) the queue under `home`.

        Raises OSError when the directories cannot be made or are missing.
        """
        qdir = os.path.join(home, "queue")
        store = cls(qdir)
        if create:
            for d in (qdir, store.mess, store.tmp, store.envelope, store.bounce,
                      os.path.join(qdir, "lock")):
                os.makedirs(d, mode=0o700, exist_ok=True)
            if not os.path.exists(store.trigger):
                try:
                    os.mkfifo(store.trigger, 0o600)
                except FileExistsError:
                    pass
        elif not os.path.isdir(store.envelope):
            raise FileNotFoundError(errno.ENOENT, "no queue", store.envelope)
        return store

    # -- writing ------------------------------------------------------------

    def new_id(self) -> str:
        return "%d.%d.%d" % (int(time.time()), os.getpid(), next(self._seq))

    def draft(self) -> "Draft":
        """Open a new message file.  Raises QueueError when the queue cannot
        take it (disk full, permissions)."""
        for _ in range(100):
            msgid = self.new_id()
            path = os.path.join(self.mess, msgid)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except OSError as e:
                raise QueueError("qq trouble creating files in queue (#4.3.0)", e.errno)
            return Draft(self, msgid, fd)
        raise QueueError("qq trouble creating files in queue (#4.3.0)")

    def poke(self) -> None:
        """Wake the daemon's scheduler through the trigger FIFO; never blocks."""
        try:
            fd = os.open(self.trigger, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # no daemon reading: it will find the message at start
        try:
            os.write(fd, b"\0")
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- reading and progress -----------------------------------------------

    def ids(self) -> List[str]:
        """IDs of all committed messages, oldest first."""
        names = [n for n in os.listdir(self.envelope) if not n.startswith(".")]

        def key(n):
            try:
                t, p, s = n.split(".")
                return (int(t), int(p), int(s))
            except ValueError:
                return (0, 0, 0)

        return sorted(names, key=key)

    def load(self, msgid: str) -> Item:
        """Read one committed message's envelope.  Raises OSError/ValueError."""
        with open(os.path.join(self.envelope, msgid), "rb") as f:
            item = decode_envelope(msgid, f.read())
        try:
            item.size = os.stat(os.path.join(self.mess, msgid)).st_size
        except FileNotFoundError:
            item.size = -1
        return item

    def items(self) -> Iterator[Item]:
        """Every committed message that can be read (bad ones are logged)."""
        for msgid in self.ids():
            try:
                yield self.load(msgid)
            except FileNotFoundError:
                continue  # finished meanwhile
            except (OSError, ValueError) as e:
                log.alert("unable to read queue envelope %s: %s" % (msgid, e))

    def message_path(self, msgid: str) -> str:
        return os.path.join(self.mess, msgid)

    def mark_done(self, item: Item, index: int) -> None:
        """Durably record that recipient `index` of `item` is finished.
        Runs in the threadpool.  Raises OSError."""
        path = os.path.join(self.envelope, item.id)
        offset = item.offsets[index]

        def work():
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"D", offset)
                os.fsync(fd)
            finally:
                os.close(fd)

        _offload(work)
        item.done[index] = True

    def remove(self, item: Item) -> None:
        """Remove a finished message: envelope first, made durable (the
        scheduler skips the done mark of a message's last recipients and
        relies on this), then the data."""
        def work():
            try:
                os.unlink(os.path.join(self.envelope, item.id))
            except FileNotFoundError:
                pass
            fsync_dir(self.envelope)  # shared with concurrent commits/removals
            try:
                os.unlink(os.path.join(self.mess, item.id))
            except FileNotFoundError:
                pass

        _offload(work)

    def commit_from(self, prefix: bytes, path: str, sender: str,
                    recipients: Sequence[str]) -> Item:
        """Queue a new message made of `prefix` and the file at `path` (a
        forward, qmail-local style).  Raises QueueError."""
        draft = self.draft()
        try:
            draft.write(prefix)
            f = _offload(open, path, "rb")
            try:
                while True:
                    chunk = _offload(f.read, CHUNK)
                    if not chunk:
                        break
                    draft.write(chunk)
            finally:
                f.close()
        except OSError as e:
            draft.abort()
            raise QueueError("qq read error (#4.3.0)", e.errno)
        return draft.commit(sender, recipients)

    def commit_bytes(self, data: bytes, sender: str, recipients: Sequence[str]) -> Item:
        """Queue a new message from bytes (a bounce).  Raises QueueError."""
        draft = self.draft()
        draft.write(data)
        return draft.commit(sender, recipients)

    # -- permanent failures, waiting for the bounce ------------------------------------

    def add_failure(self, msgid: str, record: dict) -> None:
        """Append one failure record to bounce/ID and fsync it.  Raises OSError."""
        import json

        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8", "surrogateescape")
        path = os.path.join(self.bounce, msgid)

        def work():
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                _write_all(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

        _offload(work)

    def failures(self, msgid: str) -> List[dict]:
        """The failure records of a message ([] when none).  Unreadable lines
        (a torn last line after a crash) are skipped."""
        import json

        try:
            with open(os.path.join(self.bounce, msgid), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for raw in data.split(b"\n"):
            try:
                rec = json.loads(raw.decode("utf-8", "surrogateescape"))
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("recipient"), str):
                out.append(rec)
        return out

    def drop_failures(self, msgid: str) -> None:
        try:
            os.unlink(os.path.join(self.bounce, msgid))
        except FileNotFoundError:
            pass

    # -- recovery -------------------------------------------------------------

    def recover(self, at_start: bool = True) -> int:
        """Remove junk left by crashes (states 2, 3 and 6).  Returns the count.

        A file whose writer (the pid in its ID) still runs is left alone
        unless it is older than `JUNK_AGE`; at start, files of this very pid
        are junk from an earlier process that had the same pid.
        """
        committed = set(os.listdir(self.envelope))
        now = time.time()
        removed = 0
        for d in (self.mess, self.tmp, self.bounce):
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if d != self.tmp and name in committed:
                    continue
                if name in self.open_drafts:
                    continue
                path = os.path.join(d, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if now - st.st_mtime < JUNK_AGE and self._writer_alive(name, at_start):
                    continue
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            log.status("queue recovery removed %d partial files" % removed)
        return removed

    @staticmethod
    def _writer_alive(name: str, at_start: bool) -> bool:
        try:
            pid = int(name.split(".")[1])
        except (IndexError, ValueError):
            return False
        if pid == os.getpid():
            return not at_start
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Draft:
    """A message being written into the queue.  Not shared between greenlets."""

    def __init__(self, store: Store, msgid: str, fd: int):
        self.store = store
        self.id = msgid
        self.fd = fd
        self.size = 0
        self._buf = bytearray()
        self._closed = False
        self.error: Optional[QueueError] = None
        store.open_drafts.add(msgid)

    def write(self, data: bytes) -> None:
        """Append message bytes.  Errors are kept and raised by commit()."""
        if self.error is not None:
            return
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        buf, self._buf = bytes(self._buf), bytearray()
        try:
            _offload(_write_all, self.fd, buf)
        except OSError as e:
            self.error = _write_error(e)

    def commit(self, sender: str, recipients: Sequence[str], uid: Optional[int] = None,
               pid: Optional[int] = None) -> Item:
        """Make the message durable (states 2 -> 4) and return its Item.

        Raises QueueError (temporary) for any write, fsync or rename error;
        the draft is then removed.
        """
        if self._closed:
            raise QueueError("qq internal bug (#4.3.0)")
        birth = int(time.time())
        uid = os.getuid() if uid is None else uid
        pid = os.getpid() if pid is None else pid
        env, offsets = encode_envelope(birth, uid, pid, sender, recipients)
        buf, self._buf = bytes(self._buf), bytearray()
        store = self.store
        if self.error is not None:
            self.abort()
            raise self.error

        def work():
            _write_all(self.fd, buf)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            fsync_dir(store.mess)  # shared with concurrent commits
            tmp = os.path.join(store.tmp, self.id)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, env)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(store.envelope, self.id))
            fsync_dir(store.envelope)

        try:
            _offload(work)
        except OSError as e:
            self.abort()
            raise _write_error(e)
        self._closed = True
        store.open_drafts.discard(self.id)
        item = Item(self.id, birth, sender, list(recipients),
                    [False] * len(recipients), offsets, size=self.size, uid=uid, pid=pid)
        if store.on_commit is not None:  # in the daemon: log and schedule
            log.new_msg(self.id)
            log.info_msg(self.id, self.size, sender, pid, uid)
            store.on_commit(item)
        else:  # a tool (sendmail, smtpd): stay quiet, wake the daemon
            store.poke()
        return item

    def abort(self) -> None:
        """Throw the draft away (state 2/3 -> 1).  Never raises."""
        if self._closed:
            return
        self._closed = True
        self.store.open_drafts.discard(self.id)
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        for d in (self.store.tmp, self.store.mess):
            try:
                os.unlink(os.path.join(d, self.id))
            except OSError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_error(e: OSError) -> QueueError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
        return QueueError("qq write error or disk full (#4.3.0)", e.errno)
    return QueueError("qq trouble creating files in queue (#4.3.0)", e.errno)
