"""The SMTP session over an in-memory transport, with a real queue.

Behaviour reference sections 2.2-2.6 and test vectors T1-T5, T9-T13, T17.
Each test drives `Session.run()` with scripted client bytes, delivered in
pieces the test chooses, and inspects the replies and the queue.
"""
from __future__ import annotations

import os
import re
import time

import gevent
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import as_test_user, give_to_user, user_dir
from eqmail import control
from eqmail.queue.store import Store, open_message
from eqmail.smtp import reply, session
from eqmail.smtp.session import Session, date822, received_line

DATE_RE = rb"\d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d [+-]\d{4}"

ENV = {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "198.51.100.1", "TCPLOCALPORT": "25"}


# -- plumbing -------------------------------------------------------------------


class Transport:
    """recv(n)/send(bytes) over scripted client pieces.

    `pieces` is a list of bytes objects, each returned by one recv() call
    (cut to n when longer).  After the script: EOF (b"") or, with `block`,
    a recv() that never returns (a silent client).
    """

    def __init__(self, pieces, block=False):
        self.pieces = [p for p in pieces if p]
        self.block = block
        self.out = bytearray()
        self.recv_calls = 0

    def recv(self, n):
        self.recv_calls += 1
        if not self.pieces:
            if self.block:
                gevent.sleep(3600)
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece

    def send(self, data):
        assert isinstance(data, (bytes, bytearray))
        self.out += data

    def lines(self):
        text = bytes(self.out)
        assert text == b"" or text.endswith(b"\r\n"), text[-200:]
        return text.split(b"\r\n")[:-1]


def bytewise(data: bytes):
    return [data[i:i + 1] for i in range(len(data))]


def write_control(home, **files):
    cdir = os.path.join(home, "control")
    os.makedirs(cdir, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(cdir, name), "w") as f:
            f.write(text)


def make_qhome(home):
    write_control(home,
                  me="mx.example.org\n",
                  locals="mx.example.org\nlocalhost\n",
                  rcpthosts="mx.example.org\nexample.org\n.example.net\n",
                  badmailfrom="spam@bad.com\n@evil.com\n.spammer.org\n")
    return home


@pytest.fixture
def qhome(tmp_path):
    return make_qhome(str(tmp_path / "home"))


class Env:
    """A home, its config and its queue; `talk()` runs one session."""

    def __init__(self, home):
        self.home = home
        self.store = Store.open(home)

    def config(self):
        return control.load(self.home)

    def talk(self, data=b"", pieces=None, env=None, block=False, bytewise_=False,
             stopping=None):
        if pieces is None:
            pieces = bytewise(data) if bytewise_ else [data]
        t = Transport(pieces, block=block)
        e = dict(ENV)
        if env:
            e.update(env)
        s = Session(self.config(), self.store, t.recv, t.send, e, stopping=stopping)
        s.run()
        self.last_session = s
        return t.lines()

    def queued(self):
        return list(self.store.items())

    def message(self, item):
        with open_message(self.store.message_path(item.id)) as f:
            return f.read()

    def queue_files(self):
        return {d: sorted(os.listdir(os.path.join(self.store.qdir, d)))
                for d in ("mess", "tmp")}

    def queue_empty(self):
        return self.queue_files() == {"mess": [], "tmp": []}


@pytest.fixture
def env(qhome):
    return Env(qhome)


@pytest.fixture
def user_env():
    """`env` in a directory the test user owns and can reach, for
    as_test_user() (root's tmp_path is out of its reach)."""
    with user_dir("eqmail-session-") as d:
        e = Env(make_qhome(os.path.join(d, "home")))
        give_to_user(d)
        yield e


def R(r, esmtp=False):
    """The wire line(s) of a reply constant, without the final CRLF."""
    return r.render(esmtp)[:-2]


GREETING = b"220 mx.example.org ESMTP"
#: The EHLO keywords of a plain session (no TLS, no AUTH, no databytes).
EHLO_EXT = [b"PIPELINING", b"8BITMIME", b"SIZE 0", b"ENHANCEDSTATUSCODES", b"CHUNKING",
            b"SMTPUTF8", b"DSN"]
#: Where the replies after an EHLO begin: the greeting, the EHLO lines.
AFTER_EHLO = 2 + len(EHLO_EXT)
ACCEPT_RE = rb"250 ok (\d+) qp (\S+)$"
ACCEPT_RE_E = rb"250 2\.0\.0 ok (\d+) qp (\S+)$"


def body_of(stored: bytes) -> bytes:
    """The stored message without its Received line (two lines)."""
    assert stored.startswith(b"Received: from ")
    first = stored.index(b"\n")
    second = stored.index(b"\n", first + 1)
    assert stored[first + 1:first + 5] == b"  by"
    return stored[second + 1:]


def send_mail(data_lines: bytes, rcpt=b"x@example.org", helo=b"HELO x\r\n", sender=b"a@b.c"):
    return (helo + b"MAIL FROM:<" + sender + b">\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n"
            + data_lines)


# -- greeting, HELO, EHLO, fixed replies ----------------------------------------------


def test_greeting_then_quit(env):
    out = env.talk(b"QUIT\r\n")
    assert out == [GREETING, b"221 mx.example.org"]


def test_greeting_and_eof(env):
    assert env.talk(b"") == [GREETING]


