"""Giving the freed heap back to the system after a busy spell.

CPython keeps what a burst of sessions or queued messages allocated in
glibc's free lists; RSS stays at the peak until the next burst.  After one
(the scheduler after TRIM_AFTER messages, eqmaild's listeners after
SESSIONS_BURST sessions at once), eqmaild calls give_back() once it is
idle again: a full garbage collection, then glibc's malloc_trim(0), which
returns the free pages at the top and inside the heap.  Without glibc
(musl on OpenWrt) only the collection happens.
"""

from __future__ import annotations

SESSIONS_BURST = 50  # sessions at once after which the quiet gives memory back


def give_back() -> None:
    """gc.collect(), then malloc_trim(0) where glibc has it; never raises.
    Runs in the calling thread (tens of milliseconds with a large heap)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
