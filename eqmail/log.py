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
"""
from __future__ import annotations

import os
import sys
import time

#: Longest value kept from one untrusted field, in characters.
MAX_FIELD = 400

_sink = None  # callable(str) or None for stderr
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
    global _sink
    _sink = None


def to_file(path: str) -> None:
    """Append log lines to the file at `path` (created 0640 if missing)."""
    global _sink
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(line: str) -> None:
        os.write(fd, line.encode("utf-8", "replace"))

    _sink = write


def to_null() -> None:
    """Drop log lines (when no destination is safe)."""
    global _sink
    _sink = lambda line: None  # noqa: E731


def to_syslog(ident: str = "eqmaild") -> None:
    """Send log lines to syslog, facility mail, level info."""
    global _sink
    import syslog

    syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_MAIL)

    def write(line: str) -> None:
        syslog.syslog(syslog.LOG_INFO, line.rstrip("\n"))

    _sink = write


def set_prefix(prefix: str) -> None:
    """Put `prefix` in front of every line (e.g. a program name)."""
    global _prefix
    _prefix = prefix


_stamp = [0, ""]


def _now() -> str:
    """The timestamp, formatted once per second."""
    t = int(time.time())
    if t != _stamp[0]:
        _stamp[0] = t
        _stamp[1] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return _stamp[1]


def line(text: str) -> None:
    """Write one already-sanitised line.  Never raises."""
    stamp = _now()
    try:
        if _sink is None:
            sys.stderr.write("%s %s%s\n" % (stamp, _prefix, text))
            sys.stderr.flush()
        else:
            _sink("%s %s%s\n" % (stamp, _prefix, text))
    except Exception:  # a log line is never worth a crash
        pass


# -- daemon ----------------------------------------------------------------

def status(text: str) -> None:
    line("status: " + clean(text))


def warning(text: str) -> None:
    line("warning: " + clean(text, 1000))


def alert(text: str) -> None:
    line("alert: " + clean(text, 1000))


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


def end_msg(msgid: str) -> None:
    line("end msg %s" % msgid)


def queue_status(local: int, local_max: int, remote: int, remote_max: int) -> None:
    line("status: local %d/%d remote %d/%d" % (local, local_max, remote, remote_max))


# -- SMTP (qmail-smtpd) --------------------------------------------------------

def smtpd(event: str, mailfrom, remote_ip, rcpt, helo) -> None:
    """qmail-smtpd's log line: ``<event>: <from> from <ip> to <rcpt> helo <helo>``."""
    line("smtpd: %s: %s from %s to %s helo %s"
         % (event, clean(mailfrom), clean(remote_ip), clean(rcpt), clean(helo)))
