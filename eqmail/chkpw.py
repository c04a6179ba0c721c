"""chkpw -- eqmail's checkpassword program and its password file tool.

NAME
    eqmail chkpw   check a user name and password given on fd 3
    eqmail passwd  set or delete a user in HOME/users/passwd

SYNOPSIS
    eqmail chkpw [--home DIR] [subprogram [args...]]
    eqmail passwd USER [--cram] [--delete] [--home DIR]
    python -m eqmail.chkpw [--home DIR] [subprogram [args...]]

SUMMARY
    `eqmail chkpw` is a checkpassword-compatible program for SMTP AUTH: the
    checkprogram of ``eqmail smtpd`` / eqmaild, as in
    ``qmail-smtpd /usr/bin/eqmail chkpw /bin/true``.  It reads
    ``user NUL password NUL timestamp NUL`` (at most 512 bytes) from
    descriptor 3, looks the user up in HOME/users/passwd and, when the
    password is right, runs the subprogram (``execvp(argv[0], argv)``, with
    USER set to the user name), or exits 0 when none is given.  Options go
    before the subprogram: everything from the first non-option on is the
    subprogram and its arguments.

    CRAM-MD5: when the third field is not empty and the second is 32
    lower-case hex digits, the input is a CRAM-MD5 answer as eQmail's
    qmail-smtpd sends it (``user NUL hexdigest NUL <challenge> NUL``); it
    is right when ``HMAC-MD5(secret, challenge)`` equals the digest.  Only
    users stored with ``--cram`` can pass it.  Otherwise the third field is
    a timestamp and ignored, as the checkpassword interface says.

    `eqmail passwd USER` sets USER's password (scrypt), or with ``--cram``
    stores the secret itself so that CRAM-MD5 works; ``--delete`` removes
    USER.  The password is the first line of stdin (the newline removed)
    when stdin is not a terminal, else it is asked for twice.  The file is
    rewritten atomically (temporary file, fsync, rename, fsync of the
    directory) with mode 0640, keeping the file's group, every other line
    and their order; concurrent runs are serialised with flock(2) on
    HOME/users.

STANDARDS
    The checkpassword interface by D. J. Bernstein
    (https://cr.yp.to/checkpwd/interface.html) and its checkpassword-0.90
    (512-byte input, exit codes); qmail-smtpd-auth 0.59 as patched in eQmail
    (fd 3 layout, behaviour reference section 3.2); RFC 4954 (SMTP AUTH),
    RFC 4616 (PLAIN), RFC 2195 (CRAM-MD5), RFC 2104 (HMAC), RFC 7914
    (scrypt).

FILES
    HOME/users/passwd, one user per line; empty lines and lines starting
    with ``#`` are comments:

        user:scrypt:N$r$p$SALT$HASH
        user:cram:SECRET

    ``scrypt``: SALT and HASH are standard base64 (with padding) of the salt
    (32 random bytes) and of ``scrypt(password, salt, N, r, p)`` (32 bytes);
    `eqmail passwd` writes N=16384, r=8, p=1.  Parameters are accepted when
    N is a power of two and 128*N*r is at most 16 MiB, the memory scrypt
    needs.  Such a user authenticates with PLAIN and LOGIN only.
    ``cram``: SECRET is the password itself, base64-encoded so any bytes fit;
    CRAM-MD5 needs it in the clear (RFC 2195 section 4).  Such a user
    authenticates with CRAM-MD5, PLAIN and LOGIN.

    User names are compared byte for byte (case matters); they are not
    empty, hold no ``:``, whitespace or control characters and do not start
    with ``#``.  Passwords are not empty and hold no NUL.  When a name
    appears twice, the first line counts.  A missing file means no users.
    Any malformed line makes chkpw refuse to work (exit 111), naming the
    line on stderr: a half-written file must not lock anybody in or out
    silently.

EXIT CODES
    chkpw:  0 right password (or the subprogram's own exit code);
            1 wrong password, unknown user, 512 bytes or more on fd 3;
            2 misuse: fd 3 not open, input without its two NULs, bad options;
            111 temporary trouble: the password file unreadable, world-readable
                or malformed, or the subprogram cannot be run.
    passwd: 0 done; 1 --delete of a user that is not there;
            2 bad usage (user name, empty or NUL password, passwords differ);
            111 the password file cannot be read or written.

SECURITY
    chkpw runs with the uid of its caller (qmaild-like for eqmaild) and
    trusts only HOME/users/passwd, which must not be world-readable: with
    ``mode & 0004`` chkpw exits 111 and says why on stderr.  Comparisons are
    constant-time (hmac.compare_digest, over SHA-256 of the values where
    lengths differ).  It does the same work whether or not the user exists
    and whatever its scheme: every password check runs one scrypt (against a
    dummy hash for unknown and ``cram`` users), every CRAM-MD5 check one
    HMAC-MD5 (with a dummy key for unknown and ``scrypt`` users).  The
    ``cram`` scheme stores the secret recoverably, as every CRAM-MD5 server
    must: give it only to users whose clients need CRAM-MD5.  fd 3 is read
    before any file is opened and closed afterwards.  Diagnostics go to
    stderr, one line, never a password.

BUGS
    A caller other than qmail-smtpd that sends a real timestamp as the third
    field together with a password of exactly 32 lower-case hex digits is
    taken for CRAM-MD5 and fails.  Only USER is set for the subprogram: no
    HOME, SHELL, chdir or uid change as checkpassword-0.90 does; the users
    are SMTP AUTH identities, not system accounts.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import errno
import hashlib
import hmac
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .paths import resolve_home

#: The password file, relative to the home.
PASSWD = os.path.join("users", "passwd")

#: checkpassword-0.90 reads at most this many bytes from fd 3; input that
#: fills them is refused (exit 1).
MAX_INPUT = 512

#: scrypt parameters written by `eqmail passwd` (RFC 7914 section 2): 16 MiB.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SALT_BYTES = 32
HASH_BYTES = 32
#: Largest 128*N*r accepted from the file, and what OpenSSL may allocate
#: (it needs a little over 128*N*r).
SCRYPT_MEM = 16 * 2 ** 20
SCRYPT_MAXMEM = SCRYPT_MEM + 2 ** 20

EXIT_OK, EXIT_BAD, EXIT_MISUSE, EXIT_TEMP = 0, 1, 2, 111

_HEXDIGEST = re.compile(rb"[0-9a-f]{32}\Z")


class PasswdError(Exception):
    """The password file cannot be used (temporary trouble, exit 111)."""


@dataclass(frozen=True)
class Entry:
    """One user of the password file.  For ``scrypt``: `params` (N, r, p),
    `salt` and `hash`; for ``cram``: `secret`."""

    user: bytes
    scheme: str
    params: Tuple[int, int, int] = (0, 0, 0)
    salt: bytes = b""
    hash: bytes = b""
    secret: bytes = b""


# -- the file format ---------------------------------------------------------------------

def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _unb64(data: bytes) -> bytes:
    return base64.b64decode(data, validate=True)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int = HASH_BYTES) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=dklen)


def scrypt_data(password: bytes, salt: Optional[bytes] = None) -> bytes:
    """The ``N$r$p$SALT$HASH`` field for `password` (a fresh salt unless given)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return b"%d$%d$%d$%s$%s" % (SCRYPT_N, SCRYPT_R, SCRYPT_P, _b64(salt), _b64(digest))


