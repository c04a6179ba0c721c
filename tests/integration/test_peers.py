"""Smoke tests of the remote-delivery test peers themselves (peers.py), with
dnspython and smtplib only: no eqmail here."""
from __future__ import annotations

import base64
import os
import smtplib
import socket
import stat

# the fixture is called `dns`: dnspython's modules under other names
import dns.message as dns_message
import dns.query as dns_query
import dns.rcode as dns_rcode
import dns.resolver as dns_resolver
import pytest

from peers import ROOT, unbound_local_data


LONG_KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 350 + "IDAQAB"

RECORDS = [
    "far.test. 300 IN MX 10 mx1.far.test.",
    "far.test. 300 IN MX 20 mx2.far.test.",
    "mx1.far.test. 300 IN A 127.0.0.25",
    "mx2.far.test. 300 IN A 127.0.0.26",
    "nullmx.test. 300 IN MX 0 .",
    "v6only.test. 300 IN AAAA ::1",
    'sel._domainkey.far.test. 300 IN TXT "v=DKIM1; k=rsa; p=%s"' % LONG_KEY,
    'far.test. 300 IN TXT "v=spf1 ip4:127.0.0.0/8 -all"',
]


# ---------------------------------------------------------------- no root needed


def test_long_txt_is_split_into_255_byte_strings():
    line = unbound_local_data('k.test. 300 IN TXT "%s"' % ("a" * 600))
    assert line == ("local-data: 'k.test. 300 IN TXT \"%s\" \"%s\" \"%s\"'"
                    % ("a" * 255, "a" * 255, "a" * 90))
    assert unbound_local_data('k.test. TXT "x\\"y" z') == \
        "local-data: 'k.test. TXT \"x\\\"y\" \"z\"'"
    assert unbound_local_data("a.test. 300 IN A 127.0.0.1") == \
        "local-data: 'a.test. 300 IN A 127.0.0.1'"


# ---------------------------------------------------------------- DNS


def _q(server, name, rdtype):
    q = dns_message.make_query(name, rdtype)
    return dns_query.udp(q, server.address, port=server.port, timeout=3)


def test_dns_answers(dns):
    server = dns(RECORDS)
    r = server.resolver()
    mx = sorted((a.preference, a.exchange.to_text()) for a in r.resolve("far.test", "MX"))
    assert mx == [(10, "mx1.far.test."), (20, "mx2.far.test.")]
    assert [a.address for a in r.resolve("mx1.far.test", "A")] == ["127.0.0.25"]
    assert [a.address for a in r.resolve("v6only.test", "AAAA")] == ["::1"]
    with pytest.raises(dns_resolver.NoAnswer):
        r.resolve("v6only.test", "A")
    txt = r.resolve("sel._domainkey.far.test", "TXT")
    (rdata,) = list(txt)
    assert all(len(s) <= 255 for s in rdata.strings) and len(rdata.strings) > 1
    assert b"".join(rdata.strings) == ("v=DKIM1; k=rsa; p=%s" % LONG_KEY).encode()
    # null MX (RFC 7505)
    (null,) = list(r.resolve("nullmx.test", "MX"))
    assert (null.preference, null.exchange.to_text()) == (0, ".")
    # unknown names in the zone: NXDOMAIN, authoritative, at once
    assert _q(server, "nosuch.test.", "MX").rcode() == dns_rcode.NXDOMAIN
    with pytest.raises(dns_resolver.NXDOMAIN):
        r.resolve("nosuch.far.test", "A")
    # outside the zone: REFUSED (no wait for root servers)
    assert _q(server, "example.com.", "A").rcode() == dns_rcode.REFUSED
    # over TCP as well
    q = dns_message.make_query("far.test.", "MX")
    assert len(dns_query.tcp(q, server.address, port=server.port, timeout=3).answer) == 1
    # the resolv.conf for the daemon, readable by anyone
    with open(server.resolv_conf) as f:
        assert f.read() == "nameserver 127.0.0.153\n"
    assert os.stat(server.resolv_conf).st_mode & stat.S_IROTH
    res = dns_resolver.Resolver(filename=server.resolv_conf)
    assert [a.address for a in res.resolve("mx2.far.test", "A")] == ["127.0.0.26"]


def test_dns_restart_with_other_records(dns):
    first = dns(["a.test. 300 IN A 127.0.0.30"])
    pid = first.proc.pid
    second = dns(["b.test. 300 IN A 127.0.0.31"], outside="static")
    assert first.proc.poll() is not None and second.proc.pid != pid
    r = second.resolver()
    assert [a.address for a in r.resolve("b.test", "A")] == ["127.0.0.31"]
    with pytest.raises(dns_resolver.NXDOMAIN):
        r.resolve("a.test", "A")
    assert _q(second, "example.com.", "A").rcode() == dns_rcode.NXDOMAIN


