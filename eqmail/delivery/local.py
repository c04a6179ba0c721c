"""delivery.local -- one local delivery as qmail-local does it.

SUMMARY
    `deliver(config, msgfile, sender, local, domain, target)` follows the
    dot-qmail file that controls ``local@domain`` for `target` (see
    delivery.users) and returns a `LocalResult`: the Result and the forward
    addresses, which the caller queues (this function never touches the
    queue, so it can run as the recipient's uid in a child process).

    File search (ext lower-cased, ``.`` turned into ``:``): dash "" uses
    ``.qmail``; otherwise ``.qmail<dash><ext>``, then for every ``-`` in ext
    from the right ``.qmail<dash><prefix>-default``, then
    ``.qmail<dash>default``; a -default match sets DEFAULT.  No file: the
    bare user (dash "") gets control/defaultdelivery; anyone else is
    refused, ``Sorry, no mailbox here by that name. (#5.1.1)``.  An empty
    (0 byte) .qmail also means defaultdelivery.

    Lines (trailing blanks removed): ``#`` comment; ``|command`` run by
    /bin/sh -c in the home, message on stdin; ``/path`` or ``./path``:
    a Maildir when it ends in ``/``, else an mbox; ``&address`` or any other
    line: a forward.  Files and programs run in order; forwards are
    collected and go out together at the end.  A program's exit code: 0 ok;
    99 ok and skip the following lines; 64, 65, 70, 76, 77, 78, 100, 112
    permanent failure; anything else, or a signal, temporary failure.

STANDARDS
    qmail-local(8), dot-qmail(5), mbox(5), maildir(5); behaviour reference
    sections 6.2-6.4.

SECURITY
    Runs as the recipient's uid (see delivery.lspawn).  Nothing taken from
    the address may leave the home: an extension with ``/`` is refused and
    dots in it become ``:`` (so ``..`` cannot climb).  qmail's safety checks
    give temporary failures: a world-writable home or .qmail, a sticky home
    (the user is editing), a blank first line, file or program lines in a
    .qmail with its x bit set (forward-only).  A file line may not climb
    out of the home (``./../x``); when the delivery runs with eqmaild's own
    uid (virtual users), absolute paths and symbolic links must stay inside
    the home too, so a .qmail cannot write into the queue.  Elsewhere paths
    are the user's own choice, used with the user's permissions.  Program
    lines run with the target's uid and are not confined.

LIMITS
    A program may run PROGRAM_TIMEOUT seconds; its output is kept up to
    PROGRAM_OUTPUT bytes for the report.  An mbox lock is waited for
    MBOX_LOCK_WAIT seconds.

BLOCKING
    Everything here blocks: the scheduler runs it in gevent's threadpool or
    in a forked child, never on the hub.  Programs are started with the
    stdlib subprocess module from that thread or child (gevent.subprocess
    would install libev's SIGCHLD reaper, which steals the exit status of
    processes that threads wait for).
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from typing import BinaryIO, List, Optional, Sequence, Tuple

from . import Result, deferred, delivered, failed, FAILURE, DEFERRAL, SUCCESS
from ..address import quote_address
from ..control import Config
from .users import Target
from ..cpu import unpinned
from ..durable import fsync_dir

_seq = itertools.count(1)
_COPY = 65536
#: Bytes of header read for the Delivered-To loop check.
_HEADER_SCAN = 1 << 20
#: Bytes read of a dot-qmail file at most.
MAX_DOT_QMAIL = 1 << 20
PROGRAM_TIMEOUT = 3600
PROGRAM_OUTPUT = 1000
MBOX_LOCK_WAIT = 30
#: Program exit codes that qmail-local reads as permanent failures.
PERMANENT_EXITS = frozenset([64, 65, 70, 76, 77, 78, 100, 112])
PROGRAM_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class LocalResult:
    """The outcome of one local delivery and the forwards it asks for."""

    result: Result
    forwards: List[str] = field(default_factory=list)
    newsender: str = ""

    def to_dict(self) -> dict:
        r = self.result
        return {"kind": r.kind, "status": r.status, "text": r.text,
                "forwards": list(self.forwards), "newsender": self.newsender}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalResult":
        """Rebuild from a child's report.  Raises ValueError for anything odd."""
        kind, status, text = d.get("kind"), d.get("status"), d.get("text")
        forwards, newsender = d.get("forwards"), d.get("newsender")
        if kind not in (SUCCESS, DEFERRAL, FAILURE) or not isinstance(status, str) \
                or not isinstance(text, str) or not isinstance(newsender, str) \
                or not isinstance(forwards, list) \
                or not all(isinstance(f, str) for f in forwards):
            raise ValueError("malformed delivery report")
        for a in forwards + [newsender]:
            if any(ch < " " for ch in a):
                raise ValueError("control characters in a forward address")
        return cls(Result(kind, status, text), forwards, newsender)


