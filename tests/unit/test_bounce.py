"""Unit tests for eqmail.queue.bounce: bounce_envelope() and build_bounce().

Reference: the module docstring (FORMAT, SECURITY, LIMITS), behaviour
reference section 5.5 (qmail bounces, double and triple bounces), RFC 3464
(delivery-status fields), RFC 6522 (multipart/report), RFC 3834.
"""
from __future__ import annotations

import email.policy
import email.utils
import os
import re
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.control import load
from eqmail.queue.store import encode_queue_file
from eqmail.queue.bounce import (DOUBLE_BOUNCE_SENDER, HEADER_LIMIT, MAX_FIELD, Failure,
                                 bounce_envelope, build_bounce)

ME = "mx.example.org"
ARRIVAL = 1700000000.0
NOW = 1700000600.0
HEADER = (b"Received: (qmail 123 invoked from network); 14 Nov 2023 22:13:20 +0000\n"
          b"From: Alice <alice@example.com>\n"
          b"To: joe@example.org\n"
          b"Subject: hello\n")
BODY = b"SECRET-BODY-LINE\nmore body\n"
FIELDS_PER_MESSAGE = {"Reporting-MTA", "Arrival-Date", "X-Eqmail-Queue-ID"}
FIELDS_PER_RECIPIENT = {"Final-Recipient", "Action", "Status", "Remote-MTA",
                        "Diagnostic-Code"}


def queue_file(data):
    """A version 2 queue file holding `data` (what build_bounce reads)."""
    return encode_queue_file(data, 1700000000, 0, 42, "alice@example.com",
                             ["joe@example.org"])


def make_home(root, **files):
    ctl = os.path.join(str(root), "control")
    os.makedirs(ctl, exist_ok=True)
    files.setdefault("me", ME)
    for name, text in files.items():
        with open(os.path.join(ctl, name), "w") as f:
            f.write(text + "\n")
    return str(root)


@pytest.fixture
def config(tmp_path):
    return load(make_home(tmp_path / "home", bouncefrom="bouncer",
                          bouncehost="bounce.example.org", doublebounceto="dbl",
                          doublebouncehost="dblhost.example.org",
                          idhost="ids.example.org"))


@pytest.fixture
def mess(tmp_path):
    path = tmp_path / "mess"
    path.write_bytes(queue_file(HEADER + b"\n" + BODY))
    return str(path)


def build(config, mess, failures, sender="alice@example.com", msgid="1700000000.42.7"):
    return build_bounce(config, sender, msgid, ARRIVAL, failures, mess, now=NOW)


def parse(data):
    return BytesParser(policy=email.policy.default).parsebytes(data)


def parts(msg):
    return list(msg.iter_parts())


def status_blocks(msg):
    """The delivery-status part as [per-message, per-recipient...] dicts."""
    ds = parts(msg)[1]
    assert ds.get_content_type() == "message/delivery-status"
    blocks = ds.get_payload()
    return [dict(b.items()) for b in blocks], [list(b.keys()) for b in blocks]


def check_wire(data):
    """LF only, no line beyond RFC 5322's 998 octets, parseable."""
    assert b"\r" not in data
    assert b"\0" not in data
    assert all(len(line) <= 998 for line in data.split(b"\n"))
    return parse(data)


NOUSER = Failure("joe@example.org", "5.1.1",
                 "Sorry, no mailbox here by that name. (#5.1.1)")


# -- bounce_envelope ------------------------------------------------------------------


def test_envelope_normal_sender(config):
    assert bounce_envelope(config, "alice@example.com") == ("", ["alice@example.com"])


def test_envelope_double_bounce(config):
    assert bounce_envelope(config, "") == (DOUBLE_BOUNCE_SENDER, ["dbl@dblhost.example.org"])
    assert DOUBLE_BOUNCE_SENDER == "#@[]"


def test_envelope_triple_bounce_is_discarded(config):
    assert bounce_envelope(config, "#@[]") is None


def test_envelope_double_bounce_defaults(tmp_path):
    config = load(make_home(tmp_path))
    assert bounce_envelope(config, "") == ("#@[]", ["postmaster@" + ME])


# -- the message ----------------------------------------------------------------------


