"""delivery.users -- who receives a local address (qmail-lspawn, qmail-getpw, qmail-users).

SUMMARY
    `resolve(config, local)` maps the local part of a local recipient to a
    `Target`: the user, uid, gid and home whose dot-qmail files control the
    address, and the dash and extension that pick the file
    (``home/.qmail<dash><ext>``).  The order is qmail's:

    1. users/cdb when it exists (built by ``eqmail newu``), else the text
       users/assign: an exact ``=`` entry, then the ``+`` wildcard with the
       longest prefix (only prefixes ending in a character that some
       wildcard ends with), then the catch-all ``+:`` entry; a wildcard
       appends the rest of the local part to its extension;
    2. a system user, by qmail-getpw's rules: the whole local part, then
       the part before each extension delimiter (``+``, control/conf-break)
       from the right; the name lower-cased and shorter than 32, uid not 0,
       the home directory owned by that uid.  Only when eqmaild runs as
       root: an unprivileged daemon cannot deliver as anyone else, so it
       skips this step;
    3. the alias user: home ``HOME/alias``, uid and gid of that directory's
       owner, dash ``-`` and the whole local part as the extension
       (``.qmail-postmaster``, ``.qmail-root``, ``.qmail-default`` ...).

STANDARDS
    qmail-users(5), qmail-newu(8), qmail-getpw(8), qmail-lspawn(8);
    behaviour reference section 6.1.

FORMAT
    users/assign lines, ending with a line ``.``:
        =local:user:uid:gid:homedir:dash:ext:
        +prefix:user:uid:gid:homedir:dash:pre:
    users/cdb (qmail-newu's layout): key ``!`` + lower-cased local or
    prefix, value ``user\\0uid\\0gid\\0home\\0dash\\0ext\\0``; key "" holds
    the set of characters that wildcard prefixes end with.

SECURITY
    assign and cdb are trusted configuration but still checked: uid and
    gid must be numbers, the home an absolute path.  A malformed file is a
    temporary failure (the mail stays queued), never a wrong delivery.
"""
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..control import Config, ConfigError

#: qmail-getpw ignores user names this long or longer (GETPW_USERLEN).
GETPW_USERLEN = 32


@dataclass(frozen=True)
class Target:
    """Whose dot-qmail files control an address."""

    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


class UsersError(Exception):
    """users/assign or users/cdb cannot be used; a temporary failure."""


def _parse_data(fields) -> Tuple[str, int, int, str, str, str]:
    user, uid, gid, home, dash, ext = fields
    if not (uid.isascii() and uid.isdigit() and gid.isascii() and gid.isdigit()):
        raise ValueError("uid and gid must be numbers")
    if not home.startswith("/"):
        raise ValueError("the home directory must be an absolute path")
    return user, int(uid), int(gid), home, dash, ext


