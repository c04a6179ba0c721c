"""DSN (RFC 3461/3464) end to end, with smtplib as the client: NOTIFY,
ORCPT, RET and ENVID taken, kept with the message and honoured by the
reports (delivered, relayed, failed, never), passed on to Postfix (which
offers DSN); a failure is reported while other recipients still wait;
the delay notice goes out once (control/delaywarningtime)."""
from __future__ import annotations

import smtplib
import time

from helpers import wait_log
from test_remote import far_records, parse_dsn, retry_now, start

SENDER = "postmaster@mx.example.org"  # local: reports land in the alias Maildir


def message(subject: str) -> bytes:
    return ("From: %s\r\nTo: someone\r\nSubject: %s\r\n\r\nbody of %s\r\n"
            % (SENDER, subject, subject)).encode()


def send(port, rcpts, subject, mail_options=(), rcpt_options=()):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("dsn")
        return s.sendmail(SENDER, rcpts, message(subject), mail_options=list(mail_options),
                          rcpt_options=list(rcpt_options))


def reports(home, count, timeout=20.0):
    msgs = home.wait_messages(count, timeout)
    return [m for m in msgs if b"multipart/report" in m]


def test_success_relayed_and_failure_never(home, daemon_factory, scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25, rcpt_replies={
        "gone@two.test": "550 5.1.1 <gone@two.test>: no such user"})
    d = start(home, daemon_factory, routes="two.test:[127.0.0.26]\n",
              smtprules='127.0.0.1:allow,RELAYCLIENT=""\n')
    # aiosmtpd offers no DSN: a success the sender asked for is "relayed"
    send(d.port, ["ok@two.test"], "relayed", ["RET=HDRS", "ENVID=env+2B1"],
         ["NOTIFY=SUCCESS", "ORCPT=rfc822;first@two.test"])
    (raw,) = reports(home, 1)
    msg, per_msg, (block,) = parse_dsn(raw)
    assert msg["Subject"] == "success notice"
    assert per_msg["Original-Envelope-Id"] == "env+2B1"
    assert block["Action"] == "relayed" and block["Status"].startswith("2.")
    assert block["Original-Recipient"] == "rfc822; first@two.test"
    assert block["Final-Recipient"] == "rfc822; ok@two.test"
    assert srv.wait_messages(1)
    # NOTIFY=NEVER: a failure is not reported
    send(d.port, ["gone@two.test"], "never", rcpt_options=["NOTIFY=NEVER"])
    assert wait_log(d, "failure: "), d.log()
    time.sleep(1.5)
    assert len(reports(home, 2, timeout=1)) == 1, "NOTIFY=NEVER still got a report"
    # no NOTIFY: qmail's bounce, with the whole message under RET=FULL
    send(d.port, ["gone@two.test"], "full", ["RET=FULL"])
    got = reports(home, 2)
    assert len(got) == 2
    msg, _, (block,) = parse_dsn_full(got[1])
    assert msg["Subject"] == "failure notice" and block["Action"] == "failed"
    assert b"body of full" in got[1]


def parse_dsn_full(raw: bytes):
    """parse_dsn for a report whose third part is the whole message."""
    import email

    msg = email.message_from_bytes(raw)
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == \
        ["text/plain", "message/delivery-status", "message/rfc822"], raw
    blocks = parts[1].get_payload()
    return msg, blocks[0], blocks[1:]


def test_dsn_is_passed_on_to_postfix(home, daemon_factory, dns, postfix_far):
    server = dns(far_records())
    d = start(home, daemon_factory, server, smtprules='127.0.0.1:allow,RELAYCLIENT=""\n')
    send(d.port, ["farmail@far.test"], "passed", ["RET=HDRS", "ENVID=abc"],
         ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;farmail@far.test"])
    assert postfix_far.wait_messages(1, timeout=20), d.log()
    assert wait_log(d, "success: "), d.log()
    # Postfix took the request on: it sends the success notice itself, and
    # eqmail sends no "relayed" one
    deadline = time.time() + 10
    while time.time() < deadline and "delivery status notification" not in \
            postfix_far.log(2000):
        time.sleep(0.2)
    assert "sender delivery status notification" in postfix_far.log(2000), \
        postfix_far.log(200)
    time.sleep(1.0)
    assert reports(home, 1, timeout=1) == []


def test_a_failure_is_reported_while_others_wait_and_the_delay_notice_once(
        home, daemon_factory, scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25, rcpt_replies={
        "gone@two.test": "550 5.1.1 <gone@two.test>: no such user"})
    # slow.test's relay refuses connections: deferred
    d = start(home, daemon_factory, routes="two.test:[127.0.0.26]\nslow.test:[127.0.0.29]\n",
              smtprules='127.0.0.1:allow,RELAYCLIENT=""\n', delaywarningtime="3\n")
    send(d.port, ["gone@two.test", "later@slow.test"], "partial")
    (raw,) = reports(home, 1)
    _, _, (block,) = parse_dsn(raw)
    assert block["Action"] == "failed" and block["Final-Recipient"] == "rfc822; gone@two.test"
    assert home.queued(), "the message left the queue with a recipient still waiting"
    # a retry after 3 s (the queue's birth time is whole seconds): the
    # delay notice, once
    time.sleep(3.2)
    retry_now(d)
    got = reports(home, 2)
    assert len(got) == 2, d.log()
    msg, _, (block,) = parse_dsn(got[1])
    assert msg["Subject"] == "delay notice"
    assert block["Action"] == "delayed" and block["Status"].startswith("4.")
    assert block["Final-Recipient"] == "rfc822; later@slow.test"
    assert "Will-Retry-Until" in block
    retry_now(d)
    time.sleep(1.5)
    assert len(reports(home, 3, timeout=1)) == 2, "a second delay notice"
    assert srv.connections >= 1