# ---------------------------------------------------------------- Postfix


MESSAGE = (b"From: Sender <sender@near.test>\r\n"
           b"To: Far Mail <farmail@far.test>\r\n"
           b"Subject: peer smoke test\r\n"
           b"Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n"
           b"Message-ID: <peer-smoke-1@near.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"\r\n"
           b"line one\r\n"
           b".a line starting with a dot\r\n"
           b"\r\n"
           b"last line\r\n")


def test_postfix_peer_delivers_over_starttls(postfix_far, test_ca):
    pf = postfix_far
    with smtplib.SMTP(pf.address, pf.port, local_hostname="near.test", timeout=10) as s:
        code, banner = s.ehlo()
        assert code == 250 and s.has_extn("starttls")
        s.starttls(context=_client_ctx(test_ca, "mx1.far.test"))
        s.ehlo()
        assert s.sock.version() is not None
        refused = s.sendmail("sender@near.test", ["farmail@far.test"], MESSAGE)
        assert refused == {}
    (msg,) = pf.wait_messages(1, timeout=15)
    head, sep, rest = msg.partition(b"From: Sender")
    # Postfix's own header lines first (LF line ends in the Maildir), then
    # the message as sent
    assert head.startswith(b"Return-Path: <sender@near.test>\n")
    assert b"Delivered-To: farmail@far.test\n" in head
    assert b"Received: from near.test" in head and b"TLS" in head
    assert sep + rest == MESSAGE.replace(b"\r\n", b"\n")


def test_postfix_peer_refuses_unknown_users_and_relaying(postfix_far):
    pf = postfix_far
    with smtplib.SMTP(pf.address, pf.port, local_hostname="near.test", timeout=10) as s:
        s.ehlo()
        assert s.mail("sender@near.test")[0] == 250
        code, text = s.rcpt("nosuch@far.test")
        assert code == 550 and b"5.1.1" in text
        code, text = s.rcpt("someone@elsewhere.test")
        assert code in (454, 554) and b"5.7.1" in text
    assert pf.messages() == []


def test_postfix_peer_listens_only_on_its_address(postfix_peer):
    for host in ("127.0.0.1", "127.0.0.2"):
        with pytest.raises(OSError):
            socket.create_connection((host, 25), timeout=2).close()
    assert "postfix" in postfix_peer.log().lower()


# ---------------------------------------------------------------- ScriptedSMTP


def _client_ctx(ca, host=None):
    ctx = ca.client_context()
    if host is None:
        ctx.check_hostname = False
    return ctx


def _port(root_port=25):
    """Port 25 as root (as the daemon will use), any port otherwise."""
    return root_port if ROOT else None


def test_scripted_per_recipient_rcpt_replies(scripted_smtp):
    srv = scripted_smtp("127.0.0.26", _port(),
                        rcpt_replies={"nobody@far.test": "550 5.1.1 no such user"})
    with smtplib.SMTP(srv.host, srv.port, local_hostname="near.test", timeout=10) as s:
        refused = s.sendmail("a@near.test", ["ok@far.test", "Nobody@far.test"],
                             b"Subject: x\r\n\r\nbody\r\n")
    assert refused == {"Nobody@far.test": (550, b"5.1.1 no such user")}
    (m,) = srv.wait_messages(1)
    assert m.mail_from == "a@near.test" and m.rcpt_tos == ["ok@far.test"]
    assert m.data == b"Subject: x\r\n\r\nbody\r\n"
    assert m.helo == "near.test" and not m.tls
    assert srv.sessions[0].commands[:4] == ["EHLO near.test", "MAIL FROM:<a@near.test> SIZE=20",
                                            "RCPT TO:<ok@far.test>",
                                            "RCPT TO:<Nobody@far.test>"]


def test_scripted_data_deferred_then_accepted(scripted_smtp):
    srv = scripted_smtp("127.0.0.27", _port(),
                        data_replies=["451 4.3.0 try later", "250 2.0.0 ok"])
    body = b"Subject: retry\r\n\r\n..dot stuffed\r\n"
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            s.sendmail("a@near.test", ["b@far.test"], b"Subject: retry\r\n\r\n.dot stuffed\r\n")
        assert exc.value.smtp_code == 451
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as s:
        assert s.sendmail("a@near.test", ["b@far.test"],
                          b"Subject: retry\r\n\r\n.dot stuffed\r\n") == {}
    assert [a.reply for a in srv.attempts] == ["451 4.3.0 try later", "250 2.0.0 ok"]
    (m,) = srv.messages
    assert m.data == body.replace(b"..", b".")
    assert srv.connections == 2


