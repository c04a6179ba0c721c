"""A damaged queue file (cut short, zeroed, bits flipped) with the real
eqmaild and the real tools: eqmaild moves it to queue/bad/ once and says so
once; qstat and qread do not count it; `eqmail qbad` lists, shows and
removes it.  A file that is merely being written is never touched."""
from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, ensure_user, wait_log

PY = sys.executable
OTHER = "eqmailsender"


def tool(home, *args, as_owner=True):
    """`eqmail ARGS --home HOME` as the queue's owner (the daemon's user),
    or as another user (as root; ourselves otherwise)."""
    kw = {}
    if ROOT:
        if as_owner:
            kw = dict(user=home.uid, group=home.gid, extra_groups=[])
        else:
            pw = ensure_user(OTHER)
            kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    return subprocess.run([PY, "-m", "eqmail"] + list(args) + ["--home", home.path],
                          capture_output=True, timeout=30, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, **kw)


def send(port, rcpt="joe@localhost", body=b"Subject: held\r\n\r\nhello\r\n"):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail("me@example.org", [rcpt], body)


def poke(home):
    """One byte into queue/lock/trigger: the daemon scans mess/ now (as it
    does every minute on its own)."""
    fd = os.open(os.path.join(home.path, "queue", "lock", "trigger"),
                 os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"\0")
    finally:
        os.close(fd)


