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

from helpers import ROOT, wait_log
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