def format_entry(user: bytes, password: bytes, cram: bool = False) -> bytes:
    """One line of the password file, without the newline."""
    if cram:
        return user + b":cram:" + _b64(password)
    return user + b":scrypt:" + scrypt_data(password)


def parse_line(line: bytes) -> Optional[Entry]:
    """The Entry on one line (newline already removed), None for comments and
    empty lines.  Raises ValueError for anything else it cannot use."""
    if not line.strip() or line.startswith(b"#"):
        return None
    fields = line.split(b":")
    if len(fields) != 3:
        raise ValueError("not user:scheme:data")
    user, scheme, data = fields
    if not valid_user(user):
        raise ValueError("bad user name")
    try:
        if scheme == b"cram":
            secret = _unb64(data)
            if not secret:
                raise ValueError("empty secret")
            return Entry(user, "cram", secret=secret)
        if scheme == b"scrypt":
            parts = data.split(b"$")
            if len(parts) != 5:
                raise ValueError("scrypt data is not N$r$p$salt$hash")
            n, r, p = (int(x) for x in parts[:3])
            if n < 2 or n & (n - 1) or r < 1 or p < 1 or p > 16 or 128 * n * r > SCRYPT_MEM:
                raise ValueError("scrypt parameters out of range")
            salt, digest = _unb64(parts[3]), _unb64(parts[4])
            if not salt or len(digest) < 16 or len(digest) > 64:
                raise ValueError("bad scrypt salt or hash")
            return Entry(user, "scrypt", params=(n, r, p), salt=salt, hash=digest)
    except (binascii.Error, ValueError) as e:
        raise ValueError(str(e) or "bad data") from None
    raise ValueError("unknown scheme %r" % scheme.decode("ascii", "replace"))


