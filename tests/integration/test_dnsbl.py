"""DNS blocklists (issue 21 item 1) against a real DNS server (unbound on
127.0.0.153) serving blocklist zones, clients connecting from 127.0.0.x:
rblsmtpd's semantics (RBLSMTPD), weights and a threshold, allow-lists,
refusal at the connection or at MAIL, RELAYCLIENT exempt."""
from __future__ import annotations

import smtplib
import socket

import pytest

from helpers import wait_log

ZONE = [
    "2.0.0.127.bl.test. 300 IN A 127.0.0.2",
    '2.0.0.127.bl.test. 300 IN TXT "spam source, see http://bl.test/?127.0.0.2"',
    "3.0.0.127.bl.test. 300 IN A 127.0.0.2",
    "3.0.0.127.white.test. 300 IN A 127.0.0.2",
    "5.0.0.127.weak.test. 300 IN A 127.0.0.2",
    "6.0.0.127.weak.test. 300 IN A 127.0.0.2",
    "6.0.0.127.bl.test. 300 IN A 127.0.0.2",
]


def greet(port, source):
    s = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0))
    try:
        return s.recv(500)
    finally:
        s.close()


@pytest.fixture
def listed(home, dns, daemon_factory):
    server = dns(ZONE)
    home.setup(rbls="bl.test 2\nweak.test\n+white.test\n", rblthreshold="2\n")

    def start(**files):
        for name, text in files.items():
            home.write(name, text)
        return daemon_factory(home, env={"EQMAIL_RESOLV_CONF": server.resolv_conf})
    return start


def test_listed_clients_are_refused_at_the_connection(home, listed):
    d = listed(smtprules='127.0.0.4:allow,RBLSMTPD="-go away"\n'
                         '127.0.0.7:allow,RBLSMTPD=""\n')
    got = greet(d.port, "127.0.0.2")
    assert got.startswith(b"554 Your address 127.0.0.2 is listed: spam source, see "
                          b"http://bl.test/?127.0.0.2"), got
    assert wait_log(d, "smtpd: 127.0.0.2 refused by DNS blocklist")
    assert greet(d.port, "127.0.0.1").startswith(b"220 ")   # not listed
    assert greet(d.port, "127.0.0.3").startswith(b"220 ")   # allow-listed
    assert greet(d.port, "127.0.0.5").startswith(b"220 ")   # weight 1 < threshold 2
    got = greet(d.port, "127.0.0.6")                        # 2 + 1
    assert got.startswith(b"554 Your address 127.0.0.6 is listed: listed in bl.test; "
                          b"listed in weak.test"), got
    assert greet(d.port, "127.0.0.4") == b"554 go away\r\n"  # RBLSMTPD from the rules
    assert greet(d.port, "127.0.0.7").startswith(b"220 ")   # RBLSMTPD="": not listed


def test_at_mail_and_temporary_and_relayclient(home, listed):
    d = listed(rblwhen="mail\n", rbltemporary="1\n",
               smtprules='127.0.0.6:allow,RELAYCLIENT=""\n')
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20, source_address=("127.0.0.2", 0)) as s:
        s.ehlo("c.example")
        code, text = s.docmd("MAIL FROM:<x@spam.example>")
        assert code == 451 and b"is listed: spam source" in text, (code, text)
    # a RELAYCLIENT of the rules is never refused
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20, source_address=("127.0.0.6", 0)) as s:
        s.ehlo("c.example")
        code, text = s.docmd("MAIL FROM:<x@b.example>")
        assert code == 250, (code, text)


def test_a_zone_that_does_not_answer_lists_nobody(home, dns, daemon_factory):
    server = dns(ZONE)
    home.setup(rbls="bl.test\nnot-served.example\n")  # refused by the server
    d = daemon_factory(home, env={"EQMAIL_RESOLV_CONF": server.resolv_conf})
    assert greet(d.port, "127.0.0.1").startswith(b"220 ")
    assert greet(d.port, "127.0.0.2").startswith(b"554 ")
    assert "Traceback" not in d.log()


def test_a_huge_txt_answer_is_cut_to_one_short_line(home, dns, daemon_factory):
    """Bad input (issue 21): a listing whose TXT record is 40 strings of 200
    bytes (8 KB, over TCP) gives a refusal of one short line."""
    big = " ".join('"%s"' % (("x%02d" % i) * 66) for i in range(40))
    server = dns(["2.0.0.127.huge.test. 300 IN A 127.0.0.2",
                  "2.0.0.127.huge.test. 300 IN TXT %s" % big])
    home.setup(rbls="huge.test\n")
    d = daemon_factory(home, env={"EQMAIL_RESOLV_CONF": server.resolv_conf})
    got = greet(d.port, "127.0.0.2")
    assert got.startswith(b"554 Your address 127.0.0.2 is listed: x00x00"), got[:100]
    assert got.count(b"\r\n") == 1 and len(got) < 600, len(got)
    assert "Traceback" not in d.log()
