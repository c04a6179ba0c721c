"""log -- one log line per event, in the style of qmail-log(5).

SUMMARY
    Every part of eqmail logs through this module, one function per event, so
    the wording stays stable for people and scripts that read it.  Lines look
    like qmail-send's and qmail-smtpd's:

        new msg 1732230000.123.1
        info msg 1732230000.123.1: bytes 412 from <a@b> qp 123 uid 1000
        starting delivery 3: msg 1732230000.123.1 to local joe@example.org
        delivery 3: success: did_1+0+0/
        end msg 1732230000.123.1
        smtpd: message accepted: a@b from 127.0.0.1 to joe@example.org helo x

SECURITY
    Values that come from the network or from files are untrusted: `clean()`
    turns LF into `/`, other non-printable bytes into `_`, and bounds the
    length, as qmail-send does for delivery reports.  Only this module
    sanitises.

DESTINATIONS
    stderr (the default, and always in the foreground), a file, or syslog
    (facility mail) when the daemon detaches.  A failing destination never
    raises into the caller.

GEVENT
    By default every line is one synchronous write.  Once the daemon's hub
    is up it calls `start_batching()`: from then on `line()` only formats the
    line (with the time it was logged) and appends it to a buffer; the first
    line of a hub loop iteration queues one callback on the hub, which wakes
    a single writer thread, which waits `WRITE_DELAY` seconds and then
    writes every line pending as one write (one syslog call per line for
    syslog), off the hub: a wake-up of that thread per loop iteration cost
    the daemon more CPU than anything else it does per message at one
    connection at a time.  There is only
    one writer, so there is never more than one write in flight and lines
    keep their order; lines logged while a write is in flight go into the
    next one.  Lines from other threads (the threadpool) join the same
    buffer and wake the writer directly.  The buffer is bounded: beyond
    `MAX_PENDING` characters (a writer stuck on a dead disk) lines are
    dropped and counted, and ``log: dropped N lines`` is logged where they
    went missing once the writer takes the buffer again.  `flush()` writes
    what is pending synchronously (at exit, before a fatal exit; registered
    with atexit by `start_batching()`).  A forked child logs synchronously
    again and leaves the parent's pending lines to the parent.
"""
from __future__ import annotations

import os
import sys
import time

#: Longest value kept from one untrusted field, in characters.
MAX_FIELD = 400

#: While batching: most characters waiting for the writer thread; lines
#: beyond are dropped and counted (a writer stuck on a dead disk must not
#: eat the daemon's memory).  The batch being written comes on top.
MAX_PENDING = 1 << 20

#: Seconds the writer thread waits after a wake-up before it writes, so
#: that the lines of many hub loop iterations share one wake-up and one
#: write: a line reaches the log at most this much later.
WRITE_DELAY = 0.02

#: Seconds `flush()` waits for a write already in flight before giving up.
FLUSH_WAIT = 5.0

_sink = None  # callable(list of lines) or None for stderr
_dest = ("stderr", None)  # what `destination()` tells: (kind, fd or ident)
_prefix = ""


def clean(value, limit: int = MAX_FIELD) -> str:
    """Return `value` (str or bytes) made safe for one log line.

    LF becomes ``/``, other characters outside printable ASCII become ``_``,
    and the result is cut to `limit` characters with ``...`` appended.
    """
    if value is None:
        return "(null)"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    out = []
    for ch in value[:limit]:
        if ch == "\n":
            out.append("/")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("_")
    if len(value) > limit:
        out.append("...")
    return "".join(out)


def to_stderr() -> None:
    """Send log lines to stderr (the default)."""
    global _sink, _dest
    flush()
    _sink, _dest = None, ("stderr", None)


def to_file(path: str) -> None:
    """Append log lines to the file at `path` (created 0640 if missing).
    Raises OSError when it cannot be opened."""
    to_fd(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))


def to_fd(fd: int) -> None:
    """Append log lines to the open descriptor `fd` (a file opened with
    O_APPEND, so several processes can share it line by line)."""
    global _sink, _dest

    def write(lines) -> None:
        data = memoryview("".join(lines).encode("utf-8", "replace"))
        while data:
            data = data[os.write(fd, data):]

    flush()
    _sink, _dest = write, ("fd", fd)


def to_null() -> None:
    """Drop log lines (when no destination is safe)."""
    global _sink, _dest
    flush()
    _sink, _dest = (lambda lines: None), ("null", None)


def to_syslog(ident: str = "eqmaild") -> None:
    """Send log lines to syslog, facility mail, level info."""
    global _sink, _dest
    import syslog

    syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_MAIL)

    def write(lines) -> None:
        for one in lines:
            syslog.syslog(syslog.LOG_INFO, one.rstrip("\n"))

    flush()
    _sink, _dest = write, ("syslog", ident)