# -- Maildir ---------------------------------------------------------------------------

def maildirmake(path: str, mode: int = 0o700) -> None:
    """Create a Maildir (tmp, new, cur) at `path`, like qmail's maildirmake.
    Existing directories are kept.  Raises OSError."""
    os.makedirs(path, mode=mode, exist_ok=True)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=mode, exist_ok=True)


def _hostname() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name() -> str:
    """A Maildir file name: ``<sec>.M<usec>P<pid>Q<seq>.<host>`` (maildir(5))."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1e6)
    return "%d.M%dP%dQ%d.%s" % (sec, usec, os.getpid(), next(_seq), _hostname())


def rewind(msgfile: BinaryIO) -> None:
    """Back to byte 0, buffer dropped and the descriptor itself at 0 too
    (a program reads the descriptor; a plain seek(0) inside the buffer
    would leave it wherever the last read left it)."""
    msgfile.seek(0, os.SEEK_END)
    msgfile.seek(0)


def _copy(msgfile: BinaryIO, fd: int) -> None:
    rewind(msgfile)
    while True:
        chunk = msgfile.read(_COPY)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def deliver_maildir(maildir: str, msgfile: BinaryIO, prefix: bytes,
                    later: Optional[set] = None) -> Result:
    """Write `prefix` then the message into the Maildir `maildir`: tmp/,
    fsync, link into new/, fsync new/.  Every failure is temporary.
    `later`: new/ is added to this set instead of fsync'd; the caller
    fsyncs it before it reports the success to anyone."""
    name = unique_name()
    tmp = os.path.join(maildir, "tmp", name)
    new = os.path.join(maildir, "new", name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return deferred("Maildir %s does not exist or is not a Maildir. (#4.2.1)"
                            % maildir, "4.2.1")
        return deferred("Unable to open %s: %s. (#4.2.1)" % (tmp, e.strerror), "4.2.1")
    try:
        try:
            os.write(fd, prefix)
            _copy(msgfile, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, new)
        if later is not None:
            later.add(os.path.join(maildir, "new"))
        else:
            fsync_dir(os.path.join(maildir, "new"))  # shared with concurrent deliveries
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return deferred("Disk full writing to Maildir. (#4.3.0)", "4.3.0")
        return deferred("Unable to write to Maildir: %s. (#4.3.0)" % e.strerror, "4.3.0")
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return delivered("maildir %s" % name)


# -- mbox ------------------------------------------------------------------------------

def _from_line(sender: str, when: Optional[float] = None) -> bytes:
    who = sender or "MAILER-DAEMON"
    who = "".join("-" if ch in " \t\n" else ch for ch in who)
    return ("From %s %s\n" % (who, time.asctime(time.localtime(when)))).encode(
        "utf-8", "surrogateescape")


def deliver_mbox(path: str, msgfile: BinaryIO, sender: str, prefix: bytes,
                lock_wait: float = MBOX_LOCK_WAIT, nofollow: bool = False) -> Result:
    """Append to the mbox `path` under an fcntl lock: From_ line, `prefix`,
    the message with ``>`` before every line matching ``^>*From ``, a final
    newline when missing and one empty line; fsync.  On a write error the
    file is cut back to its old size.  Every failure is temporary."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | (os.O_NOFOLLOW if nofollow else 0), 0o600)
    except OSError as e:
        return deferred("Unable to open %s: %s. (#4.2.1)" % (path, e.strerror), "4.2.1")
    try:
        deadline = time.time() + lock_wait
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    return deferred("Unable to lock %s: %s. (#4.2.1)" % (path, e.strerror),
                                    "4.2.1")
                if time.time() >= deadline:
                    return deferred("File has been locked for %d seconds straight. (#4.3.0)"
                                    % lock_wait)
                time.sleep(0.5)
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            out = [_from_line(sender), prefix]
            rewind(msgfile)
            last = b"\n"
            for line in msgfile:
                if line.lstrip(b">").startswith(b"From "):
                    line = b">" + line
                out.append(line)
                last = line
                if len(out) > 512:
                    _write_all(fd, b"".join(out))
                    out = []
            if not last.endswith(b"\n"):
                out.append(b"\n")
            out.append(b"\n")
            _write_all(fd, b"".join(out))
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            return deferred("Unable to write %s: %s. (#4.3.0)" % (path, e.strerror))
    finally:
        os.close(fd)
    return delivered("mbox %s" % path)


