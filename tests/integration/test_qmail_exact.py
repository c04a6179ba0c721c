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


# ----------------------------------------------------------------- QMAILQUEUE

CAPTURE = r'''#!/bin/sh
# a qmail-queue stand-in: keep the message (fd 0) and the envelope (fd 1)
cat > "$OUT.msg" || exit 54
cat <&1 > "$OUT.env" || exit 54
echo "scanned by capture" >&2
exit ${CODE:-0}
'''


def scanner(home, name, text):
    path = os.path.join(home.path, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


DIALOGUE = ["EHLO client.example", "MAIL FROM:<a@b.c>", "RCPT TO:<x@example.org>",
            "RCPT TO:<y@example.org>", "DATA", "Subject: scan me", "", "..dot", "body", ".",
            "QUIT"]


def test_qmailqueue_gets_message_and_envelope_and_its_pid_is_the_qp(home):
    scanner(home, "capture", CAPTURE)
    out = os.path.join(home.path, "got")
    r = smtpd(home, DIALOGUE, env={"QMAILQUEUE": "capture", "OUT": out})
    m = re.match(r"250 2\.0\.0 ok \d+ qp (\d+)$", r[-2])
    assert m, r
    with open(out + ".env", "rb") as f:
        assert f.read() == b"Fa@b.c\0Tx@example.org\0Ty@example.org\0\0"
    with open(out + ".msg", "rb") as f:
        msg = f.read()
    assert msg.startswith(b"Received: from unknown (HELO client.example) (192.0.2.1)\n"), msg
    assert msg.endswith(b"\nSubject: scan me\n\n.dot\nbody\n"), msg
    assert home.queued() == []  # the program, not eqmail, queues it


@pytest.mark.parametrize("code,reply", [
    (31, "554 5.3.0 mail server permanently rejected message (#5.3.0)"),
    (11, "554 5.1.3 envelope address too long for qq (#5.1.3)"),
    (20, "554 5.3.0 qq permanent problem (#5.3.0)"),
    (53, "451 4.3.0 qq write error or disk full (#4.3.0)"),
    (71, "451 4.3.0 mail server temporarily rejected message (#4.3.0)"),
    (73, "451 4.4.1 connection to mail server rejected (#4.4.1)"),
    (99, "451 4.3.0 qq temporary problem (#4.3.0)"),
])
def test_qmailqueue_exit_codes_as_qmail_smtpd_answers(home, code, reply):
    scanner(home, "capture", CAPTURE)
    r = smtpd(home, DIALOGUE, env={"QMAILQUEUE": "capture", "CODE": str(code),
                                   "OUT": os.path.join(home.path, "got")})
    assert r[-2] == reply, r
    assert r[-1].startswith("221"), r
    assert home.queued() == []


@pytest.mark.parametrize("program,reply", [
    ("#!/bin/sh\nkill -9 $$\n", "451 4.3.0 qq crashed (#4.3.0)"),
    ("#!/bin/sh\nexit 0\n", "451 4.3.0 qq read error (#4.3.0)"),  # read nothing, said ok
    ("#!/bin/sh\nsleep 60\n", "451 4.3.0 qq timeout (#4.3.0)"),   # hangs
    (None, "451 4.3.0 unable to exec qq (#4.3.0)"),                # missing
    ("exit 0\n", "451 4.3.0 unable to exec qq (#4.3.0)"),          # no #!: execv fails
])
def test_qmailqueue_that_dies_hangs_or_is_missing_loses_nothing(home, program, reply):
    home.write("timeoutsmtpd", "2\n")
    if program is not None:
        scanner(home, "bad", program)
    body = ["line %d of a message long enough to fill a pipe" % i for i in range(3000)]
    r = smtpd(home, DIALOGUE[:5] + body + [".", "QUIT"], env={"QMAILQUEUE": "bad"})
    assert r[-2] == reply, r[-3:]   # temporary: the client keeps the message
    assert home.queued() == []


def test_qmailqueue_from_smtprules_in_the_daemon(home, daemon_factory):
    import smtplib

    scanner(home, "capture", CAPTURE)
    out = os.path.join(home.path, "got")
    home.write("smtprules", '127.0.0.1:allow,QMAILQUEUE="capture",OUT="%s",CODE="31"\n' % out)
    d = daemon_factory(home)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.ehlo("client.example")
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@b.c", ["x@example.org"], b"Subject: daemon\r\n\r\nscan\r\n")
        assert e.value.smtp_code == 554
    with open(out + ".env", "rb") as f:
        assert f.read() == b"Fa@b.c\0Tx@example.org\0\0"
    assert "QMAILQUEUE capture said: scanned by capture" in d.log(), d.log()
    assert home.queued() == []


def test_qmailqueue_from_eqmailds_environment_and_smtprules_turns_it_off(home, daemon_factory):
    import smtplib

    scanner(home, "capture", CAPTURE)
    out = os.path.join(home.path, "got")
    home.write("smtprules", '127.0.0.2:allow,QMAILQUEUE=""\n:allow,OUT="%s"\n' % out)
    d = daemon_factory(home, env={"QMAILQUEUE": "capture"})
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.sendmail("a@b.c", ["x@example.org"], b"Subject: one\r\n\r\nscan\r\n")
    with open(out + ".env", "rb") as f:
        assert f.read() == b"Fa@b.c\0Tx@example.org\0\0"
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20, source_address=("127.0.0.2", 0)) as s:
        s.sendmail("a@b.c", ["x@example.org"], b"Subject: two\r\n\r\nnot scanned\r\n")
    assert len(home.wait_messages(1)) == 1  # the second went to the queue and was delivered


