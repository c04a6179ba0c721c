"""delivery.aliases -- /etc/aliases for the alias user (fastforward's newaliases).

SUMMARY
    Debian's programs and admins expect ``/etc/aliases`` (``root: joe``).
    qmail's answer is fastforward: ``newaliases`` compiles the file into a
    cdb, and ``| fastforward`` in ``~alias/.qmail-default`` forwards the
    addresses it lists.  eqmail builds the same in:

    * ``eqmail newaliases`` (also ``newaliases``, ``sendmail -bi``)
      compiles the aliases file into ``<file>.cdb`` (written to
      ``<file>.cdb.tmp``, fsync'd and renamed, mode 0644), or names the file
      and line of the first bad entry and leaves the old cdb in use;
    * a local delivery to the alias user (an address that is no user of
      users/assign and no system user) for which the alias home has no
      dot-qmail file of its own (none, or only the catch-all
      ``.qmail-default``) follows the alias entry, when there is one,
      instead.  A specific ``~alias/.qmail-NAME`` (or
      ``.qmail-PREFIX-default``) still wins, as it does over fastforward.

    The aliases file is the first line of ``control/aliases``, else
    ``/etc/aliases``.  Without a compiled cdb nothing changes.

FORMAT
    sendmail's aliases(5): ``name: target, target, ...``; lines starting
    with white space continue the entry; ``#`` starts a comment line;
    names are compared without regard to case.  ``name`` matches
    ``name@`` any local domain, ``name@domain`` that domain only (tried
    first).  A target is

    * an address, ``joe@example.org`` (forwarded);
    * a bare name, ``joe`` or ``\\joe``, forwarded to ``joe@`` the domain
      of control/envnoathost (the backslash changes nothing here: aliases
      are consulted only for addresses no user owns);
    * ``|command`` (``"|command with, commas"`` in double quotes): run by
      /bin/sh in the alias home as the alias user, as a dot-qmail program
      line;
    * ``/path``: appended to the mbox /path (a Maildir when it ends in
      ``/``), with the alias user's permissions;
    * ``:include:/path``: the addresses in that file, read at delivery
      time, one or more per line (programs and files are refused there, as
      fastforward and sendmail's safe mode do).

    cdb layout: key ``name@`` or ``name@domain`` (lower case); value the
    NUL-separated ``FILE:LINE`` of the entry, then its targets in dot-qmail
    syntax (``&address``, ``|command``, ``/path``, ``:include:/path``).

STANDARDS
    sendmail aliases(5); fastforward's newaliases(1) and fastforward(1);
    Debian policy 11.6 (every MTA provides newaliases).

SECURITY
    The aliases file is the admin's, trusted like a control file but still
    checked: control characters, empty names or targets and relative
    include paths are errors with the file and line.  Included files are
    read with the alias user's permissions, at most MAX_INCLUDE bytes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

DEFAULT_SOURCE = "/etc/aliases"
#: Bytes of an aliases file or an :include: file read at most.
MAX_SOURCE = 1 << 24
MAX_INCLUDE = 1 << 20
#: Addresses taken from one :include: file at most.
MAX_INCLUDE_ADDRESSES = 10000

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class AliasError(Exception):
    """A bad aliases entry; `str()` names the file and the line."""

    def __init__(self, path: str, lineno: int, problem: str):
        self.path, self.lineno, self.problem = path, lineno, problem
        super().__init__("%s line %d: %s" % (path, lineno, problem))


@dataclass(frozen=True)
class Entry:
    """One compiled alias: where it was written and its targets (dot-qmail
    syntax: ``&address``, ``|command``, ``/path``, ``:include:/path``)."""

    where: str
    targets: Tuple[str, ...]


def source_path(config) -> str:
    """The aliases file: control/aliases' first line, else /etc/aliases."""
    path = getattr(config, "aliases", "") or DEFAULT_SOURCE
    return path


def _split_targets(text: str, path: str, lineno: int) -> List[str]:
    """Comma-separated targets; double quotes protect commas."""
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            continue
        if ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if quoted:
        raise AliasError(path, lineno, "unbalanced double quote")
    out.append("".join(cur).strip())
    if any(not t for t in out):
        raise AliasError(path, lineno, "empty target (two commas, or a comma at the end)")
    return out


def _target(raw: str, path: str, lineno: int) -> str:
    """One target in dot-qmail syntax (see the module docstring)."""
    if raw.startswith("|"):
        if not raw[1:].strip():
            raise AliasError(path, lineno, "empty program")
        return raw
    if raw.startswith("/"):
        return raw
    if raw.lower().startswith(":include:"):
        inc = raw[len(":include:"):].strip()
        if not inc.startswith("/"):
            raise AliasError(path, lineno, ":include: needs an absolute path: %s" % raw)
        return ":include:" + inc
    if raw.startswith(":") or raw.lower().startswith("error:"):
        raise AliasError(path, lineno, "unsupported target %s" % raw)
    address = raw[1:] if raw.startswith("\\") else raw
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not address or any(ch.isspace() for ch in address):
        raise AliasError(path, lineno, "not an address: %s" % raw)
    return "&" + address