# -- the mail spool (control/mailspool) ----------------------------------------------

#: The spool directory's group (mail) this delivery child may take as its
#: effective group for the spool mbox: kept as the saved set-group-ID by
#: delivery.lspawn.  A program line never gets it: it is the effective
#: group only inside deliver_spool, and execve(2) copies the effective
#: group (the user's) into the saved set-group-ID of the program.
_spool_gid: Optional[int] = None
#: A dot-lock older than this (seconds) is stale and removed (Debian's
#: liblockfile uses 5 minutes).
DOTLOCK_STALE = 300


def allow_spool_group(gid: int) -> None:
    """Called by the delivery child after setuid: `gid` (the saved
    set-group-ID) may be taken for the spool mbox."""
    global _spool_gid
    _spool_gid = gid


def deliver_spool(path: str, msgfile: BinaryIO, sender: str, prefix: bytes,
                  lock_wait: float = MBOX_LOCK_WAIT) -> Result:
    """Append to the user's mbox in the mail spool as Debian policy 11.6
    says: the dot-lock ``path.lock`` (made with O_EXCL; one older than
    DOTLOCK_STALE seconds is removed), then deliver_mbox's fcntl lock; a
    new mbox is made mode 0660 in the spool's group (mail).  Symbolic
    links are never followed.  Every failure is temporary."""
    raised = False
    if _spool_gid is not None:
        os.setegid(_spool_gid)
        raised = True
    lock = path + ".lock"
    locked = False
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
            os.fchmod(fd, 0o660)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as e:
            return deferred("Unable to create %s: %s. (#4.2.1)" % (path, e.strerror), "4.2.1")
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return deferred("Uh-oh: %s is not a file of this user. (#4.7.0)" % path, "4.7.0")
        deadline = time.time() + lock_wait
        while True:
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o660))
                locked = True
                break
            except FileExistsError:
                try:
                    if time.time() - os.lstat(lock).st_mtime > DOTLOCK_STALE:
                        os.unlink(lock)
                        continue
                except OSError:
                    continue
            except OSError as e:
                return deferred("Unable to make the lock %s: %s. (#4.2.1)"
                                % (lock, e.strerror), "4.2.1")
            if time.time() >= deadline:
                return deferred("File has been locked for %d seconds straight. (#4.3.0)"
                                % lock_wait)
            time.sleep(0.5)
        return deliver_mbox(path, msgfile, sender, prefix, lock_wait, nofollow=True)
    finally:
        if locked:
            try:
                os.unlink(lock)
            except OSError:
                pass
        if raised:
            os.setegid(os.getgid())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- programs ----------------------------------------------------------------------------

