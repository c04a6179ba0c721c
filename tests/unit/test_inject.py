"""Unit tests for eqmail.inject: prepare() and the inject / sendmail tools.

Reference: the module docstring, behaviour reference section 5.6, and
qmail-inject(8) / sendmail(8) of netqmail 1.06.
"""
from __future__ import annotations

import io
import os
import sys
import time
import types
from email.utils import parsedate_to_datetime

import pytest

from eqmail import inject
from eqmail.control import load
from eqmail.inject import MAX_HEADER, InjectError, Prepared, prepare

NOW = 946684800.0   # 2000-01-01 00:00:00 UTC
PID = 4242
MSGID = b"<20000101000000.4242.qmail@id.example.org>"


@pytest.fixture
def home(tmp_path):
    ctl = tmp_path / "control"
    ctl.mkdir()
    for name, value in (("me", "mx.example.org"), ("defaultdomain", "example.org"),
                        ("defaulthost", "example.org"), ("plusdomain", "example.com"),
                        ("idhost", "id.example.org")):
        (ctl / name).write_text(value + "\n")
    return str(tmp_path)


@pytest.fixture
def config(home):
    return load(home)


def run(config, msg: bytes, env=None, **kw) -> Prepared:
    env = {"USER": "joe"} if env is None else env
    return prepare(config, io.BytesIO(msg), env, now=NOW, pid=PID, **kw)


def fields(header: bytes):
    """{lower-case name: [values]} of a completed header (unfolded)."""
    assert header.endswith(b"\n\n") or header == b"\n"
    out = {}
    text = header[:-1].replace(b"\n ", b" ").replace(b"\n\t", b"\t")
    for line in text.split(b"\n")[:-1]:
        name, _, value = line.partition(b":")
        out.setdefault(name.decode().lower(), []).append(value.strip())
    return out


# -- rewriting -------------------------------------------------------------------------


class TestRewriting:
    def test_no_at_gets_defaulthost(self, config):
        p = run(config, b"\n", recipients=["bob"])
        assert p.recipients == ["bob@example.org"]

    def test_host_without_dot_gets_defaultdomain(self, config):
        p = run(config, b"\n", recipients=["bob@box"])
        assert p.recipients == ["bob@box.example.org"]

    def test_plus_host_gets_plusdomain(self, config):
        p = run(config, b"\n", recipients=["bob@shop+"])
        assert p.recipients == ["bob@shop.example.com"]

    def test_full_address_unchanged(self, config):
        p = run(config, b"\n", recipients=["bob@x.example.net", "<c@[10.0.0.1]>"])
        assert p.recipients == ["bob@x.example.net", "c@[10.0.0.1]"]

    def test_source_route_dropped(self, config):
        p = run(config, b"\n", recipients=["<@relay.a,@relay.b:bob@x.y>"])
        assert p.recipients == ["bob@x.y"]

    def test_env_overrides(self, config):
        env = {"USER": "joe", "QMAILDEFAULTHOST": "dh.test", "QMAILDEFAULTDOMAIN": "dd.test",
               "QMAILPLUSDOMAIN": "pd.test", "QMAILIDHOST": "idh.test"}
        p = run(config, b"\n", env=env, recipients=["a", "b@c", "d@e+"])
        assert p.recipients == ["a@dh.test", "b@c.dd.test", "d@e.pd.test"]
        assert fields(p.header)["message-id"] == [b"<20000101000000.4242.qmail@idh.test>"]
        assert p.sender == "joe@dh.test"

    def test_header_fields_rewritten(self, config):
        msg = (b"From: Joe Q. Public <joe>\nReply-To: x@y\nTo: bob, Carol <carol@shop+>\n"
               b"Subject: hi\n\nbody\n")
        p = run(config, msg)
        f = fields(p.header)
        assert f["from"] == [b"\"Joe Q. Public\" <joe@example.org>"]   # "." is not atext
        assert f["reply-to"] == [b"x@y.example.org"]
        assert f["to"] == [b"bob@example.org, Carol <carol@shop.example.com>"]
        assert f["subject"] == [b"hi"]
        assert p.recipients == ["bob@example.org", "carol@shop.example.com"]

    def test_unchanged_field_kept_byte_for_byte(self, config):
        msg = b"To: Bob   (the boss) <bob@x.example.net>\nFrom: a@b.c\n\n"
        p = run(config, msg)
        assert b"To: Bob   (the boss) <bob@x.example.net>\n" in p.header

    def test_group_kept(self, config):
        p = run(config, b"To: friends: a@b.c, d;\n\n")
        assert fields(p.header)["to"] == [b"friends: a@b.c, d@example.org;"]
        assert p.recipients == ["a@b.c", "d@example.org"]

    def test_long_field_folded(self, config):
        names = b", ".join(b"user%d" % i for i in range(20))
        p = run(config, b"To: " + names + b"\n\n")
        to = p.header.split(b"\n\n")[0].split(b"To: ", 1)[1]
        assert all(len(line) <= 78 for line in to.split(b"\n"))
        assert b"\n  " in to
        assert len(p.recipients) == 20 and p.recipients[-1] == "user19@example.org"