def test_smtpgreeting_used_for_greeting_helo_ehlo_quit(env):
    write_control(env.home, smtpgreeting="mx.example.org NO UCE\n")
    out = env.talk(b"HELO x.y\r\nEHLO x.y\r\nQUIT\r\n")
    assert out[0] == b"220 mx.example.org NO UCE ESMTP"
    assert out[1] == b"250 mx.example.org NO UCE"
    assert out[2] == b"250-mx.example.org NO UCE"
    # QUIT after EHLO: enhanced status in front
    assert out[-1] == b"221 2.0.0 mx.example.org NO UCE"


def test_helo_reply(env):
    out = env.talk(b"HELO x.y\r\nQUIT\r\n")
    assert out == [GREETING, b"250 mx.example.org", b"221 mx.example.org"]


def test_ehlo_lines(env):
    out = env.talk(b"EHLO x\r\n")
    assert out == [GREETING, b"250-mx.example.org", b"250-PIPELINING", b"250-8BITMIME",
                   b"250-SIZE 0", b"250-ENHANCEDSTATUSCODES", b"250-CHUNKING",
                   b"250-SMTPUTF8", b"250 DSN"]


def test_ehlo_bytewise(env):
    out = env.talk(b"ehlo x\r\nnoop\r\n", bytewise_=True)
    assert out[1:] == [b"250-mx.example.org", b"250-PIPELINING", b"250-8BITMIME",
                       b"250-SIZE 0", b"250-ENHANCEDSTATUSCODES", b"250-CHUNKING",
                       b"250-SMTPUTF8", b"250 DSN", b"250 2.0.0 ok"]


def test_fixed_replies_helo_client_exact_qmail_text(env):
    out = env.talk(b"HELO x\r\nVRFY foo\r\nNOOP\r\nHELP\r\nEXPN bar\r\nRSET\r\n")
    assert out[2:] == [b"252 send some mail, i'll try my best", b"250 ok",
                       R(reply.HELP), b"500 unrecognised (#5.5.2)", b"250 flushed"]
    assert R(reply.HELP).startswith(b"214 ")


def test_fixed_replies_ehlo_client_enhanced(env):
    out = env.talk(b"EHLO x\r\nVRFY foo\r\nNOOP\r\nHELP\r\nEXPN bar\r\nRSET\r\n")
    assert out[AFTER_EHLO:] == [b"252 2.1.5 send some mail, i'll try my best", b"250 2.0.0 ok",
                       R(reply.HELP, True), b"500 5.5.2 unrecognised (#5.5.2)",
                       b"250 2.0.0 flushed"]
    assert out[AFTER_EHLO + 2].startswith(b"214 2.0.0 ")


def test_fixed_replies_before_any_helo(env):
    out = env.talk(b"NOOP\r\nvrfy x\r\nFOO\r\nrset\r\n")
    assert out[1:] == [b"250 ok", b"252 send some mail, i'll try my best",
                       b"500 unrecognised (#5.5.2)", b"250 flushed"]


def test_verb_case_and_spaces(env):
    out = env.talk(b"helo x\r\nmail from:<a@b.c>\r\nRcPt   TO:<x@example.org>\r\n")
    assert out[1:] == [b"250 mx.example.org", b"250 ok", b"250 ok"]


def test_ehlo_then_helo_switches_back_to_plain_replies(env):
    out = env.talk(b"EHLO x\r\nNOOP\r\nHELO x\r\nNOOP\r\n")
    assert out[AFTER_EHLO] == b"250 2.0.0 ok"
    assert out[AFTER_EHLO + 1:] == [b"250 mx.example.org", b"250 ok"]