def run_program(command: str, home: str, msgfile: BinaryIO, env: dict) -> Tuple[Result, int]:
    """Run ``/bin/sh -c command`` in `home` with the message on stdin.
    Returns the Result and the exit code (-1 when it did not exit)."""
    stdin = msgfile
    try:
        msgfile.fileno()
    except (OSError, ValueError):  # a queue file: the program gets a copy it may rewind
        from ..queue.store import data_copy

        try:
            stdin = data_copy(msgfile)
        except OSError as e:
            return deferred("Unable to copy the message for a program: %s. (#4.3.0)"
                            % e.strerror), -1
    try:
        rewind(stdin)
        try:
            with unpinned():
                proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=home, env=env,
                                        stdin=stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return deferred("Unable to run /bin/sh: %s. (#4.3.0)" % e.strerror), -1
    finally:
        if stdin is not msgfile:
            stdin.close()
    try:
        out, _ = proc.communicate(timeout=PROGRAM_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.communicate()
        return deferred("Timeout: program ran %d seconds. (#4.3.0)" % PROGRAM_TIMEOUT), -1
    text = out[:PROGRAM_OUTPUT].decode("utf-8", "replace").strip()
    code = proc.returncode
    if code < 0:
        return deferred("%sUnable to run: killed by signal %d. (#4.3.0)"
                        % (text + "\n" if text else "", -code)), -1
    if code in (0, 99):
        return delivered(text), code
    if code in PERMANENT_EXITS:
        return failed(text or "program failed with exit code %d. (#5.0.0)" % code), code
    return deferred(text or "program failed with exit code %d. (#4.3.0)" % code), code


def program_env(target: Target, local: str, domain: str, sender: str, newsender: str,
                ext: str, default: Optional[str], dtline: bytes, rpline: bytes) -> dict:
    """qmail-local's environment for programs (behaviour reference 6.3)."""
    env = {"PATH": PROGRAM_PATH, "USER": target.user, "HOME": target.home,
           "LOCAL": local, "HOST": domain, "RECIPIENT": "%s@%s" % (local, domain),
           "SENDER": sender, "NEWSENDER": newsender, "EXT": ext,
           "DTLINE": dtline.decode("utf-8", "surrogateescape"),
           "RPLINE": rpline.decode("utf-8", "surrogateescape"),
           "UFLINE": _from_line(sender).decode("utf-8", "surrogateescape")}
    words = ext.split("-")
    for n in (2, 3, 4):
        env["EXT%d" % n] = "-".join(words[n - 1:])
    host = domain
    for n in (2, 3, 4):
        # qmail-local cuts at the last dot each time and keeps what it has
        # when no dot is left: example.org gives example three times
        cut = host.rfind(".")
        host = host if cut == -1 else host[:cut]
        env["HOST%d" % n] = host
    if default is not None:
        env["DEFAULT"] = default
    return env


# -- the dot-qmail file ---------------------------------------------------------------------

def header_has_line(msgfile: BinaryIO, line: bytes) -> bool:
    """Does the message header hold exactly `line` (with its LF)?"""
    rewind(msgfile)
    scanned = 0
    for raw in msgfile:
        scanned += len(raw)
        if raw == b"\n" or scanned > _HEADER_SCAN:
            return False
        if raw == line:
            return True
    return False


class _Found:
    def __init__(self, path: Optional[str], default: Optional[str], text: Optional[bytes],
                 mode: int = 0):
        self.path, self.default, self.text, self.mode = path, default, text, mode


def find_dot_qmail(target: Target) -> _Found:
    """qmail-local's qmesearch().  Raises OSError for errors other than ENOENT."""
    def try_open(name):
        path = os.path.join(target.home, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            # qmail-local's qmeexists(): only temporary errors stop the search
            if e.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR):
                return None
            raise
        try:
            st = os.fstat(fd)
            want = min(st.st_size, MAX_DOT_QMAIL)  # a 1 MB buffer for 11 bytes costs
            chunks = []
            while want > 0:
                chunk = os.read(fd, want)
                if not chunk:
                    break
                chunks.append(chunk)
                want -= len(chunk)
            return path, b"".join(chunks), st.st_mode
        finally:
            os.close(fd)

    if not target.dash:
        got = try_open(".qmail")
        return _Found(got[0], None, got[1], got[2]) if got else _Found(None, None, None)
    ext = target.ext.lower().replace(".", ":")
    got = try_open(".qmail" + target.dash + ext)
    if got:
        return _Found(got[0], None, got[1], got[2])
    for i in range(len(ext), -1, -1):
        if i == 0 or ext[i - 1] == "-":
            got = try_open(".qmail" + target.dash + ext[:i] + "default")
            if got:
                return _Found(got[0], target.ext[i:], got[1], got[2])
    return _Found(None, None, None)


def outside_home(line: str, home: str, confined: bool, below: Sequence[str] = ()) -> bool:
    """Does the file line `line` (or one of the entries `below` it, such as
    a Maildir's ``tmp`` and ``new``) lead out of `home`?

    A relative line (``./x``) may never climb out (``./../x``).  When
    `confined` -- the delivery runs with eqmaild's own uid, so the kernel
    would not stop it from writing into the queue -- absolute lines and
    symbolic links must stay inside the home as well.  A relative line
    whose every component below the home is not a symbolic link (lstat(2)
    each, the common case) stays inside without resolving the home's own
    path; otherwise both are resolved with realpath.  Blocking."""
    home_n = os.path.normpath(home)
    path = os.path.normpath(line if line.startswith("/") else os.path.join(home, line))
    inside = lambda p, h: p == h or p.startswith(h.rstrip("/") + "/")  # noqa: E731
    if not line.startswith("/") and not inside(path, home_n):
        return True
    if not confined:
        return False
    paths = [path] + [os.path.join(path, b) for b in below]
    if not line.startswith("/") and not _symlink_below(home_n, path, below):
        return False
    real_home = os.path.realpath(home_n)
    return any(not inside(os.path.realpath(p), real_home) for p in paths)


def _symlink_below(home: str, path: str, below: Sequence[str]) -> bool:
    """Is a component of `path` under `home`, or `path`/b for b in `below`,
    a symbolic link (or not to be checked)?  Missing components end the walk:
    nothing can be resolved through them."""
    rel = os.path.relpath(path, home)
    parts = [] if rel == "." else rel.split(os.sep)
    cur = home
    for part in parts:
        cur = os.path.join(cur, part)
        try:
            if stat.S_ISLNK(os.lstat(cur).st_mode):
                return True
        except OSError:
            return False
    for b in below:
        if "/" in b or b in ("", ".", ".."):
            return True
        try:
            if stat.S_ISLNK(os.lstat(os.path.join(cur, b)).st_mode):
                return True
        except OSError:
            pass
    return False


def owner_sender(target: Target, local: str, domain: str, sender: str) -> str:
    """NEWSENDER, the envelope sender of forwards (qmail-local(8)): when
    the .qmail file of this extension has an ``-owner`` sibling
    (``.qmail-list-owner`` next to ``.qmail-list``), ``LOCAL-owner@HOST``,
    or with an ``-owner-default`` file as well the VERP form
    ``LOCAL-owner-@HOST-@[]``; otherwise, and for the null and the
    double-bounce sender, `sender`.  Raises OSError when a file cannot be
    looked at for a reason other than its absence."""
    if sender in ("", "#@[]"):
        return sender
    owner = os.path.join(target.home, ".qmail" + target.dash
                         + target.ext.lower().replace(".", ":") + "-owner")

    def exists(path: str) -> bool:
        try:
            os.stat(path)
            return True
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EACCES,
                           errno.ELOOP):
                return False
            raise

    if not exists(owner):
        return sender
    if exists(owner + "-default"):
        return "%s-owner-@%s-@[]" % (local, domain)
    return "%s-owner@%s" % (local, domain)


