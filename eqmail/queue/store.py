"""queue.store -- the durable on-disk queue (qmail-queue's role).

SUMMARY
    `Store.draft()` opens a new message whose bytes are streamed to disk as
    they arrive; `Draft.commit(sender, recipients)` makes it durable and
    returns the committed `Item`.  Only after commit() returns may SMTP
    answer 250 or an injector exit 0.  The scheduler marks recipients done
    with `mark_done()` and removes finished messages with `remove()`.

LAYOUT (under HOME/queue, one filesystem)
    tmp/ID         a message being written when its ID is not younger than
                   the key (see COMMIT MARK)
    mess/ID        a committed message: the Received line and the data (LF
                   line ends), then its envelope, then a 32-byte trailer;
                   or a message being written, whose commit mark is not
                   (yet) valid
    bounce/ID      permanent failures waiting for the bounce: one JSON object
                   a line (recipient, status, text, remote_mta, diagnostic)
    spare/N        a finished message's file kept for reuse by a later draft
                   (N < SPARES, so there are never more; each at most
                   SPARE_SIZE bytes): its bytes are junk and never read.
                   Reusing a file instead of creating one spares the file
                   system an inode allocation and a free per message (ext4
                   without a journal scans the inodes freed in the last
                   minute on every allocation).
    bad/ID         a damaged queue file set aside, never delivered (see
                   DAMAGED FILES); ``eqmail qbad`` lists, shows and removes
                   them.  Made when the first one is moved there.
    lock/trigger   a FIFO; one byte written there wakes the daemon's scheduler
    lock/key       the queue's secret for commit marks: ``eqmail-queue-key 1
                   <birth> <64 hex digits>`` LF, made once, by the first draft
                   of a queue without one (never replaced; part of the
                   queue: back it up with it)
    ID = <unix time>.<pid of the writer>.<sequence>, created exclusively.
    One file per message, written where it stays, so that committing it
    takes one fsync (on ext4 and xfs; elsewhere one file fsync and one
    shared directory fsync): the envelope travels with the data.

QUEUE FILE FORMAT (version 2)
    data | envelope | trailer.  The trailer is the last 32 bytes:
    ``\nEQMAIL-QUEUE-2 `` and the envelope's offset (= the size of the
    data) as 15 decimal digits, then LF.  The envelope is NUL-terminated
    records, each one type byte and a value (readers skip types they do not
    know): ``V2`` version, ``B<unix seconds>`` birth, ``u<uid>``, ``p<pid>``
    of the writer, ``F<sender>``, then one record per recipient:
    ``T<address>`` while pending, ``D<address>`` when done, then the commit
    mark ``K<32 hex digits>`` (see COMMIT MARK).  Marking a
    recipient done overwrites its one type byte in place and fsyncs, as
    qmail-send does with its local/remote files.  Readers of the message
    see only the data (`open_message`); programs get a copy (`data_copy`)
    because they may rewind their stdin.  Version 1 (mess/ID data plus
    envelope/ID) is converted when the queue is opened (`Store.open`).

COMMIT MARK
    The last envelope record, ``K`` and the hex of a keyed BLAKE2b-128
    (RFC 7693; key: lock/key, personalisation ``eqmail-queue``) of: the ID
    and NUL, the data, the envelope before the mark with every recipient
    record typed T (so marking D keeps it valid), and the data size in
    decimal.  A file whose mark is valid was written whole by a holder of
    the key under this very name; a file in mess/ that must have a mark and
    has none, or a wrong one, is NOT committed (NotCommitted): it is being
    written, or a crash cut its writing short -- maybe after network bytes
    that look like an envelope and a trailer, or leaving the bytes of an
    older message in a reused file.  Those are never delivered.  Every file
    written with a key has a mark; a file "must have" one when a key exists
    and its ID's time is later than the key's birth.  Drafts whose ID is
    not later go through tmp/ (below), so that a file without a mark is
    trusted only when it was written the old way, through tmp/, by an
    eqmail before 0.2 or before the key was made.  The mark is checked
    whenever a message is read from disk (`load`: at the daemon's start,
    its scans for injected messages, the tools), never for the commits the
    daemon hears of from its own processes.

STATES (after a crash at any instant; compare qmail's INTERNALS S1-S5)
    1. nothing                               clean
    2. tmp/ID (partial or complete)          junk: recovery removes it
       mess/ID without a valid mark          junk: removed once its writer
                                             is gone (`load_committed`)
       spare/N                               junk kept for reuse, never read
    3. mess/ID (and maybe tmp/ID, same file) COMMITTED: delivered at start
    4. mess/ID with some D records           committed, partly delivered
    Commit goes 1 -> 2 -> 3: rename a spare file to mess/ID (or create
    mess/ID), write data, envelope with its mark and trailer from offset 0,
    cut it to that size and fsync it; on a file system where that fsync
    does not also make the new name durable (not ext4 or xfs:
    `fsync_covers_new_name`), fsync mess/ as well.  Through tmp/ (see
    COMMIT MARK): the same into tmp/ID, then link it as mess/ID (never
    replacing a file), unlink tmp/ID, fsync mess/.  A spare file that has
    a second name (after fsck) is never written to.  A permanent failure is appended to
    bounce/ID and fsync'd before its recipient is marked done.  Finishing goes 4 -> 1: the bounce
    (if bounce/ID exists) is committed as a new message, bounce/ID is
    unlinked, then mess/ID is renamed to spare/N (or unlinked; the
    scheduler does not mark a message's last recipients done: this removal
    records them).  mess/ and spare/ are fsync'd within
    half a second after that (durable.fsync_dir_soon, one fsync for every
    removal meanwhile), not before the next delivery starts: a crash in
    that window delivers those last recipients again -- at least once, as
    for a delivery in flight; qmail-send makes no fsync there at all.
    bounce/ID without mess/ID is junk.  A recipient whose delivery was in
    flight at the crash is delivered again (at least once), and so is one
    marked D less than half a second before it: the D record is written at
    once and fsync'd within durable.SOON (fsync_file_soon, shared by the
    recipients that finish meanwhile), as qmail-send's markdone makes no
    fsync at all.  A failure record is fsync'd before its D: never lost.

DAMAGED FILES
    A committed file in mess/ that no longer reads as a queue file (the
    disk cut it short, zeroed it or flipped bits in it) is `Damaged`: the
    daemon's scans (`load_committed` with `clean`) move it to bad/ID once,
    with one alert line naming it, and never deliver it; qstat and qread
    do not count it.  Only files that need no commit mark can be told
    apart from a write in progress or cut short: those went through tmp/
    and were linked into mess/ whole, so a bad one there is damage.  A
    file that must carry a mark and fails it is NotCommitted, junk as in
    STATES (it may be a crashed write, the bytes of a reused file or bytes
    from the network); a problem with lock/key itself (malformed, or
    missing while files carry marks) is never blamed on the files: it is
    alerted and nothing moves.  The move (`set_aside`) checks the file
    again on its own descriptor and moves only that very file: link to
    bad/ID (never replacing one: a name taken gets a suffix -N), fsync
    bad/, unlink mess/ID; a crash between the two leaves both names, and
    the next scan drops the one in mess/.  Nothing is moved while a
    version 1 queue is being converted (queue/envelope/ exists).  A file
    that cannot be read at all (EIO, EACCES) stays and is alerted once
    per process and error.

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
import io
import itertools
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .. import log
from ..durable import fsync_dir, fsync_dir_soon, fsync_file_soon

def is_queue_id(value) -> bool:
    """True for a str shaped like a queue ID: ``<time>.<pid>.<sequence>``,
    digits and dots only (so never a path).  For IDs that come from another
    process (the privileged helper, the local-delivery worker)."""
    return isinstance(value, str) and _QUEUE_ID.fullmatch(value) is not None


_QUEUE_ID = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+", re.ASCII)

#: Message data is written to disk in chunks of this many bytes.
CHUNK = 65536

#: At most this many finished queue files are kept in spare/ for reuse: they
#: are named 0 .. SPARES-1, and a file renamed onto a name in use replaces
#: (frees) the one there.
SPARES = 64

#: A finished queue file larger than this (bytes) is unlinked, not kept.
SPARE_SIZE = 256 * 1024

#: Junk older than this (seconds) is removed even if its writer still runs
#: (qmail-send's 36 hours).
JUNK_AGE = 36 * 3600

ENVELOPE_VERSION = b"V2"
_V1 = b"V1"

#: The queue file's trailer: this, 15 digits (the envelope's offset), LF.
TRAILER_MAGIC = b"\nEQMAIL-QUEUE-2 "
TRAILER_SIZE = 32


#: The queue's key file (under queue/lock/): ``eqmail-queue-key 1 <birth> <hex>``
#: and LF.  Made once (by a queue's first draft) and never changed: see COMMIT MARK.
KEY_FILE = "key"
_KEY_MAGIC = b"eqmail-queue-key 1 "


class NotCommitted(ValueError):
    """A mess/ file that does not prove it was committed (COMMIT MARK):
    one being written, or one a crash left half-written.  Never delivered."""


class Damaged(ValueError):
    """A mess/ file that was committed but cannot be read any more (cut
    short, zeroed, bits flipped): one that needs no commit mark (see
    COMMIT MARK) and is not a queue file, or whose mark does not match.
    Never a file being written (those are NotCommitted) and never a
    problem of the key (plain ValueError).  The daemon sets it aside in
    bad/ (`Store.set_aside`, DAMAGED FILES)."""


def _mark_hash(key: bytes, msgid: str):
    """A keyed BLAKE2b (RFC 7693) for the commit mark of `msgid`, fed the ID
    already.  _blake2 is what hashlib.blake2b is, without loading OpenSSL
    (4 MB of RSS)."""
    try:
        from _blake2 import blake2b
    except ImportError:  # a Python built without it
        from hashlib import blake2b
    h = blake2b(key=key, digest_size=16, person=b"eqmail-queue")
    h.update(os.fsencode(msgid) + b"\0")
    return h


def _finish_mark(h, env: bytes, data_size: int) -> bytes:
    """The commit mark record: `h` has hashed the ID and the data; `env` is
    the envelope with every recipient record typed T."""
    h.update(env)
    h.update(b"%d" % data_size)
    return b"K" + h.hexdigest().encode("ascii") + b"\0"


def split_mark(env: bytes):
    """(the envelope without its commit mark, the mark's hex digest as bytes
    or None): the mark is the last record, type ``K``."""
    start = env.rfind(b"\0", 0, len(env) - 1) + 1
    if env[start:start + 1] == b"K" and env.endswith(b"\0"):
        return env[:start], env[start + 1:-1]
    return env, None


def id_order(msgid: str) -> Tuple[int, int, int]:
    """The sort key of a queue ID ``time.pid.seq``: oldest first; a name
    of another form sorts first."""
    try:
        t, p, s = msgid.split(".")
        return (int(t), int(p), int(s))
    except ValueError:
        return (0, 0, 0)


def id_time(msgid: str) -> int:
    """The unix time in a queue ID (its first field), or -1."""
    head = msgid.split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def fsync_covers_new_name(path: str) -> bool:
    """True when, on the file system holding directory `path`, fsync(2) of a
    file just created or renamed into `path` also makes that name durable:
    ext4 and ext3 (with a journal: the name is in the same or an earlier
    transaction; without one: ext4_sync_parent), xfs (the log is forced
    through the inode's last change).  False for anything else or when
    /proc/self/mountinfo cannot be read: then the directory is fsync'd too."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return False
    unescape = re.compile(r"\\([0-7]{3})")
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 5:
            continue
        sep = fields.index("-", 6)
        mount = unescape.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best) and len(fields) > sep + 1:
            best, fstype = mount, fields[sep + 1]
    return fstype in ("ext4", "ext3", "xfs")


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
    #: the message's ESMTP options kept with it (``X`` records), e.g.
    #: {"utf8": "1"} for SMTPUTF8 (RFC 6531); None when it has none
    params: Optional[Dict[str, str]] = None

    def pending(self) -> List[int]:
        """Indexes of the recipients not yet done."""
        return [i for i, d in enumerate(self.done) if not d]


