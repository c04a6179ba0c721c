"""SMTPUTF8 (RFC 6531/6532) end to end: smtplib sends with SMTPUTF8 to
eqmaild; UTF-8 local parts reach their dot-qmail files (Maildir and mbox);
an IDN in a control file matches its A-labels; remote delivery speaks
SMTPUTF8 to Postfix (which offers it) and, to a server that does not
(aiosmtpd), sends the domains as A-labels and bounces a UTF-8 local part
with 5.6.7 (RFC 6531 section 3.2)."""
from __future__ import annotations

import os
import smtplib

from helpers import give_to_user, wait_log
from test_local_delivery import head_lines
from test_remote import far_records, one_bounce, parse_dsn, start, wait_gone

SUBJECT = "Grüße aus München"


def utf8_message(to: str, sender: str = "jösé@sender.example") -> bytes:
    return ("From: %s\r\nTo: %s\r\nSubject: %s\r\n\r\nΚαλημέρα\r\n"
            % (sender, to, SUBJECT)).encode("utf-8")


def send(port: int, sender: str, rcpts, data: bytes):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8")
        return s.sendmail(sender, rcpts, data, mail_options=["SMTPUTF8"])


def test_utf8_addresses_are_delivered_locally(home, daemon_factory):
    home.setup(locals_=("mx.example.org", "bücher.example"),
               rcpthosts=("mx.example.org", "bücher.example"))
    alias = os.path.join(home.path, "alias")
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(alias, "Maildir", sub), exist_ok=True)
    with open(os.path.join(alias, ".qmail-ünï"), "w", encoding="utf-8") as f:
        f.write("./Maildir/\n")
    with open(os.path.join(alias, ".qmail-ünï-box"), "w", encoding="utf-8") as f:
        f.write("./mbox-ünï\n")
    give_to_user(alias)
    d = daemon_factory(home)
    # the A-label form of a domain written in U-labels in locals and rcpthosts
    send(d.port, "jösé@sender.example", ["ünï@mx.example.org", "ünï@xn--bcher-kva.example",
                                         "ünï-box@mx.example.org"],
         utf8_message("ünï@mx.example.org"))
    msgs = home.wait_messages(2, timeout=20)
    assert len(msgs) == 2, d.log()
    for m in msgs:
        head = head_lines(m)
        assert head[0] == "Return-Path: <jösé@sender.example>".encode(), head
        assert head[1].startswith("Delivered-To: ünï@".encode()), head
        assert any(b" with UTF8SMTP; " in l or l.endswith(b"with UTF8SMTP")
                   for l in m.split(b"\n")), m[:400]
        assert ("Subject: %s" % SUBJECT).encode() in m
    mbox = os.path.join(alias, "mbox-ünï")
    assert wait_log(d, "success"), d.log()
    with open(mbox, "rb") as f:
        text = f.read()
    assert text.startswith("From jösé@sender.example ".encode()), text[:200]
    assert "Καλημέρα".encode() in text


def test_smtputf8_errors_are_clear(home, daemon_factory):
    home.setup(rcpthosts=("mx.example.org",))
    d = daemon_factory(home)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.test")
        code, text = s.docmd("MAIL FROM:<a@b.example> SMTPUTF8=yes")
        assert code == 501, text
        s.send(b"MAIL FROM:<j\xf6@b.example> SMTPUTF8\r\n")  # Latin-1, not UTF-8
        code, text = s.getreply()
        assert code == 553 and b"5.6.7" in text and b"not valid UTF-8" in text, text
        assert s.docmd("MAIL FROM:<a@b.example> SMTPUTF8")[0] == 250
        s.send(b"RCPT TO:<\xfcn\xef@mx.example.org>\r\n")
        code, text = s.getreply()
        assert code == 553 and b"not valid UTF-8" in text, text
    assert "Traceback" not in d.log()


def test_remote_without_smtputf8_gets_a_labels_and_utf8_local_parts_bounce(
        home, daemon_factory, scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25, smtputf8=False)  # aiosmtpd, no SMTPUTF8 offered
    d = start(home, daemon_factory, routes="two.test:[127.0.0.26]\nbücher.test:[127.0.0.26]\n",
              smtprules='127.0.0.1:allow,RELAYCLIENT=""\n')
    send(d.port, "postmaster@mx.example.org", ["ünï@two.test", "ok@bücher.test"],
         utf8_message("ok@bücher.test", sender="postmaster@mx.example.org"))
    msgs = srv.wait_messages(1)
    assert len(msgs) == 1, [(x.mail_from, x.rcpt_tos) for x in msgs]
    (m,) = msgs
    assert m.rcpt_tos == ["ok@xn--bcher-kva.test"], m.rcpt_tos
    assert m.mail_from == "postmaster@mx.example.org"
    mail = [c for c in srv.sessions[0].commands if c.startswith("MAIL")]
    assert mail and "SMTPUTF8" not in mail[0], mail
    assert not [c for c in srv.sessions[0].commands if "two.test" in c]
    raw = one_bounce(home, d)
    _msg, _per_msg, blocks = parse_dsn(raw)
    (rcpt,) = blocks
    assert rcpt["Status"] == "5.6.7", rcpt
    # RFC 6533's utf-8-addr-xtext in a message/delivery-status part
    assert rcpt["Final-Recipient"] == "utf-8; \\x{FC}n\\x{EF}@two.test", rcpt
    assert wait_gone(home)


def test_remote_with_smtputf8_to_postfix(home, daemon_factory, dns, postfix_far):
    server = dns(far_records())
    d = start(home, daemon_factory, server, smtprules='127.0.0.1:allow,RELAYCLIENT=""\n')
    send(d.port, "jösé@mx.example.org", ["farmail@far.test"],
         utf8_message("farmail@far.test", sender="jösé@mx.example.org"))
    msgs = postfix_far.wait_messages(1, timeout=20)
    assert len(msgs) == 1, d.log() + postfix_far.log()
    # Postfix refuses a UTF-8 address unless MAIL FROM says SMTPUTF8
    assert msgs[0].startswith("Return-Path: <jösé@mx.example.org>\n".encode()), msgs[0][:300]
    assert ("Subject: %s" % SUBJECT).encode() in msgs[0]
    assert wait_gone(home)