@pytest.mark.parametrize("tool", ["inject", "sendmail"])
@pytest.mark.parametrize("code,status", [(0, 0), (31, 100), (71, 111)])
def test_qmailqueue_in_inject_and_sendmail(home, tool, code, status):
    scanner(home, "capture", CAPTURE)
    out = os.path.join(home.path, "got")
    argv = [PY, "-m", "eqmail", tool, "--home", home.path]
    argv += ["-f", "me@mx.example.org", "you@example.org"] if tool == "sendmail" else \
        ["-fme@mx.example.org", "you@example.org"]
    env = {"PATH": "/usr/bin:/bin", "HOME": home.path, "QMAILQUEUE": "capture", "OUT": out,
           "CODE": str(code)}
    p = subprocess.run(argv, input=b"Subject: injected\n\nhello\n", capture_output=True,
                       timeout=30, env=env, **as_user(home))
    assert p.returncode == status, p
    with open(out + ".env", "rb") as f:
        assert f.read() == b"Fme@mx.example.org\0Tyou@example.org\0\0"
    with open(out + ".msg", "rb") as f:
        msg = f.read()
    assert b"Subject: injected\n" in msg and msg.endswith(b"\n\nhello\n"), msg
    assert not msg.startswith(b"Received:"), msg  # the real qmail-queue adds that
    if code == 31:
        assert b"mail server permanently rejected message (#5.3.0)" in p.stderr, p.stderr
    assert home.queued() == []


# ----------------------------------------------------------- reload = restart

def greeted(port, count, timeout=10.0):
    """Open `count` connections; returns (sockets, how many got a 220)."""
    import socket
    import time

    socks, got = [], 0
    for _ in range(count):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
    deadline = time.time() + timeout
    for s in socks:
        s.settimeout(max(0.1, deadline - time.time()))
        try:
            if s.recv(100).startswith(b"220 "):
                got += 1
        except OSError:
            pass
    return socks, got


