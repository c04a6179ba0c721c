"""First light: real clients hand eqmaild a message and it lands in the Maildir."""
from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from eqmail.smtp import reply

BODY_8BIT = ("Subject: first light\r\nFrom: a@example.com\r\n\r\n"
             "caf\u00e9 na\u00efve \u2014 8-bit\r\n.leading dot\r\nlast line\r\n").encode("utf-8")
STORED_BODY = ("Subject: first light\nFrom: a@example.com\n\n"
               "caf\u00e9 na\u00efve \u2014 8-bit\n.leading dot\nlast line\n").encode("utf-8")


def smtp(daemon):
    return smtplib.SMTP("127.0.0.1", daemon.port, timeout=20)


def split_message(raw: bytes):
    head, _, body = raw.partition(b"\n\n")
    return head, body


def test_smtplib_message_lands_in_maildir(daemon, home):
    with smtp(daemon) as s:
        s.sendmail("sender@example.com", ["joe@localhost"], BODY_8BIT)
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, daemon.log()
    raw = msgs[0]
    lines = raw.split(b"\n")
    assert lines[0] == b"Return-Path: <sender@example.com>"
    assert lines[1] == b"Delivered-To: joe@localhost"
    assert lines[2].startswith(b"Received: from unknown (HELO ")
    assert b"(127.0.0.1)" in lines[2]
    assert re.match(rb"  by mx\.example\.org with SMTP; \d+ \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$",
                    lines[3]), lines[3]
    # the client's data follows the Received line byte for byte (CRLF -> LF,
    # smtplib's dot-stuffing undone, 8-bit kept)
    assert raw.endswith(STORED_BODY)
    assert raw[raw.index(b"Subject:"):] == STORED_BODY
    # delivered during DATA (eqmail.delivery.direct): never a queue file
    assert home.queued() == []
    assert re.search(r"direct msg \S+: bytes \d+ from <sender@example\.com> to local "
                     r"joe@localhost: success: did 1\+0\+0/\n", daemon.log())


def test_swaks_message_lands_in_maildir(daemon, home):
    out = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(daemon.port),
         "--from", "swaks@example.com", "--to", "box@mx.example.org",
         "--helo", "client.example", "--header", "Subject: via swaks",
         "--body", "hello from swaks\n\u00e9t\u00e9"],
        capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    msgs = home.wait_messages(1)
    assert len(msgs) == 1
    raw = msgs[0]
    head, body = split_message(raw)
    assert b"Delivered-To: box@mx.example.org" in head
    assert b"Received: from unknown (HELO client.example) (127.0.0.1)" in head
    assert b"Subject: via swaks" in head
    assert body.startswith("hello from swaks\n\u00e9t\u00e9".encode("utf-8"))
    assert b"\r" not in raw


def test_several_recipients_each_get_a_copy(daemon, home):
    with smtp(daemon) as s:
        s.sendmail("a@example.com", ["one@localhost", "two@mx.example.org"],
                   b"Subject: two\r\n\r\nx\r\n")
    msgs = home.wait_messages(2)
    assert sorted(m.split(b"\n")[1] for m in msgs) == [
        b"Delivered-To: one@localhost", b"Delivered-To: two@mx.example.org"]


def test_badmailfrom_refused_at_rcpt(daemon):
    with smtp(daemon) as s:
        s.ehlo("x")
        for sender in ("spam@bad.com", "joe@evil.com", "joe@mail.spammer.org", "SPAM@BAD.COM"):
            assert s.mail(sender)[0] == 250
            code, text = s.rcpt("joe@localhost")
            assert (code, text) == (553, b"5.7.1 " + reply.BADMAILFROM.text.encode())
            s.rset()
        assert s.mail("joe@spammer.org")[0] == 250
        assert s.rcpt("joe@localhost")[0] == 250


def test_relay_to_foreign_domain_refused(daemon):
    with smtp(daemon) as s:
        s.helo("x")  # HELO: qmail's exact text, no enhanced status prefix
        s.mail("a@example.com")
        assert s.rcpt("victim@other.com") == (553, reply.NOGATEWAY.text.encode())
        assert s.rcpt("x@example.org")[0] == 250
        assert s.rcpt("y@sub.example.net")[0] == 250
        assert s.rcpt("z@example.net")[0] == 553


def test_size_and_databytes_refused(home, daemon_factory):
    home.setup(databytes="100\n")
    d = daemon_factory(home)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.ehlo("x")
        assert s.esmtp_features["size"] == "100"
        code, _ = s.docmd("MAIL FROM:<a@b.example> SIZE=101")
        assert code == 552
        assert s.docmd("MAIL FROM:<a@b.example> SIZE=100")[0] == 250
        assert s.rcpt("joe@localhost")[0] == 250
        code, text = s.data(b"A" * 100)  # 100 bytes + LF stored: over the limit
        assert (code, text) == (552, b"5.3.4 " + reply.TOO_BIG.text.encode())
        s.mail("a@b.example")
        s.rcpt("joe@localhost")
        assert s.data(b"A" * 99)[0] == 250
    assert len(home.wait_messages(1)) == 1


