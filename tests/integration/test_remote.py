"""Remote delivery with a real eqmaild against real far ends on loopback.

The far ends are those of peers.py: unbound serving the zone ``test.`` on
127.0.0.153:53 (the daemon gets it through EQMAIL_RESOLV_CONF), a real
Postfix on 127.0.0.25:25 for far.test (user farmail), and scripted aiosmtpd
servers on 127.0.0.26-29 and ::1.  Messages reach the queue through
``eqmail smtpd`` on a pipe with RELAYCLIENT set, run as the daemon's user,
from the local sender sender@mx.example.org, so that bounces come back into
the home's alias Maildir (home.messages()).

Covered: MX/A/AAAA routing, null MX and NXDOMAIN bounces, byte-exact
delivery over STARTTLS, per-recipient results in one SMTP transaction with
RFC 3464 bounces, deferrals retried on SIGALRM, greetings 421/554,
smtproutes (AUTH only inside TLS, implicit TLS on 465, catch-all and
.suffix routes, no password in the log), beforemote filters (header added,
failing and hanging filters skipped, environment), DKIM signing verified
with a key published in the test DNS, and local domains never relayed.

Everything here needs root (ports 25, 53, 465, 587): skipped otherwise.
"""
from __future__ import annotations

import base64
import email
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, wait_log

pytestmark = pytest.mark.skipif(not ROOT, reason="remote delivery tests listen on ports "
                                                 "25/53/465/587: root only (tests/run as root)")

PY = sys.executable
SENDER = "sender@mx.example.org"
DEAD_IP = "127.0.0.30"      # nothing listens on its port 25: connection refused
NO_DNS = "nameserver 127.0.0.154\n"   # a resolver that does not exist

#: A message that tests byte-exactness: dots at line starts (stuffing), a
#: lone dot, trailing blanks, 8-bit UTF-8, empty lines at the end.
MESSAGE = (b"From: Sender <sender@mx.example.org>\n"
           b"To: Far Mail <farmail@far.test>\n"
           b"Subject: remote delivery test\n"
           b"Date: Sat, 21 Nov 2026 12:00:00 +0000\n"
           b"Message-ID: <remote-1@mx.example.org>\n"
           b"MIME-Version: 1.0\n"
           b"Content-Type: text/plain; charset=utf-8\n"
           b"Content-Transfer-Encoding: 8bit\n"
           b"\n"
           b"first line\n"
           b".a line starting with a dot\n"
           b"..two dots\n"
           b".\n"
           b"trailing blanks   \n"
           b"\tindented with a tab\n"
           b"gr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen\n"
           b"\n"
           b"last line\n"
           b"\n")


def simple(subject: str = "hello", from_: str = SENDER, to: str = "someone@far.test") -> bytes:
    return (b"From: %s\nTo: %s\nSubject: %s\nMessage-ID: <%s@mx.example.org>\n\nbody of %s\n"
            % (from_.encode(), to.encode(), subject.encode(),
               re.sub(r"\W", "-", subject).encode(), subject.encode()))


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


# -- the daemon and injection -------------------------------------------------------------

def start(home, daemon_factory, dns_server=None, routes=None, **control):
    """eqmaild for mx.example.org with small timeouts; DNS from `dns_server`
    (else a resolver that does not exist), control files from `control`."""
    files = {"timeoutconnect": "2\n", "timeoutremote": "20\n"}
    if routes is not None:
        files["smtproutes"] = routes
    files.update(control)
    home.setup(me="mx.example.org", locals_=("mx.example.org", "localhost"),
               rcpthosts=("mx.example.org", "localhost"), **files)
    if dns_server is not None:
        resolv = dns_server.resolv_conf
    else:
        resolv = os.path.join(home.path, "resolv.conf")
        with open(resolv, "w") as f:
            f.write(NO_DNS)
    return daemon_factory(home, env={"EQMAIL_RESOLV_CONF": resolv})


def as_daemon_user(home):
    return dict(user=home.uid, group=home.gid, extra_groups=[]) if ROOT else {}