@dataclass
class Plan:
    """What qmail-local would do for one recipient, found before the
    message is read: the dot-qmail lines to follow (comments and empty
    lines dropped) and the header lines every file delivery puts first."""

    target: Target
    local: str
    domain: str
    sender: str
    newsender: str
    lines: List[str]
    default: Optional[str]  # DEFAULT, when a -default file matched
    dtline: bytes           # "Delivered-To: local@domain\n"
    rpline: bytes           # "Return-Path: <sender>\n"
    source: str = ""        # where the lines come from (for sendmail -bv)
    spool: str = ""         # the line that is the mail spool mbox (control/mailspool)

    @property
    def files_only(self) -> bool:
        """Every line writes a Maildir or an mbox: no program, no forward."""
        return bool(self.lines) and all(l[:1] in ("/", ".") for l in self.lines)


def _header_lines(sender: str, local: str, domain: str) -> Tuple[bytes, bytes]:
    recipient = "%s@%s" % (local, domain)
    dtline = ("Delivered-To: %s\n" % recipient.replace("\n", "_")).encode(
        "utf-8", "surrogateescape")
    rpline = ("Return-Path: <%s>\n" % quote_address(sender).replace("\n", "_")).encode(
        "utf-8", "surrogateescape")
    return dtline, rpline


