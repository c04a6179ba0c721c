"""DKIM, DMARC and Authentication-Results (issue 21 items 3 and 4) against a
real DNS server (unbound on 127.0.0.153) with DKIM keys and DMARC records,
and mail signed by another implementation, OpenDKIM's opendkim-testmsg."""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import tempfile

import pytest

from helpers import wait_log
from test_local_delivery import head_lines

pytest.importorskip("authheaders", reason="tests/run installs authheaders (pip .[test])")
pytest.importorskip("dkim", reason="tests/run installs dkimpy (pip .[test])")


@pytest.fixture(scope="module")
def key():
    if shutil.which("opendkim-genkey") is None or shutil.which("opendkim-testmsg") is None:
        pytest.fail("opendkim-tools is missing (tests/run installs it)")
    d = tempfile.mkdtemp(prefix="eqmail-dkim-")
    subprocess.run(["opendkim-genkey", "-b", "1024", "-d", "good.test", "-s", "sel",
                    "-D", d], check=True, timeout=60)
    with open(os.path.join(d, "sel.txt")) as f:
        p = [s for s in re.findall(r'"([^"]*)"', f.read()) if s.startswith("p=")][0]
    yield os.path.join(d, "sel.private"), p
    shutil.rmtree(d, ignore_errors=True)