def encode_envelope(birth: int, uid: int, pid: int, sender: str,
                    recipients: Sequence[str], version: bytes = ENVELOPE_VERSION,
                    params: Optional[Dict[str, str]] = None):
    """Return (bytes, offsets of each recipient's type byte in them).
    `params`: the message's options, one ``Xkey=value`` record each (an
    older eqmail skips records it does not know)."""
    parts = [version, b"B%d" % birth, b"u%d" % uid, b"p%d" % pid,
             b"F" + sender.encode("utf-8", "surrogateescape")]
    for key, value in sorted((params or {}).items()):
        parts.append(b"X" + ("%s=%s" % (key, value)).encode("utf-8", "surrogateescape"))
    data = bytearray(b"\0".join(parts) + b"\0")
    offsets = []
    for r in recipients:
        offsets.append(len(data))
        data += b"T" + r.encode("utf-8", "surrogateescape") + b"\0"
    return bytes(data), offsets


def encode_trailer(data_size: int) -> bytes:
    """The 32-byte trailer of a queue file whose data is `data_size` bytes."""
    return TRAILER_MAGIC + b"%015d\n" % data_size


def encode_queue_file(data: bytes, birth: int, uid: int, pid: int, sender: str,
                      recipients: Sequence[str], key: Optional[bytes] = None,
                      msgid: str = "") -> bytes:
    """A whole queue file (data, envelope, trailer) in memory (tests,
    tools); with `key` (the queue's key bytes), commit-marked as `msgid`."""
    env, _ = encode_envelope(birth, uid, pid, sender, recipients)
    if key is not None:
        h = _mark_hash(key, msgid)
        h.update(data)
        env += _finish_mark(h, env, len(data))
    return data + env + encode_trailer(len(data))