def destination():
    """Where lines go, for a helper process that must log to the same
    place: ``("stderr", None)``, ``("fd", descriptor)``, ``("syslog",
    ident)`` or ``("null", None)``."""
    return _dest


def set_prefix(prefix: str) -> None:
    """Put `prefix` in front of every line (e.g. a program name)."""
    global _prefix
    _prefix = prefix


_stamp = (0, "")  # (second, its text); replaced whole, so threads agree


def _now() -> str:
    """The timestamp, formatted once per second."""
    global _stamp
    t = int(time.time())
    stamp = _stamp
    if t != stamp[0]:
        stamp = _stamp = (t, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)))
    return stamp[1]


def _write_out(lines) -> None:
    """Write formatted lines to the destination.  Raises."""
    sink = _sink
    if sink is None:
        err = sys.stderr
        err.write(lines[0] if len(lines) == 1 else "".join(lines))
        err.flush()
    else:
        sink(lines)


def line(text: str) -> None:
    """Write one already-sanitised line (queue it while batching).
    Never raises."""
    stamp = _now()
    try:
        if _batching:
            _queue("%s %s%s\n" % (stamp, _prefix, text))
        else:
            _write_out(("%s %s%s\n" % (stamp, _prefix, text),))
    except Exception:  # a log line is never worth a crash
        pass


# -- batching inside the gevent hub (see GEVENT above) -------------------------

_batching = False      # line() queues instead of writing
_hub_ident = None      # the thread whose hub start_batching() was called in
_get_ident = None      # the real (unpatched) _thread.get_ident
_run_callback = None   # that hub's loop.run_callback
_lock = None           # guards the state below; never held across a write
_wlock = None          # held while a batch is taken and written: one at a time
_wake = None           # released to wake the writer (a binary semaphore)
_pending = []          # formatted lines not yet taken by a writer
_pending_size = 0      # their characters
_dropped = 0           # lines dropped since the last batch was taken
_scheduled = False     # a _kick callback is queued on the hub
_busy = False          # the writer is awake and drains _pending until empty
_hooks_done = False    # atexit and the fork hook are registered


def start_batching() -> None:
    """Batch log lines from now on; call in the thread that runs the gevent hub.

    Meant for eqmaild once gevent is set up (before it starts serving):
    `line()` then only queues the line, one callback per hub loop iteration
    hands the lines queued so far to a single writer thread, and that
    thread makes one write of them, off the hub.  Lines keep their order and
    their timestamps.  Registers `flush()` with atexit.  Calling it again
    only re-targets the hub of the calling thread.  Without it (tools,
    tests, ``eqmail smtpd``) every line is one synchronous write.
    """
    global _batching, _hub_ident, _get_ident, _run_callback, _lock, _wlock
    global _wake, _hooks_done
    import gevent
    from gevent import monkey

    get_ident, allocate_lock, start_new_thread = monkey.get_original(
        "_thread", ["get_ident", "allocate_lock", "start_new_thread"])
    hub = gevent.get_hub()
    if _lock is None:
        _lock, _wlock, _wake = allocate_lock(), allocate_lock(), allocate_lock()
        _wake.acquire()  # held: no work yet
        if monkey.is_module_patched("threading"):
            start_new_thread(_writer_main, (_wake,))
        else:
            import threading
            threading.Thread(target=_writer_main, args=(_wake,),
                             name="eqmail log writer", daemon=True).start()
    if not _hooks_done:
        import atexit
        atexit.register(flush)
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooks_done = True
    _get_ident = get_ident
    _hub_ident = get_ident()
    _run_callback = hub.loop.run_callback
    _batching = True


def stop_batching() -> None:
    """Write what is pending and go back to one synchronous write per line."""
    global _batching
    flush()
    _batching = False
    flush()


def flush() -> None:
    """Write every pending line now, in order, in the calling thread.

    Waits (at most FLUSH_WAIT seconds) for a write already in flight, so it
    blocks the hub: for exit and fatal paths.  Does nothing when nothing is
    pending or batching never started.  Never raises.
    """
    try:
        wlock = _wlock
        if wlock is None or not wlock.acquire(True, FLUSH_WAIT):
            return
        try:
            batch = _take(False)
            if batch:
                _write_out(batch)
        finally:
            wlock.release()
    except Exception:  # a log line is never worth a crash
        pass