def opendkim_sign(keyfile: str, message: bytes) -> bytes:
    """The message (CRLF lines) signed by OpenDKIM as d=good.test s=sel."""
    r = subprocess.run(["opendkim-testmsg", "-C", "-d", "good.test", "-k", keyfile, "-s",
                        "sel"], input=message, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def msg(from_, subject, body=b"hello\r\n", extra=b""):
    return (b"Date: Sun, 6 Dec 2026 04:00:00 +0000\r\nMessage-ID: <%s@x>\r\n"
            b"From: %s\r\nTo: postmaster@mx.example.org\r\nSubject: %s\r\n%s\r\n%s"
            % (subject.encode(), from_.encode(), subject.encode(), extra, body))


@pytest.fixture
def mx(home, dns, daemon_factory, key):
    keyfile, p = key
    server = dns([
        'sel._domainkey.good.test. 300 IN TXT "v=DKIM1; k=rsa; " "%s"' % p,
        '_dmarc.good.test. 300 IN TXT "v=DMARC1; p=reject"',
        '_dmarc.evil.test. 300 IN TXT "v=DMARC1; p=reject"',
        '_dmarc.soft.test. 300 IN TXT "v=DMARC1; p=quarantine"',
        # malformed records and a huge key record: permerror or none, never a crash
        '_dmarc.bad1.test. 300 IN TXT "v=DMARC1; p=bogus; pct=x"',
        '_dmarc.bad2.test. 300 IN TXT "v=DMARC1 p reject ;;;="',
        '_dmarc.bad2.test. 300 IN TXT "v=DMARC1; p=none"',
        'sel._domainkey.huge.test. 300 IN TXT %s' % " ".join(
            '"%s"' % ("k%03d" % i * 60) for i in range(30)),
    ])
    home.setup(authcheck="1\n", dmarcreject="1\n")
    d = daemon_factory(home, env={"EQMAIL_RESOLV_CONF": server.resolv_conf})
    return d, keyfile


def send(d, data: bytes, sender="s@good.test"):
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.test")
        code, text = s.docmd("MAIL FROM:<%s>" % sender)
        assert code == 250, text
        code, text = s.docmd("RCPT TO:<postmaster@mx.example.org>")
        assert code == 250, text
        code, text = s.data(data)
        return code, text


def test_dkim_dmarc_and_authentication_results(home, mx):
    d, keyfile = mx
    # signed by OpenDKIM for good.test, From good.test: dkim=pass, dmarc=pass
    code, _ = send(d, opendkim_sign(keyfile, msg("a@good.test", "signed")))
    assert code == 250
    (m,) = home.wait_messages(1)
    # at the top of what eqmail received: right under the delivery's own
    # Return-Path and Delivered-To lines, above every Received line
    head = head_lines(m)
    first = head[2]
    assert first.startswith(b"Authentication-Results: mx.example.org;"), head[:4]
    assert head[3].startswith(b"Received: ")
    assert b"dkim=pass" in first and b"header.d=good.test" in first
    assert b"dmarc=pass" in first and b"header.from=good.test" in first
    # a changed body: dkim=fail, so DMARC fails too and good.test's p=reject
    # refuses it
    signed = opendkim_sign(keyfile, msg("a@good.test", "tampered"))
    code, text = send(d, signed.replace(b"hello", b"HELLO"))
    assert code == 550 and b"DMARC policy of good.test says reject" in text, text
    # From evil.test, unsigned, p=reject: refused at the end of DATA
    code, text = send(d, msg("x@evil.test", "forged"), sender="x@evil.test")
    assert code == 550 and b"DMARC policy of evil.test says reject" in text, text
    assert wait_log(d, "smtpd: dmarc fail (p=reject) for evil.test")
    # p=quarantine: accepted, marked
    code, _ = send(d, msg("x@soft.test", "quarantine"), sender="x@soft.test")
    assert code == 250
    msgs = home.wait_messages(2)
    q = [x for x in msgs if b"Subject: quarantine" in x][0]
    assert b"dmarc=fail" in head_lines(q)[2] and b"quarantine" in head_lines(q)[2].lower()


def test_forged_authentication_results_are_removed(home, mx):
    d, _ = mx
    forged = (b"Authentication-Results: mx.example.org; dkim=pass header.d=bank.test\r\n"
              b"Authentication-Results: other.example;\r\n spf=pass smtp.mailfrom=x\r\n")
    code, _ = send(d, msg("a@plain.test", "forged-ar", extra=forged), sender="a@plain.test")
    assert code == 250
    (m,) = home.wait_messages(1)
    lines = head_lines(m)
    ours = [l for l in lines if l.lower().startswith(b"authentication-results: mx.example.org")]
    assert len(ours) == 1 and b"bank.test" not in ours[0], lines
    assert b"Authentication-Results: other.example;" in lines  # another host's stays
    assert b" spf=pass smtp.mailfrom=x" in lines


def test_malformed_records_and_a_huge_key_are_reported_not_fatal(home, mx):
    d, keyfile = mx
    # signed for huge.test: the key record is 7 KB of nonsense
    signed = opendkim_sign(keyfile, msg("a@huge.test", "huge-key"))
    signed = signed.replace(b"d=good.test", b"d=huge.test", 1)
    sent = [("a@bad1.test", "bad1", msg("a@bad1.test", "bad1")),
            ("a@bad2.test", "bad2", msg("a@bad2.test", "bad2")),
            ("a@huge.test", "huge-key", signed)]
    for sender, _subject, data in sent:
        code, text = send(d, data, sender=sender)
        assert code == 250, (sender, code, text)
    msgs = home.wait_messages(3)
    for _sender, subject, _data in sent:
        (m,) = [x for x in msgs if b"Subject: " + subject.encode() in x]
        ar = head_lines(m)[2]
        assert ar.startswith(b"Authentication-Results: mx.example.org;"), ar
        assert b"dmarc=pass" not in ar, ar
        if subject == "huge-key":
            assert re.search(rb"dkim=(fail|neutral|permerror|temperror)", ar), ar
    assert "Traceback" not in d.log()


def test_a_50_mb_signed_message_is_taken_without_the_checks(home, mx):
    d, keyfile = mx
    body = (b"x" * 998 + b"\r\n") * (50 * 1024 * 1024 // 1000)
    head = opendkim_sign(keyfile, msg("a@good.test", "big", body=b"small\r\n"))
    head = head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    code, text = send(d, head + body)
    assert code == 250, text
    (m,) = home.wait_messages(1, timeout=120)
    assert b"Subject: big" in m and len(m) > 50 * 1000 * 1000
    # bigger than authmaxsize (2 MB): not checked, so no field claims a result
    assert not [l for l in head_lines(m) if l.startswith(b"Authentication-Results:")]
    # the message was streamed, not held: no process of the tree grew by it
    assert max(peak_rss_mb(p) for p in tree(d.proc.pid)) < 60, d.log()


def tree(pid: int):
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def peak_rss_mb(pid: int) -> float:
    """The peak resident set (VmHWM) of `pid`, in MB; 0 when it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def test_an_arc_sealed_forward_is_reported(home, mx, key):
    """A forwarder (here dkimpy's arc_sign, the sealer mailing lists use)
    seals the message; eqmail reports the chain: arc=pass, and arc=fail once
    the body is changed after the seal."""
    import dkim

    d, keyfile = mx
    with open(keyfile, "rb") as f:
        private = f.read()
    base = msg("a@plain.test", "arc", extra=b"Authentication-Results: relay.good.test; "
               b"spf=pass smtp.mailfrom=a@plain.test\r\n")
    sealed = b"".join(dkim.arc_sign(base, b"sel", b"good.test", private,
                                    b"relay.good.test")) + base
    assert send(d, sealed, sender="a@plain.test")[0] == 250
    assert send(d, sealed.replace(b"Subject: arc", b"Subject: arc-broken")
                .replace(b"hello", b"HELLO"), sender="a@plain.test")[0] == 250
    msgs = home.wait_messages(2)
    (good,) = [m for m in msgs if b"Subject: arc\r\n" in m or b"Subject: arc\n" in m]
    (bad,) = [m for m in msgs if b"Subject: arc-broken" in m]
    assert b"arc=pass" in head_lines(good)[2], head_lines(good)[2]
    assert b"arc=fail" in head_lines(bad)[2], head_lines(bad)[2]
