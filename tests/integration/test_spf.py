"""SPF (issue 21 item 2) against a real DNS server (unbound on 127.0.0.153):
qmail-spf's spfbehavior levels in the daemon, the Received-SPF field, and
eqmail's verdicts (pyspf) compared with another implementation, libspf2's
spfquery, over a table of records (include, redirect, a, mx, exists, macros,
ip6, the look-up limits of RFC 7208 section 4.6.4)."""
from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import time

import pytest

from helpers import ROOT, wait_log
from test_local_delivery import head_lines

pytest.importorskip("spf", reason="pyspf is installed by tests/run (pip .[test])")

ZONE = [
    'pass.test. 300 IN TXT "v=spf1 ip4:127.0.0.0/24 ip4:192.0.2.0/25 -all"',
    'fail.test. 300 IN TXT "v=spf1 ip4:192.0.2.1 -all"',
    'soft.test. 300 IN TXT "v=spf1 ~all"',
    'neutral.test. 300 IN TXT "v=spf1 ?all"',
    'broken.test. 300 IN TXT "v=spf1 foo -all"',
    'inc.test. 300 IN TXT "v=spf1 include:pass.test -all"',
    'redir.test. 300 IN TXT "v=spf1 redirect=fail.test"',
    'a.test. 300 IN TXT "v=spf1 a:host.a.test -all"',
    'host.a.test. 300 IN A 192.0.2.10',
    'mx.test. 300 IN TXT "v=spf1 mx -all"',
    'mx.test. 300 IN MX 10 host.a.test.',
    'exists.test. 300 IN TXT "v=spf1 exists:%{i}.ok.exists.test -all"',
    '192.0.2.10.ok.exists.test. 300 IN A 127.0.0.2',
    'ip6.test. 300 IN TXT "v=spf1 ip6:2001:db8::/32 -all"',
    'two.test. 300 IN TXT "v=spf1 -all"',
    'two.test. 300 IN TXT "v=spf1 +all"',
    'helo.test. 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
    'badhelo.test. 300 IN TXT "v=spf1 -all"',
    # 11 includes: more than 10 DNS-querying terms (RFC 7208 4.6.4): permerror
    'many.test. 300 IN TXT "v=spf1 include:l1.test include:l2.test include:l3.test '
    'include:l4.test include:l5.test include:l6.test include:l7.test include:l8.test '
    'include:l9.test include:l10.test include:l11.test -all"',
] + ['l%d.test. 300 IN TXT "v=spf1 ?all"' % i for i in range(1, 12)] + [
    # void look-ups: three names that do not exist (more than 2): permerror
    'void.test. 300 IN TXT "v=spf1 a:no1.void.test a:no2.void.test a:no3.void.test -all"',
]

TABLE = [  # (sender domain, client ip); no loopback: libspf2 always passes localhost
    ("pass.test", "192.0.2.10"), ("fail.test", "192.0.2.10"), ("soft.test", "192.0.2.10"),
    ("neutral.test", "192.0.2.10"), ("broken.test", "192.0.2.10"),
    ("inc.test", "192.0.2.10"), ("inc.test", "192.0.2.200"), ("redir.test", "192.0.2.1"),
    ("redir.test", "192.0.2.10"), ("a.test", "192.0.2.10"), ("a.test", "192.0.2.11"),
    ("mx.test", "192.0.2.10"), ("exists.test", "192.0.2.10"), ("exists.test", "192.0.2.11"),
    ("ip6.test", "2001:db8::25"), ("ip6.test", "2001:db9::25"), ("nothing.test", "192.0.2.10"),
    ("two.test", "192.0.2.10"), ("many.test", "192.0.2.10"), ("void.test", "192.0.2.10"),
]


@pytest.fixture
def spfdns(dns):
    return dns(ZONE)