def test_top_level_header(config, mess):
    data = build(config, mess, [NOUSER])
    msg = check_wire(data)
    assert msg["From"] == "bouncer@bounce.example.org"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "failure notice"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<[^<>@\s]+@ids\.example\.org>", str(msg["Message-ID"]))
    assert msg["Date"].datetime.timestamp() == NOW
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    for name in ("Date", "From", "To", "Subject", "Message-ID", "Auto-Submitted",
                 "MIME-Version", "Content-Type"):
        assert len(msg.get_all(name)) == 1, name
    assert not msg.defects


def test_human_text(config, mess):
    msg = parse(build(config, mess, [NOUSER]))
    assert parts(msg)[0].get_content() == (
        "Hi. This is the eqmail program at bounce.example.org.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n"
        "\n"
        "<joe@example.org>:\n"
        "Sorry, no mailbox here by that name. (#5.1.1)\n"
        "\n")


def test_double_bounce(config, mess):
    data = build(config, mess, [NOUSER], sender="")
    msg = check_wire(data)
    assert msg["To"] == "dbl@dblhost.example.org"
    text = parts(msg)[0].get_content()
    assert text.startswith("Hi. This is the eqmail program at bounce.example.org.\n"
                           "I tried to deliver a bounce message to this address, "
                           "but the bounce bounced!\n\n<joe@example.org>:\n")
    assert "I'm afraid" not in text


def test_triple_bounce_is_not_built(config, mess):
    with pytest.raises(ValueError):
        build(config, mess, [NOUSER], sender=DOUBLE_BOUNCE_SENDER)


def test_no_failures_is_an_error(config, mess):
    with pytest.raises(ValueError):
        build(config, mess, [])


def test_delivery_status_fields(config, mess):
    local = Failure("joe@example.org", "5.1.1", "no mailbox here\nby that name (#5.1.1)")
    remote = Failure("bob@remote.example", "5.7.1", "Remote host said: 550 no relay",
                     remote_mta="mx.remote.example",
                     diagnostic="smtp; 550 5.7.1 relaying denied")
    msg = parse(build(config, mess, [local, remote]))
    blocks, names = status_blocks(msg)
    assert len(blocks) == 3
    assert blocks[0] == {"Reporting-MTA": "dns; " + ME,
                         "Arrival-Date": blocks[0]["Arrival-Date"],
                         "X-Eqmail-Queue-ID": "1700000000.42.7"}
    assert email.utils.parsedate_to_datetime(blocks[0]["Arrival-Date"]).timestamp() == ARRIVAL
    assert names[1] == ["Final-Recipient", "Action", "Status", "Diagnostic-Code"]
    assert blocks[1] == {"Final-Recipient": "rfc822; joe@example.org",
                         "Action": "failed", "Status": "5.1.1",
                         "Diagnostic-Code": "x-eqmail; no mailbox here by that name (#5.1.1)"}
    assert names[2] == ["Final-Recipient", "Action", "Status", "Remote-MTA",
                        "Diagnostic-Code"]
    assert blocks[2] == {"Final-Recipient": "rfc822; bob@remote.example",
                         "Action": "failed", "Status": "5.7.1",
                         "Remote-MTA": "dns; mx.remote.example",
                         "Diagnostic-Code": "smtp; 550 5.7.1 relaying denied"}


def test_remote_mta_only_when_given(config, mess):
    f = Failure("bob@remote.example", "5.1.1", "said no", diagnostic="smtp; 550 no")
    blocks, _ = status_blocks(parse(build(config, mess, [f])))
    assert "Remote-MTA" not in blocks[1]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 no"


def test_bad_status_becomes_500(config, mess):
    fs = [Failure("a@x.org", "550", "t"), Failure("b@x.org", "5.1.1\nX: y", "t"),
          Failure("c@x.org", "4.4.7", "t")]
    blocks, _ = status_blocks(parse(build(config, mess, fs)))
    assert [b["Status"] for b in blocks[1:]] == ["5.0.0", "5.0.0", "4.4.7"]


def test_duplicate_recipients_listed_once(config, mess):
    fs = [Failure("joe@example.org", "5.1.1", "first"),
          Failure("ann@example.org", "5.2.2", "full"),
          Failure("joe@example.org", "5.0.0", "second"),
          Failure("joe@EXAMPLE.ORG", "5.0.0", "third")]
    msg = parse(build(config, mess, fs))
    blocks, _ = status_blocks(msg)
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; joe@example.org", "rfc822; ann@example.org"]
    assert blocks[1]["Status"] == "5.1.1"
    text = parts(msg)[0].get_content()
    assert text.count("<joe@example.org>:") == 1
    assert "first" in text and "second" not in text and "third" not in text