def test_nogateway_rendering_helo_and_ehlo(env):
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<w@other.com>\r\n")
    assert out[3] == R(reply.NOGATEWAY)
    assert out[3] == b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
    out = env.talk(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<w@other.com>\r\n")
    assert out[-1] == R(reply.NOGATEWAY, True)
    assert out[-1] == (b"553 5.7.1 sorry, that domain isn't in my list of allowed "
                       b"rcpthosts (#5.7.1)")
    assert out[-2] == b"250 2.1.0 ok"


# -- T4: sequence errors ---------------------------------------------------------------


def test_t4_sequence_errors(env):
    out = env.talk(b"HELO x\r\nRCPT TO:<a@example.org>\r\nMAIL FROM:<>\r\nDATA\r\n")
    assert out[2:] == [b"503 MAIL first (#5.5.1)", b"250 ok", b"503 RCPT first (#5.5.1)"]
    assert env.queue_empty()


def test_data_without_mail(env):
    out = env.talk(b"HELO x\r\nDATA\r\n")
    assert out[2] == b"503 MAIL first (#5.5.1)"


def test_t4_sequence_errors_ehlo(env):
    out = env.talk(b"EHLO x\r\nRCPT TO:<a@example.org>\r\nMAIL FROM:<>\r\nDATA\r\n")
    assert out[AFTER_EHLO:] == [b"503 5.5.1 MAIL first (#5.5.1)", b"250 2.1.0 ok",
                       b"503 5.5.1 RCPT first (#5.5.1)"]


@pytest.mark.parametrize("reset", [b"RSET", b"HELO y", b"EHLO y"])
def test_rset_helo_ehlo_end_the_transaction(env, reset):
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@example.org>\r\n"
                   + reset + b"\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    assert out[-2] == R(reply.MAIL_FIRST, reset.startswith(b"EHLO"))
    assert out[-1] == R(reply.MAIL_FIRST, reset.startswith(b"EHLO"))
    assert env.queue_empty()


def test_second_mail_starts_new_transaction(env):
    data = (b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@example.org>\r\n"
            b"MAIL FROM:<second@b.c>\r\nDATA\r\n")
    out = env.talk(data)
    assert out[-2] == b"250 ok"
    assert out[-1] == b"503 RCPT first (#5.5.1)"


# -- T5: rcpthosts, T17: envelope -------------------------------------------------------


def test_t5_rcpthosts(env):
    data = (b"HELO x\r\nMAIL FROM:<a@b.c>\r\n"
            b"RCPT TO:<x@example.org>\r\nRCPT TO:<y@sub.example.net>\r\n"
            b"RCPT TO:<z@example.net>\r\nRCPT TO:<w@other.com>\r\n"
            b"DATA\r\nhello\r\n.\r\nQUIT\r\n")
    out = env.talk(data)
    assert out[3:7] == [b"250 ok", b"250 ok", R(reply.NOGATEWAY), R(reply.NOGATEWAY)]
    assert out[7] == b"354 go ahead"
    assert re.match(ACCEPT_RE, out[8]), out[8]
    items = env.queued()
    assert len(items) == 1
    assert items[0].sender == "a@b.c"
    assert items[0].recipients == ["x@example.org", "y@sub.example.net"]
    assert items[0].done == [False, False]
    assert out[8].split()[-1].decode() == items[0].id
    assert out[-1] == b"221 mx.example.org"


def test_rcpthosts_case_insensitive(env):
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<X@EXAMPLE.ORG>\r\n"
                   b"RCPT TO:<y@Deep.Sub.Example.NET>\r\n")
    assert out[3:] == [b"250 ok", b"250 ok"]


def test_t17_envelope_addresses(env):
    data = (b"HELO x\r\nMAIL FROM:a@b\r\nRCPT TO:postmaster\r\n"
            b"RCPT TO: <\"x y\"@example.org>\r\nRCPT TO:<@r.a,@r.b:u@example.org>\r\n"
            b"DATA\r\nbody\r\n.\r\n")
    out = env.talk(data)
    assert out[2:6] == [b"250 ok"] * 4
    assert re.match(ACCEPT_RE, out[7])
    (item,) = env.queued()
    loaded = env.store.load(item.id)
    assert loaded.sender == "a@b"
    assert loaded.recipients == ["postmaster", "x y@example.org", "u@example.org"]
    assert loaded.done == [False, False, False]


def test_null_sender_stored(env):
    out = env.talk(b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nhi\r\n.\r\n")
    assert re.match(ACCEPT_RE, out[-1])
    (item,) = env.queued()
    assert item.sender == ""


def test_relayclient_appended(env):
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@other.com>\r\nDATA\r\nhi\r\n.\r\n",
                   env={"RELAYCLIENT": ".relay"})
    assert out[3] == b"250 ok"
    (item,) = env.queued()
    assert item.recipients == ["u@other.com.relay"]


def test_badmailfrom_refused_at_rcpt(env):
    out = env.talk(b"HELO x\r\nMAIL FROM:<joe@mail.spammer.org>\r\nRCPT TO:<x@example.org>\r\n"
                   b"MAIL FROM:<joe@spammer.org>\r\nRCPT TO:<x@example.org>\r\n")
    assert out[2:] == [b"250 ok", R(reply.BADMAILFROM), b"250 ok", b"250 ok"]


# -- T9: databytes ----------------------------------------------------------------------


@pytest.fixture(params=["env", "control"])
def limited(request, env):
    """databytes = 100, from DATABYTES or from control/databytes."""
    if request.param == "env":
        return env, {"DATABYTES": "100"}
    write_control(env.home, databytes="100\n")
    return env, {}


def test_t9_ehlo_advertises_size(limited):
    env, e = limited
    out = env.talk(b"EHLO x\r\n", env=e)
    assert b"250-SIZE 100" in out


def test_t9_size_param(limited):
    env, e = limited
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b> SIZE=101\r\nMAIL FROM:<a@b> SIZE=100\r\n", env=e)
    assert out[2] == R(reply.TOO_BIG)
    assert out[2] == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)"
    assert out[3] == b"250 ok"


def test_t9_99_bytes_accepted(limited):
    env, e = limited
    out = env.talk(send_mail(b"A" * 99 + b"\r\n.\r\n"), env=e)
    assert re.match(ACCEPT_RE, out[-1]), out[-1]
    (item,) = env.queued()
    assert body_of(env.message(item)) == b"A" * 99 + b"\n"


def test_t9_100_bytes_too_big_and_session_goes_on(limited):
    env, e = limited
    out = env.talk(send_mail(b"A" * 100 + b"\r\n.\r\nNOOP\r\nQUIT\r\n"), env=e)
    assert out[-3] == R(reply.TOO_BIG)
    assert out[-2:] == [b"250 ok", b"221 mx.example.org"]
    assert env.queue_empty()


def test_t9_size_counts_after_unstuffing(limited):
    # ".." + 98 A is stored as "." + 98 A + LF = 100 bytes
    env, e = limited
    out = env.talk(send_mail(b".." + b"A" * 98 + b"\r\n.\r\n"), env=e)
    assert re.match(ACCEPT_RE, out[-1]), out[-1]