# -- recipient modes -------------------------------------------------------------------


MODE_MSG = b"To: t@x.y\nCc: c@x.y\nBcc: b@x.y\nApparently-To: p@x.y\nSubject: s\n\n"


class TestModes:
    def test_a_arguments_only(self, config):
        assert run(config, MODE_MSG, recipients=["r@x.y"], mode="a").recipients == ["r@x.y"]

    def test_a_without_arguments_has_no_recipients(self, config):
        with pytest.raises(InjectError) as e:
            run(config, MODE_MSG, mode="a")
        assert e.value.code == 100 and str(e.value) == "no recipients"

    def test_h_header_only(self, config):
        p = run(config, MODE_MSG, recipients=["r@x.y"], mode="h")
        assert p.recipients == ["t@x.y", "c@x.y", "b@x.y", "p@x.y"]

    def test_A_default_prefers_arguments(self, config):
        assert run(config, MODE_MSG, recipients=["r@x.y"]).recipients == ["r@x.y"]

    def test_A_default_falls_back_to_header(self, config):
        assert run(config, MODE_MSG).recipients == ["t@x.y", "c@x.y", "b@x.y", "p@x.y"]

    def test_H_both(self, config):
        p = run(config, MODE_MSG, recipients=["r@x.y"], mode="H")
        assert p.recipients == ["r@x.y", "t@x.y", "c@x.y", "b@x.y", "p@x.y"]

    def test_bad_mode(self, config):
        with pytest.raises(InjectError) as e:
            run(config, MODE_MSG, mode="x")
        assert e.value.code == 100

    def test_no_recipients(self, config):
        with pytest.raises(InjectError) as e:
            run(config, b"Subject: x\n\nbody\n")
        assert (e.value.code, str(e.value)) == (100, "no recipients")

    def test_unparsable_recipient_field_kept_without_recipients(self, config):
        p = run(config, b"To: a@b c@d\nCc: ok@x.y\n\n")
        assert p.recipients == ["ok@x.y"]
        assert b"To: a@b c@d\n" in p.header

    def test_empty_argument_refused(self, config):
        with pytest.raises(InjectError) as e:
            run(config, b"\n", recipients=[""])
        assert e.value.code == 100


# -- deleted and added fields ------------------------------------------------------------


