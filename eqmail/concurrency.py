"""concurrency -- the SMTP sessions of eqmaild and of its session workers,
counted per client address in memory the processes share, so that
control/concurrencyincoming and control/concurrencyperip hold for all of
them together (tcpserver's -c, and its per-IP limit, across processes).

SUMMARY
    eqmaild and each session worker accept connections on the same
    listening sockets (eqmail.workers).  Before a session is greeted, the
    process that accepted it calls `SessionTable.enter`, which counts the
    sessions of every process, and `SessionTable.leave` when it ends.  The
    table also tells eqmaild how many sessions each worker holds and when
    it last started or ended one (to retire idle workers), and eqmaild
    clears the entries of a worker that died.

LAYOUT (a memfd, else an unlinked file, mapped MAP_SHARED; little-endian;
        without either, anonymous memory of eqmaild's own: no workers)
    16 bytes      head: slots in use or used before (u32 "high"), unused
    OWNERS x 16   per process ("owner"; 0 is eqmaild, 1.. its session
                  workers): sessions (u32), unused (u32), and the
                  CLOCK_MONOTONIC time in seconds (f64) of its last session
                  start or end
    SLOTS x 24    one per (client address, owner) with sessions: the
                  address (16 bytes: IPv6, IPv4 as IPv4-mapped IPv6), the
                  owner (u32) and its sessions from that address (u32); a
                  free slot is all zero bytes.  Only slots below "high" are
                  searched.
    Every change and every check happens under a POSIX record lock on the
    whole file (fcntl F_SETLKW: held by one process, released by the kernel
    when its holder dies), for a few microseconds; only the hub thread of
    each process uses the table.

LIMITS
    A process that has no free slot left (SLOTS distinct client addresses
    in sessions at once, all processes together) refuses the session as
    over the limit.

STANDARDS
    memfd_create(2), fcntl(2) record locks, mmap(2) MAP_SHARED; qmail's
    tcpserver -c (concurrencyincoming).
"""
from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import time
from typing import Tuple

#: Processes the table can count for: eqmaild and up to OWNERS - 1 session
#: workers (retiring ones included).
OWNERS = 130
#: Distinct (client address, process) pairs in sessions at once.
SLOTS = 4096

_HEAD = 16
_OWNER_SIZE = 16
_SLOT_SIZE = 24
_SLOTS_AT = _HEAD + OWNERS * _OWNER_SIZE
SIZE = _SLOTS_AT + SLOTS * _SLOT_SIZE
_FREE = bytes(_SLOT_SIZE)
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_SLOT_TAIL = struct.Struct("<II")        # owner, sessions (after the address)
_SESSIONS = struct.Struct("<" + "I12x" * OWNERS)   # every owner's sessions


def address_key(ip: str) -> bytes:
    """The 16 bytes a client address is counted under: the IPv6 address, or
    the IPv4 one mapped into IPv6 (RFC 4291 section 2.5.5.2).  Anything
    else (never from accept()) gets a 16-byte digest of its text, so it is
    still counted apart from real addresses."""
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip)
        return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, ip)
    except (OSError, ValueError):
        import hashlib
        return b"\xfe" + hashlib.blake2b(ip.encode("utf-8", "replace"),
                                         digest_size=15).digest()