def test_databytes_env_wins_over_control(env):
    write_control(env.home, databytes="100\n")
    out = env.talk(b"EHLO x\r\n", env={"DATABYTES": "50"})
    assert b"250-SIZE 50" in out
    out = env.talk(send_mail(b"A" * 60 + b"\r\n.\r\n"), env={"DATABYTES": "50"})
    assert out[-1] == R(reply.TOO_BIG)


def test_no_databytes_size_param_ignored(env):
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b> SIZE=999999999\r\n")
    assert out[2] == b"250 ok"


# -- T10: bare LF ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"line1\nline2\r\n.\r\n",
    b"Subject: x\r\n\r\nhi\r\n.\nMAIL FROM:<e@x>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nevil\r\n.\r\n",
    b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<e@x>\r\n",
    b"Subject: x\r\n\r\nhi\r\n\n.\n\r\n.\r\n",
])
def test_t10_bare_lf_in_data(env, data):
    out = env.talk(send_mail(data + b"NOOP\r\n"))
    assert out[-1] == R(reply.BARE_LF)
    assert out[-1] == b"451 See http://pobox.com/~djb/docs/smtplf.html."
    assert out[-2] == b"354 go ahead"  # nothing answered after the 451
    assert env.queue_empty()


def test_t10_bare_lf_ehlo(env):
    out = env.talk(send_mail(b"a\nb\r\n.\r\nNOOP\r\n", helo=b"EHLO x\r\n"))
    assert out[-1] == R(reply.BARE_LF, True)
    assert out[-1] == b"451 4.6.0 See http://pobox.com/~djb/docs/smtplf.html."


def test_t10_bare_lf_bytewise(env):
    out = env.talk(send_mail(b"line1\nline2\r\n.\r\nNOOP\r\n"), bytewise_=True)
    assert out[-1] == R(reply.BARE_LF)
    assert env.queue_empty()


def test_bare_lf_in_commands_accepted(env):
    out = env.talk(b"HELO x\nMAIL FROM:<a@b>\nRCPT TO:<x@example.org>\nDATA\n"
                   b"hello\r\n.\r\nNOOP\nQUIT\n")
    assert out[1:4] == [b"250 mx.example.org", b"250 ok", b"250 ok"]
    assert out[4] == b"354 go ahead"
    assert re.match(ACCEPT_RE, out[5])
    assert out[6:] == [b"250 ok", b"221 mx.example.org"]
    (item,) = env.queued()
    assert body_of(env.message(item)) == b"hello\n"
    # the HELO argument did not keep a stray CR or LF
    assert b"(HELO x)" in env.message(item)


# -- T11: stored body ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_t11_stored_body(env, mode):
    out = env.talk(send_mail(b"a\rb\r\n..dot\r\n.\r\n"), bytewise_=(mode == "bytewise"))
    assert re.match(ACCEPT_RE, out[-1]), out[-1]
    (item,) = env.queued()
    assert body_of(env.message(item)) == b"a\rb\n.dot\n"
    assert env.store.load(item.id).size == len(env.message(item))


