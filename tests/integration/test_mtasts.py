"""MTA-STS (RFC 8461) against real parts: unbound serving the
``_mta-sts`` TXT record and the MX, a local HTTPS server (stdlib
http.server, a trustme certificate) serving the policy on
mta-sts.sts.test:443, and an aiosmtpd MX with STARTTLS.  eqmaild trusts
the test CA through SSL_CERT_FILE, as it would trust the system's store."""
from __future__ import annotations

import http.server
import os
import threading
import time

import pytest

from helpers import ROOT, wait_log
from test_remote import deliveries, inject, simple

ZONE = ["sts.test. 300 IN MX 10 mx1.sts.test.", "mx1.sts.test. 300 IN A 127.0.0.26",
        '_mta-sts.sts.test. 300 IN TXT "v=STSv1; id=20261206"',
        "mta-sts.sts.test. 300 IN A 127.0.0.27"]
GOOD = "version: STSv1\nmode: enforce\nmx: mx1.sts.test\nmax_age: 86400\n"


class PolicyServer:
    """HTTPS on 127.0.0.27:443; `answer` = (status, content type, body,
    seconds to stall before the body)."""

    def __init__(self, ca, names=("mta-sts.sts.test",)):
        owner = self
        self.answer = (200, "text/plain", GOOD, 0)
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests += 1
                status, ctype, body, stall = owner.answer
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if stall:
                    time.sleep(stall)
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.27", 443), Handler)
        self.httpd.daemon_threads = True
        ctx = ca.server_context(list(names))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sts(test_ca):
    if not ROOT:
        pytest.skip("port 443 and the DNS server need root")
    servers = []

    def make(**kw):
        s = PolicyServer(test_ca, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def mx_daemon(home, daemon_factory, dns, test_ca, **control):
    server = dns(ZONE)
    home.setup(me="mx.example.org", locals_=("mx.example.org", "localhost"),
               rcpthosts=("mx.example.org", "localhost"), timeoutconnect="2\n",
               timeoutremote="20\n", mtasts="1\n", **control)
    return daemon_factory(home, env={"EQMAIL_RESOLV_CONF": server.resolv_conf,
                                     "SSL_CERT_FILE": test_ca.ca_file})


def test_enforce_verifies_and_the_policy_is_cached(home, daemon_factory, dns, sts,
                                                  scripted_smtp, test_ca):
    web = sts()
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=["mx1.sts.test"])
    d = mx_daemon(home, daemon_factory, dns, test_ca)
    inject(home, ["a@sts.test"], simple("enforced"))
    assert mx.wait_messages(1), d.log()
    assert wait_log(d, "verified (mta-sts verify)"), d.log()
    assert os.path.exists(os.path.join(home.path, "queue", "lock", "mta-sts", "sts.test"))
    # the web server is gone: the cached policy still applies (on a new
    # connection: the idle one is closed after 2 s)
    web.stop()
    time.sleep(2.5)
    inject(home, ["b@sts.test"], simple("cached"))
    assert len(mx.wait_messages(2)) == 2, d.log()
    assert d.log().count("verified (mta-sts verify)") == 2
    assert web.requests == 1


@pytest.mark.parametrize("policy,names,why", [
    (GOOD, ["wrong.sts.test"], "certificate"),
    (GOOD.replace("mx: mx1.sts.test", "mx: *.other.test"), ["mx1.sts.test"],
     "is in its MTA-STS policy"),
])
def test_enforce_defers_what_the_policy_forbids(home, daemon_factory, dns, sts, scripted_smtp,
                                                test_ca, policy, names, why):
    web = sts()
    web.answer = (200, "text/plain", policy, 0)
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=names)
    d = mx_daemon(home, daemon_factory, dns, test_ca)
    inject(home, ["a@sts.test"], simple("forbidden"))
    assert wait_log(d, "deferral: "), d.log()
    assert why in deliveries(d, "deferral")[0], deliveries(d, "deferral")
    assert mx.messages == [] and home.queued()


