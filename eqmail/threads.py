"""threads -- blocking calls off the gevent hub.

`run(func, *args)` runs a blocking call (fsync, file I/O, DNS, waiting for
a child process) in gevent's threadpool and returns its result in the
calling greenlet, re-raising its exception there.  The exception is
carried back as a value, so gevent does not print a traceback for an
ordinary failure such as a full disk or an unknown domain.

`run_check(func, *args)` does the same in a pool of its own, at most
CHECK_THREADS threads, for the checks of received mail that wait on other
people's DNS servers (DNSBL, SPF, DKIM keys, DMARC records): a DNS server
that never answers can hold those threads only, never the ones that fsync
the queue for every other session.
"""
from __future__ import annotations


def _capture(func, args):
    try:
        return True, func(*args)
    except BaseException as e:  # handed back to the caller, who decides
        return False, e


import os

#: Threads for the checks of received mail, per process.
CHECK_THREADS = 8

_check_pool = None   # (pid, gevent ThreadPool): a forked worker makes its own


def run(func, *args):
    """Call ``func(*args)`` in the threadpool; return its value or raise
    its exception in the caller's greenlet."""
    import gevent

    ok, value = gevent.get_hub().threadpool.apply(_capture, (func, args))
    if ok:
        return value
    raise value


def run_check(func, *args):
    """Call ``func(*args)`` in the checks' own threadpool (CHECK_THREADS
    threads; created with the first call); return its value or raise its
    exception in the caller's greenlet.  A caller beyond CHECK_THREADS
    waits for a thread without blocking the hub."""
    global _check_pool
    if _check_pool is None or _check_pool[0] != os.getpid():
        from gevent.threadpool import ThreadPool

        _check_pool = (os.getpid(), ThreadPool(CHECK_THREADS))
    ok, value = _check_pool[1].apply(_capture, (func, args))
    if ok:
        return value
    raise value
