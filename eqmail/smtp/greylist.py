"""smtp.greylist -- greylisting of (client network, sender, recipient).

SUMMARY
    `check(config, ip, sender, recipient)` answers whether a recipient is
    let through now: the first time a triplet (the client's /24 or /64,
    the envelope sender, the recipient; case ignored) is seen it is
    remembered and refused for now (451); a retry after control/greydelay
    seconds and within control/greywindow seconds of the first try passes,
    and so does every later one while the triplet is used at least once in
    control/greylifetime seconds.

CONTROL FILES
    greydelay     0 (off): seconds a new triplet is refused for
    greywindow    172800 (2 days): the first retry must come within this
    greylifetime  3024000 (35 days): a triplet that passed stays known this
                  long after its last use
    greyallow     never greylisted: client networks (``192.0.2.0/24``,
                  ``2001:db8::/32``, ``10.``) and sender domains
                  (``example.org``; ``.example.org`` for its subdomains)
    GREYLIST=0 in smtprules turns it off for a client; authenticated and
    RELAYCLIENT sessions, and senders that passed SPF, are never
    greylisted.

STORE
    ``HOME/queue/lock/greylist.sqlite`` (stdlib sqlite3, WAL journal):
    one row of 16 key bytes (BLAKE2b of the triplet) and three numbers a
    triplet, so it stays small; rows past their time are deleted every
    PRUNE_EVERY writes, and at most MAX_ROWS are kept (the oldest go).
    It survives restarts and power loss (a crash may lose the last few
    writes: a sender then waits once more).  A store that cannot be
    opened, is damaged or sits on a full disk lets mail through (fail
    open) with one alert; it is made anew when it cannot be read.
    sqlite3 is imported with the first check; all of it blocks: the
    session calls it through the threadpool.

STANDARDS
    RFC 6647 (email greylisting), and postgrey's defaults.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import threading
import time
from typing import Optional

MAX_ROWS = 200000
PRUNE_EVERY = 1000

_lock = threading.Lock()
_db = {"path": None, "conn": None, "writes": 0, "told": False}


def network(ip: str) -> str:
    """The client's /24 (IPv4) or /64 (IPv6), as text."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network("%s/%d" % (addr, prefix), strict=False))


def allowed(config, ip: str, sender: str) -> bool:
    """Whether control/greyallow lets the client or the sender's domain by."""
    entries = getattr(config, "greyallow", ())
    if not entries:
        return False
    domain = sender.rpartition("@")[2].lower() if "@" in sender else ""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        addr = None
    for entry in entries:
        if "/" in entry or (entry.replace(".", "").isdigit() and entry.endswith(".")) \
                or ":" in entry:
            if addr is None:
                continue
            if entry.endswith(".") and "/" not in entry:
                if ip.startswith(entry):
                    return True
                continue
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        elif entry.startswith("."):
            if domain.endswith(entry):
                return True
        elif domain == entry:
            return True
    return False


def _key(ip: str, sender: str, recipient: str) -> bytes:
    text = "%s\0%s\0%s" % (network(ip), sender.lower(), recipient.lower())
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _connect(path: str):
    import sqlite3

    conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS grey (key BLOB PRIMARY KEY, first REAL NOT NULL,"
                 " last REAL NOT NULL, passed INTEGER NOT NULL) WITHOUT ROWID")
    return conn


def _conn(path: str):
    if _db["path"] != path or _db["conn"] is None:
        if _db["conn"] is not None:
            try:
                _db["conn"].close()
            except Exception:
                pass
        _db["conn"] = _connect(path)
        _db["path"] = path
    return _db["conn"]


def _fail_open(path: str, e: Exception) -> None:
    from .. import log

    if not _db["told"]:
        _db["told"] = True
        log.alert("greylist: store %s unusable (%s: %s); mail is let through"
                  % (path, type(e).__name__, e))
    try:
        if _db["conn"] is not None:
            _db["conn"].close()
    except Exception:
        pass
    _db["conn"] = None
    import sqlite3

    text = str(e).lower()
    if isinstance(e, sqlite3.DatabaseError) and ("malformed" in text or
                                                 "not a database" in text):
        for suffix in ("", "-wal", "-shm"):  # damaged: start again, empty
            try:
                os.unlink(path + suffix)
            except OSError:
                pass


def check(config, ip: str, sender: str, recipient: str,
          now: Optional[float] = None) -> Optional[int]:
    """None: let the recipient through; else the seconds the client
    should still wait (it gets 451).  Blocking (sqlite3): a threadpool
    thread.  Never raises: a broken store lets mail through."""
    delay = getattr(config, "greydelay", 0)
    if delay <= 0:
        return None
    now = time.time() if now is None else now
    path = config.path("queue", "lock", "greylist.sqlite")
    key = _key(ip, sender, recipient)
    with _lock:
        try:
            conn = _conn(path)
            row = conn.execute("SELECT first, last, passed FROM grey WHERE key=?",
                               (key,)).fetchone()
            wait: Optional[int] = None
            if row is None or (not row[2] and now - row[0] > config.greywindow) or \
                    (row[2] and now - row[1] > config.greylifetime):
                conn.execute("INSERT OR REPLACE INTO grey VALUES (?, ?, ?, 0)", (key, now, now))
                wait = delay
            elif not row[2]:
                if now - row[0] < delay:
                    wait = int(delay - (now - row[0])) + 1
                else:
                    conn.execute("UPDATE grey SET last=?, passed=1 WHERE key=?", (now, key))
            elif now - row[1] > 3600:  # a known triplet: its time, now and then
                conn.execute("UPDATE grey SET last=? WHERE key=?", (now, key))
            _db["writes"] += 1
            if _db["writes"] % PRUNE_EVERY == 0:
                _prune(conn, config, now)
            _db["told"] = False
            return wait
        except Exception as e:  # sqlite3.Error, OSError: fail open
            _fail_open(path, e)
            return None


def _prune(conn, config, now: float) -> None:
    conn.execute("DELETE FROM grey WHERE (passed=0 AND first<?) OR (passed=1 AND last<?)",
                 (now - config.greywindow, now - config.greylifetime))
    count = conn.execute("SELECT COUNT(*) FROM grey").fetchone()[0]
    if count > MAX_ROWS:
        conn.execute("DELETE FROM grey WHERE key IN (SELECT key FROM grey ORDER BY last "
                     "LIMIT ?)", (count - MAX_ROWS,))