def deliver(config: Config, msgfile: BinaryIO, sender: str, local: str, domain: str,
            target: Target, confined: bool = False,
            later: Optional[set] = None) -> LocalResult:
    """Deliver the message in `msgfile` to ``local@domain`` controlled by
    `target`.  `confined`: see outside_home().  Blocking; never raises for
    delivery problems.  qmail-local's order: the extension, the
    Delivered-To loop check, then `plan` and `execute`.  `later`: see
    deliver_maildir()."""
    if "/" not in target.ext:
        dtline, _ = _header_lines(sender, local, domain)
        try:
            if header_has_line(msgfile, dtline):
                return LocalResult(failed("This message is looping: it already has my "
                                          "Delivered-To line. (#5.4.6)", "5.4.6"))
        except OSError as e:
            return LocalResult(deferred("Unable to read message: %s. (#4.3.0)" % e.strerror))
    p = plan(config, sender, local, domain, target)
    if isinstance(p, LocalResult):
        return p
    return execute(p, msgfile, confined, later=later)


def plan(config: Config, sender: str, local: str, domain: str,
         target: Target) -> "LocalResult | Plan":
    """Everything qmail-local checks before it writes: the extension, the
    home's mode, the dot-qmail file (or control/defaultdelivery) and its
    lines, NEWSENDER.  Returns the Plan, or the LocalResult that ends the
    delivery (a refusal or a temporary failure).  Blocking (stat, open);
    never raises for delivery problems."""
    dtline, rpline = _header_lines(sender, local, domain)
    if "/" in target.ext:
        return LocalResult(failed("Sorry, address must not contain /. (#5.1.1)", "5.1.1"))
    try:
        st = os.stat(target.home)
    except OSError as e:
        return LocalResult(deferred("Unable to switch to %s: %s. (#4.3.0)"
                                    % (target.home, e.strerror)))
    if st.st_mode & 0o002:
        return LocalResult(deferred("Uh-oh: home directory is writable. (#4.7.0)", "4.7.0"))
    if st.st_mode & stat.S_ISVTX:
        return LocalResult(deferred("Home directory is sticky: user is editing his "
                                    ".qmail file. (#4.2.1)", "4.2.1"))
    try:
        found = find_dot_qmail(target)
    except OSError as e:
        return LocalResult(deferred("Unable to open .qmail file: %s. (#4.2.1)"
                                    % e.strerror, "4.2.1"))
    forward_only = False
    entry = None
    if target.dash and (found.path is None or found.default == target.ext) \
            and target.home == config.path("alias"):
        # the alias user's address with no dot-qmail file of its own (none,
        # or the catch-all .qmail-default): /etc/aliases first
        # (eqmail.delivery.aliases, fastforward's place)
        from . import aliases

        entry = aliases.lookup(config, local, domain)
    if entry is not None:
        try:
            kept = aliases.dot_qmail_lines(entry, config.envnoathost)
        except (OSError, aliases.AliasError) as e:
            return LocalResult(deferred("Unable to read an :include: file of the alias at "
                                        "%s: %s. (#4.2.1)" % (entry.where, e), "4.2.1"))
        try:
            newsender = owner_sender(target, local, domain, sender)
        except OSError as e:
            return LocalResult(deferred("Unable to open .qmail file: %s. (#4.2.1)"
                                        % e.strerror, "4.2.1"))
        return Plan(target, local, domain, sender, newsender, kept, found.default,
                    dtline, rpline, "alias at %s" % entry.where)
    source = found.path or ""
    if found.path is None:
        if target.dash:
            return LocalResult(failed("Sorry, no mailbox here by that name. (#5.1.1)",
                                      "5.1.1"))
        text = config.defaultdelivery.encode("utf-8")
        source = "control/defaultdelivery (no .qmail)"
    else:
        if found.mode & 0o002:
            return LocalResult(deferred("Uh-oh: .qmail file is writable. (#4.7.0)", "4.7.0"))
        text = found.text or config.defaultdelivery.encode("utf-8")
        if not found.text:
            source = "control/defaultdelivery (empty %s)" % found.path
        forward_only = bool(found.text) and bool(found.mode & stat.S_IXUSR)
    lines = [l.decode("utf-8", "surrogateescape").rstrip(" \t\r") for l in text.split(b"\n")]
    if lines and lines[-1] == "" and text.endswith(b"\n"):
        lines.pop()
    if lines and not lines[0]:
        return LocalResult(deferred("Uh-oh: first line of .qmail file is blank. (#4.2.1)",
                                    "4.2.1"))
    # forward only: the x bit of the .qmail file, or from a "+list" line on
    # (qmail-local dies at the first file or program line then; eqmail
    # looks before delivering anything, so no line is delivered twice)
    for l in lines:
        if l == "+list":
            forward_only = True
        elif forward_only and l[:1] in ("|", "/", "."):
            kind = "prog" if l[:1] == "|" else "file"
            return LocalResult(deferred("Uh-oh: .qmail has %s delivery but has x bit "
                                        "set. (#4.7.0)" % kind, "4.7.0"))

    try:
        newsender = owner_sender(target, local, domain, sender)
    except OSError as e:
        return LocalResult(deferred("Unable to open .qmail file: %s. (#4.2.1)"
                                    % e.strerror, "4.2.1"))
    kept = [l for l in lines if l and not l.startswith("#")]
    try:
        kept, forward_file = dot_forward(kept, target, config.envnoathost)
    except ForwardError as e:
        return LocalResult(deferred("%s. (#4.2.1)" % e, "4.2.1"))
    if forward_file:
        source = "%s (%s)" % (forward_file, source) if source else forward_file
    spool = ""
    if config.mailspool and found.text in (None, b"") and not target.dash:
        kept, spool = _spool_instead(kept, target, config.mailspool)
    return Plan(target, local, domain, sender, newsender, kept, found.default,
                dtline, rpline, source, spool)