def damage(path, how):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(size - 40)
        elif how == "zeroed":
            f.write(b"\0" * size)
        else:  # one bit of the message's data
            f.seek(size // 3)
            byte = f.read(1)
            f.seek(size // 3)
            f.write(bytes([byte[0] ^ 0x01]))


def one_held_message(home, daemon_factory):
    """A fresh queue with one message held (concurrencylocal 0), eqmaild
    stopped.  The first message of a queue is written through tmp/ (it is
    not younger than the queue's key), so it needs no commit mark: its
    damage can be told from a write in progress."""
    home.setup(rcpthosts=("localhost",), concurrencylocal="0\n")
    d = daemon_factory(home)
    send(d.port)
    deadline = time.time() + 10
    while not home.queued() and time.time() < deadline:
        time.sleep(0.05)
    assert d.stop() == 0
    (msgid,) = home.queued()
    with open(os.path.join(home.path, "queue", "lock", "key"), "rb") as f:
        birth = int(f.read().split()[2])
    assert int(msgid.split(".")[0]) <= birth  # the premise: no mark required
    return msgid


@pytest.mark.parametrize("how", ["truncated", "zeroed", "bit-flipped"])
def test_damaged_file_is_set_aside_once_and_shown_by_qbad(home, daemon_factory, how):
    msgid = one_held_message(home, daemon_factory)
    path = os.path.join(home.path, "queue", "mess", msgid)
    damage(path, how)

    # eqmaild is stopped: the tools read each file, do not count it, name it
    out = tool(home, "qstat")
    assert out.returncode == 0, out
    assert out.stdout.decode().splitlines() == [
        "messages in queue: 0", "messages in queue but not yet preprocessed: 0"]
    assert ("msg %s: damaged queue file" % msgid) in out.stderr.decode()
    out = tool(home, "qread")
    assert out.returncode == 0 and out.stdout == b"", out
    assert msgid in out.stderr.decode()

    # eqmaild moves it at its start, says so once, and never again
    d = daemon_factory(home)
    assert wait_log(d, "damaged queue file"), d.log()
    bad = os.path.join(home.path, "queue", "bad", msgid)
    assert os.path.exists(bad) and not os.path.exists(path)
    for _ in range(3):
        poke(home)
        time.sleep(0.3)
    send(d.port, "second@localhost")  # the queue goes on working
    log = d.log()
    lines = [l for l in log.splitlines() if msgid in l and "alert:" in l]
    assert len(lines) == 1, log
    assert "alert: msg %s: damaged queue file" % msgid in lines[0]
    assert bad in lines[0] and "eqmail qbad" in lines[0]

    out = tool(home, "qstat")
    assert out.stdout.decode().startswith("messages in queue: 1\n"), out
    assert "1 damaged queue file set aside in" in out.stderr.decode()
    assert msgid not in tool(home, "qread").stdout.decode()

    # qbad: list, show, rm
    out = tool(home, "qbad")
    assert out.returncode == 0, out
    (line,) = out.stdout.decode().splitlines()
    assert line.startswith(msgid + "  %d bytes  set aside " % os.path.getsize(bad))
    if how == "bit-flipped":
        assert "<me@example.org>" in line and line.endswith("commit mark does not match")
    out = tool(home, "qbad", "show", msgid)
    assert out.returncode == 0, out
    head, _, data = out.stdout.partition(b"\n\n")
    assert b"file: " + bad.encode() in head and b"damage: " in head
    if how == "bit-flipped":
        assert b"sender: <me@example.org>\nrecipient: <joe@localhost>" in head
        assert b"Subject: held\n\nhell" in data or b"Subject: held\n\nhel" in data
    if how == "zeroed":
        assert b"envelope: unreadable" in head and set(data) == {0}
    out = tool(home, "qbad", "show", "1.2.3")
    assert out.returncode == 66 and b"no damaged queue file '1.2.3'" in out.stderr, out
    assert home.path.encode() in out.stderr
    out = tool(home, "qbad", "rm", msgid)
    assert out.returncode == 0 and out.stderr == b"", out
    assert not os.path.exists(bad)
    assert tool(home, "qbad").stdout == b""
    out = tool(home, "qstat")
    assert out.stderr == b"", out
    assert "Traceback" not in log


def test_qbad_as_a_user_who_cannot_read_the_queue(home, daemon_factory):
    msgid = one_held_message(home, daemon_factory)
    damage(os.path.join(home.path, "queue", "mess", msgid), "zeroed")
    d = daemon_factory(home)
    assert wait_log(d, "damaged queue file"), d.log()
    qdir = os.path.join(home.path, "queue")
    if not ROOT:
        os.chmod(qdir, 0)
    try:
        for args in (("qbad",), ("qbad", "rm", msgid), ("qstat",), ("qread",)):
            out = tool(home, *args, as_owner=False)
            err = out.stderr.decode()
            assert out.returncode == 77, (args, out)
            assert "permission denied reading the queue %s" % qdir in err, err
            assert home.path in err and "Errno" not in err and "Traceback" not in err
            assert len(err.splitlines()) == 1
    finally:
        os.chmod(qdir, 0o750 if ROOT else 0o700)
    assert os.path.exists(os.path.join(qdir, "bad", msgid))


def test_a_message_being_written_is_never_set_aside(home, daemon_factory):
    """While a client sends a large message, its file lies in mess/ without
    a commit mark; the daemon's scans leave it there, and it is queued
    whole at the end of DATA."""
    home.setup(rcpthosts=("localhost",), concurrencylocal="0\n")
    d = daemon_factory(home)
    send(d.port)  # makes the queue's key
    time.sleep(1.1)  # later IDs are younger than the key: written straight into mess/
    before = set(home.queued())
    s = socket.create_connection(("127.0.0.1", d.port), timeout=20)
    f = s.makefile("rb")
    assert f.readline().startswith(b"220")
    for cmd in (b"HELO x", b"MAIL FROM:<me@example.org>", b"RCPT TO:<big@localhost>", b"DATA"):
        s.sendall(cmd + b"\r\n")
        f.readline()
    s.sendall(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300)
    deadline = time.time() + 10
    while set(home.queued()) == before and time.time() < deadline:
        time.sleep(0.05)
    (writing,) = set(home.queued()) - before
    for _ in range(3):
        poke(home)
        time.sleep(0.3)
    assert writing in home.queued()
    assert not os.path.exists(os.path.join(home.path, "queue", "bad"))
    s.sendall(b".\r\n")
    assert f.readline().startswith(b"250")
    s.sendall(b"QUIT\r\n")
    s.close()
    out = tool(home, "qstat")
    assert out.stdout.decode().startswith("messages in queue: 2\n"), out
    assert "damaged" not in d.log()