def _queue(s: str) -> None:
    """Append one formatted line to the buffer; see that a writer comes."""
    global _pending_size, _dropped, _scheduled, _busy
    kick = wake = False
    with _lock:
        if _pending_size >= MAX_PENDING:
            _dropped += 1
            return
        _pending.append(s)
        _pending_size += len(s)
        if not _busy:
            if _get_ident() == _hub_ident:
                if not _scheduled:  # the first line of this loop iteration
                    _scheduled = kick = True
            else:  # a threadpool thread: no hub of its own to wait for
                _busy = wake = True
    if kick:
        try:
            _run_callback(_kick)
        except Exception:  # no loop any more: write it ourselves
            with _lock:
                _scheduled = False
            flush()
    elif wake:
        _wake.release()


def _kick() -> None:
    """On the hub, after the lines of one loop iteration: wake the writer."""
    global _scheduled, _busy
    with _lock:
        _scheduled = False
        if _busy or not _pending:
            return
        _busy = True
    _wake.release()


def _take(writer: bool):
    """Take the pending lines (and the dropped-lines notice).  The writer
    goes idle (`_busy` off) when there is nothing to take."""
    global _pending, _pending_size, _dropped, _busy
    with _lock:
        batch = _pending
        if not batch and not _dropped:
            if writer:
                _busy = False
            return None
        _pending = []
        _pending_size = 0
        if _dropped:  # they were lost right after these lines
            batch.append("%s %slog: dropped %d lines\n" % (_now(), _prefix, _dropped))
            _dropped = 0
    return batch


def _writer_main(wake) -> None:
    """The writer thread: on each wake-up, write batches until none is left."""
    while True:
        wake.acquire()
        time.sleep(WRITE_DELAY)
        while True:
            wlock = _wlock
            if wlock is None:  # cannot happen in this process; be safe
                break
            with wlock:
                batch = _take(True)
                if batch is None:
                    break
                try:
                    _write_out(batch)
                except Exception:  # a log line is never worth a crash
                    pass


def _after_fork_in_child() -> None:
    """A forked child logs synchronously; the parent writes its own pending
    lines.  The locks may have been held by a thread the child lacks."""
    global _batching, _lock, _wlock, _wake, _pending, _pending_size, _dropped
    global _scheduled, _busy
    _batching = False
    _lock = _wlock = _wake = None
    _pending = []
    _pending_size = _dropped = 0
    _scheduled = _busy = False


# -- daemon ----------------------------------------------------------------

def status(text: str) -> None:
    line("status: " + clean(text))


def warning(text: str) -> None:
    line("warning: " + clean(text, 1000))


def alert(text: str) -> None:
    line("alert: " + clean(text, 1000))
    from . import stats

    stats.alert(clean(text, 300))


# -- queue and scheduler (qmail-send) ----------------------------------------

def new_msg(msgid: str) -> None:
    line("new msg %s" % msgid)


def info_msg(msgid: str, size: int, sender: str, qp: int, uid: int) -> None:
    line("info msg %s: bytes %d from <%s> qp %d uid %d"
         % (msgid, size, clean(sender), qp, uid))


def starting_delivery(num: int, msgid: str, channel: str, recipient: str) -> None:
    line("starting delivery %d: msg %s to %s %s"
         % (num, msgid, channel, clean(recipient)))


def delivery(num: int, kind: str, report: str) -> None:
    """kind is ``success``, ``deferral`` or ``failure``."""
    line("delivery %d: %s: %s" % (num, kind, clean(report, 1000)))
    from . import stats

    stats.count(kind)


def direct_delivery(msgid: str, size: int, sender: str, recipient: str,
                    report: str) -> None:
    """A local delivery made during DATA (eqmail.delivery.direct): the
    message never entered the queue, so this one line stands for qmail-send's
    new/info/starting/delivery/end lines."""
    line("direct msg %s: bytes %d from <%s> to local %s: success: %s"
         % (msgid, size, clean(sender), clean(recipient), clean(report, 1000)))
    from . import stats

    stats.count("success")


def end_msg(msgid: str) -> None:
    line("end msg %s" % msgid)


def queue_status(local: int, local_max: int, remote: int, remote_max: int) -> None:
    line("status: local %d/%d remote %d/%d" % (local, local_max, remote, remote_max))


# -- SMTP (qmail-smtpd) --------------------------------------------------------

def smtpd(event: str, mailfrom, remote_ip, rcpt, helo) -> None:
    """qmail-smtpd's log line: ``<event>: <from> from <ip> to <rcpt> helo <helo>``."""
    line("smtpd: %s: %s from %s to %s helo %s"
         % (event, clean(mailfrom), clean(remote_ip), clean(rcpt), clean(helo)))