class SessionTable:
    """The shared session counts; see the module's description.

    `fd` is the table's file descriptor (made by `create`, or inherited by a
    worker: `attach`), or -1 for memory only this process sees.  Raises
    OSError when it cannot be mapped.
    """

    __slots__ = ("fd", "mm")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, directory: str, shared: bool = True) -> "SessionTable":
        """A new, empty table: a memfd, else (no memfd_create) an unlinked
        file in `directory`, else memory of this process alone (``fd`` -1:
        no worker can share it, and no lock is taken).  `shared` False (no
        workers allowed) asks for that last one at once.  The descriptor is
        close-on-exec; a worker gets it through posix_spawn's dup2.  Never
        raises but MemoryError."""
        if not shared:
            return cls(-1)
        for make in (lambda: os.memfd_create("eqmail-sessions", os.MFD_CLOEXEC),
                     lambda: os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                                     0o600)):
            try:
                fd = make()
            except (AttributeError, OSError):
                continue
            try:
                os.ftruncate(fd, SIZE)
                return cls(fd)
            except OSError:
                os.close(fd)
        return cls(-1)

    @classmethod
    def attach(cls, fd: int) -> "SessionTable":
        """The table eqmaild made, on inherited descriptor `fd`.  Raises OSError."""
        if os.fstat(fd).st_size < SIZE:
            raise OSError("session table on descriptor %d is too small" % fd)
        return cls(fd)

    def close(self) -> None:
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)

    # -- under the lock ------------------------------------------------------------

    def _lock(self) -> None:
        if self.fd >= 0:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        if self.fd >= 0:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _high(self) -> int:
        return _U32.unpack_from(self.mm, 0)[0]

    def _slots(self, key: bytes):
        """Offsets of the slots for address `key` (any owner)."""
        mm, end = self.mm, _SLOTS_AT + self._high() * _SLOT_SIZE
        pos = _SLOTS_AT
        while True:
            i = mm.find(key, pos, end)
            if i < 0:
                return
            if (i - _SLOTS_AT) % _SLOT_SIZE:
                pos = i + 1
                continue
            yield i
            pos = i + _SLOT_SIZE

    def total(self) -> int:
        """Sessions of all processes."""
        return sum(_SESSIONS.unpack_from(self.mm, _HEAD))

    def _add_owner(self, owner: int, n: int) -> None:
        at = _HEAD + owner * _OWNER_SIZE
        _U32.pack_into(self.mm, at, _U32.unpack_from(self.mm, at)[0] + n)
        _F64.pack_into(self.mm, at + 8, time.monotonic())

    def _free_slot(self) -> int:
        """Offset of a free slot (below "high", else the next one), or -1."""
        high = self._high()
        end = _SLOTS_AT + high * _SLOT_SIZE
        pos = _SLOTS_AT
        while True:
            i = self.mm.find(_FREE, pos, end)
            if i < 0:
                break
            if not (i - _SLOTS_AT) % _SLOT_SIZE:
                return i
            pos = i + 1
        if high >= SLOTS:
            return -1
        _U32.pack_into(self.mm, 0, high + 1)
        return end

    # -- the interface --------------------------------------------------------------

    def enter(self, owner: int, ip: str, max_total: int, max_per_ip: int
              ) -> Tuple[bool, int, int]:
        """Count a new session of process `owner` from client address `ip`
        if it stays within `max_total` sessions in all and `max_per_ip`
        from that address.  Returns (counted, sessions in all, sessions
        from `ip`), both with this one.  Not counted: nothing changed, and
        `leave` must not be called."""
        key = address_key(ip)
        self._lock()
        try:
            total = self.total() + 1
            mine, per_ip = -1, 1
            for i in self._slots(key):
                o, n = _SLOT_TAIL.unpack_from(self.mm, i + 16)
                per_ip += n
                if o == owner:
                    mine = i
            if total > max_total or per_ip > max_per_ip:
                return False, total, per_ip
            if mine < 0:
                mine = self._free_slot()
                if mine < 0:
                    return False, total, per_ip
                self.mm[mine:mine + 16] = key
                _SLOT_TAIL.pack_into(self.mm, mine + 16, owner, 1)
            else:
                _U32.pack_into(self.mm, mine + 20, _U32.unpack_from(self.mm, mine + 20)[0] + 1)
            self._add_owner(owner, 1)
            return True, total, per_ip
        finally:
            self._unlock()

    def leave(self, owner: int, ip: str) -> None:
        """The end of a session `enter` counted for `owner` and `ip`."""
        key = address_key(ip)
        self._lock()
        try:
            for i in self._slots(key):
                o, n = _SLOT_TAIL.unpack_from(self.mm, i + 16)
                if o == owner:
                    if n <= 1:
                        self.mm[i:i + _SLOT_SIZE] = _FREE
                    else:
                        _U32.pack_into(self.mm, i + 20, n - 1)
                    self._add_owner(owner, -1)
                    return
        finally:
            self._unlock()

    def owner(self, owner: int) -> Tuple[int, float]:
        """(sessions, CLOCK_MONOTONIC seconds of its last session start or
        end, 0.0 if none) of process `owner`."""
        at = _HEAD + owner * _OWNER_SIZE
        return _U32.unpack_from(self.mm, at)[0], _F64.unpack_from(self.mm, at + 8)[0]

    def clear(self, owner: int) -> int:
        """Forget every session of process `owner` (it died, or ended); returns
        how many it held."""
        self._lock()
        try:
            held = self.owner(owner)[0]
            mm, high = self.mm, self._high()
            for k in range(high):
                i = _SLOTS_AT + k * _SLOT_SIZE
                o, n = _SLOT_TAIL.unpack_from(mm, i + 16)
                if n and o == owner:
                    mm[i:i + _SLOT_SIZE] = _FREE
            at = _HEAD + owner * _OWNER_SIZE
            mm[at:at + _OWNER_SIZE] = bytes(_OWNER_SIZE)
            return held
        finally:
            self._unlock()