def parse(path: str) -> List[Tuple[str, Entry]]:
    """Read the aliases file `path`: [(key, Entry)] in file order.
    Raises AliasError (file and line), OSError."""
    with open(path, "rb") as f:
        data = f.read(MAX_SOURCE + 1)
    if len(data) > MAX_SOURCE:
        raise AliasError(path, 1, "file larger than %d bytes" % MAX_SOURCE)
    # join continuation lines, remembering where each entry starts
    logical: List[Tuple[int, str]] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise AliasError(path, n, "not valid UTF-8 text")
        if _CONTROL.search(line):
            raise AliasError(path, n, "control characters in line")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                raise AliasError(path, n, "continuation line without an entry above")
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
            continue
        logical.append((n, line))
    out: List[Tuple[str, Entry]] = []
    seen: Dict[str, int] = {}
    for n, line in logical:
        name, colon, rest = line.partition(":")
        name = name.strip()
        if name.startswith('"') and name.endswith('"') and len(name) >= 2:
            name = name[1:-1]
        if not colon:
            raise AliasError(path, n, "expected name: target, ...")
        if not name or any(ch.isspace() for ch in name):
            raise AliasError(path, n, "bad alias name %r" % name)
        if not rest.strip():
            raise AliasError(path, n, "no target for %s" % name)
        key = name.lower()
        if "@" not in key:
            key += "@"
        if key in seen:
            raise AliasError(path, n, "%s is already defined on line %d" % (name, seen[key]))
        seen[key] = n
        targets = tuple(_target(t, path, n) for t in _split_targets(rest, path, n))
        out.append((key, Entry("%s:%d" % (path, n), targets)))
    return out


def compile_file(path: str) -> int:
    """newaliases: compile `path` into `path`.cdb (via `path`.cdb.tmp,
    fsync'd, mode 0644).  Returns the number of aliases.  Raises AliasError (the
    old cdb stays), OSError."""
    import cdblib

    from ..durable import replace_file

    entries = parse(path)

    def fill(f):
        with cdblib.Writer(f) as w:
            for key, entry in entries:
                w.put(key.encode("utf-8"),
                      "\0".join((entry.where,) + entry.targets).encode("utf-8"))

    replace_file(path + ".cdb", fill)
    return len(entries)


def _read_cdb(path: str):
    """A cdblib reader of the file, or None when it is not a cdb."""
    import cdblib

    with open(path, "rb") as f:
        data = f.read()
    try:
        return cdblib.Reader(data)
    except Exception:
        return None  # not a cdb: as if there were none


def _reader(cdbpath: str):
    """The reader of `cdbpath`, re-read when the file changes (the stat
    cache of delivery.users), or None."""
    from .users import _cached

    try:
        return _cached(cdbpath, _read_cdb)
    except OSError:
        return None


def lookup(config, local: str, domain: str) -> Optional[Entry]:
    """The alias entry for local@domain (``local@domain`` first, then
    ``local@``), or None (also without a compiled cdb).  Blocking (stat,
    read)."""
    reader = _reader(source_path(config) + ".cdb")
    if reader is None:
        return None
    local = local.lower()
    for key in ("%s@%s" % (local, domain.lower()), local + "@"):
        value = reader.get(key.encode("utf-8", "surrogateescape"))
        if value is not None:
            parts = value.decode("utf-8", "surrogateescape").split("\0")
            return Entry(parts[0], tuple(p for p in parts[1:] if p))
    return None


def dot_qmail_lines(entry: Entry, envnoathost: str) -> List[str]:
    """The entry as dot-qmail lines: forwards of bare names get
    ``@envnoathost``; each :include: file is read now (as the caller's
    uid) and its addresses become forwards.  Raises OSError for an
    unreadable include file, AliasError for a bad one."""
    out: List[str] = []
    for t in entry.targets:
        if t.startswith(":include:"):
            out.extend("&" + _qualify(a, envnoathost) for a in read_include(t[9:]))
        elif t.startswith("&"):
            out.append("&" + _qualify(t[1:], envnoathost))
        else:
            out.append(t)
    return out


def _qualify(address: str, envnoathost: str) -> str:
    return address if "@" in address else "%s@%s" % (address, envnoathost)


def read_include(path: str) -> List[str]:
    """The addresses of an :include: file: comma or line separated, ``#``
    comment lines skipped.  Raises OSError, AliasError (programs, files or
    control characters in it, too big, too many)."""
    with open(path, "rb") as f:
        data = f.read(MAX_INCLUDE + 1)
    if len(data) > MAX_INCLUDE:
        raise AliasError(path, 1, "include file larger than %d bytes" % MAX_INCLUDE)
    out: List[str] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        line = raw.decode("utf-8", "surrogateescape").strip()
        if not line or line.startswith("#"):
            continue
        if _CONTROL.search(line):
            raise AliasError(path, n, "control characters in line")
        for t in _split_targets(line, path, n):
            target = _target(t, path, n)
            if not target.startswith("&"):
                raise AliasError(path, n, "only addresses may be listed in an include "
                                 "file: %s" % t)
            out.append(target[1:])
            if len(out) > MAX_INCLUDE_ADDRESSES:
                raise AliasError(path, n, "more than %d addresses" % MAX_INCLUDE_ADDRESSES)
    return out