def inject(home, recipients, message: bytes, sender: str = SENDER) -> str:
    """Queue `message` (LF line ends) through `eqmail smtpd` with RELAYCLIENT,
    as the daemon's user; returns the queue id."""
    body = b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n"
                    for l in message.split(b"\n")[:-1])
    dialogue = (b"HELO client.test\r\nMAIL FROM:<%s>\r\n" % sender.encode()
                + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients)
                + b"DATA\r\n" + body + b".\r\nQUIT\r\n")
    env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "127.0.0.1", "RELAYCLIENT": "",
           "HOME": home.path}
    out = subprocess.run([PY, "-m", "eqmail", "smtpd", "--home", home.path], input=dialogue,
                         capture_output=True, timeout=30, env=env, cwd=home.path,
                         **as_daemon_user(home))
    m = re.search(rb"\r\n250 ok \d+ qp (\S+)\r\n", out.stdout)
    assert m, out
    return m.group(1).decode()


def retry_now(daemon):
    daemon.signal(signal.SIGALRM)
    assert wait_log(daemon, "retrying every queued message now", 10)


def remote_results(daemon):
    """[(recipient, kind, report)] of the remote deliveries in the log, in
    order (local ones, such as bounces to the sender, left out)."""
    log = daemon.log()
    who = dict(re.findall(r"starting delivery (\d+): msg \S+ to remote (\S+)", log))
    return [(who[n], kind, text)
            for n, kind, text in re.findall(r"delivery (\d+): (success|deferral|failure): (.*)",
                                            log)
            if n in who]


def deliveries(daemon, kind: str):
    """The report texts of the remote deliveries that ended with `kind`."""
    return [text for _, k, text in remote_results(daemon) if k == kind]