class Assignments:
    """The assignments of users/assign or users/cdb, with qmail-lspawn's look-up."""

    def __init__(self, table: Dict[str, Tuple], wildchars: str):
        self.table = table
        self.wildchars = wildchars

    @classmethod
    def from_assign(cls, path: str) -> "Assignments":
        """Parse users/assign.  Raises ConfigError naming the line, OSError."""
        table: Dict[str, Tuple] = {}
        wild = []
        with open(path, "rb") as f:
            data = f.read(1 << 24)
        for n, raw in enumerate(data.split(b"\n"), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(path, n, "not valid UTF-8 text")
            if line == ".":
                break
            if not line:
                continue
            if any(ch < " " or ch == "\x7f" for ch in line):
                raise ConfigError(path, n, "control characters in line")
            fields = line[1:].split(":")
            if len(fields) < 7:
                raise ConfigError(path, n, "expected 7 ':'-separated fields")
            try:
                entry = _parse_data(fields[1:7])
            except ValueError as e:
                raise ConfigError(path, n, str(e))
            key = "!" + fields[0].lower()
            if line[0] == "+":
                if fields[0] and fields[0][-1] not in wild:
                    wild.append(fields[0][-1])
            table.setdefault(key, entry)  # the first assignment wins
        return cls(table, "".join(wild))

    @classmethod
    def from_cdb(cls, path: str) -> "Assignments":
        """Read users/cdb.  Raises UsersError, OSError."""
        import cdblib

        with open(path, "rb") as f:
            data = f.read()
        try:
            reader = cdblib.Reader(data)
            wildchars = (reader.get(b"") or b"").decode("utf-8")
        except Exception as e:
            raise UsersError("users/cdb is not a cdb file: %s" % e)
        obj = cls({}, wildchars)
        obj._reader = reader
        return obj

    def get(self, key: str) -> Optional[Tuple]:
        reader = getattr(self, "_reader", None)
        if reader is None:
            return self.table.get(key)
        value = reader.get(key.encode("utf-8", "surrogateescape"))
        if value is None:
            return None
        fields = value.decode("utf-8", "surrogateescape").split("\0")
        try:
            return _parse_data(fields[:6])
        except ValueError as e:
            raise UsersError("users/cdb entry %r: %s" % (key, e))

    def lookup(self, local: str) -> Optional[Target]:
        """qmail-lspawn's nughde_get(): exact, then wildcards, then ``+:``."""
        key = "!" + local.lower()
        i = len(key)
        wild = False
        while i > 0:
            if not wild or i == 1 or key[i - 1] in self.wildchars:
                entry = self.get(key[:i])
                if entry is not None:
                    user, uid, gid, home, dash, ext = entry
                    if wild:
                        ext += local[i - 1:]
                    return Target(user, uid, gid, home, dash, ext)
            i -= 1
            wild = True
        return None

    def write_cdb(self, path: str, order) -> None:
        """Write a users/cdb (atomically, via path.tmp) from `order`:
        [(key, entry)] in file order."""
        import cdblib

        from ..durable import replace_file

        def fill(f):
            with cdblib.Writer(f) as w:
                for key, (user, uid, gid, home, dash, ext) in order:
                    w.put(key.encode("utf-8", "surrogateescape"),
                          ("%s\0%d\0%d\0%s\0%s\0%s\0" % (user, uid, gid, home, dash, ext))
                          .encode("utf-8", "surrogateescape"))
                w.put(b"", self.wildchars.encode("utf-8"))

        replace_file(path, fill)


def newu(home: str) -> int:
    """qmail-newu: compile users/assign into users/cdb.  Returns the number of
    assignments.  Raises ConfigError, OSError."""
    assign = os.path.join(home, "users", "assign")
    a = Assignments.from_assign(assign)
    order = list(a.table.items())
    a.write_cdb(os.path.join(home, "users", "cdb"), order)
    return len(order)


_cache: Dict[str, Tuple] = {}


def _cached(path: str, reader):
    """`reader(path)`, re-read only when the file's mtime or size changed.
    Returns None when the file does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _cache.pop(path, None)
        return None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _cache.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = reader(path)
    _cache[path] = (stamp, value)
    return value


def load_assignments(config: Config) -> Optional[Assignments]:
    """users/cdb if present, else users/assign, else None (both cached
    while unchanged).  Raises UsersError (also for a malformed assign)."""
    try:
        found = _cached(config.path("users", "cdb"), Assignments.from_cdb)
        if found is None:
            found = _cached(config.path("users", "assign"), Assignments.from_assign)
    except ConfigError as e:
        raise UsersError("unable to use users/assign: %s" % e)
    except OSError as e:
        raise UsersError("unable to read users/cdb or users/assign: %s" % e)
    return found


def getpw(local: str, break_char: str) -> Optional[Target]:
    """qmail-getpw's user/extension split (only meaningful as root)."""
    end = len(local)
    while True:
        if end < GETPW_USERLEN and (end == len(local) or local[end] == break_char):
            name = local[:end].lower()
            try:
                pw = pwd.getpwnam(name) if name else None
            except (KeyError, UnicodeEncodeError):
                pw = None
            if pw is not None and pw.pw_uid != 0:
                try:
                    st = os.stat(pw.pw_dir)
                except OSError:
                    st = None
                if st is not None and st.st_uid == pw.pw_uid:
                    if end < len(local):
                        return Target(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir,
                                      "-", local[end + 1:])
                    return Target(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "", "")
        if end == 0:
            return None
        end -= 1


def alias_target(config: Config, local: str) -> Target:
    """The alias user for `local`.  Raises UsersError when HOME/alias is missing."""
    home = config.path("alias")
    try:
        st = os.stat(home)
    except OSError:
        raise UsersError("Unable to find alias user!")
    return Target("alias", st.st_uid, st.st_gid, home, "-", local)


def resolve(config: Config, local: str, assignments: Optional[Assignments] = None,
            system_users: Optional[bool] = None) -> Target:
    """Map a local part to its Target (see the module docstring).

    `system_users` defaults to "eqmaild runs as root".  Raises UsersError
    (temporary failure) when the configuration cannot be read.
    """
    if assignments is None:
        assignments = load_assignments(config)
    if assignments is not None:
        target = assignments.lookup(local)
        if target is not None:
            return target
    if system_users is None:
        system_users = os.geteuid() == 0
    if system_users:
        target = getpw(local, config.break_char)
        if target is not None:
            return target
    return alias_target(config, local)