def test_sighup_raising_concurrencyincoming_grows_the_session_pool(home, daemon_factory):
    # the pool was sized at start (2 x 10 + 50 = 70) and kept after a HUP:
    # the 71st client connected and then heard nothing at all
    import signal

    from helpers import wait_log

    import resource

    home.write("concurrencyincoming", "10\n")
    home.write("concurrencyperip", "10\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))  # the usual default
    try:
        d = daemon_factory(home, extra_args=["--workers", "0"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    home.write("concurrencyincoming", "100\n")
    home.write("concurrencyperip", "100\n")
    d.signal(signal.SIGHUP)
    assert wait_log(d, "control files reloaded"), d.log()
    socks, got = greeted(d.port, 90)
    try:
        assert got == 90, d.log()[-2000:]
    finally:
        for s in socks:
            s.close()
    # 1100 sessions need more descriptors than the usual soft limit of 1024
    home.write("concurrencyincoming", "1100\n")
    d.signal(signal.SIGHUP)
    import time

    deadline = time.time() + 10
    while time.time() < deadline:
        soft, hard = open_files_limit(d.proc.pid)
        if soft >= min(hard, 2 * 1100 + 50):
            break
        time.sleep(0.05)
    assert soft >= min(hard, 2 * 1100 + 50), (soft, hard)


def open_files_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                big = 1 << 62
                return (big if soft == "unlimited" else int(soft),
                        big if hard == "unlimited" else int(hard))
    raise AssertionError("no Max open files in /proc/%d/limits" % pid)


# ------------------------------------------------------------------ the pidfile

def test_pidfile_in_a_directory_not_made_yet(home, daemon_factory):
    pidfile = os.path.join(home.path, "run", "eqmaild", "eqmaild.pid")
    d = daemon_factory(home, extra_args=["--pidfile", pidfile])
    with open(pidfile) as f:
        assert f.read() == "%d\n" % d.proc.pid
    assert d.stop() == 0
    assert not os.path.exists(pidfile)


def test_pidfile_that_cannot_be_written_is_one_line_and_exit_73(home, daemon_factory):
    import tempfile

    locked = tempfile.mkdtemp(dir="/tmp")   # the daemon's user may not write here
    try:
        os.chmod(locked, 0o555)
        d = daemon_factory(home, extra_args=["--pidfile", os.path.join(locked, "x", "e.pid")],
                           start=False)
        d.start(wait=False)
        assert d.proc.wait(20) == 73
        out = d.log()
        assert "Traceback" not in out, out
        assert out.strip().splitlines()[-1].startswith(
            "eqmaild: fatal: unable to write the pidfile %s/x/e.pid: " % locked), out
    finally:
        os.chmod(locked, 0o755)
        os.rmdir(locked) if not os.listdir(locked) else None


# ------------------------------------------------- smtpplugins checked at load

def test_missing_or_not_executable_plugin_stops_the_start_with_file_and_line(
        home, daemon_factory):
    scanner(home, "plugins/ok", "#!/bin/sh\nexit 0\n")
    with open(os.path.join(home.path, "plugins", "noexec"), "w") as f:
        f.write("#!/bin/sh\n")
    home.write("smtpplugins", "[connection]\nplugins/ok\n:true\n[mail]\nplugins/missing\n"
                              "[rcpt]\nplugins/noexec\n")
    d = daemon_factory(home, start=False)
    d.start(wait=False)
    assert d.proc.wait(20) == 78
    out = d.log()
    assert "Traceback" not in out, out
    sp = os.path.join(home.path, "control", "smtpplugins")
    assert "%s line 5: plugin plugins/missing: no such file" % sp in out, out
    assert "%s line 7: plugin plugins/noexec: not executable" % sp in out, out
    assert len(out.strip().splitlines()) == 1, out


def test_plugin_that_goes_missing_is_alerted_on_hup(home, daemon_factory):
    import signal

    from helpers import wait_log

    scanner(home, "plugins/ok", "#!/bin/sh\nexit 0\n")
    home.write("smtpplugins", "[mail]\nplugins/ok\n")
    d = daemon_factory(home)
    os.unlink(os.path.join(home.path, "plugins", "ok"))
    d.signal(signal.SIGHUP)
    assert wait_log(d, "control/smtpplugins line 2: plugin plugins/ok: no such file: "
                       "MAIL and RCPT get 451 qmail-spp failure"), d.log()


# ----------------------------------------------------------- bounded numbers

def test_databytes_of_40_digits_is_refused_with_file_and_line(home, daemon_factory):
    home.write("databytes", "1" + "0" * 39 + "\n")
    d = daemon_factory(home, start=False)
    d.start(wait=False)
    assert d.proc.wait(20) == 78
    out = d.log()
    assert "control/databytes line 1: number too large (at most 2147483647)" in out, out
    assert "Traceback" not in out, out


def test_databytes_at_the_bound_is_advertised(home):
    home.write("databytes", "2147483647\n")
    r = smtpd(home, ["EHLO x", "QUIT"])
    assert "250-SIZE 2147483647" in r, r
    # a DATABYTES from the environment past the bound is not taken
    r = smtpd(home, ["EHLO x", "QUIT"], env={"DATABYTES": "9" * 40})
    assert "250-SIZE 2147483647" in r, r
    r = smtpd(home, ["EHLO x", "QUIT"], env={"DATABYTES": "1000"})
    assert "250-SIZE 1000" in r, r


def test_smtprules_databytes_must_be_a_bounded_number(home, daemon_factory):
    home.write("smtprules", ":allow,DATABYTES=\"%s\"\n" % ("9" * 40))
    d = daemon_factory(home, start=False)
    d.start(wait=False)
    assert d.proc.wait(20) == 78
    assert "control/smtprules line 1: DATABYTES: expected bytes from 0 to 2147483647" in d.log()


def test_qmailqueue_scanner_that_queues_through_eqmail_queue(home, daemon_factory):
    # the usual chain: eqmaild -> scanner -> qmail-queue (here eqmail queue)
    import smtplib

    scanner(home, "bin/scan", "#!/bin/sh\n# a scanner: look, then queue\n"
                              "exec %s -m eqmail queue --home %s\n" % (PY, home.path))
    home.write("smtprules", ':allow,QMAILQUEUE="bin/scan"\n')
    d = daemon_factory(home)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.sendmail("a@b.c", ["joe@localhost"], b"Subject: scanned\r\n\r\nclean\r\n")
    (msg,) = home.wait_messages(1)
    assert b"Subject: scanned\n\nclean\n" in msg, msg
    assert msg.count(b"Received: ") == 2, msg  # eqmaild's and qmail-queue's own
