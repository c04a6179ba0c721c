"""Verified outbound TLS (control/tlsdestinations) against a real TLS far
end (aiosmtpd with a trustme CA), found through a real DNS server
(unbound): verify with a CA file (a matching, a mismatching and an expired
certificate), a pinned fingerprint (right and wrong), encrypt against a
server without STARTTLS, none against one with it; one log line per TLS
connection with the version, cipher and what was verified."""
from __future__ import annotations

import hashlib
import re
import socket
import ssl

import pytest

from helpers import wait_log
from test_remote import deliveries, inject, simple, start

MX = ["tls.test. 300 IN MX 10 mx1.tls.test.", "mx1.tls.test. 300 IN A 127.0.0.26"]


def server_der(host: str, port: int) -> bytes:
    """The certificate (DER) a STARTTLS server shows."""
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO x\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(b"STARTTLS\r\n")
        f.readline()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(s) as t:
            return t.getpeercert(binary_form=True)


def fingerprint(host: str, port: int) -> str:
    """The SHA-256 of that certificate, as tlsdestinations writes it."""
    h = hashlib.sha256(server_der(host, port)).hexdigest().upper()
    return "sha256:" + ":".join(h[i:i + 2] for i in range(0, 64, 2))


@pytest.mark.parametrize("names,expired,delivered", [
    (["mx1.tls.test"], False, True),
    (["other.test"], False, False),       # the name does not match
    (["mx1.tls.test"], True, False),      # expired a week ago
])
def test_verify_with_a_ca_file(home, daemon_factory, dns, scripted_smtp, test_ca,
                               names, expired, delivered):
    srv = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=names,
                        tls_expired=expired)
    d = start(home, daemon_factory, dns(MX),
              tlsdestinations="tls.test:verify:%s\n" % test_ca.ca_file)
    inject(home, ["someone@tls.test"], simple("verify"))
    if delivered:
        assert srv.wait_messages(1), d.log()
        assert srv.messages[0].tls
        assert wait_log(d, "tls: mx1.tls.test [127.0.0.26] TLSv1.3 "), d.log()
        assert re.search(r"tls: mx1\.tls\.test \[127\.0\.0\.26\] TLSv1\.3 \S+ verified "
                         r"\(tlsdestinations verify\)", d.log()), d.log()
    else:
        assert wait_log(d, "deferral: "), d.log()
        (text,) = deliveries(d, "deferral")
        assert "certificate" in text.lower() and "tlsdestinations: verify" in text, text
        assert srv.messages == []
        assert home.queued()


def test_pinned_fingerprint(home, daemon_factory, dns, scripted_smtp, test_ca):
    srv = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca, tls_names=["x.test"])
    pin = fingerprint("127.0.0.26", 25)
    wrong = "sha256:" + ":".join(["AB"] * 32)
    d = start(home, daemon_factory, dns(MX),
              tlsdestinations="tls.test:fingerprint:%s,%s\n" % (wrong, pin))
    inject(home, ["someone@tls.test"], simple("pinned"))
    assert srv.wait_messages(1), d.log()
    assert wait_log(d, "fingerprint matched (tlsdestinations fingerprint)"), d.log()
    d.stop()
    # only the wrong pin: deferred, nothing sent
    d = start(home, daemon_factory, dns(MX), tlsdestinations="tls.test:fingerprint:%s\n" % wrong)
    inject(home, ["someone@tls.test"], simple("wrong pin"))
    assert wait_log(d, "deferral: "), d.log()
    assert "is not the one in tlsdestinations" in deliveries(d, "deferral")[0]
    assert len(srv.messages) == 1


def test_encrypt_without_starttls_defers_and_none_skips_it(home, daemon_factory, dns,
                                                          scripted_smtp, test_ca):
    plain = scripted_smtp("127.0.0.26", 25)  # no STARTTLS offered
    d = start(home, daemon_factory, dns(MX), tlsdestinations="tls.test:encrypt\n")
    inject(home, ["someone@tls.test"], simple("encrypt"))
    assert wait_log(d, "deferral: "), d.log()
    assert "offers no STARTTLS, which tlsdestinations requires (encrypt)" in \
        deliveries(d, "deferral")[0]
    assert plain.messages == []
    d.stop()
    plain.stop()
    tls = scripted_smtp("127.0.0.26", 25, starttls=True, ca=test_ca)
    d = start(home, daemon_factory, dns(MX), tlsdestinations=".other.test:verify\n:none\n")
    inject(home, ["someone@tls.test"], simple("none"))
    msgs = tls.wait_messages(2)  # the first message too, now that it may go
    assert msgs and not any(m.tls for m in msgs), d.log()
    assert "tls: " not in d.log()


def test_a_bad_tlsdestinations_line_stops_the_start(home, daemon_factory):
    home.setup(tlsdestinations="example.org:paranoid\n")
    d = daemon_factory(home, start=False)
    d.start(wait=False)
    assert d.proc.wait(15) == 78
    assert "tlsdestinations" in d.log() and "unknown level" in d.log()