def _raw_session(port, data: bytes, timeout=10.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


@pytest.mark.parametrize("seq", [b"\n.\n", b"\r\n.\n", b"\n.\r\n"])
def test_smtp_smuggling_sequences_neither_end_data_nor_smuggle(daemon, home, seq):
    smuggled = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<joe@localhost>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
    data = (b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<joe@localhost>\r\nDATA\r\n"
            b"Subject: first\r\n\r\nfirst" + seq + smuggled + b"more\r\n.\r\nQUIT\r\n")
    out = _raw_session(daemon.port, data)
    replies = out.decode().split("\r\n")
    assert replies[-2] == "451 " + reply.BARE_LF.text, out
    # exactly one 354, then the 451 closes the connection: nothing else ran
    assert out.count(b"354") == 1
    assert b"250 ok " not in out
    time.sleep(0.5)
    assert home.messages() == []
    assert home.queued() == []


def test_crlf_dot_crlf_ends_data_and_pipelining_works(daemon, home):
    data = (b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<joe@localhost>\r\nDATA\r\n")
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    f = s.makefile("rb")
    assert f.readline().startswith(b"220 ")
    s.sendall(data)
    lines = []
    while not lines or not lines[-1].startswith(b"354"):
        lines.append(f.readline())
    s.sendall(b"Subject: p\r\n\r\nbody\r\n..stuffed\r\n.\r\nQUIT\r\n")
    assert f.readline().startswith(b"250 2.0.0 ok ")
    assert f.readline().startswith(b"221 ")
    s.close()
    assert home.wait_messages(1)[0].endswith(b"Subject: p\n\nbody\n.stuffed\n")


def test_eqmail_smtpd_over_a_pipe_delivers(daemon, home):
    """`eqmail smtpd` on stdin/stdout commits to the same queue; the
    daemon's trigger FIFO wakes the scheduler to deliver it."""
    env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "127.0.0.1",
           "TCPLOCALPORT": "25", "HOME": home.path}
    kwargs = {}
    if os.geteuid() == 0:
        kwargs = dict(user=home.uid, group=home.gid, extra_groups=[])
    dialogue = (b"HELO pipe.example\r\nMAIL FROM:<p@example.com>\r\n"
                b"RCPT TO:<piped@localhost>\r\nDATA\r\nSubject: piped\r\n\r\nvia stdin\r\n.\r\n"
                b"QUIT\r\n")
    import sys
    out = subprocess.run([sys.executable, "-m", "eqmail", "smtpd", "--home", home.path],
                         input=dialogue, capture_output=True, timeout=30, env=env,
                         cwd=home.path, **kwargs)
    replies = out.stdout.decode().split("\r\n")
    assert replies[0] == "220 mx.example.org ESMTP", out
    assert any(r.startswith("250 ok ") for r in replies), out
    assert replies[-2] == "221 mx.example.org"
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, daemon.log()
    assert b"Received: from unknown (HELO pipe.example) (192.0.2.1)" in msgs[0]
    assert msgs[0].endswith(b"Subject: piped\n\nvia stdin\n")


def test_kill9_after_250_delivers_once_after_restart(home, daemon_factory):
    # concurrencylocal 0 holds local deliveries: the message is surely still
    # queued when the daemon dies, right after the 250.
    home.setup(concurrencylocal="0\n")
    d = daemon_factory(home)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.sendmail("a@example.com", ["joe@localhost"], b"Subject: durable\r\n\r\nkeep me\r\n")
    d.kill9()
    assert len(home.queued()) == 1
    assert home.messages() == []
    home.write("concurrencylocal", "10\n")
    d2 = daemon_factory(home)
    msgs = home.wait_messages(1)
    assert len(msgs) == 1, d2.log()
    # and again: a restart after the delivery delivers nothing twice
    deadline = time.time() + 5
    while home.queued() and time.time() < deadline:
        time.sleep(0.05)
    d2.kill9()
    daemon_factory(home)
    time.sleep(1.0)
    assert len(home.messages()) == 1


def test_hundred_concurrent_clients_all_delivered(daemon, home):
    errors = []

    def client(n):
        try:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as s:
                s.sendmail("c%d@example.com" % n, ["bulk@localhost"],
                           b"Subject: n%d\r\n\r\nmessage %d\r\n" % (n, n))
        except Exception as e:  # collected and reported below
            errors.append((n, repr(e)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == []
    msgs = home.wait_messages(100, timeout=60)
    assert len(msgs) == 100
    subjects = sorted(int(m.split(b"Subject: n")[1].split(b"\n")[0]) for m in msgs)
    assert subjects == list(range(100))


def test_sigterm_stops_cleanly(daemon):
    assert daemon.stop() == 0, daemon.log()
    assert "exiting" in daemon.log()