def test_testing_mode_logs_and_delivers(home, daemon_factory, dns, sts, scripted_smtp,
                                        test_ca):
    web = sts()
    web.answer = (200, "text/plain", GOOD.replace("enforce", "testing")
                  .replace("mx: mx1.sts.test", "mx: *.other.test"), 0)
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=["x.test"])
    d = mx_daemon(home, daemon_factory, dns, test_ca)
    inject(home, ["a@sts.test"], simple("testing"))
    assert mx.wait_messages(1), d.log()
    assert wait_log(d, "mta-sts: sts.test testing: MX mx1.sts.test not in the policy"), d.log()
    # the certificate (for x.test) would fail verification: logged, sent anyway
    assert "mta-sts: sts.test testing: mx1.sts.test would fail: TLS connect" in d.log(), d.log()
    assert "not verified (tlsdestinations may)" in d.log()


@pytest.mark.parametrize("answer,names,logged", [
    ((200, "text/plain", "version: STSv1\nmode: sometimes\n", 0), None, "mode 'sometimes'"),
    ((200, "text/plain", GOOD + "x" * 70000, 0), None, "over 65536 bytes"),
    ((200, "text/html", GOOD, 0), None, "Content-Type"),
    ((302, "text/plain", GOOD, 0), None, "HTTP 302"),
    ((200, "text/plain", GOOD, 0), ["evil.test"], "HTTPS to mta-sts.sts.test"),
    ((200, "text/plain", GOOD, 20), None, "timed out"),
])
def test_a_bad_policy_falls_back_to_opportunistic_tls(home, daemon_factory, dns, sts,
                                                      scripted_smtp, test_ca, answer,
                                                      names, logged):
    web = sts(names=names) if names else sts()
    web.answer = answer
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=["x.test"])
    d = mx_daemon(home, daemon_factory, dns, test_ca)
    inject(home, ["a@sts.test"], simple("fallback"))
    assert mx.wait_messages(1, timeout=40), d.log()
    log = d.log()
    assert "mta-sts: sts.test: no new policy (" in log and logged in log, log
    assert "not verified (tlsdestinations may)" in log
    assert "Traceback" not in log


def test_tls_reports_count_the_sessions_and_are_mailed(home, daemon_factory, dns, sts,
                                                       scripted_smtp, test_ca):
    """RFC 8460: the failed session (a certificate for another name) is
    counted, `eqmail tlsrpt --send` writes the JSON report and mails it to
    the rua of _smtp._tls.sts.test (here the local postmaster)."""
    import email
    import gzip
    import json
    import subprocess
    import sys

    sts()
    scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=["wrong.sts.test"])
    server = dns(ZONE + ['_smtp._tls.sts.test. 300 IN TXT '
                         '"v=TLSRPTv1; rua=mailto:postmaster@mx.example.org"'])
    home.setup(me="mx.example.org", locals_=("mx.example.org", "localhost"),
               rcpthosts=("mx.example.org", "localhost"), timeoutconnect="2\n",
               timeoutremote="20\n", mtasts="1\n")
    env = {"EQMAIL_RESOLV_CONF": server.resolv_conf, "SSL_CERT_FILE": test_ca.ca_file}
    d = daemon_factory(home, env=env)
    inject(home, ["a@sts.test"], simple("reported"))
    assert wait_log(d, "deferral: "), d.log()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    out = subprocess.run([sys.executable, "-m", "eqmail", "tlsrpt", "--home", home.path,
                          "--date", day, "--send"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr
    domain, path, rua = out.stdout.split()
    assert (domain, rua) == ("sts.test", "postmaster@mx.example.org")
    with open(path) as f:
        report = json.load(f)
    (pol,) = report["policies"]
    assert pol["policy"]["policy-type"] == "sts" and "mode: enforce" in \
        pol["policy"]["policy-string"]
    assert pol["summary"]["total-failure-session-count"] >= 1
    assert pol["failure-details"][0]["result-type"] == "certificate-host-mismatch"
    assert pol["failure-details"][0]["receiving-mx-hostname"] == "mx1.sts.test"
    (m,) = [x for x in home.wait_messages(1, 20) if b"tlsrpt" in x]
    msg = email.message_from_bytes(m)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    (gz,) = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert json.loads(gzip.decompress(gz.get_payload(decode=True))) == report
