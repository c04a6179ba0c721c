"""threads -- blocking calls off the gevent hub.

`run(func, *args)` runs a blocking call (fsync, file I/O, DNS, waiting for
a child process) in gevent's threadpool and returns its result in the
calling greenlet, re-raising its exception there.  The exception is
carried back as a value, so gevent does not print a traceback for an
ordinary failure such as a full disk or an unknown domain.
"""
from __future__ import annotations


def _capture(func, args):
    try:
        return True, func(*args)
    except BaseException as e:  # handed back to the caller, who decides
        return False, e


def run(func, *args):
    """Call ``func(*args)`` in the threadpool; return its value or raise
    its exception in the caller's greenlet."""
    import gevent

    ok, value = gevent.get_hub().threadpool.apply(_capture, (func, args))
    if ok:
        return value
    raise value