@pytest.mark.parametrize("greeting,code", [("421 4.3.2 busy", 421), ("554 5.7.1 go away", 554)])
def test_scripted_greeting(scripted_smtp, greeting, code):
    srv = scripted_smtp("127.0.0.28", _port(), greeting=greeting)
    with pytest.raises(smtplib.SMTPConnectError) as exc:
        smtplib.SMTP(srv.host, srv.port, timeout=10)
    assert exc.value.smtp_code == code
    # raw: the greeting, then 503 to commands and 221 to QUIT
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline() == greeting.encode() + b"\r\n"
        s.sendall(b"EHLO near.test\r\n")
        assert f.readline().startswith(b"503 ")
        s.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221 ")
    assert srv.connections == 2 and srv.messages == []


def test_scripted_auth_after_starttls(scripted_smtp, test_ca):
    srv = scripted_smtp("127.0.0.29", _port(), starttls=True, auth=("alice", "s3cret"))
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as s:
        s.ehlo("near.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        # MAIL before AUTH is refused
        assert s.mail("a@near.test")[0] == 530
        s.starttls(context=_client_ctx(test_ca, "scripted.far.test"))
        s.ehlo("near.test")
        assert set(s.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        # wrong password, both mechanisms
        for mech in ("PLAIN", "LOGIN"):
            assert _auth_code(s, mech, "alice", "wrong")[0] == 535
        code, _ = _auth_code(s, "LOGIN", "alice", "s3cret")
        assert code == 235
        assert s.sendmail("a@near.test", ["b@far.test"], b"Subject: a\r\n\r\nx\r\n") == {}
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as s:
        s.starttls(context=_client_ctx(test_ca, "scripted.far.test"))
        s.login("alice", "s3cret")  # smtplib picks PLAIN
        s.sendmail("c@near.test", ["d@far.test"], b"Subject: b\r\n\r\ny\r\n")
    a, b = srv.wait_messages(2)
    assert (a.tls, a.auth_user, b.tls, b.auth_user) == (True, "alice", True, "alice")
    assert "AUTH PLAIN alice failed" in srv.sessions[0].commands
    assert "AUTH LOGIN alice ok" in srv.sessions[0].commands
    assert "AUTH PLAIN alice ok" in srv.sessions[1].commands


def _auth_code(s, mech, user, password):
    """AUTH by hand (smtplib's auth() raises on 535)."""
    if mech == "PLAIN":
        token = base64.b64encode(b"\0%s\0%s" % (user.encode(), password.encode()))
        return s.docmd("AUTH", "PLAIN " + token.decode())
    code, _ = s.docmd("AUTH", "LOGIN")
    assert code == 334
    code, _ = s.docmd(base64.b64encode(user.encode()).decode())
    assert code == 334
    return s.docmd(base64.b64encode(password.encode()).decode())


def test_scripted_implicit_tls_with_auth(scripted_smtp, test_ca):
    srv = scripted_smtp("127.0.0.1", None, implicit_tls=True, auth=("bob", "pw"))
    ctx = _client_ctx(test_ca, "scripted.far.test")
    with smtplib.SMTP_SSL(srv.host, srv.port, context=ctx, timeout=10) as s:
        s.ehlo("near.test")
        assert not s.has_extn("starttls") and s.has_extn("auth")
        assert _auth_code(s, "PLAIN", "bob", "nope")[0] == 535
        s.login("bob", "pw")
        s.sendmail("a@near.test", ["b@far.test"], b"Subject: tls\r\n\r\nz\r\n")
    (m,) = srv.wait_messages(1)
    assert m.tls and m.auth_user == "bob"
    # no plain-text greeting: the server waits for a TLS ClientHello
    with socket.create_connection((srv.host, srv.port), timeout=5) as s:
        s.sendall(b"EHLO near.test\r\n")
        assert not s.recv(100).startswith(b"220")


def test_scripted_on_ipv6_loopback(scripted_smtp):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")
    srv = scripted_smtp("::1", _port(), data_replies="250 2.0.0 v6 ok")
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as s:
        s.sendmail("a@near.test", ["b@far.test"], b"Subject: v6\r\n\r\n6\r\n")
    (m,) = srv.wait_messages(1)
    assert m.peer[0] == "::1" and m.reply == "250 2.0.0 v6 ok"