def decode_envelope(msgid: str, data: bytes, base: int = 0,
                    version: bytes = ENVELOPE_VERSION) -> Item:
    """Parse envelope records (`data`, found at file offset `base`).
    Raises ValueError when they are malformed."""
    if not data.startswith(version + b"\0"):
        raise ValueError("not a version %s envelope" % version[1:].decode())
    birth, uid, pid, sender = None, -1, -1, None
    recipients, done, offsets = [], [], []
    params: Optional[Dict[str, str]] = None
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
            offsets.append(base + pos)
        elif kind == b"X":
            key, _, val = value.partition("=")
            if params is None:
                params = {}
            params[key] = val
        pos = end + 1
    if birth is None or sender is None:
        raise ValueError("no birth or sender record")
    return Item(msgid, birth, sender, recipients, done, offsets, uid=uid, pid=pid,
                params=params)


def data_size_of(fd: int) -> int:
    """The size in bytes of the message data in the queue file open on `fd`
    (the envelope's offset, from the trailer).  Raises ValueError when the
    file has no valid trailer, OSError when it cannot be read."""
    size = os.fstat(fd).st_size
    if size < TRAILER_SIZE:
        raise ValueError("no queue file trailer")
    tail = os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE)
    if not tail.startswith(TRAILER_MAGIC) or not tail.endswith(b"\n"):
        raise ValueError("no queue file trailer")
    digits = tail[len(TRAILER_MAGIC):-1]
    if not digits.isdigit():
        raise ValueError("bad queue file trailer")
    offset = int(digits)
    if offset > size - TRAILER_SIZE:
        raise ValueError("bad queue file trailer")
    return offset


def read_item(msgid: str, fd: int):
    """(the Item, the envelope's bytes) of the queue file open on `fd`; its
    commit mark is not checked here (`Store.load` does).  Raises
    OSError/ValueError."""
    base = data_size_of(fd)
    end = os.fstat(fd).st_size - TRAILER_SIZE
    env = os.pread(fd, end - base, base)
    item = decode_envelope(msgid, env, base)
    item.size = base
    return item, env


class _Window(io.RawIOBase):
    """Bytes [0, end) of a file descriptor, as a seekable raw stream."""

    def __init__(self, fd: int, end: int):
        super().__init__()
        self._fd = fd
        self._end = end
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._end - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._end + offset
        else:
            raise ValueError("bad whence")
        if pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        # The descriptor's own offset and end are not the message's: a
        # program that reads it must get data_copy() instead.
        raise io.UnsupportedOperation("a queue file window has no descriptor of its own")

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


def message_window(fd: int) -> BinaryIO:
    """A buffered, seekable reader of the message data in the queue file open
    on `fd` (it takes the descriptor over and closes it).  Raises
    ValueError (not a queue file) or OSError; closes `fd` then too."""
    try:
        end = data_size_of(fd)
    except BaseException:
        os.close(fd)
        raise
    return io.BufferedReader(_Window(fd, end), CHUNK)


def open_message(path: str) -> BinaryIO:
    """Open the queue file at `path` for reading its message data (no
    envelope).  Raises OSError, or ValueError when it is not a queue file."""
    return message_window(os.open(path, os.O_RDONLY))


