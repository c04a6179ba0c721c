"""Where eqmail must behave as eQmail 1.09 does (issue: qmail-exact).

Each test drives a real program: `eqmail smtpd` on pipes with a scripted
dialogue (as xinetd or tcpserver would run it), a real eqmaild, or the
local delivery with a real dot-qmail file.  tests/differential/ feeds the
same bytes to the real eQmail; these tests pin the behaviour down on
eqmail's side alone, with the eQmail result written next to each.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, Home

PY = sys.executable


@pytest.fixture
def home():
    h = Home()
    h.setup(rcpthosts=("mx.example.org", "localhost", "example.org"))
    from eqmail.queue.store import Store

    Store.open(h.path)  # the queue eqmaild would have made
    h.chown()
    yield h
    h.remove()


def as_user(home):
    return dict(user=home.uid, group=home.gid, extra_groups=[]) if ROOT else {}


def smtpd(home, lines, env=None, timeout=30):
    """Run one `eqmail smtpd` session with `lines` (str, CRLF added) as the
    client's side; returns the server's reply lines (str)."""
    e = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "127.0.0.1",
         "TCPLOCALHOST": "mx.example.org", "HOME": home.path}
    e.update(env or {})
    data = "".join(line + "\r\n" for line in lines).encode()
    home.chown()
    out = subprocess.run([PY, "-m", "eqmail", "smtpd", "--home", home.path], input=data,
                         capture_output=True, timeout=timeout, env=e, cwd=home.path,
                         **as_user(home))
    return out.stdout.decode("utf-8", "replace").split("\r\n")[:-1]


def plugin(home, sections: str):
    """control/smtpplugins from `sections` (the file's text)."""
    home.write("smtpplugins", sections)


def queued_message(home, name):
    from eqmail.queue.store import open_message

    with open_message(os.path.join(home.path, "queue", "mess", name)) as f:
        return f.read()


def codes(replies):
    return [r[:3] for r in replies if r[3:4] == " "]


MESSAGE = ["DATA", "Subject: x", "", "body", "."]


# ----------------------------------------------------- qmail-spp verdicts that last

def test_connection_LD_survives_helo_and_refuses_data(home):
    # eQmail: 554 at DATA; HELO does not clear a [connection] plugin's L text
    plugin(home, "[connection]\n:echo LD554 5.7.1 you are listed\n")
    r = smtpd(home, ["HELO client.example", "MAIL FROM:<a@b.c>", "RCPT TO:<x@example.org>"]
              + MESSAGE + ["QUIT"])
    assert codes(r)[:5] == ["220", "250", "250", "250", "554"], r
    assert "554 5.7.1 you are listed" in r
    assert not any(x.startswith("354") for x in r), r
    assert home.queued() == []


def test_connection_LD_survives_ehlo_but_not_rset(home):
    plugin(home, "[connection]\n:echo LD554 5.7.1 you are listed\n")
    r = smtpd(home, ["EHLO client.example", "EHLO again.example", "MAIL FROM:<a@b.c>",
                     "RCPT TO:<x@example.org>", "DATA", "DATA", "RSET", "MAIL FROM:<a@b.c>",
                     "RCPT TO:<x@example.org>"] + MESSAGE + ["QUIT"])
    cs = codes(r)
    # two refused DATAs (the transaction stays, as in eQmail), then after RSET it goes
    assert cs[:7] == ["220", "250", "250", "250", "250", "554", "554"], r
    assert cs[7:] == ["250", "250", "250", "354", "250", "221"], r
    assert len(home.queued()) == 1


def test_connection_LM_survives_helo(home):
    plugin(home, "[connection]\n:echo LM553 5.7.1 not from you\n")
    r = smtpd(home, ["HELO client.example", "MAIL FROM:<a@b.c>", "MAIL FROM:<d@e.f>",
                     "RSET", "MAIL FROM:<a@b.c>", "QUIT"])
    assert codes(r) == ["220", "250", "553", "553", "250", "250", "221"], r


def test_connection_H_lines_survive_helo(home):
    plugin(home, "[connection]\n:echo HX-Listed: yes\n")
    r = smtpd(home, ["HELO client.example", "MAIL FROM:<a@b.c>", "RCPT TO:<x@example.org>"]
              + MESSAGE + ["QUIT"])
    assert "354" in codes(r), r
    (item,) = home.queued()
    data = queued_message(home, item)
    assert b"\nX-Listed: yes\n" in data, data


def test_helo_LM_refuses_every_mail_until_rset(home):
    # eQmail: 550 for the second MAIL as well
    plugin(home, "[helo]\n:echo LM550 later mail\n")
    r = smtpd(home, ["HELO client.example", "MAIL FROM:<a@b.c>", "MAIL FROM:<a@b.c>",
                     "RCPT TO:<x@example.org>", "RSET", "MAIL FROM:<a@b.c>", "QUIT"])
    assert codes(r) == ["220", "250", "550", "550", "503", "250", "250", "221"], r
    assert "550 later mail" in r


def test_refused_second_mail_ends_the_earlier_transaction(home):
    # eQmail kept the first transaction: the pipelined RCPT and DATA would
    # have sent the message with the earlier sender
    plugin(home, "[mail]\n:case \"$SMTPMAILFROM\" in bad@*) echo E553 no;; esac\n")
    r = smtpd(home, ["HELO client.example", "MAIL FROM:<good@b.c>", "RCPT TO:<x@example.org>",
                     "MAIL FROM:<bad@b.c>", "RCPT TO:<x@example.org>", "DATA", "QUIT"])
    assert codes(r) == ["220", "250", "250", "250", "553", "503", "503", "221"], r
    assert home.queued() == []
