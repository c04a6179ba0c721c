"""Local injection: sendmail, inject and mailq, as a user who cannot write the queue."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from helpers import ROOT, ensure_user

OTHER = "eqmailsender"


def other_user():
    """(uid, gid, name) of a second unprivileged user when root, else ours."""
    pw = ensure_user(OTHER)
    return pw.pw_uid, pw.pw_gid, pw.pw_name


def run_as_other(argv, stdin: bytes, env=None):
    uid, gid, name = other_user()
    kw = dict(user=uid, group=gid, extra_groups=[]) if ROOT else {}
    base = {"PATH": "/usr/bin:/bin", "USER": name, "LOGNAME": name}
    base.update(env or {})
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=30, cwd="/",
                          env=base, **kw)


@pytest.fixture
def sendmail_link():
    """A symlink named `sendmail` to an `eqmail` entry script, as
    /usr/sbin/sendmail would be."""
    d = tempfile.mkdtemp(prefix="eqmail-bin-", dir="/tmp")
    os.chmod(d, 0o755)
    script = os.path.join(d, "eqmail")
    with open(script, "w") as f:
        f.write("#!%s\nimport sys\nfrom eqmail.cli import main\nsys.exit(main())\n"
                % sys.executable)
    os.chmod(script, 0o755)
    os.symlink(script, os.path.join(d, "sendmail"))
    os.symlink(script, os.path.join(d, "mailq"))
    yield d
    for n in ("sendmail", "mailq", "eqmail"):
        os.unlink(os.path.join(d, n))
    os.rmdir(d)


def test_sendmail_t_as_another_user_is_delivered(daemon, home, sendmail_link):
    uid, _, name = other_user()
    msg = (b"To: Joe <joe@localhost>\nBcc: hidden@localhost\nSubject: via sendmail -t\n"
           b"\nhello\r\nsecond line\n")
    out = run_as_other([os.path.join(sendmail_link, "sendmail"), "--home", home.path,
                        "-t", "-oi", "-F", "Some One"], msg)
    assert out.returncode == 0, out
    assert out.stdout == b"" and out.stderr == b""
    msgs = home.wait_messages(2)
    assert len(msgs) == 2, daemon.log()
    by_rcpt = {m.split(b"\n")[1]: m for m in msgs}
    assert set(by_rcpt) == {b"Delivered-To: joe@localhost", b"Delivered-To: hidden@localhost"}
    m = by_rcpt[b"Delivered-To: joe@localhost"]
    head, _, body = m.partition(b"\n\n")
    assert b"Return-Path: <%s@mx.example.org>" % name.encode() in head
    assert b"invoked by uid %d)" % uid in head
    assert b"Bcc:" not in head                     # removed by qmail-inject rules
    assert b'From: "Some One" <%s@mx.example.org>' % name.encode() in head
    assert b"Message-ID: <" in head and b"Date: " in head
    assert body == b"hello\nsecond line\n"          # CRLF stored as LF


def test_sendmail_arguments_and_f(daemon, home, sendmail_link):
    out = run_as_other([os.path.join(sendmail_link, "sendmail"), "--home", home.path,
                        "-f", "bounces@example.com", "ann@localhost"],
                       b"Subject: args\n\nbody\n")
    assert out.returncode == 0, out
    msgs = home.wait_messages(1)
    assert len(msgs) == 1
    assert msgs[0].startswith(b"Return-Path: <bounces@example.com>\nDelivered-To: ann@localhost\n")


def test_inject_and_mailq_with_the_daemon_holding_deliveries(home, daemon_factory,
                                                           sendmail_link):
    home.setup(rcpthosts=("localhost",), concurrencylocal="0\n")
    daemon_factory(home)
    out = run_as_other([sys.executable, "-m", "eqmail", "inject", "--home", home.path,
                        "held@localhost"], b"Subject: held\n\nx\n")
    assert out.returncode == 0, out
    listing = run_as_other([os.path.join(sendmail_link, "mailq"), "--home", home.path], b"")
    # the queue is private to the daemon's user: as another user mailq cannot
    # read it (as root it can); as the daemon's user it lists the message
    if not ROOT:
        assert listing.returncode == 0
        assert b"\tlocal\t<held@localhost>" in listing.stdout
    kw = dict(user=home.uid, group=home.gid, extra_groups=[]) if ROOT else {}
    own = subprocess.run([os.path.join(sendmail_link, "mailq"), "--home", home.path],
                         capture_output=True, timeout=30, cwd="/", **kw)
    assert own.returncode == 0, own
    assert b"\tlocal\t<held@localhost>" in own.stdout


def test_sendmail_without_daemon_and_without_queue_access_fails_temporarily(home, sendmail_link):
    if not ROOT:
        pytest.skip("needs a second user who cannot write the queue")
    home.setup(rcpthosts=("localhost",))
    from eqmail.paths import init_home
    init_home(home.path)
    home.chown()
    out = run_as_other([os.path.join(sendmail_link, "sendmail"), "--home", home.path,
                        "joe@localhost"], b"Subject: x\n\nx\n")
    assert out.returncode == 111
    assert b"is it running?" in out.stderr
    assert home.queued() == []


def test_sendmail_bad_usage_is_permanent(home, sendmail_link):
    home.setup(rcpthosts=("localhost",))
    out = run_as_other([os.path.join(sendmail_link, "sendmail"), "--home", home.path,
                        "-t"], b"Subject: no recipients\n\nx\n")
    assert out.returncode == 100
    assert b"no recipients" in out.stderr


def test_smtpd_as_a_user_who_cannot_write_the_queue_uses_the_pickup_socket(daemon, home):
    """`eqmail smtpd` under xinetd runs as a service user; the queue stays
    private to eqmaild's user and the message goes through eqmaild."""
    uid, _, _ = other_user()
    dialogue = (b"HELO xinetd.example\r\nMAIL FROM:<x@example.com>\r\n"
                b"RCPT TO:<viapickup@localhost>\r\nDATA\r\nSubject: pickup\r\n\r\nbody\r\n.\r\n"
                b"QUIT\r\n")
    out = run_as_other([sys.executable, "-m", "eqmail", "smtpd", "--home", home.path],
                       dialogue, env={"TCPREMOTEIP": "192.0.2.9"})
    assert b"\r\n250 ok " in out.stdout, out
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, daemon.log()
    head = msgs[0].split(b"\n\n")[0]
    if ROOT:
        assert b"invoked by uid %d)" % uid in head  # it came through the socket
    assert b"Received: from unknown (HELO xinetd.example) (192.0.2.9)" in head
    assert msgs[0].endswith(b"Subject: pickup\n\nbody\n")