# -- the returned header --------------------------------------------------------------


def test_header_part_is_the_header_without_body(config, mess):
    data = build(config, mess, [NOUSER])
    msg = parse(data)
    assert parts(msg)[2].get_content() == HEADER.decode()
    assert b"SECRET-BODY-LINE" not in data


def test_header_part_is_bounded_at_a_line(config, tmp_path):
    line = b"X-Filler: " + b"a" * 88 + b"\n"             # 99 octets
    header = HEADER + line * 2000                        # ~200 KB, beyond the limit
    path = tmp_path / "big"
    path.write_bytes(queue_file(header + b"\n" + BODY))
    data = build(config, str(path), [NOUSER])
    msg = check_wire(data)
    got = parts(msg)[2].get_content().encode()
    assert len(got) <= HEADER_LIMIT
    assert len(got) > HEADER_LIMIT - len(line)
    assert got.endswith(b"\n")
    assert header.startswith(got)                       # cut at a line end
    assert b"SECRET-BODY-LINE" not in data


@pytest.mark.parametrize("size,kept", [(HEADER_LIMIT, True), (HEADER_LIMIT + 1, False)])
def test_header_part_limit_is_exact(config, tmp_path, size, kept):
    # The first line is `size` octets with its LF: kept only within the limit.
    first = b"X-A: " + b"a" * (size - 6) + b"\n"
    assert len(first) == size
    path = tmp_path / "exact"
    path.write_bytes(queue_file(first + b"X-B: b\n\n" + BODY))
    got = parts(check_wire(build(config, str(path), [NOUSER])))[2].get_content().encode()
    assert got == (first if kept else b"")