class TestFields:
    def test_bcc_and_friends_removed(self, config):
        msg = (b"To: t@x.y\nBcc: hidden@x.y\nContent-Length: 12\nReturn-Path: <rp@x.y>\n"
               b"Resent-Bcc: rb@x.y\nSubject: s\n\n")
        p = run(config, msg, mode="h", sender="s@x.y")
        f = fields(p.header)
        for name in ("bcc", "content-length", "return-path", "resent-bcc"):
            assert name not in f
        assert b"hidden" not in p.header

    def test_return_path_gives_sender(self, config):
        p = run(config, b"Return-Path: <rp@box>\nTo: t@x.y\n\n")
        assert p.sender == "rp@box.example.org"

    def test_null_return_path(self, config):
        assert run(config, b"Return-Path: <>\nTo: t@x.y\n\n").sender == ""

    def test_sender_argument_beats_return_path(self, config):
        p = run(config, b"Return-Path: <rp@x.y>\nTo: t@x.y\n\n", sender="me")
        assert p.sender == "me@example.org"

    def test_null_sender_argument(self, config):
        assert run(config, b"To: t@x.y\n\n", sender="<>").sender == ""
        assert run(config, b"To: t@x.y\n\n", sender="").sender == ""

    def test_default_sender_from_user(self, config):
        env = {"LOGNAME": "lg", "MAILHOST": "mh.test"}
        assert run(config, b"To: t@x.y\n\n", env=env).sender == "lg@mh.test"

    def test_default_sender_qmailsuser(self, config):
        env = {"USER": "joe", "QMAILSUSER": "bounces", "QMAILSHOST": "lists"}
        p = run(config, b"To: t@x.y\n\n", env=env)
        assert p.sender == "bounces@lists.example.org"
        assert fields(p.header)["from"] == [b"joe@example.org"]

    def test_added_fields(self, config):
        p = run(config, b"To: t@x.y\nSubject: s\n\nbody\n")
        f = fields(p.header)
        assert f["message-id"] == [MSGID]
        assert f["from"] == [b"joe@example.org"]
        date = parsedate_to_datetime(f["date"][0].decode())
        assert date.timestamp() == NOW
        assert f["date"][0].decode() == inject.formatdate(NOW, localtime=True)
        assert "cc" not in f
        # new fields come first, as qmail-inject puts them
        assert p.header.startswith(b"Date: ")
        assert p.header.endswith(b"To: t@x.y\nSubject: s\n\n")

    def test_message_id_form(self, config):
        p = prepare(config, io.BytesIO(b"To: t@x.y\n\n"), {}, now=1234567890, pid=7)
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(1234567890)).encode()
        assert fields(p.header)["message-id"] == [b"<" + stamp + b".7.qmail@id.example.org>"]

    def test_existing_fields_kept(self, config):
        msg = b"From: a@b.c\nDate: whenever\nMessage-ID: <x@y>\nTo: t@x.y\n\n"
        p = run(config, msg)
        assert p.header == msg

    def test_cc_recipient_list_not_shown(self, config):
        p = run(config, b"Subject: s\n\n", recipients=["r@x.y"])
        assert fields(p.header)["cc"] == [b"recipient list not shown: ;"]
        p = run(config, b"Cc: c@x.y\n\n", recipients=["r@x.y"])
        assert fields(p.header)["cc"] == [b"c@x.y"]

    def test_from_with_name(self, config):
        env = {"QMAILUSER": "qu", "USER": "joe", "QMAILHOST": "qh.test", "NAME": 'Joe "J" Doe'}
        p = run(config, b"To: t@x.y\n\n", env=env)
        assert fields(p.header)["from"] == [b'"Joe \\"J\\" Doe" <qu@qh.test>']
        assert p.sender == "qu@qh.test"

    def test_fullname_beats_env(self, config):
        env = {"USER": "joe", "QMAILNAME": "Env Name"}
        p = run(config, b"To: t@x.y\n\n", env=env, fullname="Arg Name")
        assert fields(p.header)["from"] == [b'"Arg Name" <joe@example.org>']

    def test_non_ascii_name_encoded(self, config):
        p = run(config, b"To: t@x.y\n\n", fullname="J\u00e9r\u00f4me")
        value = fields(p.header)["from"][0]
        assert value.startswith(b"=?utf-8?") and value.isascii()

    def test_anonymous_without_user(self, config):
        p = run(config, b"To: t@x.y\n\n", env={})
        assert fields(p.header)["from"] == [b"anonymous@example.org"]
        assert p.sender == "anonymous@example.org"

    def test_qmailinject_flags(self, config):
        env = {"USER": "joe", "NAME": "Joe", "QMAILINJECT": "cfis"}
        msg = b"From: old@x.y\nMessage-ID: <old@x>\nReturn-Path: <rp@x.y>\nTo: t@x.y\n\n"
        p = run(config, msg, env=env)
        f = fields(p.header)
        assert f["from"] == [b"joe@example.org (Joe)"]
        assert f["message-id"] == [MSGID]
        assert p.sender == "joe@example.org"

    def test_verp_flags(self, config):
        p = run(config, b"To: t@x.y\n\n", env={"USER": "joe", "QMAILINJECT": "r"})
        assert p.sender == "joe-@example.org-@[]"
        p = run(config, b"To: t@x.y\n\n", env={"USER": "joe", "QMAILINJECT": "m"})
        assert p.sender == "joe-%d.%d@example.org" % (NOW, PID)

    def test_mail_followup_to(self, config, tmp_path):
        mft = tmp_path / "lists"
        mft.write_text("list@x.y\n")
        env = {"USER": "joe", "QMAILMFTFILE": str(mft)}
        p = run(config, b"To: list@x.y\nCc: c@x.y\n\n", env=env)
        assert fields(p.header)["mail-followup-to"] == [b"list@x.y, c@x.y"]
        p = run(config, b"To: other@x.y\n\n", env=env)
        assert "mail-followup-to" not in fields(p.header)


