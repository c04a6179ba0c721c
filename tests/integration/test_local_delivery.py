"""Local delivery with a real eqmaild: users/assign and users/cdb, dot-qmail
files (Maildir, mbox, programs, forwards), the safety checks, bounces and
double bounces (RFC 3464), `eqmail queue` through the pickup socket,
`eqmail qread`/`qstat`, and delivery as a system user when eqmaild is root.

Every "user" here lives in a directory under the test home, owned by the
daemon's user (eqmailtest as root), since an unprivileged eqmaild delivers
only as itself.  Behaviour reference sections 5.5, 5.7 and 6, T31-T37.
"""
from __future__ import annotations

import email
import json
import mailbox
import os
import pwd
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import ROOT, ensure_user, free_port, wait_log

PY = sys.executable
SENDER_USER = "eqmailsender"
BOB = "eqmailbob"


# -- helpers ------------------------------------------------------------------------------

def own(home, path):
    """Give `path` (recursively) to the daemon's user, as Home.chown() does."""
    if not ROOT:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for top, dirs, files in os.walk(path):
            for n in [top] + [os.path.join(top, x) for x in dirs + files]:
                os.lchown(n, home.uid, home.gid)
    else:
        os.lchown(path, home.uid, home.gid)


def put(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def maildirmake(path):
    out = subprocess.run([PY, "-m", "eqmail", "maildirmake", path],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out
    assert all(os.path.isdir(os.path.join(path, d)) for d in ("tmp", "new", "cur"))


def user_home(home, name, dotqmail=None, maildirs=("Maildir",), mode=0o755):
    """HOME/homes/<name> with the given .qmail files ({suffix: text}) and Maildirs."""
    base = os.path.join(home.path, "homes")
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    h = os.path.join(base, name)
    os.makedirs(h)
    os.chmod(h, mode)
    for m in maildirs:
        maildirmake(os.path.join(h, m))
    for suffix, text in (dotqmail or {}).items():
        put(os.path.join(h, ".qmail" + suffix), text)
    return h


def write_assign(home, lines):
    users = os.path.join(home.path, "users")
    os.makedirs(users, exist_ok=True)
    put(os.path.join(users, "assign"), "".join(l + "\n" for l in lines) + ".\n")


def assign_line(home, kind, key, user, homedir, dash="", ext=""):
    return "%s%s:%s:%d:%d:%s:%s:%s:" % (kind, key, user, home.uid, home.gid, homedir, dash, ext)


def read_dir(path):
    """Bytes of every file in `path` (a Maildir's new/), oldest first."""
    if not os.path.isdir(path):
        return []
    out = []
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out.append(f.read())
    return out


def wait_dir(path, count, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = read_dir(path)
        if len(got) >= count:
            return got
        time.sleep(0.05)
    return read_dir(path)


def wait_empty_queue(home, timeout=15.0):
    deadline = time.time() + timeout
    while home.queued() and time.time() < deadline:
        time.sleep(0.05)
    return home.queued() == []


def results(daemon):
    """{recipient: [(kind, text), ...]} from the daemon's qmail-send log lines
    and its direct deliveries."""
    log = daemon.log()
    started = dict(re.findall(r"starting delivery (\d+): msg \S+ to \w+ (.*)", log))
    out = {}
    for num, kind, text in re.findall(r"delivery (\d+): (success|deferral|failure): (.*)", log):
        out.setdefault(started.get(num), []).append((kind, text))
    # deliveries made during DATA (eqmail.delivery.direct): successes only
    for rcpt, text in re.findall(r"direct msg \S+: bytes \d+ from <.*> to local (\S+): "
                                 r"success: (.*)", log):
        out.setdefault(rcpt, []).append(("success", text))
    return out


def wait_result(daemon, rcpt, kind, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for k, text in results(daemon).get(rcpt, []):
            if k == kind:
                return text
        time.sleep(0.05)
    raise AssertionError("no %s for %s in the log:\n%s" % (kind, rcpt, daemon.log()))


def send(daemon, sender, rcpts, data: bytes):
    """One SMTP transaction with exact MAIL/RCPT arguments (no quoting by smtplib)."""
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as s:
        s.ehlo("client.example")
        code, text = s.docmd("MAIL FROM:<%s>" % sender)
        assert code == 250, (code, text)
        for r in rcpts:
            code, text = s.docmd("RCPT TO:<%s>" % r)
            assert code == 250, (r, code, text)
        code, text = s.data(data)
        assert code == 250, (code, text)


def head_lines(raw: bytes):
    return raw.split(b"\n\n", 1)[0].split(b"\n")


def parse_bounce(raw: bytes):
    """(message, human text, [status blocks], returned header) of an RFC 3464 bounce."""
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    text = parts[0].get_payload(decode=True).decode("utf-8")
    blocks = parts[1].get_payload()
    headers = parts[2].get_payload(decode=True)
    return msg, text, blocks, headers


# -- the fixture --------------------------------------------------------------------------

@pytest.fixture
def mailhome(home):
    """me mx.example.org, locals mx.example.org and localhost, no rcpthosts
    (the locals); each test writes its own users/assign and homes."""
    home.setup()
    return home


# -- 1. users/assign, users/cdb and the dot-qmail search -----------------------------------

DUMP = r'''import json, os, sys
name = sys.argv[1]
data = sys.stdin.buffer.read()
with open(name + ".msg", "wb") as f:
    f.write(data)
with open(name + ".env", "w") as f:
    json.dump(dict(os.environ), f)
'''


def joe_home(home, extra=None):
    dq = {"": "./Maildir/\n", "-ext": "./mail-ext/\n",
          "-foo-default": "|%s dump.py foo\n" % PY}
    dq.update(extra or {})
    h = user_home(home, "joe", dq, maildirs=("Maildir", "mail-ext"))
    put(os.path.join(h, "dump.py"), DUMP)
    return h


@pytest.mark.parametrize("source", ["assign", "cdb"])
def test_assign_and_cdb_pick_the_user_and_dot_qmail(mailhome, daemon_factory, source):
    home = mailhome
    joe = joe_home(home)
    lists = user_home(home, "lists", {"-mlm-foo": "./Maildir/\n"})
    decoy = user_home(home, "decoy", {"": "./Maildir/\n", "-default": "./Maildir/\n"})
    real = [assign_line(home, "=", "joe", "joe", joe),
            assign_line(home, "+", "joe+", "joe", joe, "-"),
            assign_line(home, "+", "list-", "lists", lists, "-", "mlm-")]
    write_assign(home, real)
    if source == "cdb":
        out = subprocess.run([PY, "-m", "eqmail", "newu", "--home", home.path],
                             capture_output=True, timeout=30)
        assert out.returncode == 0, out
        assert b"3 assignments" in out.stdout
        assert os.path.exists(os.path.join(home.path, "users", "cdb"))
        # users/assign changes, newu is not run again: the cdb still rules
        write_assign(home, [assign_line(home, "=", "joe", "joe", decoy),
                            assign_line(home, "+", "joe+", "joe", decoy, "-"),
                            assign_line(home, "+", "list-", "lists", decoy, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe@localhost"], b"Subject: bare\r\n\r\nto joe\r\n")
    send(d, "s@x.org", ["JOE+Ext@localhost"], b"Subject: ext\r\n\r\nto joe+ext\r\n")
    send(d, "s@x.org", ["list-foo@localhost"], b"Subject: list\r\n\r\nto the list\r\n")
    send(d, "s@x.org", ["joe+foo-bar@mx.example.org"], b"Subject: dflt\r\n\r\ndefault\r\n")
    send(d, "s@x.org", ["nobody@localhost"], b"Subject: alias\r\n\r\ncatch-all\r\n")

    bare = wait_dir(os.path.join(joe, "Maildir", "new"), 1)
    assert len(bare) == 1, d.log()
    assert head_lines(bare[0])[:2] == [b"Return-Path: <s@x.org>", b"Delivered-To: joe@localhost"]
    assert bare[0].endswith(b"Subject: bare\n\nto joe\n")

    ext = wait_dir(os.path.join(joe, "mail-ext", "new"), 1)
    assert len(ext) == 1, d.log()
    assert head_lines(ext[0])[1] == b"Delivered-To: JOE+Ext@localhost"
    assert ext[0].endswith(b"to joe+ext\n")

    lst = wait_dir(os.path.join(lists, "Maildir", "new"), 1)
    assert len(lst) == 1, d.log()
    assert head_lines(lst[0])[1] == b"Delivered-To: list-foo@localhost"

    assert wait_result(d, "joe+foo-bar@mx.example.org", "success")
    with open(os.path.join(joe, "foo.env")) as f:
        env = json.load(f)
    assert env["DEFAULT"] == "bar"
    assert env["EXT"] == "foo-bar"
    assert env["LOCAL"] == "joe+foo-bar"

    alias = home.wait_messages(1)
    assert len(alias) == 1
    assert head_lines(alias[0])[1] == b"Delivered-To: nobody@localhost"

    assert wait_empty_queue(home), d.log()
    assert read_dir(os.path.join(decoy, "Maildir", "new")) == []
    # nothing went to the alias user but the one catch-all message
    assert len(home.messages()) == 1


# -- 2. bounces and double bounces --------------------------------------------------------

def test_unknown_extension_bounces_rfc3464_to_local_sender(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home)
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "sender@localhost", ["joe+nothere@localhost"],
         b"Subject: lost\r\nMessage-ID: <lost@x.org>\r\n\r\nsecret body\r\n")
    assert "Sorry, no mailbox here by that name. (#5.1.1)" in wait_result(
        d, "joe+nothere@localhost", "failure")
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, d.log()
    raw = msgs[0]
    lines = head_lines(raw)
    assert lines[0] == b"Return-Path: <>"
    assert lines[1] == b"Delivered-To: sender@localhost"
    msg, text, blocks, headers = parse_bounce(raw)
    assert msg["To"] == "sender@localhost"
    assert msg["From"] == "MAILER-DAEMON@mx.example.org"
    assert msg["Subject"] == "failure notice"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "<joe+nothere@localhost>:" in text
    assert "Sorry, no mailbox here by that name. (#5.1.1)" in text
    assert blocks[0]["Reporting-MTA"] == "dns; mx.example.org"
    assert len(blocks) == 2
    assert blocks[1]["Final-Recipient"] == "rfc822; joe+nothere@localhost"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"
    assert b"Subject: lost" in headers and b"Message-ID: <lost@x.org>" in headers
    assert b"secret body" not in raw
    assert wait_empty_queue(home), d.log()
    assert read_dir(os.path.join(joe, "Maildir", "new")) == []


def test_failed_bounce_becomes_double_bounce_to_postmaster(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home)
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "", ["joe+nothere@localhost"], b"Subject: a bounce\r\n\r\nbounced\r\n")
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, d.log()
    raw = msgs[0]
    lines = head_lines(raw)
    assert lines[0] == b"Return-Path: <#@[]>"
    assert lines[1] == b"Delivered-To: postmaster@mx.example.org"
    msg, text, blocks, headers = parse_bounce(raw)
    assert msg["To"] == "postmaster@mx.example.org"
    assert "but the bounce bounced!" in text
    assert blocks[1]["Final-Recipient"] == "rfc822; joe+nothere@localhost"
    assert blocks[1]["Status"] == "5.1.1"
    assert b"Subject: a bounce" in headers
    assert wait_empty_queue(home), d.log()


def test_failed_double_bounce_is_discarded(mailhome, daemon_factory):
    """doublebounceto points at a missing mailbox: the triple bounce is logged and dropped."""
    home = mailhome
    home.write("doublebounceto", "joe+nothere\n")
    home.write("doublebouncehost", "localhost\n")
    joe = joe_home(home)
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "", ["joe+gone@localhost"], b"Subject: a bounce\r\n\r\nbounced\r\n")
    assert wait_log(d, "triple bounce: discarding"), d.log()
    assert wait_empty_queue(home), d.log()
    assert home.messages() == []


# -- 3. mbox, programs, exit codes, forwards ----------------------------------------------

def test_mbox_delivery_quotes_from_lines(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-mbox": "./mbox\n"})
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+mbox@localhost"],
         b"Subject: one\r\n\r\nfirst line\r\nFrom me\r\n>From you\r\nFromage\r\n")
    mbox_path = os.path.join(joe, "mbox")
    assert wait_result(d, "joe+mbox@localhost", "success")
    send(d, "", ["joe+mbox@localhost"], b"Subject: two\r\n\r\nno final newline")
    assert wait_empty_queue(home), d.log()
    with open(mbox_path, "rb") as f:
        raw = f.read()
    assert re.match(rb"From s@x\.org \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n"
                    rb"Return-Path: <s@x\.org>\nDelivered-To: joe\+mbox@localhost\nReceived: ",
                    raw), raw[:200]
    assert b"\nfirst line\n>From me\n>>From you\nFromage\n\nFrom MAILER-DAEMON " in raw
    assert raw.endswith(b"\nno final newline\n\n")
    box = mailbox.mbox(mbox_path, create=False)
    try:
        got = list(box)
    finally:
        box.close()
    assert [m["Subject"] for m in got] == ["one", "two"]
    assert got[0].get_from().startswith("s@x.org ")
    assert got[1].get_from().startswith("MAILER-DAEMON ")
    assert got[0]["Return-Path"] == "<s@x.org>" and got[1]["Return-Path"] == "<>"
    assert got[0].get_payload() == "first line\n>From me\n>>From you\nFromage\n"


def test_program_environment_and_stdin(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home)
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    body = b"Subject: prog\r\n\r\nline one\r\n"
    send(d, "s@x.org", ["joe+foo-bar-baz@mx.example.org"], body)
    assert wait_result(d, "joe+foo-bar-baz@mx.example.org", "success")
    with open(os.path.join(joe, "foo.env")) as f:
        env = json.load(f)
    rcpt = "joe+foo-bar-baz@mx.example.org"
    expect = {"SENDER": "s@x.org", "NEWSENDER": "s@x.org", "RECIPIENT": rcpt,
              "LOCAL": "joe+foo-bar-baz", "HOST": "mx.example.org",
              "HOST2": "mx.example", "HOST3": "mx", "HOST4": "mx", "EXT": "foo-bar-baz",
              "EXT2": "bar-baz", "EXT3": "baz", "DEFAULT": "bar-baz",
              "USER": "joe", "HOME": joe,
              "DTLINE": "Delivered-To: %s\n" % rcpt, "RPLINE": "Return-Path: <s@x.org>\n"}
    assert {k: env.get(k) for k in expect} == expect
    assert re.match(r"From s@x\.org \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n\Z",
                    env["UFLINE"]), env["UFLINE"]


def test_host2_to_4_and_did_counts_as_qmail_local(mailhome, daemon_factory):
    # qmail-local cuts HOST at the last dot and keeps what is left when no
    # dot remains (example.org: example three times); it reports
    # did FILES+FORWARDS+PROGRAMS
    home = mailhome
    home.write("locals", "mx.example.org\nlocalhost\nexample.org\n")
    joe = joe_home(home, {"-foo-default": "./Maildir/\n|%s dump.py foo\n&fwd@localhost\n"
                                          "./mail-ext/\n" % PY})
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+foo-x@example.org"], b"Subject: hosts\r\n\r\nx\r\n")
    text = wait_result(d, "joe+foo-x@example.org", "success")
    assert text.startswith("did 2+1+1/"), text
    with open(os.path.join(joe, "foo.env")) as f:
        env = json.load(f)
    assert [env["HOST%s" % n] for n in ("", 2, 3, 4)] == \
        ["example.org", "example", "example", "example"], env


@pytest.mark.parametrize("size", [0, 20000])
def test_program_gets_the_whole_message_on_stdin(mailhome, daemon_factory, size):
    home = mailhome
    joe = joe_home(home)
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    filler = b"".join(b"filler line %05d\r\n" % i for i in range(size // 20))
    send(d, "s@x.org", ["joe+foo-x@localhost"],
         b"Subject: prog\r\n\r\nline one\r\n" + filler + b"last line\r\n")
    assert wait_result(d, "joe+foo-x@localhost", "success")
    with open(os.path.join(joe, "foo.msg"), "rb") as f:
        stdin = f.read()
    # the queued message: the SMTP Received line, then the data; no
    # Return-Path/Delivered-To (those are in RPLINE/DTLINE)
    assert stdin.startswith(b"Received: from "), stdin[:100]
    assert stdin.endswith(b"Subject: prog\n\nline one\n" + filler.replace(b"\r", b"")
                          + b"last line\n")
    assert b"Delivered-To" not in stdin


def test_program_exit_100_bounces(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-fail": "|echo custom refusal; exit 100\n./Maildir/\n"})
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "sender@localhost", ["joe+fail@localhost"], b"Subject: f\r\n\r\nx\r\n")
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, d.log()
    msg, text, blocks, headers = parse_bounce(msgs[0])
    assert "<joe+fail@localhost>:\ncustom refusal\n" in text
    assert blocks[1]["Final-Recipient"] == "rfc822; joe+fail@localhost"
    assert blocks[1]["Status"].startswith("5.")
    assert read_dir(os.path.join(joe, "Maildir", "new")) == []  # the next line did not run


def test_program_exit_111_defers_then_retry_delivers(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-later": "|if [ -f ok ]; then touch later.out; "
                                    "else echo not yet; exit 111; fi\n./Maildir/\n"})
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+later@localhost"], b"Subject: later\r\n\r\nretry me\r\n")
    assert wait_result(d, "joe+later@localhost", "deferral") == "not yet"
    time.sleep(0.3)
    assert len(home.queued()) == 1
    assert not os.path.exists(os.path.join(joe, "later.out"))
    assert read_dir(os.path.join(joe, "Maildir", "new")) == []
    put(os.path.join(joe, "ok"), "")
    own(home, os.path.join(joe, "ok"))
    d.signal(signal.SIGALRM)
    assert wait_result(d, "joe+later@localhost", "success"), d.log()
    assert wait_empty_queue(home), d.log()
    assert os.path.exists(os.path.join(joe, "later.out"))
    got = read_dir(os.path.join(joe, "Maildir", "new"))
    assert len(got) == 1 and got[0].endswith(b"Subject: later\n\nretry me\n")
    assert home.messages() == []  # no bounce


def test_restart_keeps_the_retry_schedule(mailhome, daemon_factory):
    # qmail keeps a message's next try on disk: after a restart a deferred
    # message waits for it (local: about 100 s after its birth) instead of
    # being tried again at once; SIGALRM still tries it now
    home = mailhome
    joe = joe_home(home, {"-later": "|echo not yet; exit 111\n"})
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+later@localhost"], b"Subject: later\r\n\r\nretry me\r\n")
    assert wait_result(d, "joe+later@localhost", "deferral") == "not yet"
    attempts = lambda: d.log().count("to local joe+later@localhost")  # noqa: E731
    assert attempts() == 1
    (name,) = home.queued()
    deadline = time.time() + 5
    while os.stat(os.path.join(home.path, "queue", "mess", name)).st_mtime < time.time() + 50:
        assert time.time() < deadline, "the next try was not written to the queue file"
        time.sleep(0.05)
    assert d.stop() == 0
    d2 = daemon_factory(home)
    time.sleep(2)
    assert attempts() == 1, d2.log()
    d2.signal(signal.SIGALRM)
    deadline = time.time() + 15
    while attempts() < 2:
        assert time.time() < deadline, d2.log()
        time.sleep(0.05)


def test_program_exit_99_skips_following_lines(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-z": "&early@localhost\n|exit 99\n|touch second\n./Maildir/\n"
                                "&late@localhost\n"})
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+z@localhost"], b"Subject: z\r\n\r\nx\r\n")
    text = wait_result(d, "joe+z@localhost", "success")
    assert text.startswith("did 0+1+1/"), text  # qmail-local: files+forwards+programs
    msgs = home.wait_messages(1)
    assert wait_empty_queue(home), d.log()
    time.sleep(0.3)
    msgs = home.messages()
    # the forward written before the program still goes out; nothing after it runs
    assert [head_lines(m)[1] for m in msgs] == [b"Delivered-To: early@localhost"]
    assert not os.path.exists(os.path.join(joe, "second"))
    assert read_dir(os.path.join(joe, "Maildir", "new")) == []


@pytest.mark.parametrize("verp", [False, True])
def test_list_owner_is_the_forward_sender_and_verp_gives_one_per_recipient(
        mailhome, daemon_factory, verp):
    # qmail-local: .qmail-list-owner makes NEWSENDER joe+list-owner@HOST;
    # with .qmail-list-owner-default it is VERP, joe+list-owner-@HOST-@[],
    # and qmail-send gives each recipient its own: ...-owner-box=rhost@HOST
    home = mailhome
    files = {"-list": "&bob@localhost\n&carol@localhost\n", "-list-owner": "./Maildir/\n"}
    if verp:
        files["-list-owner-default"] = "./Maildir/\n"
    joe = joe_home(home, files)
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+list@localhost"], b"Subject: to the list\r\n\r\nhi\r\n")
    msgs = home.wait_messages(2)  # bob and carol: the alias user's catch-all
    assert wait_empty_queue(home), d.log()
    paths = sorted(head_lines(m)[0] for m in msgs)
    if verp:
        assert paths == [b"Return-Path: <joe+list-owner-bob=localhost@localhost>",
                         b"Return-Path: <joe+list-owner-carol=localhost@localhost>"], paths
    else:
        assert paths == [b"Return-Path: <joe+list-owner@localhost>"] * 2, paths


def test_plus_list_line_makes_later_file_lines_temporary_failures(mailhome, daemon_factory):
    # qmail-local: "+list" means forward only from there on; a file line
    # after it is "Uh-oh: .qmail has file delivery but has x bit set" (111)
    home = mailhome
    joe = joe_home(home, {"-lst": "+list\n./Maildir/\n"})
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+lst@localhost"], b"Subject: lst\r\n\r\nx\r\n")
    text = wait_result(d, "joe+lst@localhost", "deferral")
    assert text.startswith("Uh-oh: .qmail has file delivery but has x bit set."), text
    assert read_dir(os.path.join(joe, "Maildir", "new")) == []


def test_return_path_is_quoted_as_qmail_local_quotes_it(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home)
    write_assign(home, [assign_line(home, "=", "joe", "joe", joe)])
    d = daemon_factory(home)
    send(d, '"a b"@x.org', ["joe@localhost"], b"Subject: q\r\n\r\nx\r\n")
    assert wait_result(d, "joe@localhost", "success")
    (msg,) = read_dir(os.path.join(joe, "Maildir", "new"))
    assert head_lines(msg)[0] == b'Return-Path: <"a b"@x.org>', msg[:200]


def test_forward_to_another_local_user_keeps_first_hop_delivered_to(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-fwd": "&other@localhost\n"})
    other = user_home(home, "other")  # no .qmail: defaultdelivery ./Maildir/
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-"),
                        assign_line(home, "=", "other", "other", other)])
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe+fwd@localhost"], b"Subject: fwd\r\n\r\nforwarded\r\n")
    got = wait_dir(os.path.join(other, "Maildir", "new"), 1)
    assert len(got) == 1, d.log()
    lines = head_lines(got[0])
    assert lines[:3] == [b"Return-Path: <s@x.org>", b"Delivered-To: other@localhost",
                         b"Delivered-To: joe+fwd@localhost"]
    assert lines[3].startswith(b"Received: from ")
    assert got[0].endswith(b"Subject: fwd\n\nforwarded\n")
    assert wait_empty_queue(home), d.log()
    assert read_dir(os.path.join(joe, "Maildir", "new")) == []
    assert home.messages() == []


# -- 4. Delivered-To loops ----------------------------------------------------------------

def test_delivered_to_loop_bounces(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-loop": "&joe+loop@localhost\n"})
    write_assign(home, [assign_line(home, "=", "joe", "joe", joe),
                        assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    send(d, "sender@localhost", ["joe@localhost"],
         b"Delivered-To: joe@localhost\r\nSubject: again\r\n\r\nx\r\n")
    looping = "This message is looping: it already has my Delivered-To line. (#5.4.6)"
    assert wait_result(d, "joe@localhost", "failure") == looping
    # a .qmail forwarding to itself: the second hop sees its own Delivered-To
    send(d, "sender@localhost", ["joe+loop@localhost"], b"Subject: self\r\n\r\nx\r\n")
    msgs = home.wait_messages(2)
    assert len(msgs) == 2, d.log()
    seen = {}
    for raw in msgs:
        msg, text, blocks, headers = parse_bounce(raw)
        assert looping in text
        assert blocks[1]["Status"] == "5.4.6"
        seen[blocks[1]["Final-Recipient"]] = headers
    assert set(seen) == {"rfc822; joe@localhost", "rfc822; joe+loop@localhost"}
    assert b"Delivered-To: joe+loop@localhost" in seen["rfc822; joe+loop@localhost"]
    assert wait_empty_queue(home), d.log()
    assert read_dir(os.path.join(joe, "Maildir", "new")) == []


# -- 5. nothing taken from the address leaves the home ------------------------------------

def snapshot(root, skip):
    out = {}
    for top, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if os.path.join(top, x) not in skip]
        for n in files + dirs:
            p = os.path.join(top, n)
            if p in skip:
                continue
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def test_extension_cannot_escape_the_home(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-default": "./Maildir/\n",
                          # never used: "." in an extension becomes ":"
                          "-.hidden": "|touch TRAPPED\n",
                          "-:hidden": "./hidden/\n"})
    maildirmake(os.path.join(joe, "hidden"))
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-")])
    d = daemon_factory(home)
    skip = {os.path.join(home.path, n) for n in ("queue", "daemon.log", "run", "homes")}
    skip.add(home.maildir)
    before = snapshot(home.path, skip)
    passwd = os.stat("/etc/passwd")
    slashy = ["joe+../../x@localhost", "joe+/etc/passwd@localhost", "joe+a/b@localhost",
              "joe+../../../../tmp/eqx@localhost"]
    for rcpt in slashy:
        send(d, "sender@localhost", [rcpt], b"Subject: escape\r\n\r\nx\r\n")
    send(d, "sender@localhost", ["joe+.hidden@localhost"], b"Subject: dot\r\n\r\nx\r\n")
    send(d, "sender@localhost", ["joe+..@localhost"], b"Subject: dots\r\n\r\nx\r\n")
    for rcpt in slashy:
        assert wait_result(d, rcpt, "failure") == "Sorry, address must not contain /. (#5.1.1)"
    assert wait_empty_queue(home), d.log()
    bounces = home.wait_messages(len(slashy))
    assert len(bounces) == len(slashy)
    failed = set()
    for raw in bounces:
        msg, text, blocks, headers = parse_bounce(raw)
        assert blocks[1]["Status"] == "5.1.1"
        failed.add(blocks[1]["Final-Recipient"])
    assert failed == {"rfc822; " + r for r in slashy}
    # the dotted extensions stayed inside joe's home, in the files they map to
    hidden = read_dir(os.path.join(joe, "hidden", "new"))
    assert [head_lines(m)[1] for m in hidden] == [b"Delivered-To: joe+.hidden@localhost"]
    dflt = read_dir(os.path.join(joe, "Maildir", "new"))
    assert [head_lines(m)[1] for m in dflt] == [b"Delivered-To: joe+..@localhost"]
    assert not os.path.exists(os.path.join(joe, "TRAPPED"))
    # nothing new or changed anywhere else
    assert snapshot(home.path, skip) == before
    for other in ("homes/x", "x", "../x"):
        assert not os.path.exists(os.path.join(home.path, other))
    assert not os.path.exists("/tmp/eqx")
    after = os.stat("/etc/passwd")
    assert (after.st_size, after.st_mtime_ns) == (passwd.st_size, passwd.st_mtime_ns)
    # inside joe's home: only the Maildirs got files
    for top, dirs, files in os.walk(joe):
        rel = os.path.relpath(top, joe)
        if files and rel not in (".",):
            assert rel.split(os.sep)[0] in ("Maildir", "hidden", "mail-ext"), (top, files)
    assert sorted(f for f in os.listdir(joe) if not os.path.isdir(os.path.join(joe, f))) == \
        sorted([".qmail", ".qmail-ext", ".qmail-foo-default", ".qmail-default",
                ".qmail-.hidden", ".qmail-:hidden", "dump.py"])


def test_very_long_local_part_reaches_the_catch_all(mailhome, daemon_factory):
    home = mailhome
    d = daemon_factory(home)
    rcpt = "x" * 300 + "@localhost"
    send(d, "s@x.org", [rcpt], b"Subject: long\r\n\r\nx\r\n")
    msgs = home.wait_messages(1, timeout=5)
    assert len(msgs) == 1, d.log()
    assert head_lines(msgs[0])[1] == b"Delivered-To: " + rcpt.encode()


# -- 6. safety checks ---------------------------------------------------------------------

def test_unsafe_dot_qmail_files_defer(mailhome, daemon_factory):
    home = mailhome
    joe = joe_home(home, {"-ww": "./Maildir/\n", "-xfile": "./Maildir/\n",
                          "-xprog": "|touch ran\n", "-xfwd": "&fwd@localhost\n",
                          "-blank": "\n./Maildir/\n"})
    os.chmod(os.path.join(joe, ".qmail-ww"), 0o666)
    os.chmod(os.path.join(joe, ".qmail-xfile"), 0o755)
    os.chmod(os.path.join(joe, ".qmail-xprog"), 0o700)
    os.chmod(os.path.join(joe, ".qmail-xfwd"), 0o755)
    open_home = user_home(home, "open", {"": "./Maildir/\n"}, mode=0o755)
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-"),
                        assign_line(home, "=", "open", "open", open_home)])
    d = daemon_factory(home)
    os.chmod(open_home, 0o777)  # after Daemon.start()'s chown, which keeps modes anyway
    try:
        expect = {
            "joe+ww@localhost": "Uh-oh: .qmail file is writable. (#4.7.0)",
            "joe+xfile@localhost": "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)",
            "joe+xprog@localhost": "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)",
            "joe+blank@localhost": "Uh-oh: first line of .qmail file is blank. (#4.2.1)",
            "open@localhost": "Uh-oh: home directory is writable. (#4.7.0)",
        }
        for rcpt in expect:
            send(d, "sender@localhost", [rcpt], b"Subject: unsafe\r\n\r\nx\r\n")
        # a forward-only .qmail with its x bit set is fine
        send(d, "sender@localhost", ["joe+xfwd@localhost"], b"Subject: xfwd\r\n\r\nx\r\n")
        for rcpt, text in expect.items():
            assert wait_result(d, rcpt, "deferral") == text
        msgs = home.wait_messages(1)
        assert [head_lines(m)[1] for m in msgs] == [b"Delivered-To: fwd@localhost"]
        time.sleep(0.3)
        assert len(home.queued()) == len(expect)  # all kept for a retry
        assert read_dir(os.path.join(joe, "Maildir", "new")) == []
        assert read_dir(os.path.join(open_home, "Maildir", "new")) == []
        assert not os.path.exists(os.path.join(joe, "ran"))
        assert len(home.messages()) == 1  # no bounce: these are temporary
    finally:
        os.chmod(open_home, 0o755)


# -- 7. eqmail queue, qread, qstat --------------------------------------------------------

def _sender_user():
    """(uid, gid) of a second unprivileged user (created as root), else ours."""
    pw = ensure_user(SENDER_USER)
    return pw.pw_uid, pw.pw_gid


def run_queue(home, envelope: bytes, message: bytes, as_user=None):
    """`eqmail queue` with the message on fd 0 and `envelope` on fd 1."""
    r, w = os.pipe()
    try:
        os.write(w, envelope)  # small: fits in the pipe buffer
        os.close(w)
        w = None
        kw = {}
        if as_user is not None and ROOT:
            kw = dict(user=as_user[0], group=as_user[1], extra_groups=[])
        return subprocess.run([PY, "-m", "eqmail", "queue", "--home", home.path],
                              input=message, stdout=r, stderr=subprocess.PIPE,
                              timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin"}, **kw)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def run_tool(home, *args):
    kw = dict(user=home.uid, group=home.gid, extra_groups=[]) if ROOT else {}
    return subprocess.run([PY, "-m", "eqmail"] + list(args) + ["--home", home.path],
                          capture_output=True, timeout=30, cwd="/",
                          env={"PATH": "/usr/bin:/bin"}, **kw)


def test_eqmail_queue_from_another_user_goes_through_pickup(mailhome, daemon_factory):
    home = mailhome
    uid, gid = _sender_user()
    d = daemon_factory(home)
    if ROOT:
        # the other user cannot write the queue: only the pickup socket is left
        assert os.stat(os.path.join(home.path, "queue", "mess")).st_uid == home.uid != uid
        assert os.path.exists(os.path.join(home.path, "run", "pickup"))
    out = run_queue(home, b"Finjector@example.org\0Tinjected@localhost\0\0",
                    b"Subject: injected\n\nvia eqmail queue\n", as_user=(uid, gid))
    assert out.returncode == 0, out
    assert out.stderr == b""
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, d.log()
    lines = head_lines(msgs[0])
    assert lines[0] == b"Return-Path: <injector@example.org>"
    assert lines[1] == b"Delivered-To: injected@localhost"
    assert re.match(rb"Received: \(\w+ \d+ invoked by uid %d\); " % uid, lines[2]), lines[2]
    assert msgs[0].endswith(b"Subject: injected\n\nvia eqmail queue\n")
    assert "uid %d" % uid in d.log()


def test_eqmail_queue_bad_envelope_and_long_address(mailhome, daemon_factory):
    home = mailhome
    uid, gid = _sender_user()
    daemon_factory(home)
    msg = b"Subject: bad\n\nx\n"
    assert run_queue(home, b"Xoops\0Tjoe@localhost\0\0", msg, (uid, gid)).returncode == 91
    assert run_queue(home, b"Fa@b\0Tjoe@localhost\0", msg, (uid, gid)).returncode == 91
    assert run_queue(home, b"Fa@b\0\0", msg, (uid, gid)).returncode == 91
    long_addr = b"a" * 993 + b"@localhost"  # 1003 bytes
    ok_addr = b"a" * 992 + b"@localhost"  # 1002 bytes: allowed
    rcpt = b"Tbox@localhost\0\0"
    assert run_queue(home, b"Fa@b\0T" + long_addr + b"\0\0", msg, (uid, gid)).returncode == 11
    assert run_queue(home, b"F" + long_addr + b"\0" + rcpt, msg, (uid, gid)).returncode == 11
    assert run_queue(home, b"F" + ok_addr + b"\0" + rcpt, msg, (uid, gid)).returncode == 0
    got = home.wait_messages(1)
    assert len(got) == 1
    assert head_lines(got[0])[0] == b"Return-Path: <" + ok_addr + b">"
    time.sleep(0.3)
    assert len(home.messages()) == 1


def test_qread_and_qstat_list_held_messages(mailhome, daemon_factory):
    home = mailhome
    home.write("concurrencylocal", "0\n")
    # remote deliveries go to a port where nothing listens: they stay deferred
    home.write("smtproutes", ":[127.0.0.1]:%d\n" % free_port())
    uid, gid = _sender_user()
    d = daemon_factory(home)
    assert run_queue(home, b"Fsender@example.org\0Tjoe@localhost\0Tr@far.example\0\0",
                     b"Subject: held\n\nheld\n", (uid, gid)).returncode == 0
    send(d, "s2@x.org", ["box@mx.example.org"], b"Subject: held2\r\n\r\nx\r\n")
    deadline = time.time() + 10
    while len(home.queued()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert home.messages() == []
    out = run_tool(home, "qstat")
    assert out.returncode == 0, out
    assert out.stdout.decode().splitlines() == [
        "messages in queue: 2", "messages in queue but not yet preprocessed: 0"]
    out = run_tool(home, "qread")
    assert out.returncode == 0, out
    lines = out.stdout.decode().splitlines()
    head = re.compile(r"\d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT  #(\S+)  (\d+)  <([^>]*)> \Z")
    heads = [i for i, l in enumerate(lines) if head.match(l)]
    assert len(heads) == 2, lines
    blocks = {}
    for n, i in enumerate(heads):
        end = heads[n + 1] if n + 1 < len(heads) else len(lines)
        blocks[head.match(lines[i]).group(3)] = lines[i + 1:end]
    assert blocks == {
        "sender@example.org": ["\tlocal\t<joe@localhost>", "\tremote\t<r@far.example>"],
        "s2@x.org": ["\tlocal\t<box@mx.example.org>"]}
    # release the local deliveries: the local ones are done, the remote one waits
    home.write("concurrencylocal", "10\n")
    d.signal(signal.SIGHUP)
    assert len(home.wait_messages(2)) == 2, d.log()
    deadline = time.time() + 10
    while time.time() < deadline:
        text = run_tool(home, "qread").stdout.decode()
        if "  done\tlocal\t<joe@localhost>" in text and "box@" not in text:
            break
        time.sleep(0.1)
    assert "  done\tlocal\t<joe@localhost>\n\tremote\t<r@far.example>\n" in text, text
    assert "box@mx.example.org" not in text
    assert run_tool(home, "qstat").stdout.decode().startswith("messages in queue: 1\n")


# -- 8. eqmaild as root delivers as the system user ----------------------------------------

@pytest.fixture
def system_user():
    if not ROOT:
        pytest.skip("needs root to create a system user and run eqmaild as root")
    subprocess.run(["userdel", BOB], capture_output=True, timeout=30)
    homedir = tempfile.mkdtemp(prefix="eqmail-bob-", dir="/tmp")
    out = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", homedir,
                          "--shell", "/usr/sbin/nologin", BOB],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out
    pw = pwd.getpwnam(BOB)
    try:
        os.chmod(homedir, 0o755)
        maildirmake(os.path.join(homedir, "Maildir"))
        for top, dirs, files in os.walk(homedir):
            for n in [top] + [os.path.join(top, x) for x in dirs + files]:
                os.lchown(n, pw.pw_uid, pw.pw_gid)
        yield pw
    finally:
        subprocess.run(["userdel", BOB], capture_output=True, timeout=30)
        subprocess.run(["rm", "-rf", "--one-file-system", homedir], timeout=30)


def test_root_daemon_delivers_as_the_system_user(home, system_user):
    pw = system_user
    home.setup()
    port = free_port()
    logpath = os.path.join(home.path, "root-daemon.log")
    with open(logpath, "ab") as log:
        proc = subprocess.Popen([PY, "-m", "eqmail.daemon", "--home", home.path,
                                 "--foreground", "--smtp", "127.0.0.1:%d" % port],
                                stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=home.path,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})

    def logtext():
        with open(logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    try:
        deadline = time.time() + 15
        while True:
            assert proc.poll() is None, logtext()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    if s.makefile("rb").readline().startswith(b"220 "):
                        break
            except OSError:
                pass
            assert time.time() < deadline, logtext()
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail("s@x.org", ["%s@localhost" % BOB], b"Subject: bob\r\n\r\nfor bob\r\n")
        new = os.path.join(pw.pw_dir, "Maildir", "new")
        got = wait_dir(new, 1)
        assert len(got) == 1, logtext()
        assert head_lines(got[0])[:2] == [b"Return-Path: <s@x.org>",
                                          b"Delivered-To: %s@localhost" % BOB.encode()]
        assert got[0].endswith(b"Subject: bob\n\nfor bob\n")
        st = os.stat(os.path.join(new, os.listdir(new)[0]))
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
        assert read_dir(os.path.join(home.maildir, "new")) == []
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_dot_qmail_lines_cannot_leave_the_home(mailhome, daemon_factory):
    """Virtual users share eqmaild's uid: their .qmail lines must not reach
    the queue or another home, by ../, an absolute path or a symlink."""
    home = mailhome
    victim = os.path.join(home.path, "queue")
    other = user_home(home, "other", {"": "./Maildir/\n"})
    joe = joe_home(home, {
        "-up": "./../other/Maildir/\n",
        "-abs": "%s/Maildir/\n" % other,
        "-absmbox": "%s/mess/stolen\n" % victim,
        "-link": "./linked/\n",
        "-inside": "%s/Maildir/\n" % os.path.join(home.path, "homes", "joe"),
    })
    os.symlink(os.path.join(other, "Maildir"), os.path.join(joe, "linked"))
    write_assign(home, [assign_line(home, "+", "joe+", "joe", joe, "-"),
                        assign_line(home, "=", "other", "other", other)])
    d = daemon_factory(home)
    for ext in ("up", "abs", "absmbox", "link", "inside"):
        send(d, "sender@localhost", ["joe+%s@localhost" % ext], b"Subject: %s\r\n\r\nx\r\n"
             % ext.encode())
    for ext in ("up", "abs", "absmbox", "link"):
        text = wait_result(d, "joe+%s@localhost" % ext, "deferral")
        assert "leads out of the home directory" in text
    wait_result(d, "joe+inside@localhost", "success")
    assert len(read_dir(os.path.join(joe, "Maildir", "new"))) == 1  # the absolute one inside
    assert read_dir(os.path.join(other, "Maildir", "new")) == []
    assert not os.path.exists(os.path.join(victim, "mess", "stolen"))
