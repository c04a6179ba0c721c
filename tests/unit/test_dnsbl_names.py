"""eqmail.smtp.dnsbl: query names (RFC 5782) and control/rbls."""
from __future__ import annotations

import pytest

from eqmail.control import ConfigError, load
from eqmail.smtp import dnsbl


def test_query_names_ipv4_and_ipv6():
    assert dnsbl.reversed_name("192.0.2.99", "bl.example.") == "99.2.0.192.bl.example."
    assert dnsbl.reversed_name("2001:db8:1:2:3:4:567:89ab", "bl.example") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example.")
    assert dnsbl.reversed_name("unknown", "bl.example") is None


def _home(tmp_path, **files):
    c = tmp_path / "control"
    c.mkdir()
    (c / "me").write_text("mx.example.org\n")
    for k, v in files.items():
        (c / k).write_text(v)
    return str(tmp_path)


def test_rbls_file(tmp_path):
    cfg = load(_home(tmp_path, rbls="# lists\nzen.example 2\n+wl.example.\n", rblwhen="MAIL\n"))
    assert cfg.rbls == (("zen.example", 2, False), ("wl.example", 1, True))
    assert cfg.rblwhen == "mail" and cfg.rblthreshold == 1


@pytest.mark.parametrize("text", ["zen.example two\n", "a b c\n", "bad/zone\n"])
def test_bad_rbls_lines_name_the_line(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        load(_home(tmp_path, rbls="ok.example\n" + text))
    assert e.value.lineno == 2


def test_authserv_id_of_authentication_results_lines():
    from eqmail.smtp.authcheck import authserv_id

    assert authserv_id(b"Authentication-Results: MX.example.org; dkim=pass") == b"mx.example.org"
    assert authserv_id(b"Authentication-Results: (c) mx.example.org 1; none") == b"mx.example.org"
    assert authserv_id(b"Authentication-Results:mx.example.org") == b"mx.example.org"
    assert authserv_id(b"Authentication-Results: ") == b""