class TestResent:
    MSG = (b"From: orig@x.y\nTo: t@x.y\nDate: old\nMessage-ID: <old@x.y>\n"
           b"Resent-To: rt@x.y\nResent-Bcc: rb@box\nBcc: b@x.y\n\nbody\n")

    def test_resent_recipients_and_fields(self, config):
        p = run(config, self.MSG)
        f = fields(p.header)
        assert p.recipients == ["rt@x.y", "rb@box.example.org"]
        assert f["resent-message-id"] == [MSGID]
        assert f["resent-from"] == [b"joe@example.org"]
        assert "resent-date" in f
        assert "resent-cc" not in f and "resent-bcc" not in f and "bcc" not in f
        assert f["message-id"] == [b"<old@x.y>"] and f["date"] == [b"old"]

    def test_resent_without_resent_to(self, config):
        p = run(config, b"Resent-From: me@x.y\nTo: t@x.y\n\n", recipients=["a@x.y"])
        f = fields(p.header)
        assert f["resent-cc"] == [b"recipient list not shown: ;"]
        assert "cc" not in f and "resent-from" in f and "from" not in f


# -- reading the header ---------------------------------------------------------------


class TestReading:
    def test_crlf_input_stored_with_lf(self, config):
        p = run(config, b"To: t@x.y\r\nSubject: a\r\n\tfolded\r\n\r\nbody\r\n")
        assert b"\r" not in p.header
        assert p.header.endswith(b"To: t@x.y\nSubject: a\n\tfolded\n\n")
        assert p.body.read() == b"body\n"  # CRLF line ends become LF in the body too

    def test_folded_address_field(self, config):
        p = run(config, b"To: a@x.y,\n  b\nSubject: s\n\n")
        assert p.recipients == ["a@x.y", "b@example.org"]
        assert fields(p.header)["to"] == [b"a@x.y, b@example.org"]

    def test_body_left_unread(self, config):
        stream = io.BytesIO(b"To: t@x.y\n\nline 1\nline 2\n")
        p = prepare(config, stream, {}, now=NOW, pid=PID)
        assert stream.tell() == len(b"To: t@x.y\n\n")
        assert p.body.read() == b"line 1\nline 2\n"

    def test_non_header_line_starts_body(self, config):
        p = run(config, b"To: t@x.y\nthis is text\nmore\n")
        assert p.header.endswith(b"To: t@x.y\n\n")
        assert p.body.read() == b"this is text\nmore\n"

    def test_mbox_from_line(self, config):
        p = run(config, b"From joe Sat Jan  1 00:00:00 2000\nTo: t@x.y\n\n")
        assert b"MBOX-Line: From joe Sat Jan  1 00:00:00 2000\n" in p.header

    def test_header_without_body(self, config):
        p = run(config, b"To: t@x.y")
        assert p.header.endswith(b"To: t@x.y\n\n") and p.body.read() == b""

    def test_header_too_big(self, config):
        msg = b"To: t@x.y\n" + b"X-Pad: " + b"a" * MAX_HEADER + b"\n\nbody\n"
        with pytest.raises(InjectError) as e:
            run(config, msg)
        assert e.value.code == 100 and "too big" in str(e.value)

    def test_header_too_big_many_lines(self, config):
        msg = b"To: t@x.y\n" + b"X-Pad: 0123456789\n" * (MAX_HEADER // 18 + 1) + b"\n"
        with pytest.raises(InjectError) as e:
            run(config, msg)
        assert e.value.code == 100

    def test_header_just_under_limit(self, config):
        pad = b"X-Pad: " + b"a" * (MAX_HEADER - 10 - 8 - 1) + b"\n"
        msg = b"To: t@x.y\n" + pad + b"\nbody"
        assert len(msg) - len(b"\nbody") <= MAX_HEADER
        assert run(config, msg).recipients == ["t@x.y"]

    def test_unparsable_from(self, config):
        with pytest.raises(InjectError) as e:
            run(config, b"From: <<<\nTo: t@x.y\n\n")
        assert e.value.code == 100 and "From" in str(e.value)
        assert "\n" not in str(e.value)

    def test_unparsable_return_path(self, config):
        with pytest.raises(InjectError) as e:
            run(config, b"Return-Path: <a@b\nTo: t@x.y\n\n")
        assert e.value.code == 100

    @pytest.mark.parametrize("value", [b"=?utf-8?q?J=C3=A9?= <je>", b"\xc3\xa9 <je>",
                                       b"\xff\xfe <a@b>", b"(((", b"\"unclosed",
                                       b"<>", b"@", b"a@", b";;;", b"a@b, , ,"])
    def test_odd_to_fields_never_crash(self, config, value):
        try:
            p = run(config, b"To: " + value + b"\nFrom: f@x.y\n\n", recipients=["r@x.y"])
        except InjectError as e:
            assert e.code == 100
        else:
            assert p.header.endswith(b"\n\n")

    def test_encoded_word_name_stays_encoded(self, config):
        p = run(config, b"To: =?utf-8?q?J=C3=A9?= <je>\n\n")
        to = fields(p.header)["to"][0]
        assert to.isascii() and to.endswith(b"<je@example.org>")

    def test_raw_8bit_name_kept(self, config):
        p = run(config, b"To: \xc3\xa9\xff <je>\n\n")
        assert fields(p.header)["to"] == [b"\"\xc3\xa9\xff\" <je@example.org>"] or \
            fields(p.header)["to"] == [b"\xc3\xa9\xff <je@example.org>"]

    def test_bare_cr_in_header_refused(self, config):
        with pytest.raises(InjectError) as e:
            run(config, b"To: t@x.y\rBcc: evil@x.y\n\n")
        assert e.value.code == 100


# -- header injection -----------------------------------------------------------------


class TestInjection:
    @pytest.mark.parametrize("var", ["NAME", "QMAILNAME", "MAILNAME", "USER", "QMAILUSER",
                                     "QMAILHOST", "QMAILSUSER", "QMAILSHOST", "QMAILIDHOST",
                                     "QMAILDEFAULTHOST", "QMAILDEFAULTDOMAIN",
                                     "QMAILPLUSDOMAIN"])
    @pytest.mark.parametrize("bad", ["x\nBcc: evil@x.y", "x\r\nBcc: evil@x.y", "x\rY", "x\0"])
    def test_env_with_line_break_refused(self, config, var, bad):
        with pytest.raises(InjectError) as e:
            run(config, b"Subject: s\n\n", env={var: bad}, recipients=["r@x.y"])
        assert e.value.code == 100 and var in str(e.value)

    @pytest.mark.parametrize("bad", ["Joe\nBcc: evil@x.y", "Joe\r\nX: y", "Joe\r"])
    def test_fullname_with_line_break_refused(self, config, bad):
        with pytest.raises(InjectError) as e:
            run(config, b"Subject: s\n\n", fullname=bad, recipients=["r@x.y"])
        assert e.value.code == 100

    def test_name_with_quotes_and_specials_stays_one_field(self, config):
        p = run(config, b"To: t@x.y\n\n", fullname='a" <evil@x.y>, "b')
        f = fields(p.header)
        assert len(f["from"]) == 1
        assert f["from"][0] == b'"a\\" <evil@x.y>, \\"b" <joe@example.org>'

    def test_recipient_argument_with_line_break_refused(self, config):
        with pytest.raises(InjectError):
            run(config, b"\n", recipients=["a@b.c\nBcc: x@y.z"])
        with pytest.raises(InjectError):
            run(config, b"\n", sender="a@b.c\r\nX: y", recipients=["r@x.y"])

    def test_host_with_space_refused(self, config):
        with pytest.raises(InjectError):
            run(config, b"\n", env={"QMAILHOST": "a b"}, recipients=["r@x.y"])


# -- the tools ----------------------------------------------------------------------------


class FakePickup:
    """A stand-in for eqmail.queue.pickup that records submit() calls."""

    class SubmitError(Exception):
        def __init__(self, code, text):
            super().__init__(text)
            self.code = code
            self.text = text

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def submit(self, home, sender, recipients, header, body):
        self.calls.append((home, sender, list(recipients), header, body.read()))
        if self.fail:
            raise self.SubmitError(*self.fail)


@pytest.fixture
def pickup(monkeypatch):
    fake = FakePickup()
    module = types.ModuleType("eqmail.queue.pickup")
    module.submit = fake.submit
    module.SubmitError = FakePickup.SubmitError
    import eqmail.queue

    monkeypatch.setitem(sys.modules, "eqmail.queue.pickup", module)
    monkeypatch.setattr(eqmail.queue, "pickup", module, raising=False)
    return fake


@pytest.fixture
def stdin(monkeypatch):
    def feed(data: bytes):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    return feed


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("QMAILUSER", "MAILUSER", "LOGNAME", "QMAILHOST", "MAILHOST", "QMAILNAME",
                 "MAILNAME", "NAME", "QMAILSUSER", "QMAILSHOST", "QMAILINJECT",
                 "QMAILMFTFILE", "QMAILDEFAULTDOMAIN", "QMAILDEFAULTHOST",
                 "QMAILPLUSDOMAIN", "QMAILIDHOST", "PROTO", "RELAYCLIENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "joe")


MSG = b"To: t@x.y\nSubject: s\n\nbody\n"


class TestCmdInject:
    def test_queues(self, home, pickup, stdin, clean_env):
        stdin(MSG)
        assert inject.cmd_inject(["--home", home, "-f", "s@x.y", "r"]) == 0
        [(h, sender, rcpts, header, body)] = pickup.calls
        assert (h, sender, rcpts, body) == (home, "s@x.y", ["r@example.org"], b"body\n")
        assert header.endswith(b"To: t@x.y\nSubject: s\n\n")

    @pytest.mark.parametrize("flag,expected", [
        ("-a", ["r@x.y"]), ("-h", ["t@x.y"]), ("-A", ["r@x.y"]), ("-H", ["r@x.y", "t@x.y"])])
    def test_modes(self, home, pickup, stdin, clean_env, flag, expected):
        stdin(MSG)
        assert inject.cmd_inject(["--home", home, flag, "r@x.y"]) == 0
        assert pickup.calls[0][2] == expected

    def test_print(self, home, pickup, stdin, clean_env, capsysbinary):
        stdin(MSG)
        assert inject.cmd_inject(["--home", home, "-n"]) == 0
        out = capsysbinary.readouterr().out
        assert out.startswith(b"Return-Path: <joe@example.org>\nDate: ")
        assert b"Message-ID: <" in out and b".qmail@id.example.org>\n" in out
        assert out.endswith(b"From: joe@example.org\nTo: t@x.y\nSubject: s\n\nbody\n")
        assert pickup.calls == []

    def test_no_recipients(self, home, pickup, stdin, clean_env, capsys):
        stdin(b"Subject: s\n\n")
        assert inject.cmd_inject(["--home", home]) == 100
        assert capsys.readouterr().err == "eqmail inject: fatal: no recipients\n"

    def test_bad_option(self, home, pickup, stdin, clean_env, capsys):
        stdin(MSG)
        assert inject.cmd_inject(["--home", home, "-x"]) == 100
        assert "usage" in capsys.readouterr().err
        assert pickup.calls == []

    def test_help(self, capsys):
        assert inject.cmd_inject(["--help"]) == 0
        assert "qmail-inject" in capsys.readouterr().out

    @pytest.mark.parametrize("code,exit", [(11, 100), (31, 100), (40, 100), (41, 111),
                                           (53, 111), (71, 111), (81, 111), (1, 111)])
    def test_submit_errors(self, home, pickup, stdin, clean_env, capsys, code, exit):
        pickup.fail = (code, "qq trouble (#4.3.0)")
        stdin(MSG)
        assert inject.cmd_inject(["--home", home]) == exit
        assert capsys.readouterr().err == "eqmail inject: fatal: qq trouble (#4.3.0)\n"

    def test_bad_home(self, tmp_path, pickup, stdin, clean_env):
        stdin(MSG)
        assert inject.cmd_inject(["--home", str(tmp_path / "nothing")]) == 111


class TestCmdSendmail:
    def test_arguments_only(self, home, pickup, stdin, clean_env):
        stdin(MSG)
        assert inject.cmd_sendmail(["--home", home, "-i", "r@x.y"]) == 0
        assert pickup.calls[0][2] == ["r@x.y"]

    def test_t(self, home, pickup, stdin, clean_env):
        stdin(MSG)
        assert inject.cmd_sendmail(["--home", home, "-t"]) == 0
        assert pickup.calls[0][2] == ["t@x.y"]

    def test_t_with_arguments(self, home, pickup, stdin, clean_env):
        stdin(MSG)
        assert inject.cmd_sendmail(["--home", home, "-ti", "r@x.y"]) == 0
        assert pickup.calls[0][2] == ["r@x.y", "t@x.y"]

    @pytest.mark.parametrize("args", [["-f", "s@x.y"], ["-fs@x.y"], ["-r", "s@x.y"]])
    def test_sender(self, home, pickup, stdin, clean_env, args):
        stdin(b"Subject: s\n\n")
        assert inject.cmd_sendmail(["--home", home] + args + ["r@x.y"]) == 0
        _, sender, _, header, _ = pickup.calls[0]
        assert sender == "s@x.y"
        assert fields(header)["from"] == [b"s@x.y"]   # qmail's sendmail: From follows -f

    @pytest.mark.parametrize("args", [["-F", "Joe Doe"], ["-FJoe Doe"]])
    def test_fullname(self, home, pickup, stdin, clean_env, args):
        stdin(b"Subject: s\n\n")
        assert inject.cmd_sendmail(["--home=" + home] + args + ["r@x.y"]) == 0
        assert fields(pickup.calls[0][3])["from"] == [b'"Joe Doe" <joe@example.org>']

    def test_ignored_options(self, home, pickup, stdin, clean_env):
        stdin(MSG)
        args = ["-oi", "-oem", "-oee", "-odb", "-odi", "-oQ/var/spool", "-o", "i", "-B8BITMIME",
                "-B", "7BIT", "-v", "-i", "-bm", "-em", "-N", "never", "-Rhdrs", "-Vid", "r@x.y"]
        assert inject.cmd_sendmail(["--home", home] + args) == 0
        assert pickup.calls[0][2] == ["r@x.y"]

    def test_options_stop_at_first_recipient(self, home, pickup, stdin, clean_env):
        stdin(MSG)
        assert inject.cmd_sendmail(["--home", home, "r@x.y", "-t"]) == 0
        assert pickup.calls[0][2] == ["r@x.y", "-t@example.org"]

    @pytest.mark.parametrize("args", [["-Q"], ["-C", "cf"], ["-bd"], ["-bt"], ["--frob"], ["-f"]])
    def test_usage_errors(self, home, pickup, stdin, clean_env, capsys, args):
        stdin(MSG)
        assert inject.cmd_sendmail(["--home", home] + args) == 100
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sendmail: ")
        assert pickup.calls == []

    def test_no_recipients(self, home, pickup, stdin, clean_env, capsys):
        stdin(MSG)
        assert inject.cmd_sendmail(["--home", home]) == 100
        assert capsys.readouterr().err == "sendmail: fatal: no recipients\n"

    def test_submit_error_prefix(self, home, pickup, stdin, clean_env, capsys):
        pickup.fail = (31, "mail server permanently rejected message (#5.3.0)")
        stdin(MSG)
        assert inject.cmd_sendmail(["--home", home, "r@x.y"]) == 100
        assert capsys.readouterr().err == \
            "sendmail: fatal: mail server permanently rejected message (#5.3.0)\n"

    def test_bp_runs_qread(self, home, monkeypatch, clean_env):
        import eqmail.cli

        seen = []
        monkeypatch.setattr(eqmail.cli, "cmd_qread", lambda argv: seen.append(argv) or 7)
        assert inject.cmd_sendmail(["--home", home, "-bp"]) == 7
        assert seen == [["--home", home]]

    def test_bs_runs_smtpd_with_relayclient(self, home, monkeypatch, clean_env):
        import eqmail.cli

        seen = []

        def smtpd(argv):
            seen.append((argv, os.environ.get("RELAYCLIENT")))
            return 0

        monkeypatch.setattr(eqmail.cli, "cmd_smtpd", smtpd)
        monkeypatch.setattr(os, "environ", dict(os.environ))
        assert inject.cmd_sendmail(["--home", home, "-bs"]) == 0
        assert seen == [(["--home", home], "")]


def test_body_crlf_conversion_across_chunk_boundaries(config):
    # a CR at the end of one read and its LF at the start of the next
    body = b"a" * 65535 + b"\r\n" + b"lone\rcr\r\n" + b"b" * 70000 + b"\r"
    p = prepare(config, io.BytesIO(b"To: t@x.y\n\n" + body), {}, now=NOW, pid=PID)
    out = b""
    while True:
        chunk = p.body.read(65536)
        if not chunk:
            break
        out += chunk
    assert out == body.replace(b"\r\n", b"\n")


def test_local_dotless_hosts_are_not_completed(config):
    # eqmail's change: localhost and control/locals stay as they are
    p = run(config, b"To: joe@localhost, ann@mx.example.org, bob@box\n\nx\n")
    assert p.recipients == ["joe@localhost", "ann@mx.example.org", "bob@box.example.org"]