def wait_count(daemon, text: str, count: int, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if daemon.log().count(text) >= count:
            return True
        time.sleep(0.05)
    return False


def wait_gone(home, timeout: float = 15.0) -> bool:
    """Until the queue is empty (every message and bounce delivered)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not home.queued():
            return True
        time.sleep(0.05)
    return False


def connection_refused(ip: str, port: int = 25) -> bool:
    try:
        socket.create_connection((ip, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


# -- bounces ------------------------------------------------------------------------------

def parse_dsn(raw: bytes):
    """(message, per-message fields, [per-recipient fields]) of an RFC 3464
    bounce."""
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report", raw
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == \
        ["text/plain", "message/delivery-status", "text/rfc822-headers"], raw
    blocks = parts[1].get_payload()
    return msg, blocks[0], blocks[1:]


def one_bounce(home, daemon, timeout: float = 15.0):
    msgs = home.wait_messages(1, timeout)
    assert len(msgs) == 1, daemon.log()
    return msgs[0]


# ======================================================================= 1. DNS routing

def far_records(*extra):
    return ["far.test. 300 IN MX 10 mx1.far.test.",
            "mx1.far.test. 300 IN A 127.0.0.25"] + list(extra)


def test_single_mx_to_postfix_byte_exact_over_starttls(home, daemon_factory, dns, postfix_far):
    server = dns(far_records())
    d = start(home, daemon_factory, server)
    inject(home, ["farmail@far.test"], MESSAGE)
    msgs = postfix_far.wait_messages(1, timeout=20)
    assert len(msgs) == 1, d.log() + postfix_far.log()
    assert wait_log(d, ": success: "), d.log()
    (msg,) = msgs
    head, sep, rest = msg.partition(b"From: Sender <")
    # our header lines and body, byte for byte, after the added lines
    assert sep + rest == MESSAGE
    # Postfix's lines first, then eqmail's own queue Received line
    assert head.startswith(b"Return-Path: <sender@mx.example.org>\n"), head
    assert b"\nDelivered-To: farmail@far.test\n" in head
    ours = re.search(rb"Received: from unknown \(HELO client\.test\) \(127\.0\.0\.1\)\n  by mx\.example\.org "
                     rb"with SMTP; [^\n]+\n\Z", head)
    assert ours, head
    # Postfix's Received line: from eqmail's EHLO name, over TLS
    pf = re.search(rb"Received: from mx\.example\.org \(([^\n]|\n[ \t])*", head)
    assert pf, head
    assert b"with ESMTPS" in pf.group(0) and b"TLS" in pf.group(0), pf.group(0)
    assert "TLS connection established from" in postfix_far.log(1000)
    assert "accepted message" in deliveries(d, "success")[0]
    assert wait_gone(home)
    assert home.messages() == []  # no bounce


def test_best_mx_refusing_connections_falls_back_to_the_next(home, daemon_factory, dns,
                                                             scripted_smtp):
    assert connection_refused(DEAD_IP), "%s:25 must refuse connections" % DEAD_IP
    second = scripted_smtp("127.0.0.26", 25)
    third = scripted_smtp("127.0.0.27", 25)
    server = dns(["multi.test. 300 IN MX 10 dead.multi.test.",
                  "multi.test. 300 IN MX 20 second.multi.test.",
                  "multi.test. 300 IN MX 30 third.multi.test.",
                  "dead.multi.test. 300 IN A %s" % DEAD_IP,
                  "second.multi.test. 300 IN A 127.0.0.26",
                  "third.multi.test. 300 IN A 127.0.0.27"])
    d = start(home, daemon_factory, server)
    inject(home, ["rcpt@multi.test"], simple("multi", to="rcpt@multi.test"))
    (m,) = second.wait_messages(1)
    assert m.rcpt_tos == ["rcpt@multi.test"] and m.mail_from == SENDER
    assert wait_log(d, ": success: "), d.log()
    assert third.connections == 0        # preference order: 20 before 30
    assert deliveries(d, "deferral") == []
    # the DNS server was really asked for the MX
    assert "multi.test. MX IN" in server.log()


def test_domain_without_mx_uses_its_a_record(home, daemon_factory, dns, scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25)
    server = dns(["nomx.test. 300 IN A 127.0.0.26",
                  # a decoy: a subdomain MX must not be mistaken for the domain's
                  "mail.nomx.test. 300 IN MX 10 elsewhere.test.",
                  "elsewhere.test. 300 IN A 127.0.0.27"])
    d = start(home, daemon_factory, server)
    inject(home, ["user@nomx.test"], simple("no mx", to="user@nomx.test"))
    (m,) = srv.wait_messages(1)
    assert m.rcpt_tos == ["user@nomx.test"]
    assert wait_log(d, ": success: "), d.log()


def test_aaaa_only_mx_host_is_reached_over_ipv6(home, daemon_factory, dns, scripted_smtp):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    srv6 = scripted_smtp("::1", 25)
    srv4 = scripted_smtp("127.0.0.26", 25)
    server = dns(["v6.test. 300 IN MX 10 mx6.v6.test.",
                  "mx6.v6.test. 300 IN AAAA ::1",
                  # a host with both: IPv6 is tried first
                  "dual.test. 300 IN MX 10 mx.dual.test.",
                  "mx.dual.test. 300 IN AAAA ::1",
                  "mx.dual.test. 300 IN A 127.0.0.26"])
    d = start(home, daemon_factory, server, routes="v6route.test:[::1]:25\n")
    inject(home, ["six@v6.test"], simple("over ipv6", to="six@v6.test"))
    (m,) = srv6.wait_messages(1)
    assert m.peer[0] == "::1" and m.rcpt_tos == ["six@v6.test"]   # the client's side
    assert wait_log(d, ": success: "), d.log()
    inject(home, ["two@dual.test"], simple("dual stack", to="two@dual.test"))
    inject(home, ["r@v6route.test"], simple("ipv6 relay", to="r@v6route.test"))
    assert wait_count(d, ": success: ", 3), d.log()
    assert sorted(r for m in srv6.messages for r in m.rcpt_tos) == \
        ["r@v6route.test", "six@v6.test", "two@dual.test"]
    assert srv4.connections == 0


def test_null_mx_bounces_at_once_with_5_1_10(home, daemon_factory, dns, scripted_smtp):
    watch = scripted_smtp("127.0.0.26", 25)  # where an A record would lead
    server = dns(["nullmx.test. 300 IN MX 0 .",
                  "nullmx.test. 300 IN A 127.0.0.26"])
    d = start(home, daemon_factory, server)
    msgid = inject(home, ["nobody@nullmx.test"], simple("null mx", to="nobody@nullmx.test"))
    assert wait_log(d, "bounce msg " + msgid), d.log()
    assert deliveries(d, "deferral") == []   # at once, not after retries
    raw = one_bounce(home, d)
    msg, per_msg, (rcpt,) = parse_dsn(raw)
    assert msg["To"] == SENDER and msg["Subject"] == "failure notice"
    assert rcpt["Final-Recipient"] == "rfc822; nobody@nullmx.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.10"
    assert b"null MX" in raw
    assert watch.connections == 0


def test_nonexistent_domain_bounces_with_5_1_2(home, daemon_factory, dns):
    server = dns(far_records())
    d = start(home, daemon_factory, server)
    msgid = inject(home, ["who@nosuch.test"], simple("nxdomain", to="who@nosuch.test"))
    assert wait_log(d, "bounce msg " + msgid), d.log()
    assert deliveries(d, "deferral") == []
    msg, per_msg, (rcpt,) = parse_dsn(one_bounce(home, d))
    assert rcpt["Final-Recipient"] == "rfc822; who@nosuch.test"
    assert rcpt["Status"] == "5.1.2"
    assert "nosuch.test" in rcpt["Diagnostic-Code"]
    assert per_msg["X-Eqmail-Queue-ID"] == msgid


# ======================================================================= 2. far-end replies

def test_data_451_is_deferred_then_delivered_after_sigalrm(home, daemon_factory,
                                                           scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25,
                        data_replies=["451 4.3.0 try again later", "250 2.0.0 ok now"])
    d = start(home, daemon_factory, routes="retry.test:[127.0.0.26]\n")
    inject(home, ["r@retry.test"], simple("retry", to="r@retry.test"))
    assert wait_log(d, ": deferral: "), d.log()
    (deferral,) = deliveries(d, "deferral")
    assert "451 4.3.0 try again later" in deferral
    assert srv.messages == [] and len(home.queued()) == 1
    retry_now(d)
    assert wait_log(d, ": success: "), d.log()
    assert len(srv.messages) == 1
    assert [a.reply for a in srv.attempts] == ["451 4.3.0 try again later", "250 2.0.0 ok now"]
    assert wait_gone(home)
    time.sleep(0.3)
    assert len(srv.messages) == 1 and home.messages() == []


def test_550_for_one_of_two_recipients_one_transaction_and_a_dsn(home, daemon_factory,
                                                                 scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25,
                        rcpt_replies={"nobody@two.test": "550 5.1.1 <nobody@two.test>: "
                                                         "no such user here"})
    d = start(home, daemon_factory, routes="two.test:[127.0.0.26]\n")
    msgid = inject(home, ["ok@two.test", "nobody@two.test"], simple("two", to="ok@two.test"))
    (m,) = srv.wait_messages(1)
    assert wait_log(d, "bounce msg " + msgid), d.log()
    # one session, one transaction, both RCPTs
    assert srv.connections == 1 and len(srv.sessions) == 1
    cmds = srv.sessions[0].commands
    assert [c for c in cmds if c.startswith("RCPT")] == ["RCPT TO:<ok@two.test>",
                                                         "RCPT TO:<nobody@two.test>"]
    assert cmds.count("DATA") == 1
    assert len([c for c in cmds if c.startswith("MAIL")]) == 1
    assert m.rcpt_tos == ["ok@two.test"] and m.mail_from == SENDER
    assert sorted(r[:2] for r in remote_results(d)) == [("nobody@two.test", "failure"),
                                                         ("ok@two.test", "success")]
    raw = one_bounce(home, d)
    msg, per_msg, blocks = parse_dsn(raw)
    assert len(blocks) == 1  # only the refused recipient
    (rcpt,) = blocks
    assert rcpt["Final-Recipient"] == "rfc822; nobody@two.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; 127.0.0.26"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550")
    assert "no such user here" in rcpt["Diagnostic-Code"]
    assert b"ok@two.test" not in msg.get_payload()[0].get_payload(decode=True)
    # the returned header is the failed message's
    assert b"Subject: two" in msg.get_payload()[2].as_bytes()
    assert wait_gone(home)


def test_greeting_421_on_the_only_host_is_a_deferral(home, daemon_factory, dns,
                                                     scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25, greeting="421 4.3.2 busy, come back later")
    server = dns(["busy.test. 300 IN MX 10 mx.busy.test.",
                  "mx.busy.test. 300 IN A 127.0.0.26"])
    d = start(home, daemon_factory, server)
    inject(home, ["x@busy.test"], simple("busy", to="x@busy.test"))
    assert wait_log(d, ": deferral: "), d.log()
    assert deliveries(d, "failure") == []
    assert srv.connections == 1 and srv.messages == []
    assert len(home.queued()) == 1 and home.messages() == []
    retry_now(d)   # tried again: a second deferral, still no bounce
    assert wait_count(d, ": deferral: ", 2), d.log()
    assert srv.connections == 2
    assert len(home.queued()) == 1 and home.messages() == []


def test_greeting_554_is_a_bounce(home, daemon_factory, dns, scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25, greeting="554 5.7.1 go away, no mail for you")
    server = dns(["rude.test. 300 IN MX 10 mx.rude.test.",
                  "mx.rude.test. 300 IN A 127.0.0.26"])
    d = start(home, daemon_factory, server)
    msgid = inject(home, ["x@rude.test"], simple("rude", to="x@rude.test"))
    assert wait_log(d, "bounce msg " + msgid), d.log()
    assert deliveries(d, "deferral") == []
    msg, per_msg, (rcpt,) = parse_dsn(one_bounce(home, d))
    assert rcpt["Final-Recipient"] == "rfc822; x@rude.test"
    assert rcpt["Status"].startswith("5.")
    assert rcpt["Remote-MTA"] == "dns; mx.rude.test"
    assert "go away, no mail for you" in rcpt["Diagnostic-Code"]
    assert srv.messages == []


# ======================================================================= 3. smtproutes

PASSWORD = "secret pass"


def _secret_forms(user: str, password: str):
    return [password, base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode(),
            base64.b64encode(password.encode()).decode()]


def test_smtproute_with_auth_over_starttls_on_587(home, daemon_factory, scripted_smtp):
    srv = scripted_smtp("127.0.0.27", 587, starttls=True, auth=("user", PASSWORD))
    d = start(home, daemon_factory, routes="far2.test:[127.0.0.27]:587 user %s\n" % PASSWORD)
    inject(home, ["r@far2.test"], simple("auth", to="r@far2.test"))
    (m,) = srv.wait_messages(1)
    assert m.tls and m.auth_user == "user" and m.rcpt_tos == ["r@far2.test"]
    assert wait_log(d, ": success: "), d.log()
    cmds = srv.sessions[0].commands
    assert cmds.index("STARTTLS") < cmds.index("AUTH PLAIN user ok") < \
        [i for i, c in enumerate(cmds) if c.startswith("MAIL")][0], cmds
    assert srv.sessions[0].helo == "mx.example.org"
    for secret in _secret_forms("user", PASSWORD):
        assert secret not in d.log()


@pytest.mark.parametrize("form", ["plain.test:127.0.0.1:%d\n", ":127.0.0.1:%d\n"])
def test_smtproute_relay_as_a_plain_dotted_quad_is_the_address(home, daemon_factory,
                                                                scripted_smtp, form):
    # qmail's dns_ip takes "192.0.2.7" as the address itself, before any DNS:
    # with no resolver at all, the mail must still reach the relay
    srv = scripted_smtp("127.0.0.1")
    d = start(home, daemon_factory, routes=form % srv.port)
    inject(home, ["r@plain.test"], simple("dotted quad", to="r@plain.test"))
    (m,) = srv.wait_messages(1)
    assert m.rcpt_tos == ["r@plain.test"]
    assert wait_log(d, ": success: "), d.log()
    assert deliveries(d, "failure") == []


def first_message_to_a_relay(home, daemon_factory, scripted_smtp):
    """A relay on loopback for reuse.test, eqmaild, and one message there
    delivered: (the relay, the daemon)."""
    srv = scripted_smtp("127.0.0.1")
    d = start(home, daemon_factory, routes="reuse.test:127.0.0.1:%d\n" % srv.port)
    inject(home, ["r1@reuse.test"], simple("first", to="r1@reuse.test"))
    srv.wait_messages(1)
    assert wait_count(d, ": success: ", 1)
    return srv, d


def test_next_message_to_the_same_relay_reuses_the_connection(home, daemon_factory,
                                                                scripted_smtp):
    # Postfix's connection cache: after a transaction the connection stays
    # open (CACHE_IDLE, 2 s) and the next message to the same server goes
    # over it (RFC 5321 section 3.3: MAIL again); then QUIT
    srv, d = first_message_to_a_relay(home, daemon_factory, scripted_smtp)
    inject(home, ["r2@reuse.test"], simple("second", to="r2@reuse.test"))
    msgs = srv.wait_messages(2)
    assert [m.rcpt_tos for m in msgs] == [["r1@reuse.test"], ["r2@reuse.test"]]
    assert srv.connections == 1, [s.commands for s in srv.sessions]
    cmds = srv.sessions[0].commands
    assert [c.split(":")[0] for c in cmds if c.startswith(("MAIL", "EHLO"))] == \
        ["EHLO mx.example.org", "MAIL FROM", "MAIL FROM"], cmds
    deadline = time.time() + 10
    while "QUIT" not in srv.sessions[0].commands:  # the idle connection is closed
        assert time.time() < deadline, srv.sessions[0].commands
        time.sleep(0.1)


def test_a_relay_that_dropped_the_idle_connection_gets_a_new_one(home, daemon_factory,
                                                                 scripted_smtp):
    # the far end closes an idle connection at once (as after a timeout):
    # the next message must not be deferred for it
    srv, d = first_message_to_a_relay(home, daemon_factory, scripted_smtp)
    srv.stop()  # closes every connection, then listens again on the same port
    srv.start()
    inject(home, ["r2@reuse.test"], simple("second", to="r2@reuse.test"))
    assert wait_count(d, ": success: ", 2), d.log()
    assert deliveries(d, "deferral") == [], d.log()


def test_smtproute_wrong_credentials_defer_and_keep_the_message(home, daemon_factory,
                                                                scripted_smtp):
    srv = scripted_smtp("127.0.0.27", 587, starttls=True, auth=("user", PASSWORD))
    d = start(home, daemon_factory, routes="far2.test:[127.0.0.27]:587 user wrong pass\n")
    inject(home, ["r@far2.test"], simple("bad auth", to="r@far2.test"))
    assert wait_log(d, ": deferral: "), d.log()
    assert deliveries(d, "failure") == []
    assert "authentication was rejected" in deliveries(d, "deferral")[0]
    cmds = srv.sessions[0].commands
    assert "AUTH PLAIN user failed" in cmds
    assert not any(c.startswith("MAIL") for c in cmds), cmds
    assert srv.messages == []
    assert len(home.queued()) == 1 and home.messages() == []
    for secret in _secret_forms("user", "wrong pass"):
        assert secret not in d.log()


def test_credentials_for_a_relay_without_starttls_defer_and_send_no_auth(home, daemon_factory,
                                                                          scripted_smtp):
    # the relay would take mail without AUTH: eqmail must not send it anyway
    srv = scripted_smtp("127.0.0.27", 587)
    d = start(home, daemon_factory, routes="far2.test:[127.0.0.27]:587 user %s\n" % PASSWORD)
    inject(home, ["r@far2.test"], simple("no tls", to="r@far2.test"))
    assert wait_log(d, ": deferral: "), d.log()
    assert "STARTTLS" in deliveries(d, "deferral")[0]
    assert srv.connections == 1
    cmds = srv.sessions[0].commands
    assert not any(c.startswith(("AUTH", "MAIL", "RCPT", "DATA")) for c in cmds), cmds
    assert srv.messages == [] and len(home.queued()) == 1 and home.messages() == []
    for secret in _secret_forms("user", PASSWORD):
        assert secret not in d.log()


def test_smtproute_implicit_tls_on_465_with_auth(home, daemon_factory, scripted_smtp):
    srv = scripted_smtp("127.0.0.28", 465, implicit_tls=True, auth=("bob", "pw for 465"))
    d = start(home, daemon_factory, routes="tls465.test:[127.0.0.28]:465 bob pw for 465\n")
    inject(home, ["r@tls465.test"], simple("smtps", to="r@tls465.test"))
    (m,) = srv.wait_messages(1)
    assert m.tls and m.auth_user == "bob"
    assert "STARTTLS" not in srv.sessions[0].commands
    assert wait_log(d, ": success: "), d.log()
    assert "pw for 465" not in d.log()


def test_catch_all_and_subdomain_routes_without_dns(home, daemon_factory, scripted_smtp):
    catch_all = scripted_smtp("127.0.0.28", 25)
    sub = scripted_smtp("127.0.0.29", 25)
    d = start(home, daemon_factory,
              routes=":[127.0.0.28]:25\n.sub.test:[127.0.0.29]:25\n")
    inject(home, ["a@deep.sub.test", "b@sub.test", "c@unrouted.example"],
           simple("routes", to="a@deep.sub.test"))
    assert wait_count(d, ": success: ", 3), d.log()
    assert deliveries(d, "deferral") == [] and deliveries(d, "failure") == []
    got_sub = sorted(r for m in sub.messages for r in m.rcpt_tos)
    got_all = sorted(r for m in catch_all.messages for r in m.rcpt_tos)
    assert got_sub == ["a@deep.sub.test"]          # .sub.test: any subdomain
    assert got_all == ["b@sub.test", "c@unrouted.example"]  # not sub.test itself
    assert len(catch_all.messages) == 2            # one transaction per domain


# ======================================================================= 4. beforemote

def _unchanged(data: bytes, original: bytes) -> bool:
    """`data` (as received, CRLF) is `original` after the queue's own
    Received line and nothing else."""
    wire = crlf(original)
    if not data.endswith(wire):
        return False
    head = data[:-len(wire)]
    return re.fullmatch(rb"Received: from [^\r\n]*\r\n  by [^\r\n]*\r\n", head) is not None


def test_beforemote_filter_adds_a_header_and_gets_the_environment(home, daemon_factory,
                                                                   scripted_smtp):
    srv = scripted_smtp("127.0.0.26", 25)
    d = start(home, daemon_factory, routes="filt.test:[127.0.0.26]\n",
              beforemote='(echo "X-Filtered: yes"; '
                         'echo "X-Env: $SENDER|$RECIPIENT|$RECIPIENTS|$HOST|$EQMAIL_HOME"; cat)\n')
    original = simple("filtered", to="one@filt.test")
    inject(home, ["one@filt.test", "two@filt.test"], original)
    (m,) = srv.wait_messages(1)
    assert m.data.startswith(b"X-Filtered: yes\r\nX-Env: %s|one@filt.test|"
                             b"one@filt.test two@filt.test|filt.test|%s\r\n"
                             % (SENDER.encode(), home.path.encode())), m.data
    assert _unchanged(m.data[m.data.index(b"Received:"):], original), m.data
    assert m.rcpt_tos == ["one@filt.test", "two@filt.test"]
    assert "beforemote filter skipped" not in d.log()
    assert wait_gone(home)
    # the filters' copies are gone too
    assert os.listdir(os.path.join(home.path, "queue", "tmp")) == []


@pytest.mark.parametrize("command,extra", [
    ('echo "X-Broken: yes"; exit 1', {}),
    ('echo "X-Hung: yes"; sleep 30', {"timeoutbeforemote": "1\n"}),
], ids=["failing", "hanging"])
def test_beforemote_failing_or_hanging_filter_is_skipped(home, daemon_factory, scripted_smtp,
                                                         command, extra):
    srv = scripted_smtp("127.0.0.26", 25)
    d = start(home, daemon_factory, routes="filt.test:[127.0.0.26]\n",
              beforemote=command + "\n", **extra)
    original = simple("skipped", to="one@filt.test")
    started = time.time()
    inject(home, ["one@filt.test"], original)
    (m,) = srv.wait_messages(1, timeout=15)
    assert time.time() - started < 10
    assert _unchanged(m.data, original), m.data
    assert wait_log(d, ": success: "), d.log()
    assert d.log().count("beforemote filter skipped") == 1, d.log()


def _eqmail_command() -> str:
    script = os.path.join(os.path.dirname(PY), "eqmail")
    return script if os.access(script, os.X_OK) else "%s -m eqmail" % PY


def test_dkimsign_filter_signature_verifies_with_the_key_published_in_dns(
        home, daemon_factory, dns, postfix_far):
    dkim = pytest.importorskip("dkim")
    home.setup(me="mx.example.org")
    home.chown()
    out = subprocess.run([PY, "-m", "eqmail", "dkimsign", "--genkey", "--domain", "sign.test",
                          "--selector", "s1", "--home", home.path],
                         capture_output=True, timeout=120, cwd="/",
                         env={"PATH": "/usr/bin:/bin"}, **as_daemon_user(home))
    assert out.returncode == 0, out
    record = out.stdout.decode().strip()
    assert record.startswith('s1._domainkey.sign.test. IN TXT "v=DKIM1; k=rsa; p='), record
    assert len(re.findall(r'"[^"]*"', record)) > 1   # 2048 bits: more than one string
    server = dns(far_records(record))
    # the published key, as a resolver sees it
    published = b"".join(b"".join(r.strings)
                         for r in server.resolver().resolve("s1._domainkey.sign.test", "TXT"))
    assert published == "".join(re.findall(r'"([^"]*)"', record)).encode()
    d = start(home, daemon_factory, server, beforemote=_eqmail_command() + " dkimsign\n")
    original = (b"From: Signer <a@sign.test>\nTo: farmail@far.test\n"
                b"Subject: signed\nDate: Sat, 21 Nov 2026 12:00:00 +0000\n"
                b"Message-ID: <dkim-1@sign.test>\n\nsigned body\n.dot line\n\n")
    inject(home, ["farmail@far.test"], original)
    msgs = postfix_far.wait_messages(1, timeout=20)
    assert len(msgs) == 1, d.log() + postfix_far.log()
    (msg,) = msgs
    assert msg.endswith(original)
    assert b"DKIM-Signature: " in msg and b"d=sign.test" in msg and b"s=s1" in msg
    assert "beforemote filter skipped" not in d.log()
    asked = []

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        asked.append(name)
        r = server.resolver()
        try:
            answer = r.resolve(name, "TXT")
        except Exception:
            return None
        return b"".join(b"".join(rd.strings) for rd in answer)

    assert dkim.verify(crlf(msg), dnsfunc=dnsfunc) is True
    assert [n.rstrip(".") for n in asked] == ["s1._domainkey.sign.test"]
    # and it can fail: a changed body does not verify
    assert dkim.verify(crlf(msg.replace(b"signed body", b"signed b0dy")),
                       dnsfunc=dnsfunc) is False


# ======================================================================= 5. local domains

def test_local_domains_are_never_relayed_out(home, daemon_factory, scripted_smtp):
    catch_all = scripted_smtp("127.0.0.28", 25)
    d = start(home, daemon_factory, routes=":[127.0.0.28]:25\n",
              virtualdomains="virt.test:joe\n")
    inject(home, ["joe@mx.example.org", "Ann@MX.Example.ORG", "bob@localhost",
                  "x@virt.test", "out@elsewhere.test"],
           simple("mixed", to="joe@mx.example.org"))
    assert len(home.wait_messages(4)) == 4, d.log()
    assert wait_gone(home), d.log()
    assert len(home.messages()) == 4   # and no bounce
    dt = sorted(m.split(b"\n")[1].lower() for m in home.messages())
    assert dt == [b"delivered-to: ann@mx.example.org", b"delivered-to: bob@localhost",
                  b"delivered-to: joe-x@virt.test", b"delivered-to: joe@mx.example.org"], dt
    assert [r for r, _, _ in remote_results(d)] == ["out@elsewhere.test"]
    rcpts = [c for s in catch_all.sessions for c in s.commands if c.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<out@elsewhere.test>"]
    assert len(catch_all.messages) == 1