def _spfquery(resolv_conf: str, ip: str, sender: str) -> str:
    """libspf2's verdict, with the test's DNS server as the system's (a
    private mount namespace binds its resolv.conf over /etc/resolv.conf)."""
    out = subprocess.run(["unshare", "-m", "sh", "-c",
                          'mount --bind "$0" /etc/resolv.conf && exec spfquery -ip "$1" '
                          '-sender "$2" -helo client.test',
                          resolv_conf, ip, sender], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    if lines and lines[0] == "StartError":  # an error block comes before the result
        lines = lines[lines.index("EndError") + 1:] if "EndError" in lines else []
    first = (lines or [""])[0].strip().lower()
    # libspf2 calls a record it cannot compile "(invalid)": RFC 7208's permerror
    return {"(invalid)": "permerror"}.get(first, first)


#: Where libspf2 1.2.10 (RFC 4408) and RFC 7208 part ways, with eqmail on
#: RFC 7208's side: {case: (eqmail's, libspf2's, why)}.
KNOWN = {("void.test", "192.0.2.10"): (
    "permerror", "fail", "RFC 7208 4.6.4: more than two void look-ups is a permerror; "
    "libspf2 predates that limit")}


def test_verdicts_agree_with_libspf2(spfdns, monkeypatch):
    if not ROOT:
        pytest.skip("the DNS server and the mount namespace need root")
    if shutil.which("spfquery") is None:
        pytest.fail("spfquery is missing (tests/run installs it)")
    monkeypatch.setenv("EQMAIL_RESOLV_CONF", spfdns.resolv_conf)
    from eqmail.delivery import remote
    from eqmail.smtp import spfcheck

    remote._resolvers.clear()

    class C:
        me = "mx.example.org"

    rows = []
    for domain, ip in TABLE:
        ours = spfcheck.check(C, ip, "someone@" + domain, "client.test").result
        theirs = _spfquery(spfdns.resolv_conf, ip, "someone@" + domain)
        rows.append((domain, ip, ours, theirs))
    differ = [r for r in rows if r[2] != r[3] and KNOWN.get(r[:2], (None, None))[:2] != r[2:]]
    assert not differ, "eqmail (pyspf) and libspf2 disagree: %s\nall: %s" % (differ, rows)
    # the table covers every result, the limits included
    assert {r[2] for r in rows} >= {"pass", "fail", "softfail", "neutral", "none", "permerror"}
    assert dict(((d, i), o) for d, i, o, _ in rows)[("many.test", "192.0.2.10")] == "permerror"


def test_spfbehavior_levels_in_the_daemon(home, spfdns, daemon_factory):
    home.setup(spfbehavior="3\n", rcpthosts=("mx.example.org", "localhost"),
               smtprules='127.0.0.2:allow,SPFBEHAVIOR="4"\n127.0.0.3:allow,RELAYCLIENT=""\n')
    d = daemon_factory(home, env={"EQMAIL_RESOLV_CONF": spfdns.resolv_conf})

    def mail_from(sender, source="127.0.0.1"):
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30, source_address=(source, 0)) as s:
            s.ehlo("client.test")
            return s.docmd("MAIL FROM:<%s>" % sender)

    code, text = mail_from("a@fail.test")
    assert code == 550 and text.startswith(b"5.7.23 SPF fail: "), (code, text)
    assert wait_log(d, "smtpd: spf fail: a@fail.test from 127.0.0.1 refused (spfbehavior 3)")
    assert mail_from("a@soft.test")[0] == 250           # level 3 takes softfail
    assert mail_from("a@soft.test", "127.0.0.2")[0] == 550  # the rule's level 4 does not
    assert mail_from("a@broken.test")[0] == 250         # permerror: refused at 6 only
    assert mail_from("a@fail.test", "127.0.0.3")[0] == 250  # RELAYCLIENT: not checked
    code, text = mail_from("a@down.example")  # the server refuses: temperror
    assert code == 451 and b"SPF: temporary error" in text, (code, text)
    # a pass: the message carries Received-SPF above eqmail's Received line
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.test")
        s.sendmail("a@pass.test", ["postmaster@mx.example.org"], b"Subject: spf\r\n\r\nx\r\n")
    (msg,) = home.wait_messages(1)
    head = head_lines(msg)
    spf_at = [i for i, l in enumerate(head) if l.startswith(b"Received-SPF: ")]
    recv_at = [i for i, l in enumerate(head) if l.startswith(b"Received: ")]
    assert spf_at and recv_at and spf_at[0] < recv_at[0], head
    assert head[spf_at[0]].startswith(b"Received-SPF: Pass (mx.example.org: domain of "
                                      b"pass.test designates 127.0.0.1 as permitted sender)")
    assert b'envelope-from="a@pass.test"' in head[spf_at[0]]


