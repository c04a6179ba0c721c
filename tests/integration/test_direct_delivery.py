"""Local mail written once (issue 19 item 2, eqmail.delivery.direct).

A message whose local recipients only write files (Maildir, mbox) is in
their mailboxes, fsync'd, before the 250, and never becomes a queue file;
every other recipient still goes through the queue, with the queue's texts,
retries and bounces.  The crash battery for this path is
test_batteries.py::test_crash_safety_sigkill_while_receiving_and_delivering
(run for both paths).
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import smtplib
import time

import pytest

from helpers import wait_log

from test_batteries import alias_home, message, wait_drained, wait_until


def send(port, rcpts, data, sender="battery@example.com"):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("direct.client")
        assert s.sendmail(sender, rcpts, data) == {}


def started(log):
    """Recipients the queue started a delivery for."""
    return re.findall(r"starting delivery \d+: msg \S+ to local (\S+)", log)


def direct(log):
    return re.findall(r"direct msg \S+: bytes \d+ from <[^>]*> to local (\S+): success: "
                      r"(did 1\+0\+0/)", log)


def maildir_files(path):
    new = os.path.join(path, "new")
    return sorted(os.listdir(new)) if os.path.isdir(new) else []


def test_in_the_maildir_before_the_250_and_never_queued(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    alias_home(home)
    d = daemon_factory(home)
    mess = os.path.join(home.path, "queue", "mess")
    send(d.port, ["joe@localhost"], message("once", 1))
    # no waiting: the file is there when the 250 is
    got = home.messages()
    assert len(got) == 1, d.log()
    assert got[0].startswith(b"Return-Path: <battery@example.com>\n"
                             b"Delivered-To: joe@localhost\nReceived: from ")
    assert os.listdir(mess) == []
    log = d.log()
    assert direct(log) == [("joe@localhost", "did 1+0+0/")], log
    assert "new msg" not in log and started(log) == []


def test_the_same_bytes_as_through_the_queue(home, daemon_factory):
    """directlocal 0 (read on SIGHUP) sends the same message through the
    queue: the mailbox gets the same bytes, Received date aside."""
    home.setup(rcpthosts=("localhost",))
    alias_home(home)
    d = daemon_factory(home)
    data = message("same", 1, "\r\nX-Long: " + "y" * 3000)
    send(d.port, ["pat@localhost"], data)
    assert len(home.messages()) == 1
    home.write("directlocal", "0\n")
    d.signal(signal.SIGHUP)
    assert wait_log(d, "control files reloaded")
    send(d.port, ["pat@localhost"], data)
    got = home.wait_messages(2)
    assert len(got) == 2, d.log()
    assert started(d.log()) == ["pat@localhost"]

    def without_date(m):
        return re.sub(rb"; \d+ \w+ \d+ \d\d:\d\d:\d\d [-+]0000\n", b"\n", m, count=1)

    assert without_date(got[0]) == without_date(got[1])


def test_other_recipients_go_through_the_queue(home, daemon_factory):
    """A program line, a looping message and an 11-recipient fan-out take
    the queue; the file-only recipient of the same message does not."""
    home.setup(rcpthosts=("localhost",))
    alias = alias_home(home, {".qmail-prog": "|cat > prog-out\n"})
    d = daemon_factory(home)
    send(d.port, ["prog@localhost", "plain@localhost"], message("mixed", 1))
    assert len(home.messages()) == 1  # plain: before the 250
    assert wait_until(lambda: os.path.exists(os.path.join(alias, "prog-out")))
    assert wait_drained(home)
    log = d.log()
    assert direct(log) == [("plain@localhost", "did 1+0+0/")]
    assert started(log) == ["prog@localhost"]

    # a message that already has the Delivered-To line: the queue bounces it
    looping = b"Delivered-To: loop@localhost\r\n" + message("loop", 1)
    send(d.port, ["loop@localhost"], looping, sender="")
    assert wait_log(d, "This message is looping: it already has my Delivered-To line.")
    assert wait_drained(home)
    # the loop's failure, then its double bounce (null sender) to postmaster
    assert started(d.log())[-2:] == ["loop@localhost", "postmaster@mx.example.org"]

    fanout = ["fan+%d@localhost" % i for i in range(11)]
    send(d.port, fanout, message("fan", 1))
    assert len(home.wait_messages(13)) == 13  # plain, the double bounce, the 11
    assert wait_drained(home)
    assert sorted(started(d.log())[-11:]) == sorted(fanout)
    assert len(direct(d.log())) == 1


def test_a_locked_mbox_is_left_to_the_queue(home, daemon_factory):
    """An mbox another program holds locked is not waited for during DATA:
    the queue delivers once the lock is gone."""
    home.setup(rcpthosts=("localhost",))
    alias = alias_home(home, {".qmail-box": "./mbox\n"})
    d = daemon_factory(home)
    box = os.path.join(alias, "mbox")
    send(d.port, ["box@localhost"], message("box", 1))
    with open(box, "rb") as f:
        assert b"Message-ID: <box-1@battery.test>" in f.read()
    assert direct(d.log()) == [("box@localhost", "did 1+0+0/")]
    with open(box, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        t0 = time.time()
        send(d.port, ["box@localhost"], message("box", 2))
        assert time.time() - t0 < 5
        assert len(home.queued()) == 1
        time.sleep(1)
        fcntl.lockf(f, fcntl.LOCK_UN)
    assert wait_drained(home, 40), d.log()
    with open(box, "rb") as f:
        text = f.read()
    assert text.count(b"Message-ID: <box-2@battery.test>") == 1
    assert started(d.log()) == ["box@localhost"]


def test_a_missing_maildir_gets_the_queues_deferral(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    alias_home(home, {".qmail-gone": "./Gone/\n"})
    d = daemon_factory(home)
    send(d.port, ["gone@localhost"], message("gone", 1))
    assert len(home.queued()) == 1
    assert wait_log(d, "Maildir %s/alias/./Gone/ does not exist" % home.path) or \
        wait_log(d, "Gone/ does not exist")
    assert direct(d.log()) == []


def test_a_fan_out_goes_in_batches_with_each_recipients_own_result(home, daemon_factory):
    """25 local recipients with concurrencylocal 2: the queue delivers them
    in two batches (eqmail.queue.scheduler._jobs), each recipient with its
    own Delivered-To, report, forward and done mark; after a restart and a
    retry only the deferred one is tried again."""
    home.setup(rcpthosts=("localhost",), concurrencylocal="2\n")
    alias_home(home, {".qmail-gone": "./Gone/\n", ".qmail-fwd": "&fan0@localhost\n"})
    d = daemon_factory(home)
    fans = ["fan%d@localhost" % i for i in range(1, 24)]
    send(d.port, fans + ["gone@localhost", "fwd@localhost"], message("fan", 1))
    got = home.wait_messages(24)  # the 23, and fan0 through the forward
    assert len(got) == 24, d.log()
    dt = sorted(re.search(rb"^Delivered-To: (\S+)", m, re.M).group(1).decode() for m in got)
    assert dt == sorted(fans + ["fan0@localhost"])
    assert wait_log(d, "Gone/ does not exist or is not a Maildir")
    log = d.log()
    assert sorted(started(log)) == sorted(fans + ["gone@localhost", "fwd@localhost",
                                                  "fan0@localhost"])
    assert re.search(r"delivery \d+: success: did 0\+1\+0//forwarded as msg \S+", log), log
    assert len(home.queued()) == 1  # gone waits for its retry
    d.stop()
    d.start()
    d.signal(signal.SIGALRM)
    assert wait_until(lambda: started(d.log()).count("gone@localhost") == 2), d.log()
    time.sleep(0.5)
    assert len(home.messages()) == 24  # nobody else again
    assert started(d.log()).count("fan1@localhost") == 1


def _environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)


@pytest.mark.parametrize("admin", [None, "4"])
def test_one_malloc_arena_and_programs_do_not_inherit_it(home, daemon_factory, admin):
    """eqmaild runs itself again with MALLOC_ARENA_MAX=1 (glibc reads it at
    start), same pid; the programs it starts do not see it.  An admin's
    own MALLOC_ARENA_MAX is left as it is (and no re-run)."""
    home.setup(rcpthosts=("localhost",))
    alias = alias_home(home, {".qmail-env": "|env > env-out\n"})
    d = daemon_factory(home, env={"MALLOC_ARENA_MAX": admin} if admin else None)
    started_env = _environ(d.proc.pid)
    send(d.port, ["env@localhost"], message("env", 1))
    out = os.path.join(alias, "env-out")
    assert wait_until(lambda: os.path.exists(out) and os.path.getsize(out) > 0)
    with open(out) as f:
        seen = dict(l.split("=", 1) for l in f.read().splitlines() if "=" in l)
    assert "EQMAIL_ONE_ARENA" not in seen
    if admin is None:
        assert started_env.get(b"MALLOC_ARENA_MAX") == b"1"  # what glibc read
        assert "MALLOC_ARENA_MAX" not in seen
    else:
        assert b"EQMAIL_ONE_ARENA" not in started_env  # not run again
        assert started_env.get(b"MALLOC_ARENA_MAX") == admin.encode()