def load(path: str) -> Dict[bytes, Entry]:
    """The users of the password file `path` (the first line of each name).

    A missing file gives no users.  Raises PasswdError when it cannot be
    read, is world-readable or has a malformed line.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise PasswdError("unable to open %s: %s" % (path, e.strerror)) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o004:
            raise PasswdError("%s is world-readable; chmod o-rwx it" % path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read()
    except OSError as e:
        raise PasswdError("unable to read %s: %s" % (path, e.strerror)) from None
    finally:
        os.close(fd)
    users = {}
    for number, line in enumerate(text.split(b"\n"), 1):
        try:
            entry = parse_line(line.rstrip(b"\r"))
        except ValueError as e:
            raise PasswdError("%s line %d: %s" % (path, number, e)) from None
        if entry is not None and entry.user not in users:
            users[entry.user] = entry
    return users


def valid_user(user: bytes) -> bool:
    """A user name the file can hold: not empty, no ``:``, whitespace or
    control characters, no leading ``#``."""
    if not user or user.startswith(b"#") or b":" in user:
        return False
    text = user.decode("utf-8", "surrogateescape")
    return not any(c.isspace() or unicodedata.category(c) in ("Cc", "Cs") for c in text)


# -- checking --------------------------------------------------------------------------

#: What unknown users are checked against, so they cost the same work.
_DUMMY_SALT = os.urandom(SALT_BYTES)
_DUMMY_HASH = os.urandom(HASH_BYTES)
_DUMMY_SECRET = os.urandom(32)


def _same(a: bytes, b: bytes) -> bool:
    """Constant-time equality, lengths included."""
    return hmac.compare_digest(hashlib.sha256(a).digest(), hashlib.sha256(b).digest())


def is_cram(secret: bytes, challenge: bytes) -> bool:
    """Whether fd 3 carried a CRAM-MD5 answer rather than a password."""
    return bool(challenge) and _HEXDIGEST.match(secret) is not None


def verify(users: Dict[bytes, Entry], user: bytes, secret: bytes, challenge: bytes = b"") -> bool:
    """Whether `secret` is right for `user` (see SUMMARY for the two forms).
    Does the same work whether or not `user` exists."""
    entry = users.get(user)
    if is_cram(secret, challenge):
        cram = entry is not None and entry.scheme == "cram"
        key = entry.secret if cram else _DUMMY_SECRET
        good = hmac.compare_digest(hmac.new(key, challenge, hashlib.md5).hexdigest().encode(),
                                   secret)
        return good and cram
    if entry is not None and entry.scheme == "scrypt":
        n, r, p = entry.params
        salt, want = entry.salt, entry.hash
    else:
        n, r, p = SCRYPT_N, SCRYPT_R, SCRYPT_P
        salt, want = _DUMMY_SALT, _DUMMY_HASH
    try:
        good = hmac.compare_digest(_scrypt(secret, salt, n, r, p, len(want)), want)
    except (ValueError, MemoryError):
        good = False
    if entry is None:
        return False
    if entry.scheme == "cram":
        return _same(secret, entry.secret)
    return good