def data_size(path: str) -> int:
    """The size in bytes of the message data in the queue file at `path`.
    Raises OSError, or ValueError when it is not a queue file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_size_of(fd)
    finally:
        os.close(fd)


def data_copy(msgfile: BinaryIO, dir: Optional[str] = None) -> BinaryIO:
    """A temporary, already-unlinked file holding the bytes of `msgfile`,
    positioned at 0: stdin for a program, which may rewind it (qmail's
    programs such as condredirect do).  In `dir`, else $TMPDIR.  Raises
    OSError."""
    import shutil
    import tempfile

    out = tempfile.TemporaryFile(dir=dir)
    try:
        msgfile.seek(0)
        shutil.copyfileobj(msgfile, out, CHUNK)
        out.flush()
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out


class Store:
    """The queue under ``HOME/queue``.  Create it with `Store.open()`."""

    def __init__(self, qdir: str):
        self.qdir = qdir
        self.mess = os.path.join(qdir, "mess")
        self.tmp = os.path.join(qdir, "tmp")
        self.bounce = os.path.join(qdir, "bounce")
        self.spare = os.path.join(qdir, "spare")
        #: hold/ID: the admin held the message (eqmail queue hold)
        self.hold = os.path.join(qdir, "hold")
        #: warned/ID: the sender was told the message is delayed (once)
        self.warned = os.path.join(qdir, "warned")
        self.bad = os.path.join(qdir, "bad")
        #: msgid -> the last alert logged for it (one alert per problem)
        self._reported: dict = {}
        #: Whether spare/ exists (a queue made by an older eqmail has none
        #: until the daemon starts).
        self.spares_on = True
        self._spare_names: List[str] = []  # names seen in spare/, maybe taken since
        self._spare_relist = 0.0           # no new listing before (monotonic s)
        # the names this process puts files under, in turn from a random start
        self._spare_slots = itertools.count(int.from_bytes(os.urandom(2), "big"))
        self.trigger = os.path.join(qdir, "lock", "trigger")
        self.keyfile = os.path.join(qdir, "lock", KEY_FILE)
        self._key: Optional[Tuple[int, bytes]] = None  # (birth, key) once read
        #: Whether fsync of a new file also makes its name in mess/ durable
        #: (`fsync_covers_new_name`); None: not looked up yet.
        self.one_fsync: Optional[bool] = None
        self._seq = itertools.count(1)
        #: Called with each committed Item by the process that committed it
        #: (the daemon's scheduler); None means "poke the trigger FIFO".
        self.on_commit: Optional[Callable[[Item], None]] = None
        #: Drafts open in this process (never junk while open).
        self.open_drafts: set = set()

    @classmethod
    def open(cls, home: str, create: bool = True) -> "Store":
        """Open (and with `create`, make) the queue under `home`.  A version 1
        queue is converted (`upgrade_v1`) when this process may write it.

        Raises OSError when the directories cannot be made or are missing.
        """
        qdir = os.path.join(home, "queue")
        store = cls(qdir)
        if create:
            for d in (qdir, store.mess, store.tmp, store.bounce, store.spare,
                      store.hold, os.path.join(qdir, "lock")):
                os.makedirs(d, mode=0o700, exist_ok=True)
            if not os.path.exists(store.trigger):
                try:
                    os.mkfifo(store.trigger, 0o600)
                except FileExistsError:
                    pass
            if os.path.isdir(os.path.join(qdir, "envelope")):
                store.upgrade_v1()
        else:
            try:
                st = os.stat(store.mess)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "no queue", store.mess) from None
            # PermissionError (queue/ belongs to the daemon's user) goes up as it is
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a queue", store.mess)
            if not os.access(store.mess, os.R_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied", store.mess)
            store.spares_on = os.path.isdir(store.spare)
            old = os.path.join(qdir, "envelope")
            if os.path.isdir(old) and os.access(old, os.W_OK):  # never commit into v1
                store.upgrade_v1()
        return store

    def make_key(self) -> None:
        """Make the queue's key file (lock/key) unless it exists (the first
        draft of a queue without one does, in `_create`): 32 random
        bytes and the time it was made (its birth), written to a file of its
        own, fsync'd and linked into place (an existing key is never
        replaced: all marks made with it would fail).  Raises OSError."""
        if os.path.exists(self.keyfile):
            return
        text = _KEY_MAGIC + b"%d %s\n" % (int(time.time()), os.urandom(32).hex().encode())
        # a name of this attempt's own (threads of one process make keys at
        # once on a fresh queue): never another writer's file, never truncated
        tmp = "%s.%d.%s" % (self.keyfile, os.getpid(), os.urandom(8).hex())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            _write_all(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.keyfile)
        except FileExistsError:
            pass  # another process made it first: theirs counts
        finally:
            os.unlink(tmp)
        fsync_dir(os.path.dirname(self.keyfile))

    def key(self) -> Optional[Tuple[int, bytes]]:
        """(birth in unix seconds, key bytes) from lock/key, or None when
        there is none (a queue made by an eqmail before 0.2 whose daemon has
        not started since).  Raises OSError, or ValueError when the file is
        malformed (then nothing is committed or trusted: see COMMIT MARK)."""
        if self._key is None:
            try:
                with open(self.keyfile, "rb") as f:
                    raw = f.read(256)
            except FileNotFoundError:
                return None
            fields = raw[len(_KEY_MAGIC):].split()
            if (not raw.startswith(_KEY_MAGIC) or len(fields) != 2
                    or not fields[0].isdigit() or len(fields[1]) != 64):
                raise ValueError("malformed queue key %s" % self.keyfile)
            self._key = (int(fields[0]), bytes.fromhex(fields[1].decode("ascii")))
        return self._key

    def marked(self, msgid: str) -> bool:
        """Whether the queue file of `msgid` must carry a commit mark: a key
        exists and the ID is younger than it.  Raises as `key()`."""
        key = self.key()
        return key is not None and id_time(msgid) > key[0]

    def upgrade_v1(self) -> int:
        """Convert a version 1 queue (mess/ID data, envelope/ID envelope) in
        place.  Returns the count of messages converted; raises OSError.

        Under an exclusive flock(2) of envelope/ (one converter at a time):
        first, once (marked by envelope/.swept), every mess/ file without an
        envelope is removed: it is v1 junk (a partial or finished message)
        and its bytes came from the network, so they are never read as a
        queue file.  Then each message: its data size is recorded in its v1
        envelope (an ``S`` record, fsync'd) unless recorded already; the data
        file is cut back to that size (a conversion cut short by a crash is
        redone, a trailer in the data is never trusted), the v2 envelope
        with the progress marks and the trailer are appended and fsync'd,
        and envelope/ID goes.  envelope/ goes last.  Safe to rerun after a
        crash at any point.
        """
        import fcntl

        old = os.path.join(self.qdir, "envelope")
        try:
            lock = os.open(old, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            return 0
        converted = 0
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isdir(old):
                return 0  # another process finished it meanwhile
            swept = os.path.join(old, ".swept")
            if not os.path.exists(swept):
                committed = set(os.listdir(old))
                for name in os.listdir(self.mess):
                    if name not in committed:
                        try:
                            os.unlink(os.path.join(self.mess, name))
                        except (FileNotFoundError, IsADirectoryError, PermissionError):
                            pass
                fsync_dir(self.mess)
                os.close(os.open(swept, os.O_WRONLY | os.O_CREAT, 0o600))
                fsync_dir(old)
            for name in os.listdir(old):
                if name.startswith("."):
                    continue
                try:
                    converted += self._convert_v1(name, os.path.join(old, name))
                except ValueError as e:
                    log.alert("queue upgrade: unable to read envelope %s: %s" % (name, e))
            if [n for n in os.listdir(old) if not n.startswith(".")]:
                return converted  # a bad envelope stays; tried again next time
            os.unlink(swept)
            os.rmdir(old)
            fsync_dir(self.qdir)
        finally:
            os.close(lock)
            if converted:
                log.status("queue upgrade: %d messages converted to version 2" % converted)
        return converted

    def _convert_v1(self, name: str, env_path: str) -> int:
        """One message of upgrade_v1().  Returns 1, or 0 when its data was
        gone (a finished message).  Raises OSError, ValueError."""
        with open(env_path, "rb") as f:
            v1 = f.read()
        try:
            fd = os.open(os.path.join(self.mess, name), os.O_RDWR)
        except FileNotFoundError:
            os.unlink(env_path)  # v1 state 6: the message was finished
            return 0
        try:
            item = decode_envelope(name, v1, 0, _V1)
            sizes = [r[1:] for r in v1.split(b"\0") if r[:1] == b"S" and r[1:].isdigit()]
            if sizes:
                size = int(sizes[-1])
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
                efd = os.open(env_path, os.O_WRONLY | os.O_APPEND)
                try:
                    _write_all(efd, b"S%d\0" % size)
                    os.fsync(efd)
                finally:
                    os.close(efd)
            env, offsets = encode_envelope(item.birth, item.uid, item.pid,
                                           item.sender, item.recipients, params=item.params)
            mark = self._mark_of(name, fd, size, env) if self.marked(name) else b""
            env = bytearray(env)
            for off, was_done in zip(offsets, item.done):
                if was_done:
                    env[off:off + 1] = b"D"
            view, at = memoryview(bytes(env) + mark + encode_trailer(size)), size
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(env_path)
        return 1

    # -- writing ------------------------------------------------------------

    def new_id(self) -> str:
        return "%d.%d.%d" % (int(time.time()), os.getpid(), next(self._seq))

    def draft(self) -> "Draft":
        """Start a new message.  Raises QueueError when the queue cannot take
        it (a directory missing or not writable), before any data comes.

        The file itself is created by the first write to disk (a message
        under `CHUNK` bytes: by commit()), in the same threadpool call.
        Checking the directories is two access(2) calls on the hub.
        """
        for d in (self.tmp, self.mess):
            if not os.access(d, os.W_OK | os.X_OK):
                raise QueueError("qq trouble creating files in queue (#4.3.0)",
                                 errno.EACCES)
        try:
            key = self.key()  # None: the first write makes it (_create)
        except (OSError, ValueError) as e:
            log.alert("queue: %s" % e)
            raise QueueError("qq trouble creating files in queue (#4.3.0)",
                             getattr(e, "errno", None))
        return Draft(self, self.new_id(), key)

    def _create(self, draft: "Draft") -> int:
        """Create the draft's file (blocking): in mess/ when it gets a commit
        mark and its ID is younger than the key (draft.direct), else in
        tmp/; a spare file renamed (draft.reused), else a new one.  A name in
        use in tmp/ or mess/ is skipped: a committed message is never
        replaced.  A queue without a key gets one here (`make_key`; if that
        fails, the message goes through tmp/ without a mark).  Sets
        draft.path; returns the descriptor, at offset 0; raises OSError."""
        if draft.key is None:
            try:
                self.make_key()
                draft.key = self.key()
            except (OSError, ValueError) as e:
                log.warning("queue: unable to make %s: %s" % (self.keyfile, e))
        for _ in range(100):
            final = os.path.join(self.mess, draft.id)
            draft.direct = draft.key is not None and id_time(draft.id) > draft.key[0]
            path = final if draft.direct else os.path.join(self.tmp, draft.id)
            if not os.path.lexists(final):
                fd = self._take_spare(path)
                if fd >= 0:
                    draft.reused = True
                    draft.path = path
                    return fd
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                fd = -1
            if fd >= 0 and (draft.direct or not os.path.lexists(final)):
                draft.path = path
                return fd
            if fd >= 0:
                os.close(fd)
                os.unlink(path)
            self.open_drafts.discard(draft.id)
            draft.id = self.new_id()
            self.open_drafts.add(draft.id)
        raise OSError(errno.EEXIST, "no free queue file name")

    def _take_spare(self, path: str) -> int:
        """Rename a file of spare/ to `path` and open it for writing
        (blocking).  Returns the descriptor, or -1 when no spare file could
        be had.  Another process may take the same name first; a file this
        process may not write, or that is not a regular file, is dropped."""
        if not self.spares_on:
            return -1
        names = self._spare_names
        for _ in range(8):
            if not names:
                now = time.monotonic()
                if now < self._spare_relist:
                    return -1
                try:
                    names[:] = os.listdir(self.spare)
                except OSError:
                    names.clear()
                if not names:  # none: no new listing for a while
                    self._spare_relist = now + 0.25
                    return -1
            try:
                name = names.pop()  # atomic: threadpool threads share the list
            except IndexError:
                continue
            try:
                os.rename(os.path.join(self.spare, name), path)
            except FileNotFoundError:
                continue  # taken by someone else meanwhile
            except OSError:
                return -1
            try:
                fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
                             | getattr(os, "O_NONBLOCK", 0))
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    # a second name (fsck after a crash in a rename from
                    # mess/ may leave one) could be a committed message
                    os.close(fd)
                    raise IsADirectoryError(errno.EISDIR, "not a regular file of its own")
            except OSError:
                try:
                    os.unlink(path)
                except IsADirectoryError:
                    try:
                        os.rmdir(path)
                    except OSError:
                        pass  # a full directory: recover() leaves it, no ID reuses it
                except OSError:
                    pass
                continue
            return fd
        return -1

    def _keep_spare(self, msgid: str) -> bool:
        """Move the finished mess/ID to spare/N for reuse (blocking): N is the
        next of this process's names in turn; a file still there is replaced.
        False when it was not kept: spare/ missing or full (SPARES names
        waiting), the file too large, or gone already, or spare/ not
        writable (then never again here).
        Never raises."""
        if not self.spares_on or len(self._spare_names) >= SPARES:
            # spare/ is full and nobody is taking from it (a drain): a
            # rename over a spare costs more than the unlink, and the list
            # of names would grow with every message
            return False
        path = os.path.join(self.mess, msgid)
        name = str(next(self._spare_slots) % SPARES)
        try:
            if os.lstat(path).st_size > SPARE_SIZE:
                return False
            os.rename(path, os.path.join(self.spare, name))
        except FileNotFoundError:
            return False
        except OSError:  # spare/ not ours (made by root?): unlink from now on
            self.spares_on = False
            return False
        self._spare_names.append(name)  # this process's next draft takes it
        return True

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

    def any_ids(self) -> bool:
        """Whether any committed message exists (reads one directory entry,
        not the whole list).  Raises OSError."""
        with os.scandir(self.mess) as it:
            return any(not e.name.startswith(".") for e in it)

    def ids(self) -> List[str]:
        """IDs of all committed messages, oldest first."""
        return sorted((n for n in os.listdir(self.mess) if not n.startswith(".")),
                      key=id_order)

    def load(self, msgid: str) -> Item:
        """Read one committed message's envelope from disk, checking its
        commit mark (COMMIT MARK): it reads the whole file.  Raises
        NotCommitted for a file being written or left half-written by a
        crash, ValueError for one that is not a queue file, OSError."""
        fd = os.open(os.path.join(self.mess, msgid), os.O_RDONLY)
        try:
            return self._verify(msgid, fd)
        finally:
            os.close(fd)

    def _verify(self, msgid: str, fd: int) -> Item:
        try:
            item, env = read_item(msgid, fd)
        except ValueError as e:
            # the key is looked at after the file: a file written straight
            # into mess/ exists only once the key does
            raise (NotCommitted if self.marked(msgid) else Damaged)(str(e))
        marked = self.marked(msgid)
        bad = NotCommitted if marked else Damaged
        base = item.size
        env, mark = split_mark(env)
        if mark is None:
            if marked:
                raise NotCommitted("no commit mark")
            return item  # written through tmp/ before the queue had a key
        if self.key() is None:
            raise ValueError("a commit mark but no queue key (%s)" % self.keyfile)
        plain = bytearray(env)
        for off in item.offsets:
            plain[off - base] = 0x54  # T: the mark was made before any D
        if self._mark_of(msgid, fd, base, bytes(plain))[1:-1] != mark:
            raise bad("commit mark does not match")
        return item

    def _mark_of(self, msgid: str, fd: int, size: int, env: bytes) -> bytes:
        """The commit mark record of the queue file open on `fd`, whose data
        is `size` bytes and whose envelope (every recipient T) is `env`."""
        h = _mark_hash(self.key()[1], msgid)
        at = 0
        while at < size:
            chunk = os.pread(fd, min(CHUNK, size - at), at)
            if not chunk:
                raise NotCommitted("queue file shorter than its data")
            h.update(chunk)
            at += len(chunk)
        return _finish_mark(h, env, size)

    def load_committed(self, msgid: str, clean: bool = False,
                       at_start: bool = False) -> Optional[Item]:
        """`load()` for a scan of mess/: None for a message finished
        meanwhile, a file being written, or a bad file (logged).  With
        `clean` (the daemon), a file that is not committed and whose writer
        is gone (`_writer_alive`, as for tmp/ junk) is removed.  Blocking
        (reads the whole file): a threadpool thread, or a tool."""
        try:
            return self.load(msgid)
        except FileNotFoundError:
            return None
        except NotCommitted as e:
            if clean and self._is_junk(msgid, at_start):
                try:
                    os.unlink(os.path.join(self.mess, msgid))
                except FileNotFoundError:
                    return None
                fsync_dir_soon(self.mess)
                log.status("queue: removed %s, never committed (%s)" % (msgid, e))
            return None
        except Damaged as e:
            if clean:
                try:
                    moved = self.set_aside(msgid)
                except OSError as e2:
                    self._report(msgid, "msg %s: damaged queue file (%s); unable to move it "
                                 "to %s: %s" % (msgid, e, self.bad, e2))
                    return None
                if moved is not None:
                    self._reported.pop(msgid, None)
                    log.alert("msg %s: damaged queue file (%s); moved to %s, never "
                              "delivered (eqmail qbad shows and removes it)"
                              % (msgid, moved[1], moved[0]))
                    return None
                try:  # not damaged after all (the file changed meanwhile)
                    return self.load(msgid)
                except (OSError, ValueError):
                    return None
            self._report(msgid, "msg %s: damaged queue file (%s)" % (msgid, e))
            return None
        except (OSError, ValueError) as e:
            self._report(msgid, "unable to read queue file %s: %s" % (msgid, e))
            return None

    def _report(self, msgid: str, text: str) -> None:
        """log.alert(text), unless it is what was said last for `msgid` (a
        file that stays unreadable is not alerted at every scan)."""
        if self._reported.get(msgid) == text:
            return
        if len(self._reported) > 10000:
            self._reported.clear()
        self._reported[msgid] = text
        log.alert(text)

    # -- damaged files (DAMAGED FILES) ---------------------------------------------

    def set_aside(self, msgid: str) -> Optional[Tuple[str, str]]:
        """Move mess/ID to bad/ when it is `Damaged` (checked here again, on
        the file's own descriptor).  Returns (its path in bad/, why), or
        None when it is not damaged (any more), gone, being written, or a
        version 1 queue is being converted.  Blocking; raises OSError."""
        if msgid in self.open_drafts or os.path.isdir(os.path.join(self.qdir, "envelope")):
            return None
        src = os.path.join(self.mess, msgid)
        try:
            fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return None
            try:
                self._verify(msgid, fd)
                return None
            except Damaged as e:
                why = str(e)
            except (NotCommitted, ValueError):
                return None
            after = os.fstat(fd)
            now = os.lstat(src)
        finally:
            os.close(fd)
        same = (before.st_size, before.st_mtime_ns, before.st_ino, before.st_dev)
        if ((after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev) != same
                or (now.st_size, now.st_mtime_ns, now.st_ino, now.st_dev) != same):
            return None  # it changed while being read: look again at the next scan
        if not os.path.isdir(self.bad):
            os.makedirs(self.bad, mode=0o700, exist_ok=True)
            fsync_dir(self.qdir)
        for n in range(1000):
            dst = os.path.join(self.bad, msgid if n == 0 else "%s-%d" % (msgid, n))
            try:
                os.link(src, dst)  # never replaces a file in bad/
            except FileExistsError:
                try:
                    if os.path.samefile(src, dst):
                        break  # linked before a crash: only the unlink is left
                except OSError:
                    pass
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if os.path.lexists(dst):
                    continue
                os.rename(src, dst)  # a file system without hard links
                fsync_dir(self.bad)
                fsync_dir_soon(self.mess)
                return dst, why
            break
        else:
            raise OSError(errno.EEXIST, "no free name in bad/", self.bad)
        fsync_dir(self.bad)
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
        fsync_dir_soon(self.mess)
        return dst, why

    def bad_names(self) -> List[str]:
        """The names of the files in bad/ (IDs, maybe with a suffix -N),
        oldest ID first; [] when there is no bad/.  Raises OSError."""
        try:
            names = [n for n in os.listdir(self.bad) if not n.startswith(".")]
        except FileNotFoundError:
            return []

        def key(n):
            fields = n.split("-", 1)[0].split(".")
            return ([int(f) if f.isdigit() else 0 for f in fields], n)

        return sorted(names, key=key)

    def bad_path(self, name: str) -> str:
        """The path of bad/NAME.  Raises ValueError for a name that is not a
        plain file name (a path, ``.``, ``..``)."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError("not a file name in bad/: %r" % name)
        return os.path.join(self.bad, name)

    def examine_bad(self, name: str):
        """(the Item as far as it can be read or None, why it is damaged or
        None when it reads well now, the size of the file) of bad/NAME.
        Raises OSError (FileNotFoundError for an unknown name), ValueError
        as `bad_path`."""
        path = self.bad_path(name)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
            msgid = name.split("-", 1)[0]
            item, why = None, None
            try:
                item, _ = read_item(msgid, fd)
            except ValueError as e:
                why = str(e)
            if why is None:
                try:
                    self._verify(msgid, fd)
                except ValueError as e:
                    why = str(e)
            return item, why, st.st_size
        finally:
            os.close(fd)

    def remove_bad(self, name: str) -> None:
        """Unlink bad/NAME and fsync bad/.  Raises OSError
        (FileNotFoundError for an unknown name), ValueError as `bad_path`."""
        path = self.bad_path(name)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a file", path)
        os.unlink(path)
        fsync_dir(self.bad)

    def _is_junk(self, msgid: str, at_start: bool) -> bool:
        if msgid in self.open_drafts:
            return False
        try:
            st = os.lstat(os.path.join(self.mess, msgid))
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        return time.time() - st.st_mtime >= JUNK_AGE or not self._writer_alive(msgid, at_start)

    def items(self, clean: bool = False, at_start: bool = False) -> Iterator[Item]:
        """Every committed message that can be read (`load_committed`)."""
        for msgid in self.ids():
            item = self.load_committed(msgid, clean, at_start)
            if item is not None:
                yield item

    def message_path(self, msgid: str) -> str:
        """The queue file of `msgid` (data, envelope, trailer): read its data
        with `open_message()`, never as a plain file."""
        return os.path.join(self.mess, msgid)

    def plain_copy(self, msgid: str) -> str:
        """Copy the data of `msgid` to a new file in tmp/ (for beforemote
        filters) and return its path; the caller removes it.  Blocking.
        Raises OSError, or ValueError when the queue file is bad."""
        import shutil

        path = os.path.join(self.tmp, "plain.%d.%s" % (os.getpid(), msgid))
        with open_message(self.message_path(msgid)) as src:
            try:
                with open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            except BaseException:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                raise
        return path

    def mark_done(self, item: Item, index: int) -> None:
        """Record that recipient `index` of `item` is finished; the mark
        reaches the disk within durable.SOON seconds (qmail-send's markdone
        makes no fsync at all: a crash before then delivers that recipient
        again, at least once).  Runs in the threadpool.  Raises OSError."""
        path = os.path.join(self.mess, item.id)
        offset = item.offsets[index]

        def work():
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"D", offset)
            finally:
                os.close(fd)
            fsync_file_soon(path)

        _offload(work)
        item.done[index] = True

    def mark_done_many(self, item: Item, indexes: Sequence[int]) -> None:
        """mark_done for several recipients at once: one threadpool call,
        one (later) fsync.  Raises OSError (the marks before the failing
        one may be written: each recipient is then delivered at most once
        more)."""
        path = os.path.join(self.mess, item.id)

        def work():
            fd = os.open(path, os.O_WRONLY)
            try:
                for index in indexes:
                    os.pwrite(fd, b"D", item.offsets[index])
            finally:
                os.close(fd)
            fsync_file_soon(path)

        _offload(work)
        for index in indexes:
            item.done[index] = True

    def remove(self, item: Item) -> None:
        """Remove a finished message (the scheduler skips the done mark of a
        message's last recipients and relies on this); its directory is
        fsync'd within half a second (see STATES)."""
        _offload(self.remove_now, item)

    def remove_now(self, item: Item) -> None:
        """remove(), blocking: for a threadpool thread that is already
        running (the delivery that finished the message).  Raises OSError."""
        self.remove_id_now(item.id)

    def remove_id_now(self, msgid: str) -> None:
        """remove_now() by queue ID (the local-delivery worker has no Item):
        the file goes to spare/ (`_keep_spare`) or is unlinked.  Blocking;
        raises OSError."""
        if self._keep_spare(msgid):
            fsync_dir_soon(self.spare)
        else:
            try:
                os.unlink(os.path.join(self.mess, msgid))
            except FileNotFoundError:
                pass
        fsync_dir_soon(self.mess)  # see STATES
        for d in (self.hold, self.warned):  # the admin's note, the delay notice's
            try:
                os.unlink(os.path.join(d, msgid))
            except FileNotFoundError:
                pass

    def commit_from(self, prefix: bytes, path: str, sender: str,
                    recipients: Sequence[str]) -> Item:
        """Queue a new message made of `prefix` and the data of the queue file
        at `path` (a forward, qmail-local style).  Raises QueueError."""
        draft = self.draft()
        try:
            draft.write(prefix)
            f = _offload(open_message, path)
            try:
                while True:
                    chunk = _offload(f.read, CHUNK)
                    if not chunk:
                        break
                    draft.write(chunk)
            finally:
                f.close()
        except (OSError, ValueError) as e:
            draft.abort()
            raise QueueError("qq read error (#4.3.0)", getattr(e, "errno", None))
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

    # -- the admin's notes: held messages, last temporary failures --------------------

    def held_ids(self) -> List[str]:
        """The IDs in hold/ ([] without the directory)."""
        try:
            return os.listdir(self.hold)
        except FileNotFoundError:
            return []

    def set_held(self, msgid: str, held: bool) -> None:
        """Make or remove hold/ID.  Raises OSError."""
        path = os.path.join(self.hold, msgid)
        if held:
            os.makedirs(self.hold, mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def was_warned(self, msgid: str) -> bool:
        """Whether the delay notice of `msgid` went out (warned/ID)."""
        return os.path.exists(os.path.join(self.warned, msgid))

    def set_warned(self, msgid: str) -> None:
        """Make warned/ID (no fsync: a crash may send the notice twice, never
        lose it).  Raises OSError."""
        os.makedirs(self.warned, mode=0o700, exist_ok=True)
        os.close(os.open(os.path.join(self.warned, msgid), os.O_WRONLY | os.O_CREAT, 0o600))

    def drop_failures(self, msgid: str) -> None:
        try:
            os.unlink(os.path.join(self.bounce, msgid))
        except FileNotFoundError:
            pass

    # -- recovery -------------------------------------------------------------

    def recover(self, at_start: bool = True) -> int:
        """Remove junk left by crashes: tmp/ files (state 2) and bounce/
        files of finished messages.  Returns the count.

        A file whose writer (the pid in its ID) still runs is left alone
        unless it is older than `JUNK_AGE`; at start, files of this very pid
        are junk from an earlier process that had the same pid.  A tmp/ID
        whose mess/ID exists is the same file, left by a crash after the
        link: always junk.
        """
        now = time.time()
        removed = 0
        for d in (self.tmp, self.bounce, self.hold, self.warned):
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name in self.open_drafts:
                    continue
                linked = os.path.exists(os.path.join(self.mess, name))
                if d != self.tmp and linked:
                    continue
                path = os.path.join(d, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if (not linked and now - st.st_mtime < JUNK_AGE
                        and self._writer_alive(name, at_start)):
                    continue
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            log.status("queue recovery removed %d partial files" % removed)
        self._trim_spares()
        return removed

    def _trim_spares(self) -> None:
        """Unlink what spare/ holds besides the names 0 .. SPARES-1 (left by
        an eqmail with a larger SPARES)."""
        try:
            names = os.listdir(self.spare)
        except OSError:
            return
        keep = set(str(n) for n in range(SPARES))
        for name in names:
            if name in keep:
                continue
            try:
                os.unlink(os.path.join(self.spare, name))
            except OSError:
                pass

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

    def __init__(self, store: Store, msgid: str,
                 key: Optional[Tuple[int, bytes]] = None):
        self.store = store
        self.id = msgid
        self.key = key  # the queue's (birth, key): the file gets a commit mark
        self.fd = -1  # created by the first write to disk
        self.path = ""  # of the file, once created: in mess/ when direct
        self.direct = False  # written as mess/ID: the mark alone commits it
        self.reused = False  # the file is a spare one: cut it at commit
        self._mark = None  # the commit mark's hash, fed the data written
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

    def held(self) -> Optional[bytes]:
        """The whole message so far when none of it has gone to disk yet
        (under CHUNK bytes, no write error), else None."""
        if self.fd >= 0 or self.path or self.error is not None or self._closed:
            return None
        return bytes(self._buf)

    def contents(self, limit: int) -> Optional[bytes]:
        """The whole message written so far when it is at most `limit`
        bytes (read back from the file when it went to disk), else None;
        None after a write error too.  May block (a threadpool read)."""
        if self.error is not None or self._closed or self.size > limit:
            return None
        if self.fd < 0:
            return bytes(self._buf)
        if self._buf:
            self._flush()
            if self.error is not None:
                return None
        try:
            return _offload(os.pread, self.fd, self.size, 0)
        except OSError:
            return None

    def _flush(self) -> None:
        buf, self._buf = bytes(self._buf), bytearray()
        try:
            _offload(self._write, buf)
        except OSError as e:
            self.error = _write_error(e)

    def _write(self, buf: bytes) -> None:
        if self.fd < 0:
            self.fd = self.store._create(self)
            if self.key is not None:
                self._mark = _mark_hash(self.key[1], self.id)
        if self._mark is not None:
            self._mark.update(buf)
        _write_all(self.fd, buf)

    def commit(self, sender: str, recipients: Sequence[str], uid: Optional[int] = None,
               pid: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> Item:
        """Make the message durable (states 2 -> 3) and return its Item.
        `params`: the message's ESMTP options to keep (see Item.params).

        Raises QueueError (temporary) for any write, fsync or link error;
        the draft is then removed.
        """
        if self._closed:
            raise QueueError("qq internal bug (#4.3.0)")
        birth = int(time.time())
        uid = os.getuid() if uid is None else uid
        pid = os.getpid() if pid is None else pid
        params = dict(params) if params else None
        env, offsets = encode_envelope(birth, uid, pid, sender, recipients, params=params)
        base = self.size
        offsets = [base + o for o in offsets]
        buf, self._buf = bytes(self._buf), bytearray()
        store = self.store
        if self.error is not None:
            self.abort()
            raise self.error

        def work():
            self._write(buf)
            tail = env
            if self._mark is not None:
                tail += _finish_mark(self._mark, env, base)
            tail += encode_trailer(base)
            _write_all(self.fd, tail)
            if self.reused:  # drop what is left of the file's former bytes
                os.ftruncate(self.fd, base + len(tail))
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if self.direct:  # the mark commits it, once durable with its name
                if store.one_fsync is None:
                    store.one_fsync = fsync_covers_new_name(store.mess)
                if not store.one_fsync:
                    fsync_dir(store.mess)
                return
            tmp = os.path.join(store.tmp, self.id)
            final = os.path.join(store.mess, self.id)
            try:
                os.link(tmp, final)  # never replaces a committed message
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                                   errno.EMLINK) or os.path.lexists(final):
                    raise
                os.rename(tmp, final)  # a file system without hard links
            else:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass  # the same file as mess/ID: recover() removes it
            linked.append(final)
            fsync_dir(store.mess)  # shared with concurrent commits

        linked: List[str] = []
        try:
            _offload(work)
        except OSError as e:
            for path in linked:  # in mess/ but not made durable: take it back
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self.abort()
            raise _write_error(e)
        self._closed = True
        store.open_drafts.discard(self.id)
        item = Item(self.id, birth, sender, list(recipients),
                    [False] * len(recipients), offsets, size=self.size, uid=uid, pid=pid,
                    params=params)
        if store.on_commit is not None:  # in the daemon (or one of its workers)
            store.on_commit(item)
        else:  # a tool (sendmail, smtpd): stay quiet, wake the daemon
            store.poke()
        return item

    def abort(self) -> None:
        """Throw the draft away (state 2 -> 1).  Never raises."""
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
        if self.path:
            try:
                os.unlink(self.path)
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