# -- dot-forward and the mail spool ---------------------------------------------------

#: ``|dot-forward .forward`` (any directory before the program's name):
#: eqmail does what qmail's dot-forward program would.
_DOT_FORWARD = re.compile(r"^\|\s*(?:\S*/)?dot-forward\s+([^\s/][^\s]*)\s*$")
#: Bytes of a .forward file read at most.
MAX_FORWARD_FILE = 65536


class ForwardError(Exception):
    """A .forward file that must not be followed; the text says why."""


def dot_forward(lines: List[str], target: Target, envnoathost: str
                ) -> Tuple[List[str], str]:
    """Follow a ``|dot-forward FILE`` line as qmail's dot-forward(1) does:
    without FILE (usually ``.forward``) in the home the line does nothing;
    with it, its entries replace the line and the lines after it are
    skipped (dot-forward exits 99), unless an entry is ``\\USER`` (this
    user: deliver here as well, so the following lines stay).  Entries:
    addresses (bare names get ``@envnoathost``), ``|command``, ``/file``
    (a Maildir when it ends in ``/``); comma or line separated, ``#``
    comments, double quotes protect commas.  Returns (lines, the path of
    the file followed or "").  Raises ForwardError for a file that is
    writable by others, too big, or has bad entries."""
    from .aliases import AliasError, _split_targets, _target

    for i, line in enumerate(lines):
        m = _DOT_FORWARD.match(line)
        if not m:
            continue
        name = m.group(1)
        if ".." in name.split("/"):
            raise ForwardError("Uh-oh: dot-forward file %s leads out of the home" % name)
        path = os.path.join(target.home, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return lines[:i] + lines[i + 1:], ""
            raise ForwardError("Unable to read %s: %s" % (path, e.strerror))
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
                raise ForwardError("Uh-oh: %s is writable by others or not a file" % path)
            data = os.read(fd, MAX_FORWARD_FILE + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_FORWARD_FILE:
            raise ForwardError("%s is larger than %d bytes" % (path, MAX_FORWARD_FILE))
        entries: List[str] = []
        keep_here = False
        try:
            for n, raw in enumerate(data.split(b"\n"), 1):
                text = raw.decode("utf-8", "surrogateescape").strip()
                if not text or text.startswith("#"):
                    continue
                for t in _split_targets(text, path, n):
                    if t.startswith("\\") and t[1:].lower() == target.user.lower():
                        keep_here = True
                        continue
                    entry = _target(t, path, n)
                    if entry.startswith(":include:"):
                        raise AliasError(path, n, ":include: is for /etc/aliases only")
                    if entry.startswith("&") and "@" not in entry:
                        entry = "%s@%s" % (entry, envnoathost)
                    entries.append(entry)
        except AliasError as e:
            raise ForwardError("Unable to follow %s" % e)
        rest = lines[i + 1:] if keep_here else []
        return lines[:i] + entries + rest, path
    return lines, ""


def _spool_instead(lines: List[str], target: Target, spooldir: str) -> Tuple[List[str], str]:
    """control/mailspool: a Maildir line of the default delivery whose
    Maildir (its new/) does not exist becomes the mbox SPOOLDIR/USER.
    Returns (lines, that line or "")."""
    spool = os.path.join(spooldir, target.user)
    out, used = [], ""
    for line in lines:
        if line.endswith("/") and line[:1] in ("/", "."):
            path = line if line.startswith("/") else os.path.join(target.home, line)
            if not os.path.isdir(os.path.join(path, "new")):
                if not used:
                    out.append(spool)
                    used = spool
                continue
        out.append(line)
    return out, used


def call_here(func, *args):
    """``func(*args)`` in the caller's thread: execute()'s default `wait`."""
    return func(*args)


def execute(p: Plan, msgfile: BinaryIO, confined: bool = False,
            lock_wait: float = None, later: Optional[set] = None,
            wait=call_here) -> LocalResult:
    """Follow the lines of `p` for the message in `msgfile`: files and
    programs in order, forwards collected (qmail-local's main loop).
    `confined`: see outside_home(); `lock_wait`: seconds an mbox lock is
    waited for (default MBOX_LOCK_WAIT); `later`: see deliver_maildir().
    `wait(func, *args)` calls the writer of each file line (Maildir,
    mbox) and returns its result: by default right here; on the gevent
    hub eqmail.threads.run, so that the decisions stay on the hub and
    the threadpool gets one job per file.  Blocking; never raises for
    delivery problems."""
    target, local, domain, sender = p.target, p.local, p.domain, p.sender
    newsender, dtline, rpline = p.newsender, p.dtline, p.rpline
    ext = target.ext
    env = None
    forwards: List[str] = []
    counts = [0, 0, 0]  # files, forwards, programs: qmail-local's "did" order
    notes = []
    for line in p.lines:
        if line.startswith("|"):
            if env is None:
                env = program_env(target, local, domain, sender, newsender, ext,
                                  p.default, dtline, rpline)
            r, code = run_program(line[1:], target.home, msgfile, env)
            counts[2] += 1
            if r.kind != SUCCESS:
                return LocalResult(r)
            if r.text:
                notes.append(r.text)
            if code == 99:
                break  # qmail-local: success, and ignore the following lines
            continue
        if line.startswith("/") or line.startswith("."):
            path = line if line.startswith("/") else os.path.join(target.home, line)
            if outside_home(line, target.home, confined,
                            ("tmp", "new") if line.endswith("/") else ()):
                return LocalResult(deferred("Uh-oh: .qmail file line %s leads out of the "
                                            "home directory. (#4.7.0)" % line, "4.7.0"))
            if line.endswith("/"):
                r = wait(deliver_maildir, path, msgfile, rpline + dtline, later)
            elif p.spool and line == p.spool:
                r = wait(deliver_spool, path, msgfile, sender, rpline + dtline,
                         MBOX_LOCK_WAIT if lock_wait is None else lock_wait)
            else:
                r = wait(deliver_mbox, path, msgfile, sender, rpline + dtline,
                         MBOX_LOCK_WAIT if lock_wait is None else lock_wait)
            counts[0] += 1
            if r.kind != SUCCESS:
                return LocalResult(r)
            continue
        if line.startswith("+"):
            continue  # "+list" (forward only, see above); other + lines do nothing
        address = line[1:] if line.startswith("&") else line
        if address:
            forwards.append(address)
            counts[1] += 1
    report = "did %d+%d+%d/" % tuple(counts)
    if notes:
        report += "/".join(notes)
    return LocalResult(delivered(report), forwards, newsender)