def read_input(fd: int = 3) -> bytes:
    """Everything on `fd` (checkpassword's fd 3), closing it.  Raises OSError
    (EBADF when it is not open); returns at most MAX_INPUT bytes, and
    exactly MAX_INPUT when the input was too long."""
    data = b""
    try:
        while len(data) < MAX_INPUT:
            chunk = os.read(fd, MAX_INPUT - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return data


def split_input(data: bytes) -> Optional[Tuple[bytes, bytes, bytes]]:
    """(user, password, timestamp) from ``user NUL password NUL timestamp NUL``,
    None when the two first NULs are missing (checkpassword-0.90's rules)."""
    fields = data.split(b"\0", 2)
    if len(fields) < 3:
        return None
    user, password, rest = fields
    return user, password, rest.split(b"\0", 1)[0]


def _say(prog: str, text: str) -> None:
    sys.stderr.write("eqmail %s: %s\n" % (prog, text))
    sys.stderr.flush()


def cmd_chkpw(argv: Sequence[str]) -> int:
    """`eqmail chkpw [--home DIR] [subprogram...]`; returns the exit code, or
    does not return (exec of the subprogram)."""
    p = argparse.ArgumentParser(
        prog="eqmail chkpw",
        description="A checkpassword program: read user NUL password NUL timestamp NUL "
        "from fd 3, check it against HOME/users/passwd (CRAM-MD5 answers too), then run "
        "SUBPROGRAM, or exit 0 without one. Exit 1: wrong; 2: misuse; 111: trouble.")
    p.add_argument("--home", metavar="DIR", help="the eqmail home (default: see `eqmail --help`)")
    p.add_argument("subprogram", nargs=argparse.REMAINDER,
                   help="program (and arguments) run after a right password")
    args = p.parse_args(list(argv))
    try:
        data = read_input(3)
    except OSError as e:
        if e.errno == errno.EBADF:
            _say("chkpw", "fatal: descriptor 3 is not open (checkpassword interface)")
            return EXIT_MISUSE
        _say("chkpw", "fatal: unable to read descriptor 3: %s" % e.strerror)
        return EXIT_TEMP
    if len(data) >= MAX_INPUT:
        return EXIT_BAD
    fields = split_input(data)
    if fields is None:
        _say("chkpw", "fatal: fd 3 must hold user NUL password NUL timestamp NUL")
        return EXIT_MISUSE
    user, secret, challenge = fields
    try:
        users = load(os.path.join(resolve_home(args.home), PASSWD))
    except PasswdError as e:
        _say("chkpw", "fatal: %s" % e)
        return EXIT_TEMP
    if not verify(users, user, secret, challenge):
        return EXIT_BAD
    if not args.subprogram:
        return EXIT_OK
    os.environ["USER"] = user.decode("utf-8", "surrogateescape")
    sys.stdout.flush()
    try:
        os.execvp(args.subprogram[0], args.subprogram)
    except OSError as e:
        _say("chkpw", "fatal: unable to run %s: %s" % (args.subprogram[0], e.strerror))
    return EXIT_TEMP


# -- eqmail passwd -------------------------------------------------------------------------

def _read_password() -> bytes:
    """The new password: stdin's first line, or asked twice on a terminal.
    Raises ValueError with the reason when unusable."""
    if not sys.stdin.isatty():
        line = sys.stdin.buffer.readline()
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        password = line
    else:
        import getpass

        first = getpass.getpass("New password: ")
        if getpass.getpass("Retype new password: ") != first:
            raise ValueError("the passwords differ")
        password = first.encode("utf-8", "surrogateescape")
    if not password:
        raise ValueError("empty password")
    if b"\0" in password:
        raise ValueError("NUL in the password")
    return password


def _name_of(line: bytes) -> Optional[bytes]:
    if not line.strip() or line.startswith(b"#"):
        return None
    return line.split(b":", 1)[0]


def update_lines(lines: List[bytes], user: bytes, entry: Optional[bytes]) -> Tuple[List[bytes], bool]:
    """`lines` (without newlines) with `user`'s line replaced by `entry`,
    appended when missing, or removed when `entry` is None; also whether
    `user` was there.  Later duplicates of `user` are dropped."""
    out, found = [], False
    for line in lines:
        if _name_of(line.rstrip(b"\r")) == user:
            if not found and entry is not None:
                out.append(entry)
            found = True
            continue
        out.append(line)
    if not found and entry is not None:
        out.append(entry)
    return out, found


def write_atomically(path: str, data: bytes, mode: int = 0o640, gid: int = -1) -> None:
    """Replace `path` by `data`: temporary file, fsync, rename, fsync of the
    directory.  Raises OSError (the temporary file is removed)."""
    directory = os.path.dirname(path)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            if gid != -1:
                try:
                    os.fchown(fd, -1, gid)
                except OSError:
                    pass   # not ours to give: keep the default group
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def cmd_passwd(argv: Sequence[str]) -> int:
    """`eqmail passwd USER [--cram] [--delete] [--home DIR]`; the exit code."""
    p = argparse.ArgumentParser(
        prog="eqmail passwd",
        description="Set USER's SMTP AUTH password in HOME/users/passwd (scrypt), read "
        "from stdin's first line or asked twice on a terminal. --cram stores the secret "
        "itself so that CRAM-MD5 works; --delete removes USER. The file is rewritten "
        "atomically, mode 0640.")
    p.add_argument("--home", metavar="DIR", help="the eqmail home (default: see `eqmail --help`)")
    p.add_argument("user")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cram", action="store_true",
                   help="store the secret in the clear (base64) so CRAM-MD5 works")
    g.add_argument("--delete", action="store_true", help="remove USER")
    args = p.parse_args(list(argv))
    user = os.fsencode(args.user)
    if not valid_user(user):
        p.error("bad user name %r: not empty, no ':', whitespace or control characters, "
                "no leading '#'" % args.user)
    entry = None
    if not args.delete:
        try:
            entry = format_entry(user, _read_password(), cram=args.cram)
        except ValueError as e:
            _say("passwd", "fatal: %s" % e)
            return EXIT_MISUSE
        except (EOFError, KeyboardInterrupt):
            _say("passwd", "fatal: no password")
            return EXIT_MISUSE
    home = resolve_home(args.home)
    users_dir = os.path.join(home, "users")
    path = os.path.join(home, PASSWD)
    try:
        os.makedirs(users_dir, mode=0o755, exist_ok=True)
        lock = os.open(users_dir, os.O_RDONLY)
    except OSError as e:
        _say("passwd", "fatal: unable to open %s: %s" % (users_dir, e.strerror))
        return EXIT_TEMP
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        gid = -1
        try:
            with open(path, "rb") as f:
                gid = os.fstat(f.fileno()).st_gid
                text = f.read()
        except FileNotFoundError:
            text = b""
        lines = text.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        lines, found = update_lines(lines, user, entry)
        if args.delete and not found:
            _say("passwd", "fatal: no user %s in %s" % (args.user, path))
            return EXIT_BAD
        write_atomically(path, b"".join(line + b"\n" for line in lines), 0o640, gid)
    except OSError as e:
        _say("passwd", "fatal: unable to update %s: %s" % (path, e.strerror or e))
        return EXIT_TEMP
    finally:
        os.close(lock)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(cmd_chkpw(sys.argv[1:]))