def test_smtputf8_and_dsn_options_cross_the_pickup_socket(daemon, home):
    """The same path keeps the message's SMTPUTF8 flag and DSN options
    (Item.params): the Received line says UTF8SMTP, and eqmaild's queue
    file had them (a NOTIFY=SUCCESS recipient gets its success notice)."""
    uid, _, _ = other_user()
    dialogue = ("EHLO xinetd.example\r\nMAIL FROM:<postmaster@localhost> SMTPUTF8 ENVID=e1\r\n"
                "RCPT TO:<jösé@localhost> NOTIFY=SUCCESS\r\nDATA\r\nSubject: ü\r\n\r\n"
                "body\r\n.\r\nQUIT\r\n").encode()
    out = run_as_other([sys.executable, "-m", "eqmail", "smtpd", "--home", home.path],
                       dialogue, env={"TCPREMOTEIP": "192.0.2.9"})
    assert b"\r\n250 2.0.0 ok " in out.stdout, out
    msgs = home.wait_messages(2)
    assert len(msgs) == 2, daemon.log()
    (mail,) = [m for m in msgs if "Subject: ü".encode() in m]
    (notice,) = [m for m in msgs if b"multipart/report" in m]
    if ROOT:
        assert b"invoked by uid %d)" % uid in mail  # it came through the socket
    assert b"with UTF8SMTP" in mail
    assert b"Action: delivered" in notice and b"Original-Envelope-Id: e1" in notice
