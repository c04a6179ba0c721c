"""cpu -- eqmaild's threads on one CPU; the programs it starts on all of them.

SUMMARY
    eqmaild runs Python on one thread at a time (the GIL): the gevent hub,
    and the threadpool threads that wait for the disk.  Each time a thread
    comes back from a system call while another holds the GIL, the two hand
    it over, and between two cores every hand-over is a futex wake-up of a
    thread on the other core.  Measured at c=20 with 4 KB messages on two
    cores, the same throughput costs about a fifth more CPU when the
    threads may run on both cores than on one (the bench's router budget
    of 2 CPUs at 20 % each is where it shows).  So eqmaild keeps its
    threads on one CPU (`pin`), and gives the processes it starts -- local
    delivery programs, qmail-spp plugins, checkpassword, QMAILQUEUE,
    beforemote filters -- every CPU it was allowed
    (`unpinned` around each spawn, `unpin` in a forked child), so that a
    spam filter run from a dot-qmail file still uses the other cores.  A
    session or local-delivery worker (``--workers``) is a Python process
    of its own with the same hand-overs: it keeps its threads on one of
    the other CPUs (`spare`).

CHOICE
    ``auto`` (eqmaild's default): the highest-numbered CPU the process may
    use, away from CPU 0, which handles the network interrupts on many
    routers; ``any``: no pinning (the kernel's choice, as before); a
    number: that CPU.  Nothing happens when the process may use one CPU
    only, or when the kernel refuses (a one-line warning).

STANDARDS
    Linux sched_setaffinity(2): with pid 0 it applies to the calling thread,
    and a new thread or child starts with its creator's mask.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional, Set

_allowed: Optional[Set[int]] = None   # the mask before pin(); None: not pinned
_mine: Optional[Set[int]] = None      # the one CPU pinned to


def parse(text: str) -> Optional[int]:
    """``auto`` -> -1, ``any`` -> None, a CPU number -> itself.  Raises
    ValueError for anything else (the daemon's --cpu option)."""
    if text == "auto":
        return -1
    if text == "any":
        return None
    if text.isdigit():
        return int(text)
    raise ValueError("not auto, any or a CPU number: %r" % text)


def pin(choice: Optional[int]) -> Optional[int]:
    """Keep every thread of this process on one CPU: `choice` as parse()
    gives it.  Call before the threads start (they inherit the mask); the
    threads already running are moved too.  Returns the CPU, or None when
    nothing was pinned.  Raises OSError when the kernel refuses, or
    ValueError for a CPU this process may not use."""
    global _allowed, _mine
    if choice is None or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if choice == -1:
        if len(allowed) < 2:
            return None
        choice = max(allowed)
    elif choice not in allowed:
        raise ValueError("CPU %d is not one this process may use (%s)"
                         % (choice, ",".join(str(c) for c in sorted(allowed))))
    tids = [0]
    try:
        tids += [int(t) for t in os.listdir("/proc/self/task") if int(t) != os.getpid()]
    except OSError:
        pass
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {choice})
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
    _allowed, _mine = allowed, {choice}
    return choice


def spare(n: int) -> Optional[int]:
    """The CPU for the `n`-th (from 0) worker process of a pinned process:
    one it may use other than its own, the highest first, in turn; None
    when this process is not pinned or has no other CPU."""
    if _allowed is None:
        return None
    others = sorted(_allowed - _mine, reverse=True)
    return others[n % len(others)] if others else None


def unpin() -> None:
    """In a forked child (one thread): back to every CPU the parent was
    allowed before pin().  Never raises."""
    if _allowed is not None:
        try:
            os.sched_setaffinity(0, _allowed)
        except OSError:
            pass


@contextmanager
def unpinned():
    """Around a fork or spawn in a pinned process: the calling thread (and
    so the child) may use every CPU the process was allowed, until the
    block ends.  Other threads stay pinned.  Never raises by itself."""
    if _allowed is None:
        yield
        return
    try:
        os.sched_setaffinity(0, _allowed)
    except OSError:
        pass
    try:
        yield
    finally:
        try:
            os.sched_setaffinity(0, _mine)
        except OSError:
            pass
