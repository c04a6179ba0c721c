"""DSN parameters (RFC 3461 section 4) in the session: accepted, refused
when malformed, and kept with the queued message for the recipients the
queue takes."""
from __future__ import annotations

import re

import pytest

from eqmail.smtp import policy, reply
from test_session import ACCEPT_RE_E, R, env, qhome  # noqa: F401

HEAD = b"EHLO x\r\n"


@pytest.mark.parametrize("params,ok", [
    ({"RET": "full"}, {"ret": "FULL"}), ({"RET": "HDRS", "ENVID": "a+2Bb"},
                                         {"ret": "HDRS", "envid": "a+2Bb"}),
    ({"RET": "ALL"}, None), ({"RET": None}, None), ({"ENVID": "a=b"}, None),
    ({"ENVID": "x" * 101}, None), ({"ENVID": "a+zz"}, None), ({}, {}),
])
def test_mail_dsn(params, ok):
    assert policy.mail_dsn(params) == ok


@pytest.mark.parametrize("params,ok", [
    ({"NOTIFY": "success,failure"}, {"notify": "SUCCESS,FAILURE"}),
    ({"NOTIFY": "NEVER"}, {"notify": "NEVER"}),
    ({"NOTIFY": "NEVER,SUCCESS"}, None), ({"NOTIFY": "SOMETIMES"}, None),
    ({"NOTIFY": "DELAY,DELAY"}, None), ({"NOTIFY": None}, None),
    ({"ORCPT": "rfc822;a@b.example"}, {"orcpt": "rfc822;a@b.example"}),
    ({"ORCPT": "RFC822;a+2Bb@b.example"}, {"orcpt": "rfc822;a+2Bb@b.example"}),
    ({"ORCPT": "a@b.example"}, None), ({"ORCPT": "rfc822;"}, None),
    ({"ORCPT": "x y;a@b"}, None),
])
def test_rcpt_dsn(params, ok):
    assert policy.rcpt_dsn(params) == ok


def test_dsn_is_offered_and_kept_with_the_message(env):
    out = env.talk(HEAD + b"MAIL FROM:<a@b.c> RET=HDRS ENVID=id1\r\n"
                   b"RCPT TO:<x@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x@example.org\r\n"
                   b"RCPT TO:<y@example.org>\r\n"
                   b"RCPT TO:<z@example.org> NOTIFY=NEVER\r\nDATA\r\nhi\r\n.\r\n")
    assert b"250-DSN" in out or b"250 DSN" in out
    assert re.match(ACCEPT_RE_E, out[-1]), out
    (item,) = env.queued()
    assert item.params == {"ret": "HDRS", "envid": "id1", "notify.0": "SUCCESS,DELAY",
                           "orcpt.0": "rfc822;x@example.org", "notify.2": "NEVER"}


def test_malformed_dsn_parameters_get_501(env):
    out = env.talk(HEAD + b"MAIL FROM:<a@b.c> RET=ALL\r\nMAIL FROM:<a@b.c>\r\n"
                   b"RCPT TO:<x@example.org> NOTIFY=NEVER,FAILURE\r\n"
                   b"RCPT TO:<x@example.org> ORCPT=nonsense\r\n")
    assert out[-4:] == [R(reply.PARAM_SYNTAX, True), b"250 2.1.0 ok",
                        R(reply.PARAM_SYNTAX, True), R(reply.PARAM_SYNTAX, True)], out
