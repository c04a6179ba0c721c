"""CHUNKING (RFC 3030): BDAT over the in-memory transport of test_session,
with a real queue.  BDAT stores what DATA stores for the same message,
however the chunks and the reads are cut; a chunk that cannot be taken is
read to its end and never taken for commands."""
from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.smtp import reply
from test_session import (ACCEPT_RE_E, Env, R, body_of, env, make_qhome,  # noqa: F401
                          qhome, write_control)

HEAD = b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@example.org>\r\n"


def bdat(*chunks: bytes, last_empty: bool = False) -> bytes:
    """BDAT commands for `chunks`, the last one LAST (or an empty LAST)."""
    out = b""
    for i, c in enumerate(chunks):
        last = i == len(chunks) - 1 and not last_empty
        out += b"BDAT %d%s\r\n" % (len(c), b" LAST" if last else b"") + c
    if last_empty:
        out += b"BDAT 0 LAST\r\n"
    return out


def test_chunking_is_offered_and_a_message_comes_in_chunks(env):
    out = env.talk(HEAD + bdat(b"Subject: x\r\n\r\nhel", b"lo\r\n", last_empty=True)
                   + b"QUIT\r\n")
    assert b"250-CHUNKING" in out or b"250 CHUNKING" in out
    assert out[-5:-2] == [b"250 2.1.5 ok", b"250 2.0.0 17 octets received",
                          b"250 2.0.0 4 octets received"], out
    assert re.match(ACCEPT_RE_E, out[-2]), out
    (item,) = env.queued()
    assert body_of(env.message(item)) == b"Subject: x\n\nhello\n"
    assert item.sender == "a@b.c" and item.recipients == ["x@example.org"]


def _data_stores(env, message: bytes) -> bytes:
    stuffed = b"".join(b"." + l if l.startswith(b".") else l
                       for l in message.splitlines(keepends=True))
    out = env.talk(HEAD + b"DATA\r\n" + stuffed + b".\r\nQUIT\r\n")
    assert re.match(ACCEPT_RE_E, out[-2]), out
    item = env.queued()[-1]
    return body_of(env.message(item))


lines = st.lists(st.binary(max_size=120).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"), max_size=30)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=lines, body=lines, cuts=st.lists(st.integers(0, 5000), max_size=6),
       piece=st.integers(1, 300))
def test_bdat_stores_what_data_stores(tmp_path_factory, header, body, cuts, piece):
    env = Env(make_qhome(str(tmp_path_factory.mktemp("home"))))
    message = b"".join(header) + b"\r\n" + b"".join(body)
    expected = _data_stores(env, message)
    bounds = sorted({min(c, len(message)) for c in cuts} | {0, len(message)})
    chunks = [message[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]
    wire = HEAD + bdat(*chunks) + b"QUIT\r\n"
    pieces = [wire[i:i + piece] for i in range(0, len(wire), piece)]
    out = env.talk(pieces=pieces)
    assert re.match(ACCEPT_RE_E, out[-2]), out
    got = [body_of(env.message(i)) for i in env.queued()]
    assert expected in got and got.count(expected) == 2, (expected, got)


def test_a_chunk_without_a_transaction_is_read_not_obeyed(env):
    # the chunk's bytes look like commands: none of them is run
    out = env.talk(b"EHLO x\r\n" + bdat(b"MAIL FROM:<e@vil>\r\nRCPT TO:<x@example.org>\r\n")
                   + b"NOOP\r\n")
    assert out[-2:] == [R(reply.MAIL_FIRST, True), b"250 2.0.0 ok"], out
    assert env.queued() == []


def test_bdat_after_helo_is_unrecognised_and_its_data_skipped(env):
    out = env.talk(b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@example.org>\r\n"
                   + bdat(b"RSET\r\n") + b"NOOP\r\n")
    assert out[-2:] == [R(reply.UNRECOGNISED), b"250 ok"], out
    assert env.queued() == []


def test_bare_lf_in_a_chunk_is_refused_as_in_data(env):
    out = env.talk(HEAD + bdat(b"a\nb\r\n") + b"NOOP\r\n")
    assert out[-1] == R(reply.BARE_LF, True), out
    assert env.queued() == [] and env.queue_empty()


def test_databytes_a_chunk_that_cannot_fit_ends_the_connection(qhome):
    write_control(qhome, databytes="100\n")
    env = Env(qhome)
    out = env.talk(HEAD + b"BDAT 2000000000 LAST\r\n" + b"x" * 100)
    assert out[-1] == R(reply.TOO_BIG.closing(), True), out
    assert env.queued() == [] and env.queue_empty()


def test_databytes_over_in_a_chunk_fails_the_message_and_rset_mends_it(qhome):
    write_control(qhome, databytes="100\n")
    env = Env(qhome)
    out = env.talk(HEAD + b"BDAT 150\r\n" + b"x" * 148 + b"\r\n"
                   + bdat(b"more\r\n") + b"RSET\r\n"
                   + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@example.org>\r\n" + bdat(b"ok\r\n"))
    at = out.index(R(reply.TOO_BIG, True))
    assert out[at - 2:at + 4] == [b"250 2.1.0 ok", b"250 2.1.5 ok", R(reply.TOO_BIG, True),
                                  R(reply.BDAT_FAILED, True), b"250 2.0.0 flushed",
                                  b"250 2.1.0 ok"], out
    assert re.match(ACCEPT_RE_E, out[-1]), out
    (item,) = env.queued()
    assert body_of(env.message(item)) == b"ok\n"


def test_a_size_that_is_not_a_number_ends_the_connection(env):
    out = env.talk(HEAD + b"BDAT 12x\r\nhello\r\n")
    assert out[-1] == R(reply.BDAT_SYNTAX, True), out
    out = env.talk(HEAD + b"BDAT 5 LAST now\r\nhello")
    assert out[-1] == R(reply.BDAT_SYNTAX, True), out


def test_a_chunk_that_never_ends_leaves_nothing_behind(env):
    # announced 2 GB, sent 10 bytes, then the client hangs up
    out = env.talk(HEAD + b"BDAT 2000000000 LAST\r\n0123456789")
    assert re.match(rb"250 ", out[-1]), out  # the RCPT reply: nothing after it
    assert env.queued() == [] and env.queue_empty()


def test_data_after_bdat_is_refused_and_looping_is_caught(env):
    out = env.talk(HEAD + b"BDAT 4\r\nab\r\nDATA\r\n")
    assert out[-2:] == [b"250 2.0.0 4 octets received", R(reply.DATA_IN_BDAT, True)], out
    hops = b"Received: x\r\n" * 100
    out = env.talk(HEAD + bdat(hops, b"\r\nbody\r\n"))
    assert out[-1] == R(reply.LOOPING, True), out
    assert env.queued() == []