_data_line = st.one_of(
    st.lists(st.sampled_from([b".", b"\r", b"x", b" ", b"\xff"]), max_size=6).map(b"".join),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")))


@given(st.lists(_data_line, max_size=6), st.lists(_data_line, max_size=30),
       st.lists(st.integers(min_value=1, max_value=4000), max_size=8))
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_body_is_stored_as_sent_however_it_arrives(env, head, body, cuts):
    """Dot-stuffed lines ending in CRLF come out as the lines with LF, read
    line by line (headers) or in blocks (the body), in any pieces."""
    lines = head + [b""] + body
    wire = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
    data = send_mail(wire + b".\r\nNOOP\r\n")
    pieces, at = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        if cut > at:
            pieces.append(data[at:cut])
            at = cut
    for item in env.queued():
        env.store.remove(item)
    out = env.talk(pieces=pieces)
    assert re.match(ACCEPT_RE, out[-2]), out
    assert out[-1] == b"250 ok"
    (item,) = env.queued()
    assert body_of(env.message(item)) == b"".join(x + b"\n" for x in lines)


def test_empty_message_and_dot_only_end(env):
    out = env.talk(send_mail(b".\r\n"))
    assert re.match(ACCEPT_RE, out[-1])
    (item,) = env.queued()
    assert body_of(env.message(item)) == b""


@pytest.mark.parametrize("data,stored", [
    (b" .\r\n.\r\n", b" .\n"),
    (b".\r.\r\n.\r\n", b"\r.\n"),        # ".\r." is not the end marker
    (b"...\r\n.\r\n", b"..\n"),
    (b"x\r\n\r\n\r\n.\r\n", b"x\n\n\n"),
    (b"caf\xc3\xa9 \xff\x00\r\n.\r\n", b"caf\xc3\xa9 \xff\x00\n"),
])
def test_data_transparency(env, data, stored):
    out = env.talk(send_mail(data))
    assert re.match(ACCEPT_RE, out[-1]), out
    (item,) = env.queued()
    assert body_of(env.message(item)) == stored


def test_two_messages_in_one_session(env):
    data = send_mail(b"first\r\n.\r\n") + (
        b"MAIL FROM:<b@c>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nsecond\r\n.\r\n")
    out = env.talk(data, bytewise_=True)
    assert re.match(ACCEPT_RE, out[5]) and re.match(ACCEPT_RE, out[-1])
    items = env.queued()
    assert sorted(body_of(env.message(i)) for i in items) == [b"first\n", b"second\n"]
    assert {i.sender: i.recipients for i in items} == {"a@b.c": ["x@example.org"],
                                                       "b@c": ["y@example.org"]}
    assert env.last_session.messages == 2


# -- T12: hop count --------------------------------------------------------------------


def _hops(received, delivered):
    return (b"Received: x\r\n" * received + b"Delivered-To: y\r\n" * delivered
            + b"Subject: s\r\n\r\nbody\r\n.\r\n")


def test_t12_looping(env):
    out = env.talk(send_mail(_hops(99, 1)))
    assert out[-1] == R(reply.LOOPING)
    assert out[-1] == b"554 too many hops, this message is looping (#5.4.6)"
    assert env.queue_empty()


def test_t12_98_plus_1_accepted(env):
    out = env.talk(send_mail(_hops(98, 1)))
    assert re.match(ACCEPT_RE, out[-1]), out[-1]
    (item,) = env.queued()
    assert body_of(env.message(item)).count(b"Received: x\n") == 98


def test_hops_case_and_prefix(env):
    # "received" and "delivered" at the start, any case; Received-SPF counts
    data = (b"RECEIVED: a\r\n" * 40 + b"received-spf: b\r\n" * 40 + b"DELIVERED-to: c\r\n" * 20
            + b"\r\nbody\r\n.\r\n")
    out = env.talk(send_mail(data))
    assert out[-1] == R(reply.LOOPING)


def test_hops_only_in_header(env):
    data = b"Subject: s\r\n\r\n" + b"Received: x\r\n" * 120 + b".\r\n"
    out = env.talk(send_mail(data))
    assert re.match(ACCEPT_RE, out[-1]), out[-1]


# -- T13: the Received line --------------------------------------------------------------


@pytest.fixture
def tz():
    old = os.environ.get("TZ")

    def set_tz(name):
        os.environ["TZ"] = name
        time.tzset()

    yield set_tz
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_date822(tz):
    tz("UTC0")
    assert date822(0) == "1 Jan 1970 00:00:00 +0000"
    assert date822(1795300896) == "21 Nov 2026 22:41:36 +0000"
    tz("EST5")
    assert date822(0) == "31 Dec 1969 19:00:00 -0500"
    tz("IST-5:30")
    assert date822(0) == "1 Jan 1970 05:30:00 +0530"
    tz("NST3:30")
    assert date822(0) == "31 Dec 1969 20:30:00 -0330"


def test_date822_now():
    assert re.fullmatch(DATE_RE, date822().encode())


def test_received_line_t13(tz):
    tz("UTC0")
    line = received_line("Client.Example", "x", "ident", "192.0.2.1", "mx.example.org",
                         "SMTP", when=0)
    assert line == (b"Received: from Client.Example (HELO x) (ident@192.0.2.1)\n"
                    b"  by mx.example.org with SMTP; 1 Jan 1970 00:00:00 +0000\n")
    line = received_line("client.example", "client.example", None, "192.0.2.1",
                         "mx.example.org", "SMTP", when=0)
    assert line == (b"Received: from client.example (192.0.2.1)\n"
                    b"  by mx.example.org with SMTP; 1 Jan 1970 00:00:00 +0000\n")


def test_received_line_helo_case_ignored_and_no_helo(tz):
    tz("UTC0")
    a = received_line("Client.Example", "CLIENT.example", None, "192.0.2.1", "h", "SMTP", 0)
    assert a.startswith(b"Received: from Client.Example (192.0.2.1)\n  by h with SMTP; ")
    b = received_line("unknown", None, None, "192.0.2.1", "h", "SMTP", 0)
    assert b.startswith(b"Received: from unknown (192.0.2.1)\n")


def test_received_line_sanitised(tz):
    tz("UTC0")
    line = received_line("h", "<fake+user@evil> x\ty", "a b", "192.0.2.1", "mx", "SMTP", 0)
    assert line.startswith(b"Received: from h (HELO ?fake+user@evil??x?y) (a?b@192.0.2.1)\n")
    line = received_line("h", "caf\u00e9\udcff", None, "1.2.3.4", "mx", "SMTP", 0)
    assert line.startswith(b"Received: from h (HELO caf??) (1.2.3.4)\n")
    assert session.safe("aZ09.@%+/=:-_ !\r\n") == "aZ09.@%+/=:-?????"


def _stored_received(env, helo, extra_env):
    out = env.talk(send_mail(b"hi\r\n.\r\n", helo=helo), env=extra_env)
    assert re.match(ACCEPT_RE, out[-1]) or re.match(ACCEPT_RE_E, out[-1]), out
    (item,) = env.queued()
    return env.message(item)


def test_t13_stored_received_line(env):
    msg = _stored_received(env, b"HELO x\r\n", {"TCPREMOTEHOST": "Client.Example",
                                                "TCPLOCALHOST": "mx.example.org",
                                                "TCPREMOTEINFO": "ident"})
    assert re.fullmatch(rb"Received: from Client\.Example \(HELO x\) \(ident@192\.0\.2\.1\)\n"
                        rb"  by mx\.example\.org with SMTP; " + DATE_RE + rb"\nhi\n", msg), msg


def test_t13_stored_received_line_helo_equals_host(env):
    msg = _stored_received(env, b"HELO client.example\r\n",
                           {"TCPREMOTEHOST": "client.example", "TCPLOCALHOST": "mx.example.org"})
    assert re.fullmatch(rb"Received: from client\.example \(192\.0\.2\.1\)\n"
                        rb"  by mx\.example\.org with SMTP; " + DATE_RE + rb"\nhi\n", msg), msg


def test_received_line_defaults_and_ehlo_proto(env):
    # no TCPREMOTEHOST: "unknown"; EHLO still says "with SMTP"
    msg = _stored_received(env, b"EHLO [1.2.3.4]\r\n", {"TCPLOCALHOST": "local.example"})
    assert re.fullmatch(rb"Received: from unknown \(HELO \?1\.2\.3\.4\?\) \(192\.0\.2\.1\)\n"
                        rb"  by local\.example with SMTP; " + DATE_RE + rb"\nhi\n", msg), msg


def test_received_line_without_helo(env):
    out = env.talk(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nhi\r\n.\r\n",
                   env={"TCPREMOTEHOST": "c.example", "TCPLOCALHOST": "mx.example.org"})
    assert re.match(ACCEPT_RE, out[-1])
    (item,) = env.queued()
    assert env.message(item).startswith(b"Received: from c.example (192.0.2.1)\n  by mx")


# -- long DATA lines and chunk boundaries ------------------------------------------------


def _deliver(env, data, pieces=None):
    full = send_mail(data)
    if pieces is not None:
        head = send_mail(b"")
        pieces = [head] + pieces(data)
    out = env.talk(full if pieces is None else b"", pieces=pieces)
    assert re.match(ACCEPT_RE, out[-1]), out[-3:]
    (item,) = env.queued()
    return body_of(env.message(item))


def test_long_data_line_intact(env):
    line = bytes(range(33, 127)) * 200  # 18800 octets, no CR/LF
    body = _deliver(env, line + b"\r\n.\r\n")
    assert body == line + b"\n"


def test_long_data_line_in_odd_recv_pieces(env):
    line = b"0123456789abcdef" * 1100  # 17600 octets
    data = b"Subject: long\r\n\r\n" + line + b"\r\n" + line[:5000] + b"\r\n.\r\n"

    def pieces(d):
        return [d[i:i + 777] for i in range(0, len(d), 777)]

    body = _deliver(env, data, pieces)
    assert body == b"Subject: long\n\n" + line + b"\n" + line[:5000] + b"\n"


def test_bare_cr_at_data_chunk_boundary_kept(env):
    n = session.DATA_CHUNK - 1
    data = b"x" * n + b"\r" + b"y" * 10 + b"\r\n.\r\n"
    assert _deliver(env, data) == b"x" * n + b"\r" + b"y" * 10 + b"\n"


def test_crlf_split_at_data_chunk_boundary(env):
    n = session.DATA_CHUNK - 1
    data = b"x" * n + b"\r\n" + b"next\r\n.\r\n"
    assert _deliver(env, data) == b"x" * n + b"\n" + b"next\n"


def test_crlf_split_at_data_chunk_boundary_then_end(env):
    n = session.DATA_CHUNK - 1
    assert _deliver(env, b"x" * n + b"\r\n.\r\n") == b"x" * n + b"\n"


def test_bare_cr_then_dot_at_chunk_boundary_is_not_the_end(env):
    n = session.DATA_CHUNK - 1
    data = b"x" * n + b"\r.\r\n" + b"after\r\n.\r\n"
    assert _deliver(env, data) == b"x" * n + b"\r.\n" + b"after\n"


def test_cr_cr_lf_at_chunk_boundary(env):
    n = session.DATA_CHUNK - 1
    data = b"x" * n + b"\r\r\nz\r\n.\r\n"
    assert _deliver(env, data) == b"x" * n + b"\r\nz\n"


def test_dot_after_full_chunk_is_data(env):
    n = session.DATA_CHUNK
    data = b"x" * n + b".\r\n" + b"x" * n + b"..\r\n.\r\n"
    assert _deliver(env, data) == b"x" * n + b".\n" + b"x" * n + b"..\n"


def test_crlf_split_across_recv_pieces(env):
    data = b"one\r\ntwo\r\n.\r\n"

    def pieces(d):
        # every CR and LF in its own recv() piece
        out, cur = [], b""
        for i in range(len(d)):
            ch = d[i:i + 1]
            if ch in (b"\r", b"\n"):
                if cur:
                    out.append(cur)
                out.append(ch)
                cur = b""
            else:
                cur += ch
        return out + ([cur] if cur else [])

    assert _deliver(env, data, pieces) == b"one\ntwo\n"


def test_crlf_split_across_recv_pieces_at_chunk_boundary(env):
    n = session.DATA_CHUNK - 1
    line = b"q" * n

    def pieces(d):
        return [line + b"\r", b"\n", b"tail\r", b"\n.\r", b"\n"]

    assert _deliver(env, line + b"\r\ntail\r\n.\r\n", pieces) == line + b"\ntail\n"


def test_bare_lf_right_after_full_chunk(env):
    n = session.DATA_CHUNK
    out = env.talk(send_mail(b"x" * n + b"\nmore\r\n.\r\n"))
    assert out[-1] == R(reply.BARE_LF)
    assert env.queue_empty()


def test_big_message_streamed_and_size(env):
    # more than the store's write chunk, many lines
    lines = [(b"%06d " % i) + b"z" * 90 for i in range(2000)]
    data = b"\r\n".join(lines) + b"\r\n.\r\n"
    body = _deliver(env, data)
    assert body == b"\n".join(lines) + b"\n"
    (item,) = env.queued()
    assert env.store.load(item.id).size == len(env.message(item))


def test_databytes_with_long_lines(env):
    write_control(env.home, databytes="20000\n")
    line = b"a" * 19999
    assert _deliver(env, line + b"\r\n.\r\n") == line + b"\n"
    env.store.remove(env.queued()[0])
    out = env.talk(send_mail(b"a" * 20000 + b"\r\n.\r\nQUIT\r\n"))
    assert out[-2] == R(reply.TOO_BIG)
    assert env.queue_empty()


# -- limits ---------------------------------------------------------------------------


def test_command_line_of_1000_octets_accepted(env):
    line = b"NOOP " + b"x" * (session.MAX_LINE - 7) + b"\r\n"
    assert len(line) == 1000
    out = env.talk(b"HELO x\r\n" + line)
    assert out[-1] == b"250 ok"


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_command_line_too_long_then_session_continues(env, mode):
    line = b"NOOP " + b"x" * 5000 + b"\r\n"
    out = env.talk(b"HELO x\r\n" + line + b"NOOP\r\nQUIT\r\n", bytewise_=(mode == "bytewise"))
    assert out[2:] == [R(reply.LINE_TOO_LONG), b"250 ok", b"221 mx.example.org"]
    assert out[2] == b"500 line too long (#5.5.2)"


def test_command_line_1001_octets_too_long(env):
    line = b"NOOP " + b"x" * (session.MAX_LINE - 6) + b"\r\n"
    assert len(line) == 1001
    out = env.talk(b"EHLO x\r\n" + line + b"NOOP\r\n")
    assert out[-2:] == [R(reply.LINE_TOO_LONG, True), b"250 2.0.0 ok"]


def test_long_line_rest_not_executed(env):
    # the tail of a long line must not run as a command of its own
    line = b"NOOP " + b"x" * 995 + b"QUIT\r\n"
    out = env.talk(b"HELO x\r\n" + line + b"NOOP\r\n")
    assert out[2:] == [R(reply.LINE_TOO_LONG), b"250 ok"]


def test_too_many_recipients(env):
    rcpts = b"".join(b"RCPT TO:<u%d@example.org>\r\n" % i for i in range(session.MAX_RCPT + 1))
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b>\r\n" + rcpts + b"DATA\r\nhi\r\n.\r\n")
    replies = out[3:3 + session.MAX_RCPT + 1]
    assert replies[:-1] == [b"250 ok"] * session.MAX_RCPT
    assert replies[-1] == R(reply.TOO_MANY_RCPT)
    assert replies[-1] == b"452 too many recipients (#4.5.3)"
    assert re.match(ACCEPT_RE, out[-1])
    (item,) = env.queued()
    assert len(item.recipients) == 1000
    assert item.recipients[0] == "u0@example.org" and item.recipients[-1] == "u999@example.org"


def test_too_many_errors(env):
    out = env.talk(b"HELO x\r\n" + b"EXPN x\r\n" * 30)
    errs = out[2:]
    assert errs[-1] == R(reply.TOO_MANY_ERRORS)
    assert errs[-1].startswith(b"421 ")
    # 20 refused commands: the 20th is answered with 421, then the hang-up
    assert errs[:-1] == [b"500 unrecognised (#5.5.2)"] * (session.MAX_ERRORS - 1)


def test_too_many_errors_mixed_refusals(env):
    data = (b"EHLO x\r\nMAIL FROM:<a@b>\r\n"
            + b"RCPT TO:<w@other.com>\r\nFOO\r\n" * 9 + b"RCPT TO:<bad\r\n" + b"NOOP\r\n"
            + b"RCPT TO:<v@other.com>\r\nNOOP\r\n")
    out = env.talk(data)
    assert out[-1] == R(reply.TOO_MANY_ERRORS, True)
    assert out[-1] == b"421 4.7.0 too many errors, closing (#4.7.0)"
    assert out.count(b"250 2.0.0 ok") == 1  # only the NOOP before the 20th refusal


def test_timeout_waiting_for_command(env):
    write_control(env.home, timeoutsmtpd="1\n")
    t0 = time.monotonic()
    out = env.talk(b"HELO x\r\n", block=True)
    assert time.monotonic() - t0 < 5
    assert out == [GREETING, b"250 mx.example.org", R(reply.TIMEOUT)]
    assert out[-1] == b"451 timeout (#4.4.2)"


def test_timeout_in_data(env):
    write_control(env.home, timeoutsmtpd="1\n")
    out = env.talk(send_mail(b"some data\r\n", helo=b"EHLO x\r\n"), block=True)
    assert out[-2:] == [b"354 go ahead", R(reply.TIMEOUT, True)]
    assert env.queue_empty()


def test_timeout_in_middle_of_command_line(env):
    write_control(env.home, timeoutsmtpd="1\n")
    out = env.talk(b"HELO x\r\nNOO", block=True)
    assert out[-1] == R(reply.TIMEOUT)


@pytest.mark.parametrize("data", [
    b"partial line",
    b"Subject: x\r\n\r\nline\r\n",
    b"Subject: x\r\n\r\n" + b"y" * 70000 + b"\r\n" + b"z" * 70000,
    b"Subject: x\r\n\r\n" + b"y" * (session.DATA_CHUNK - 1) + b"\r",
])
def test_eof_in_data_leaves_nothing(env, data):
    out = env.talk(send_mail(data))
    assert out[-1] == b"354 go ahead"
    assert env.queue_empty()
    assert env.store.open_drafts == set()


def test_eof_in_middle_of_command(env):
    out = env.talk(b"HELO x\r\nNOOP")
    assert out == [GREETING, b"250 mx.example.org"]


def test_connection_reset(env):
    def recv(n):
        raise ConnectionResetError("reset")

    t = Transport([])
    s = Session(env.config(), env.store, recv, t.send, dict(ENV))
    s.run()
    assert t.lines() == [GREETING]


@pytest.mark.parametrize("verb", [b"GET / HTTP/1.0", b"POST /x HTTP/1.1", b"CONNECT a:25 HTTP/1.1"])
def test_http_first_line_closes(env, verb):
    out = env.talk(verb + b"\r\nHost: x\r\n\r\nNOOP\r\n")
    assert out == [GREETING, R(reply.UNRECOGNISED)]


def test_get_after_helo_is_just_unrecognised(env):
    out = env.talk(b"HELO x\r\nGET / HTTP/1.0\r\nNOOP\r\n")
    assert out[2:] == [R(reply.UNRECOGNISED), b"250 ok"]


def test_stopping_sends_shutdown(env):
    out = env.talk(b"HELO x\r\nNOOP\r\nNOOP\r\n", stopping=lambda: True)
    assert out == [GREETING, b"250 mx.example.org", R(reply.SHUTDOWN)]


def test_pipelined_replies_all_sent(env):
    data = (b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<y@example.org>\r\n"
            b"DATA\r\n")
    t = Transport([data, b"hi\r\n.\r\nQUIT\r\n"])
    s = Session(env.config(), env.store, t.recv, t.send, dict(ENV))
    s.run()
    out = t.lines()
    assert out[AFTER_EHLO:AFTER_EHLO + 4] == [b"250 2.1.0 ok", b"250 2.1.5 ok",
                                              b"250 2.1.5 ok", b"354 go ahead"]
    assert re.match(ACCEPT_RE_E, out[AFTER_EHLO + 4])
    assert out[AFTER_EHLO + 5] == b"221 2.0.0 mx.example.org"


# -- queue failures -----------------------------------------------------------------


def test_queue_unusable_at_data(env):
    # the queue's directories are gone: DATA gets 451 qqt failure, no 354
    import shutil
    shutil.rmtree(env.store.mess)
    out = env.talk(send_mail(b"NOOP\r\n"))
    assert out[-2] == R(reply.QQT_FAILURE)
    assert out[-2] == b"451 qqt failure (#4.3.0)"
    assert b"354 go ahead" not in out
    assert out[-1] == b"250 ok"  # the session goes on


def test_commit_failure_gets_451(env, monkeypatch):
    import errno

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "refused", dst)

    monkeypatch.setattr("eqmail.queue.store.os.link", refuse)
    out = env.talk(send_mail(b"hi\r\n.\r\nNOOP\r\n"))
    assert out[-2] == b"451 qq trouble creating files in queue (#4.3.0)"
    assert out[-1] == b"250 ok"
    assert os.listdir(env.store.mess) == [] and os.listdir(env.store.tmp) == []