def test_the_helo_identity_is_checked_too(home, spfdns, daemon_factory):
    home.setup(spfbehavior="3\n", rcpthosts=("mx.example.org", "localhost"))
    d = daemon_factory(home, env={"EQMAIL_RESOLV_CONF": spfdns.resolv_conf})

    def session(helo, sender):
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
            s.ehlo(helo)
            return s.docmd("MAIL FROM:<%s>" % sender)

    # a HELO name whose record says -all is refused, whatever MAIL FROM passes
    code, text = session("badhelo.test", "a@pass.test")
    assert code == 550 and text.startswith(b"5.7.23 SPF fail"), (code, text)
    assert wait_log(d, "smtpd: spf fail for HELO badhelo.test from 127.0.0.1 refused")
    # an address literal or a bare word has no record to check
    assert session("[127.0.0.1]", "a@pass.test")[0] == 250
    assert session("localhost", "a@pass.test")[0] == 250
    # the null sender is the HELO identity: its field says so
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("helo.test")
        s.sendmail("", ["postmaster@mx.example.org"], b"Subject: bounce\r\n\r\nx\r\n")
    (msg,) = home.wait_messages(1)
    (field,) = [l for l in head_lines(msg) if l.startswith(b"Received-SPF: ")]
    assert field.startswith(b"Received-SPF: Pass") and b"identity=helo" in field, field
    assert b'helo="helo.test"' in field or b"helo=helo.test" in field, field


def test_a_dns_server_that_never_answers_stalls_no_other_session(home, daemon_factory):
    """25 sessions wait on SPF look-ups that never come back (more than the
    20 threads that commit messages): a client whose rule skips SPF still
    gets its message in at once, and the waiting ones get 451 in bounded
    time (spfbehavior 2)."""
    if not ROOT:
        pytest.skip("a DNS server on port 53 needs root")
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.157", 53))  # takes queries, answers none
    resolv = os.path.join(home.path, "resolv-hole.conf")
    with open(resolv, "w") as f:
        f.write("nameserver 127.0.0.157\noptions timeout:30 attempts:1\n")
    home.setup(spfbehavior="2\n", rcpthosts=("mx.example.org", "localhost"),
               smtprules='127.0.0.2:allow,SPFBEHAVIOR="0"\n',
               concurrencyincoming="100\n")
    d = daemon_factory(home, env={"EQMAIL_RESOLV_CONF": resolv})
    waiting = []
    try:
        for _ in range(25):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=60)
            f = s.makefile("rb")
            assert f.readline().startswith(b"220")
            s.sendall(b"HELO [127.0.0.1]\r\n")
            assert f.readline().startswith(b"250")
            s.sendall(b"MAIL FROM:<a@slow.test>\r\n")
            waiting.append((s, f))
        time.sleep(1.0)
        t0 = time.monotonic()
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30,
                          source_address=("127.0.0.2", 0)) as c:
            c.sendmail("b@slow.test", ["postmaster@mx.example.org"],
                       b"Subject: not stalled\r\n\r\nx\r\n")
        took = time.monotonic() - t0
        assert took < 5, "a session without SPF waited %.1f s for the stuck look-ups" % took
        t0 = time.monotonic()
        first = waiting[0][1].readline()
        assert first.startswith(b"451 ") and b"SPF: temporary error" in first, first
        assert time.monotonic() - t0 < 30
    finally:
        for s, f in waiting:
            f.close()
            s.close()
        hole.close()
