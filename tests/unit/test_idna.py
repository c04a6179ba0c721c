"""SMTPUTF8 and IDNA pieces: the address helpers (A-labels, downgrade, UTF-8
validity), the session's MAIL parameter and Received protocol, and the
queue's envelope keeping the flag."""
from __future__ import annotations

import re

import pytest

from eqmail import address
from eqmail.queue.store import decode_envelope, encode_envelope
from eqmail.smtp import reply
from test_session import ACCEPT_RE_E, R, env, qhome, write_control, Env  # noqa: F401


@pytest.mark.parametrize("given,key", [
    ("Example.ORG", "example.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),         # UTS 46 maps case
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    (".bücher.example", ".xn--bcher-kva.example"),       # a suffix entry
    ("b\udcfccher.example", "b\udcfccher.example"),      # not UTF-8: as it is
])
def test_domain_key(given, key):
    assert address.domain_key(given) == key


@pytest.mark.parametrize("given,out", [
    ("a@example.org", "a@example.org"),
    ("a@bücher.example", "a@xn--bcher-kva.example"),
    ("jösé@example.org", None),                         # needs SMTPUTF8
    ("a@b\udcfccher.example", None),                     # not a valid IDN
    ("", ""),
])
def test_ascii_address(given, out):
    assert address.ascii_address(given) == out


def test_valid_utf8_and_return_path_quoting():
    assert address.valid_utf8("jösé") and not address.valid_utf8("j\udcf6")
    assert address.quote_address("jösé@x.org") == "jösé@x.org"      # RFC 6532 atext
    assert address.quote_address("j\udcf6@x.org") == '"j\udcf6"@x.org'  # qmail's quoting


def test_envelope_keeps_params_and_older_records_parse():
    data, offsets = encode_envelope(1, 2, 3, "jösé@x.org", ["ünï@y.org"],
                                    params={"utf8": "1"})
    item = decode_envelope("m", data)
    assert item.params == {"utf8": "1"} and item.recipients == ["ünï@y.org"]
    assert data[offsets[0]:offsets[0] + 1] == b"T"
    plain, _ = encode_envelope(1, 2, 3, "a@x.org", ["b@y.org"])
    assert decode_envelope("m", plain).params is None


def test_smtputf8_mail_is_queued_with_its_flag(env):
    out = env.talk("EHLO x\r\nMAIL FROM:<jösé@b.example> SMTPUTF8 BODY=8BITMIME\r\n"
                   "RCPT TO:<ünï@example.org>\r\nDATA\r\nSubject: Grüße\r\n\r\nx\r\n.\r\n"
                   .encode("utf-8"))
    assert b"250-SMTPUTF8" in out or b"250 SMTPUTF8" in out
    assert re.match(ACCEPT_RE_E, out[-1]), out
    (item,) = env.queued()
    assert item.params == {"utf8": "1"}
    assert item.sender == "jösé@b.example" and item.recipients == ["ünï@example.org"]
    stored = env.message(item)
    assert re.search(rb"by mx\.example\.org with UTF8SMTP; ", stored), stored[:300]


def test_without_smtputf8_8bit_addresses_pass_as_in_qmail(env):
    out = env.talk("HELO x\r\nMAIL FROM:<jösé@b.example>\r\nRCPT TO:<ünï@example.org>\r\n"
                   "DATA\r\nx\r\n.\r\n".encode("utf-8"))
    assert out[2:4] == [b"250 ok", b"250 ok"], out
    (item,) = env.queued()
    assert item.params is None


def test_idn_in_rcpthosts_matches_either_form(qhome):
    write_control(qhome, rcpthosts="bücher.example\n.xn--caf-dma.example\n")
    e = Env(qhome)
    out = e.talk("EHLO x\r\nMAIL FROM:<a@b> SMTPUTF8\r\nRCPT TO:<a@xn--bcher-kva.example>\r\n"
                 "RCPT TO:<a@BÜCHER.example>\r\nRCPT TO:<a@mx.café.example>\r\n"
                 "RCPT TO:<a@other.example>\r\n".encode("utf-8"))
    assert out[-4:] == [b"250 2.1.5 ok", b"250 2.1.5 ok", b"250 2.1.5 ok",
                        R(reply.NOGATEWAY, True)], out