def test_read_only_mess_dir_gets_451(user_env):
    # root ignores permissions: as root, the session runs as the unprivileged test user
    env = user_env
    os.chmod(env.store.mess, 0o500)
    try:
        out = as_test_user(env.talk, send_mail(b"hi\r\n.\r\n"))
    finally:
        os.chmod(env.store.mess, 0o700)
    assert R(reply.QQT_FAILURE) in out
    assert b"354 go ahead" not in out
    assert env.queue_empty()
    # with mess/ writable again the same user queues the message
    out = as_test_user(env.talk, send_mail(b"hi\r\n.\r\n"))
    assert re.match(ACCEPT_RE, out[-1]) and len(env.queued()) == 1


def test_timeout_while_skipping_long_line(env):
    write_control(env.home, timeoutsmtpd="1\n")
    out = env.talk(b"HELO x\r\nNOOP " + b"x" * 2000, block=True)
    assert out[-1] == R(reply.TIMEOUT)


def test_databytes_env_not_a_number_ignored(env):
    write_control(env.home, databytes="100\n")
    out = env.talk(b"EHLO x\r\n", env={"DATABYTES": "abc"})
    assert b"250-SIZE 100" in out


def test_databytes_env_unicode_digit_ignored(env):
    write_control(env.home, databytes="100\n")
    out = env.talk(b"EHLO x\r\n", env={"DATABYTES": "\u00b2"})
    assert b"250-SIZE 100" in out


def test_empty_forward_path_refused(env):
    # qmail accepts RCPT TO:<>; RFC 5321 has no empty forward-path
    out = env.talk(b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<>\r\nRCPT TO:<a@example.org>\r\n")
    assert out[2:] == [b"250 ok", R(reply.SYNTAX), b"250 ok"]
