"""DANE for SMTP (RFC 7672) against real parts: the zone with the MX and
the TLSA records is signed with ldns-signzone, served and validated by
unbound (auth-zone plus a trust anchor for it, on 127.0.0.156), and the MX
is aiosmtpd with STARTTLS.  The TLSA data is computed from the server's
certificate with the `cryptography` package (trustme's), not with eqmail's
own code.  Matching records, every selector and matching type, a record
that does not match, a bogus signature, an unsigned zone, a host without
STARTTLS."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from helpers import ROOT, wait_log
from test_remote import deliveries, inject, simple
from test_tls_out import server_der

ADDRESS = "127.0.0.156"


def tlsa_data(der: bytes, selector: int, mtype: int) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if selector == 0:
        blob = der
    else:
        blob = x509.load_der_x509_certificate(der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        blob = hashlib.sha256(blob).digest()
    elif mtype == 2:
        blob = hashlib.sha512(blob).digest()
    return blob.hex()


class SignedZone:
    """dane.test signed with ldns-signzone; unbound validating it on
    127.0.0.156:53.  `tamper`: change the TLSA data after signing (bogus);
    `anchored` False: no trust anchor (insecure)."""

    def __init__(self, records, tamper=False, anchored=True):
        for tool in ("ldns-keygen", "ldns-signzone"):
            if shutil.which(tool) is None:
                pytest.fail("%s is missing (tests/run installs ldnsutils)" % tool)
        self.dir = tempfile.mkdtemp(prefix="eqmail-dane-")
        os.chmod(self.dir, 0o755)
        zone = os.path.join(self.dir, "dane.test.zone")
        with open(zone, "w") as f:
            f.write("$ORIGIN dane.test.\n$TTL 300\n"
                    "@ IN SOA ns.dane.test. admin.dane.test. 1 3600 600 86400 300\n"
                    "@ IN NS ns.dane.test.\nns IN A %s\n" % ADDRESS)
            f.write("".join(r + "\n" for r in records))
        key = subprocess.run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", "dane.test"],
                             cwd=self.dir, capture_output=True, text=True, check=True,
                             timeout=60).stdout.strip()
        subprocess.run(["ldns-signzone", "-n", zone, key], cwd=self.dir, check=True,
                       timeout=60, capture_output=True)
        signed = zone + ".signed"
        if tamper:
            with open(signed) as f:
                text = f.read()
            lines = text.split("\n")
            for i, line in enumerate(lines):
                if "\tTLSA\t" in line or " TLSA " in line:
                    lines[i] = line[:-4] + ("0000" if not line.endswith("0000") else "1111")
                    break
            with open(signed, "w") as f:
                f.write("\n".join(lines))
        with open(os.path.join(self.dir, key + ".ds")) as f:
            ds = f.read().strip()
        self.resolv_conf = os.path.join(self.dir, "resolv.conf")
        with open(self.resolv_conf, "w") as f:
            f.write("nameserver %s\n" % ADDRESS)
        conf = os.path.join(self.dir, "unbound.conf")
        with open(conf, "w") as f:
            f.write("server:\n  interface: %s\n  port: 53\n  do-ip6: no\n"
                    "  username: \"\"\n  chroot: \"\"\n  directory: \"%s\"\n"
                    "  pidfile: \"%s/unbound.pid\"\n  use-syslog: no\n"
                    "  logfile: \"%s/unbound.log\"\n  do-not-query-localhost: no\n"
                    "  module-config: \"validator iterator\"\n"
                    "  access-control: 127.0.0.0/8 allow\n"
                    "  local-zone: \"test.\" nodefault\n"
                    "%s"
                    "auth-zone:\n  name: \"dane.test.\"\n  zonefile: \"%s\"\n"
                    "  for-downstream: no\n  for-upstream: yes\n  fallback-enabled: no\n"
                    % (ADDRESS, self.dir, self.dir, self.dir,
                       ("  trust-anchor: \"%s\"\n" % ds) if anchored else "", signed))
        self.proc = subprocess.Popen(["unbound", "-d", "-c", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            r = subprocess.run(["unbound-checkconf", conf], capture_output=True)
            if r.returncode == 0 and self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("unbound did not answer on %s" % ADDRESS)

    def _answers(self) -> bool:
        import socket

        q = bytes.fromhex("abcd01000001000000000000") + b"\x04dane\x04test\x00\x00\x06\x00\x01"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.3)
        try:
            s.sendto(q, (ADDRESS, 53))
            return bool(s.recv(512))
        except OSError:
            return False
        finally:
            s.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def zone():
    if not ROOT:
        pytest.skip("the DNS server on port 53 needs root")
    made = []

    def make(records, **kw):
        z = SignedZone(records, **kw)
        made.append(z)
        return z

    yield make
    for z in made:
        z.stop()


BASE = ["@ IN MX 10 mx1.dane.test.", "mx1 IN A 127.0.0.26"]


def dane_daemon(home, daemon_factory, z):
    home.setup(me="mx.example.org", locals_=("mx.example.org", "localhost"),
               rcpthosts=("mx.example.org", "localhost"), timeoutconnect="2\n",
               timeoutremote="20\n", dane="1\n")
    return daemon_factory(home, env={"EQMAIL_RESOLV_CONF": z.resolv_conf})


@pytest.mark.parametrize("selector,mtype", [(1, 1), (0, 1), (0, 0), (1, 2), (1, 0)])
def test_a_matching_tlsa_record(home, daemon_factory, zone, scripted_smtp, test_ca,
                                selector, mtype):
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=["x.test"])
    data = tlsa_data(server_der("127.0.0.26", 25), selector, mtype)
    z = zone(BASE + ["_25._tcp.mx1 IN TLSA 3 %d %d %s" % (selector, mtype, data)])
    d = dane_daemon(home, daemon_factory, z)
    inject(home, ["a@dane.test"], simple("dane"))
    assert mx.wait_messages(1), d.log()
    assert wait_log(d, "TLSA matched (dane dane)"), d.log()


def test_a_tlsa_record_that_does_not_match_defers(home, daemon_factory, zone, scripted_smtp,
                                                  test_ca):
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca)
    z = zone(BASE + ["_25._tcp.mx1 IN TLSA 3 1 1 " + "00" * 32])
    d = dane_daemon(home, daemon_factory, z)
    inject(home, ["a@dane.test"], simple("mismatch"))
    assert wait_log(d, "deferral: "), d.log()
    assert "matches none of the DANE TLSA records" in deliveries(d, "deferral")[0]
    assert mx.messages == []


def test_a_bogus_tlsa_answer_skips_the_host(home, daemon_factory, zone, scripted_smtp,
                                           test_ca):
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca)
    data = tlsa_data(server_der("127.0.0.26", 25), 1, 1)
    z = zone(BASE + ["_25._tcp.mx1 IN TLSA 3 1 1 %s" % data], tamper=True)
    d = dane_daemon(home, daemon_factory, z)
    inject(home, ["a@dane.test"], simple("bogus"))
    assert wait_log(d, "deferral: "), d.log()
    assert mx.messages == []
    assert "could not be looked up" in d.log()


def test_an_unsigned_zone_is_opportunistic(home, daemon_factory, zone, scripted_smtp,
                                           test_ca):
    mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca)
    z = zone(BASE + ["_25._tcp.mx1 IN TLSA 3 1 1 " + "00" * 32], anchored=False)
    d = dane_daemon(home, daemon_factory, z)
    inject(home, ["a@dane.test"], simple("insecure"))
    assert mx.wait_messages(1), d.log()
    assert "not verified (tlsdestinations may)" in d.log()


def test_tlsa_without_starttls_defers(home, daemon_factory, zone, scripted_smtp):
    mx = scripted_smtp("127.0.0.26", 25)
    z = zone(BASE + ["_25._tcp.mx1 IN TLSA 3 1 1 " + "00" * 32])
    d = dane_daemon(home, daemon_factory, z)
    inject(home, ["a@dane.test"], simple("plain"))
    assert wait_log(d, "deferral: "), d.log()
    assert "offers no STARTTLS, which dane requires" in deliveries(d, "deferral")[0]
    assert mx.messages == []
    assert glob.glob(os.path.join(home.path, "queue", "mess", "*"))


def intermediate_ca():
    """A TestCA that issues from an intermediate: the server then sends
    leaf + intermediate, and the intermediate is the DANE-TA anchor."""
    from peers import TestCA

    ca = TestCA()
    ca.ca = ca.ca.create_child_ca()
    return ca


@pytest.mark.parametrize("selector,mtype,names,delivered", [
    (0, 1, ["mx1.dane.test"], True),
    (1, 1, ["mx1.dane.test"], True),
    (0, 0, ["mx1.dane.test"], True),          # the anchor whole in DNS
    (0, 1, ["other.dane.test"], False),       # DANE-TA checks the name
])
def test_dane_ta(home, daemon_factory, zone, scripted_smtp, selector, mtype, names,
                 delivered):
    import ssl

    ca = intermediate_ca()
    try:
        mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=ca, tls_names=names)
        anchor = ssl.PEM_cert_to_DER_cert(ca.ca.cert_pem.bytes().decode())
        z = zone(BASE + ["_25._tcp.mx1 IN TLSA 2 %d %d %s"
                         % (selector, mtype, tlsa_data(anchor, selector, mtype))])
        d = dane_daemon(home, daemon_factory, z)
        inject(home, ["a@dane.test"], simple("dane-ta"))
        if delivered:
            assert mx.wait_messages(1), d.log()
            assert wait_log(d, "TLSA matched (DANE-TA) (dane dane)"), d.log()
        else:
            assert wait_log(d, "deferral: "), d.log()
            assert "hostname mismatch" in deliveries(d, "deferral")[0].lower() or \
                "certificate" in deliveries(d, "deferral")[0].lower(), deliveries(d, "deferral")
            assert mx.messages == []
    finally:
        ca.remove()


def test_dane_ta_naming_no_certificate_of_the_chain(home, daemon_factory, zone,
                                                   scripted_smtp):
    ca = intermediate_ca()
    try:
        mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=ca, tls_names=["mx1.dane.test"])
        z = zone(BASE + ["_25._tcp.mx1 IN TLSA 2 0 1 " + "00" * 32])
        d = dane_daemon(home, daemon_factory, z)
        inject(home, ["a@dane.test"], simple("no anchor"))
        assert wait_log(d, "deferral: "), d.log()
        assert "matches the DANE-TA records" in deliveries(d, "deferral")[0]
        assert mx.messages == []
    finally:
        ca.remove()


def test_dane_comes_before_mta_sts(home, daemon_factory, zone, scripted_smtp, test_ca):
    """RFC 8461 section 2: a domain with DANE hosts skips MTA-STS.  The
    domain also publishes an MTA-STS policy in enforce mode naming no
    MX host of it: applied, it would defer the message."""
    from test_mtasts import PolicyServer

    web = PolicyServer(test_ca, names=("mta-sts.dane.test",))
    try:
        web.answer = (200, "text/plain", "version: STSv1\nmode: enforce\n"
                      "mx: *.elsewhere.test\nmax_age: 86400\n", 0)
        mx = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca)
        data = tlsa_data(server_der("127.0.0.26", 25), 1, 1)
        z = zone(BASE + ["_25._tcp.mx1 IN TLSA 3 1 1 %s" % data,
                         '_mta-sts IN TXT "v=STSv1; id=1"', "mta-sts IN A 127.0.0.27"])
        home.setup(me="mx.example.org", locals_=("mx.example.org", "localhost"),
                   rcpthosts=("mx.example.org", "localhost"), timeoutconnect="2\n",
                   timeoutremote="20\n", dane="1\n", mtasts="1\n")
        d = daemon_factory(home, env={"EQMAIL_RESOLV_CONF": z.resolv_conf,
                                      "SSL_CERT_FILE": test_ca.ca_file})
        inject(home, ["a@dane.test"], simple("both"))
        assert mx.wait_messages(1), d.log()
        assert wait_log(d, "TLSA matched (dane dane)"), d.log()
        assert web.requests == 0 and "mta-sts" not in d.log()
    finally:
        web.stop()
