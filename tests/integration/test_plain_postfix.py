"""Remote delivery to a Postfix that offers neither SMTPUTF8 nor DSN nor
CHUNKING (smtputf8_enable = no, smtpd_discard_ehlo_keywords): the
message goes with DATA, byte for byte; a success the sender asked to hear
of is reported as relayed; a UTF-8 local part bounces with 5.6.7 (RFC
6531 section 3.2), while an IDN domain goes as A-labels."""
from __future__ import annotations

import smtplib

import pytest

from peers import POSTFIX, PostfixPeer
from test_remote import MESSAGE, crlf, parse_dsn, start, wait_gone

ZONE = ["far2.test. 300 IN MX 10 mx1.far2.test.", "mx1.far2.test. 300 IN A 127.0.0.28",
        "xn--bcher-kva.test. 300 IN MX 10 mx1.far2.test."]


@pytest.fixture
def plain_postfix(test_ca):
    import os

    from conftest import need_root

    need_root("a Postfix of the test's own on 127.0.0.28:25")
    if not os.path.exists(POSTFIX):
        pytest.fail("postfix is missing (tests/run installs it)")
    peer = PostfixPeer(test_ca, address="127.0.0.28", port=25, domain="far2.test",
                       hostname="mx1.far2.test", user="farmail2",
                       extra_config={"smtputf8_enable": "no",
                                     "smtpd_discard_ehlo_keywords": "chunking, dsn",
                                     "mydestination": "far2.test, xn--bcher-kva.test"})
    peer.start()
    yield peer
    peer.remove()


def test_what_a_plain_postfix_gets(home, daemon_factory, dns, plain_postfix):
    d = start(home, daemon_factory, dns(ZONE), smtprules='127.0.0.1:allow,RELAYCLIENT=""\n')
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.test")
        # DSN asked for, not offered further: a "relayed" notice
        s.sendmail("postmaster@mx.example.org", ["farmail2@far2.test"], crlf(MESSAGE),
                   rcpt_options=["NOTIFY=SUCCESS"])
        # SMTPUTF8: an IDN domain goes as A-labels, a UTF-8 local part bounces
        s.sendmail("postmaster@mx.example.org", ["farmail2@bücher.test", "jösé@far2.test"],
                   "Subject: utf8\r\n\r\nbody\r\n".encode(), mail_options=["SMTPUTF8"])
    got = plain_postfix.wait_messages(2, timeout=30)
    assert len(got) == 2, d.log() + plain_postfix.log()
    (first,) = [m for m in got if b"From: Sender <" in m]
    assert first.split(b"From: Sender <", 1)[1] == MESSAGE.split(b"From: Sender <", 1)[1]
    (second,) = [m for m in got if b"Subject: utf8" in m]
    assert b"Delivered-To: farmail2@xn--bcher-kva.test" in second
    reports = [m for m in home.wait_messages(2, timeout=30) if b"multipart/report" in m]
    assert len(reports) == 2, d.log()
    actions = sorted(parse_dsn(r)[2][0]["Action"] for r in reports)
    assert actions == ["failed", "relayed"], actions
    (bounce,) = [r for r in reports if parse_dsn(r)[2][0]["Action"] == "failed"]
    assert parse_dsn(bounce)[2][0]["Status"] == "5.6.7"
    assert wait_gone(home)
