"""delivery.local -- local delivery (qmail-local's role), first light: Maildir.

SUMMARY
    `deliver(config, msgpath, sender, route)` delivers one queued message to
    one local recipient.  In this release every local recipient is handled
    by the alias user, whose home is ``HOME/alias``, with the instructions
    of control/defaultdelivery (default ``./Maildir/``): mail to any address
    at a local domain lands in ``HOME/alias/Maildir/new/``.  The dot-qmail
    machinery (users/assign, .qmail files, mbox, programs, forwards) builds
    on this.

STANDARDS
    maildir(5) of qmail: tmp/ then new/, unique names, fsync before the
    link; qmail-local(8): the Return-Path and Delivered-To lines, and the
    loop check on Delivered-To (behaviour reference section 6.4).

SECURITY
    Paths come from control/defaultdelivery only, never from an address; a
    defaultdelivery that leaves the alias home (``..``, absolute paths
    elsewhere) is refused as a temporary failure.  Files are created with
    O_EXCL, mode 0600.

GEVENT
    `deliver()` blocks on disk I/O: the scheduler runs it in the threadpool.
"""
from __future__ import annotations

import itertools
import os
import socket
import time

from . import Result, delivered, deferred, failed
from .route import Route
from ..control import Config

_seq = itertools.count(1)
_COPY = 65536
#: Bytes of header read for the Delivered-To loop check.
_HEADER_SCAN = 1 << 20


def maildirmake(path: str, mode: int = 0o700) -> None:
    """Create a Maildir (tmp, new, cur) at `path`, like qmail's maildirmake.
    Existing directories are kept.  Raises OSError."""
    os.makedirs(path, mode=mode, exist_ok=True)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=mode, exist_ok=True)


def _hostname() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name() -> str:
    """A Maildir file name: ``<sec>.M<usec>P<pid>Q<seq>.<host>`` (maildir(5))."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1e6)
    return "%d.M%dP%dQ%d.%s" % (sec, usec, os.getpid(), next(_seq), _hostname())


def has_line_in_header(path: str, line: bytes) -> bool:
    """Does the header of the message at `path` hold exactly `line` (with LF)?"""
    with open(path, "rb") as f:
        scanned = 0
        for raw in f:
            scanned += len(raw)
            if raw == b"\n" or scanned > _HEADER_SCAN:
                return False
            if raw == line:
                return True
    return False


def deliver_maildir(maildir: str, msgpath: str, prefix: bytes) -> Result:
    """Write `prefix` then the message at `msgpath` into `maildir`.

    Every failure is temporary (qmail-local).  Blocking: call it from the
    threadpool.
    """
    name = unique_name()
    tmp = os.path.join(maildir, "tmp", name)
    new = os.path.join(maildir, "new", name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return deferred("Unable to open %s: %s. (#4.2.1)" % (tmp, e.strerror), "4.2.1")
    try:
        try:
            os.write(fd, prefix)
            with open(msgpath, "rb") as src:
                while True:
                    chunk = src.read(_COPY)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, new)
        dfd = os.open(os.path.join(maildir, "new"), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if e.errno == 28:
            return deferred("Disk full writing to Maildir. (#4.3.0)", "4.3.0")
        return deferred("Unable to write to Maildir: %s. (#4.3.0)" % e.strerror, "4.3.0")
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return delivered("did 0+0+1/maildir %s" % name)


def alias_home(config: Config) -> str:
    return config.path("alias")


def deliver(config: Config, msgpath: str, sender: str, rt: Route) -> Result:
    """Deliver the message at `msgpath` to the local recipient `rt`.

    Blocking; returns a Result and never raises for delivery problems.
    """
    recipient = "%s@%s" % (rt.local, rt.domain)
    dtline = b"Delivered-To: " + recipient.encode("utf-8", "surrogateescape") + b"\n"
    rpline = b"Return-Path: <" + sender.encode("utf-8", "surrogateescape") + b">\n"
    try:
        if has_line_in_header(msgpath, dtline):
            return failed("This message is looping: it already has my "
                          "Delivered-To line. (#5.4.6)", "5.4.6")
    except OSError as e:
        return deferred("Unable to read message: %s. (#4.3.0)" % e.strerror)
    home = alias_home(config)
    target = config.defaultdelivery.strip()
    if not target.endswith("/"):
        return deferred("Only Maildir delivery (a line ending in /) is supported "
                        "in control/defaultdelivery for now. (#4.3.5)", "4.3.5")
    maildir = os.path.normpath(os.path.join(home, target))
    if not (maildir + "/").startswith(os.path.normpath(home) + "/"):
        return deferred("defaultdelivery leaves the alias home. (#4.3.5)", "4.3.5")
    if not os.path.isdir(os.path.join(maildir, "new")):
        try:
            maildirmake(maildir)
        except OSError as e:
            return deferred("Unable to create Maildir: %s. (#4.2.1)" % e.strerror, "4.2.1")
    return deliver_maildir(maildir, msgpath, rpline + dtline)