def test_header_part_one_huge_line(config, tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(queue_file(b"X-Huge: " + b"b" * (3 * HEADER_LIMIT) + b"\n\n" + BODY))
    msg = check_wire(build(config, str(path), [NOUSER]))
    assert parts(msg)[2].get_content() == ""


def test_header_part_message_without_body(config, tmp_path):
    path = tmp_path / "nobody"
    path.write_bytes(queue_file(b"Subject: no body\nX-Last: no newline"))
    msg = parse(build(config, str(path), [NOUSER]))
    assert parts(msg)[2].get_content() == "Subject: no body\nX-Last: no newline\n"


def test_header_part_crlf_and_8bit(config, tmp_path):
    path = tmp_path / "crlf"
    path.write_bytes(queue_file(b"Subject: caf\xc3\xa9\r\nX-Latin1: \xe9t\xe9\r\n\r\nbody\r\n"))
    data = build(config, str(path), [NOUSER])
    msg = check_wire(data)
    assert parts(msg)[2].get_content() == "Subject: caf\u00e9\nX-Latin1: \ufffdt\ufffd\n"
    assert b"body" not in data.split(b"message/delivery-status")[1]


def test_unreadable_message_raises(config, tmp_path):
    with pytest.raises(OSError):
        build(config, str(tmp_path / "missing"), [NOUSER])


# -- hostile values -------------------------------------------------------------------


def test_crlf_cannot_inject_fields(config, mess):
    evil = Failure("joe@example.org\r\nBcc: victim@example.net", "5.1.1",
                   "no such user\r\nX-Injected: 1\rX-Injected-Too: 2\n\n<fake@example.org>:\nok",
                   remote_mta="mx.example.net\r\nX-Injected: 3",
                   diagnostic="smtp; 550 no\r\n\r\nX-Injected: 4\nFinal-Recipient: rfc822; x@y")
    data = build(config, mess, [evil], sender="alice@example.com\nBcc: victim@example.net")
    msg = check_wire(data)
    assert "Bcc" not in msg
    assert set(msg.keys()) == {"Date", "From", "To", "Subject", "Message-ID",
                               "Auto-Submitted", "MIME-Version", "Content-Type"}
    assert "\n" not in msg["To"]
    blocks, names = status_blocks(msg)
    assert len(blocks) == 2
    assert set(names[0]) == FIELDS_PER_MESSAGE
    assert names[1] == ["Final-Recipient", "Action", "Status", "Remote-MTA",
                        "Diagnostic-Code"]
    for value in blocks[1].values():
        assert "\n" not in value and "\r" not in value
    assert blocks[1]["Diagnostic-Code"].startswith("smtp; 550 no X-Injected: 4")
    assert blocks[1]["Remote-MTA"] == "dns; mx.example.net X-Injected: 3"
    # Outside the text/plain body no line may start a field of its own.
    top = data.split(b"\n\n", 1)[0]
    status = data.split(b"Content-Type: message/delivery-status\n", 1)[1].split(b"\n--", 1)[0]
    for line in (top + b"\n" + status).split(b"\n"):
        assert not line.startswith((b"X-Injected", b"Bcc", b"Final-Recipient: rfc822; x@y"))
    text = parts(msg)[0].get_content()
    # The report cannot open a second recipient block: empty lines become "/".
    assert "\n/\n<fake@example.org>:" in text
    assert re.findall(r"(?m)^<.*>:$", text) == [
        "<joe@example.org__Bcc: victim@example.net>:", "<fake@example.org>:"]
    assert text.count("\n\n") == 2


def test_default_diagnostic_folds_line_breaks(config, mess):
    f = Failure("joe@example.org", "5.2.2", "line one\nline two\r\nline three")
    blocks, _ = status_blocks(parse(build(config, mess, [f])))
    assert blocks[1]["Diagnostic-Code"] == "x-eqmail; line one line two line three"


def test_long_values_are_bounded(config, mess):
    f = Failure("joe@example.org", "5.0.0", "x" * 5000, remote_mta="h" * 5000,
                diagnostic="smtp; " + "y" * 5000)
    data = build(config, mess, [f])
    msg = check_wire(data)
    blocks, _ = status_blocks(msg)
    assert len(blocks[1]["Diagnostic-Code"]) <= MAX_FIELD
    assert blocks[1]["Diagnostic-Code"].endswith("...")
    assert len(blocks[1]["Remote-MTA"]) <= MAX_FIELD
    assert "x" * 5000 in parts(msg)[0].get_content().replace("\n", "")


def test_non_ascii_does_not_crash(config, mess):
    fs = [Failure("j\u00f6rg@b\u00fccher.example", "5.1.1", "kein Postfach f\u00fcr j\u00f6rg",
                  remote_mta="mx.b\u00fccher.example",
                  diagnostic="smtp; 550 Empf\u00e4nger unbekannt"),
          Failure("lone\udce9@example.org", "5.1.1", "surrogate \udcff here")]
    data = build(config, mess, fs, sender="s\u00e9n@example.com")
    msg = check_wire(data)
    assert data.isascii()
    text = parts(msg)[0].get_content()
    assert "<j\u00f6rg@b\u00fccher.example>:" in text
    assert "kein Postfach f\u00fcr j\u00f6rg" in text
    assert "s\u00e9n@example.com" in str(msg["To"])
    blocks, _ = status_blocks(msg)
    assert blocks[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 Empf\\x{E4}nger unbekannt"
    assert blocks[2]["Final-Recipient"] == "rfc822; lone?@example.org"


def test_quoted_sender(config, mess):
    msg = parse(build(config, mess, [NOUSER], sender='a b"c@example.com'))
    assert msg["To"].addresses[0].addr_spec == '"a b\\"c"@example.com'


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rcpt=st.text(min_size=1, max_size=60), text=st.text(max_size=200),
       diag=st.one_of(st.none(), st.text(max_size=100)),
       mta=st.one_of(st.none(), st.text(max_size=40)),
       sender=st.text(max_size=40))
def test_any_input_gives_a_clean_report(config, mess, rcpt, text, diag, mta, sender):
    if sender == DOUBLE_BOUNCE_SENDER:
        sender = ""
    f = Failure(rcpt, "5.1.1", text, remote_mta=mta, diagnostic=diag)
    data = build(config, mess, [f, NOUSER], sender=sender)
    msg = check_wire(data)
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks, names = status_blocks(msg)
    assert set(names[0]) == FIELDS_PER_MESSAGE
    for n in names[1:]:
        assert set(n) <= FIELDS_PER_RECIPIENT and len(n) == len(set(n))
    assert blocks[-1]["Final-Recipient"] == "rfc822; joe@example.org" or len(blocks) == 2
    assert parts(msg)[2].get_content() == HEADER.decode()
