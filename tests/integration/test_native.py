"""The conventions of a native MTA (issue 20) with a real eqmaild: /etc/aliases
compiled by newaliases and followed for the alias user's addresses,
sendmail -bi, -bv and -q, and the sender of system mail when no USER or
LOGNAME is set (the real uid's login)."""
from __future__ import annotations

import os
import pwd
import time
import subprocess
import sys

import pytest

from helpers import ROOT, wait_log
from test_local_delivery import (assign_line, head_lines, maildirmake, put, read_dir, results, send,
                                 user_home, wait_dir, wait_empty_queue, wait_result,
                                 write_assign)

PY = sys.executable


def eqmail(*args, env=None, stdin=b""):
    r = subprocess.run([PY, "-m", "eqmail"] + list(args), input=stdin, capture_output=True,
                       timeout=60, env=env)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


@pytest.fixture
def aliashome(home):
    """mx.example.org with users/assign joe (a Maildir), an aliases file
    in the home named by control/aliases."""
    home.setup(aliases=os.path.join(home.path, "aliases") + "\n")
    joe = user_home(home, "joe", {"": "./Maildir/\n"})
    write_assign(home, [assign_line(home, "=", "joe", "joe", joe)])
    home.joe = joe
    return home


def test_aliases_are_compiled_and_followed_for_the_alias_users_addresses(aliashome,
                                                                       daemon_factory):
    home = aliashome
    alias = os.path.join(home.path, "alias")
    maildirmake(os.path.join(alias, "Maildir"))
    put(os.path.join(alias, ".qmail-default"), "./Maildir/\n")  # as eqmaild makes it
    members = os.path.join(home.path, "members")
    put(members, "# the list\nJoe, outsider@localhost\n")
    archive = os.path.join(alias, "archive")
    put(os.path.join(home.path, "aliases"),
        "# comment\n"
        "root: joe\n"
        "Postmaster: root\n"
        "team: joe,\n"
        "\tnobody@localhost\n"
        "list: :include:%s\n"
        "prog: \"|cat > %s/prog.out\", %s\n"
        "special: joe\n" % (members, alias, archive))
    # ~alias/.qmail-special is the address's own file: it wins over the alias
    put(os.path.join(alias, ".qmail-special"), "./Maildir/\n")
    rc, out, err = eqmail("newaliases", "--home", home.path)
    assert rc == 0, err
    assert "6 aliases" in out
    assert os.stat(os.path.join(home.path, "aliases.cdb")).st_mode & 0o777 == 0o644

    d = daemon_factory(home)
    send(d, "s@x.org", ["postmaster@mx.example.org"], b"Subject: pm\r\n\r\npm\r\n")
    send(d, "s@x.org", ["team@localhost"], b"Subject: team\r\n\r\nteam\r\n")
    send(d, "s@x.org", ["list@localhost"], b"Subject: list\r\n\r\nlist\r\n")
    send(d, "s@x.org", ["prog@localhost"], b"Subject: prog\r\n\r\nprog\r\n")
    send(d, "s@x.org", ["special@localhost"], b"Subject: special\r\n\r\nspecial\r\n")

    # postmaster -> root -> joe; team -> joe; list -> joe: three in joe's Maildir
    got = wait_dir(os.path.join(home.joe, "Maildir", "new"), 3)
    assert sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in got) == \
        [b"list", b"pm", b"team"], d.log()
    pm = [m for m in got if b"Subject: pm" in m][0]
    # each forward hop leaves its Delivered-To line (qmail-local's loop check)
    assert b"Delivered-To: postmaster@mx.example.org" in pm
    assert b"Delivered-To: root@mx.example.org" in pm
    # team's second target and the list's outsider: the catch-all Maildir;
    # special: its own .qmail-special
    alias_new = wait_dir(os.path.join(alias, "Maildir", "new"), 3)
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in alias_new)
    assert subjects == [b"list", b"special", b"team"], d.log()
    assert wait_result(d, "prog@localhost", "success")
    with open(os.path.join(alias, "prog.out"), "rb") as f:
        assert f.read().endswith(b"Subject: prog\n\nprog\n")
    with open(archive, "rb") as f:
        box = f.read()
    assert box.startswith(b"From s@x.org ") and b"Delivered-To: prog@localhost" in box
    assert wait_empty_queue(home), d.log()

    # a bad entry: file and line named, exit 78, the old cdb still in use
    put(os.path.join(home.path, "aliases"), "root: joe\nbroken line\n")
    rc, out, err = eqmail("newaliases", "--home", home.path)
    assert rc == 78
    assert "%s line 2: expected name: target" % os.path.join(home.path, "aliases") in err
    assert err.count("\n") == 1 and "Traceback" not in err
    send(d, "s@x.org", ["root@localhost"], b"Subject: again\r\n\r\nagain\r\n")
    assert len(wait_dir(os.path.join(home.joe, "Maildir", "new"), 4)) == 4, d.log()

    # sendmail -bi compiles too
    put(os.path.join(home.path, "aliases"), "root: nobody@localhost\n")
    rc, out, err = eqmail("sendmail", "--home", home.path, "-bi")
    assert rc == 0 and "1 aliases" in out, err
    send(d, "s@x.org", ["root@localhost"], b"Subject: moved\r\n\r\nmoved\r\n")
    assert len(wait_dir(os.path.join(alias, "Maildir", "new"), 4)) == 4, d.log()
    assert len(read_dir(os.path.join(home.joe, "Maildir", "new"))) == 4


def test_an_unreadable_include_file_defers_with_the_alias_named(aliashome, daemon_factory):
    home = aliashome
    put(os.path.join(home.path, "aliases"), "list: :include:/nonexistent/members\n")
    assert eqmail("newaliases", "--home", home.path)[0] == 0
    d = daemon_factory(home)
    send(d, "s@x.org", ["list@localhost"], b"Subject: x\r\n\r\nx\r\n")
    text = wait_result(d, "list@localhost", "deferral")
    assert "an :include: file of the alias at %s:1" % os.path.join(home.path, "aliases") in text


def test_sendmail_bv_shows_where_mail_would_go(aliashome):
    home = aliashome
    home.write("smtproutes", "relay.example:[127.0.0.1]:2525\n")
    put(os.path.join(home.path, "aliases"), "root: joe, far@relay.example, \"|true\"\n")
    assert eqmail("newaliases", "--home", home.path)[0] == 0
    maildirmake(os.path.join(home.path, "alias", "Maildir"))
    rc, out, err = eqmail("sendmail", "--home", home.path, "-bv", "root", "x@other.example")
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "root@mx.example.org: local, alias user (%s/alias)" % home.path
    assert "  from alias at %s/aliases:1" % home.path in lines
    assert "  forward to joe@mx.example.org" in lines
    assert "    joe@mx.example.org: local, user joe (uid %d, home %s)" % (
        home.uid, home.joe) in lines
    assert "      Maildir %s/Maildir/" % home.joe in lines
    assert "    far@relay.example: remote, relay [127.0.0.1]:2525 (control/smtproutes)" \
        in lines or "    far@relay.example: remote, relay 127.0.0.1:2525 (control/smtproutes)" \
        in lines, out
    assert "  program true" in lines
    assert "x@other.example: remote, MX of other.example" in lines
    # an address that would bounce: exit 100, and why
    rc, out, err = eqmail("verify", "--home", home.path, "joe-nothing@localhost")
    assert rc == 100
    assert "bounces: Sorry, no mailbox here by that name. (#5.1.1)" in out


def test_sendmail_q_flushes_through_the_pickup_socket(aliashome, daemon_factory):
    home = aliashome
    flag = os.path.join(home.path, "ok")
    # the first try fails temporarily; a flush makes the next one now
    alias = os.path.join(home.path, "alias")
    os.makedirs(alias)
    put(os.path.join(alias, ".qmail-later"),
        "|test -e %s || exit 111\n&joe@localhost\n" % flag)
    d = daemon_factory(home)
    send(d, "s@x.org", ["later@localhost"], b"Subject: later\r\n\r\nlater\r\n")
    wait_result(d, "later@localhost", "deferral")
    put(flag, "")
    os.chmod(flag, 0o644)
    rc, out, err = eqmail("sendmail", "--home", home.path, "-q30m")
    assert rc == 0, err
    assert len(wait_dir(os.path.join(home.joe, "Maildir", "new"), 1, timeout=10)) == 1, d.log()
    log = d.log()
    assert "pickup: flush asked by uid %d" % os.getuid() in log
    assert "retrying every queued message now" in log
    # a second flush at once is answered, not started again
    assert eqmail("flush", "--home", home.path)[0] == 0
    assert d.log().count("retrying every queued message now") == 1
    d.stop()
    rc, out, err = eqmail("sendmail", "--home", home.path, "-q")
    assert rc == 69
    assert "is it running?" in err and "Traceback" not in err


def test_sendmail_without_user_or_logname_sends_as_the_real_uids_login(aliashome,
                                                                       daemon_factory):
    home = aliashome
    d = daemon_factory(home)
    env = {"PATH": "/usr/bin:/bin"}  # env -i, as a systemd timer or cron leaves it
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    rc, out, err = eqmail("sendmail", "--home", home.path, "joe@localhost", env=env,
                          stdin=b"Subject: cron\n\nhello\n")
    assert rc == 0, err
    got = wait_dir(os.path.join(home.joe, "Maildir", "new"), 1)
    assert got, d.log()
    me = pwd.getpwuid(os.getuid()).pw_name
    assert head_lines(got[0])[0] == b"Return-Path: <%s@mx.example.org>" % me.encode()
    assert b"\nFrom: %s@mx.example.org\n" % me.encode() in got[0]
    # qmail-inject keeps qmail's "anonymous"
    rc, out, err = eqmail("inject", "--home", home.path, "joe@localhost", env=env,
                          stdin=b"Subject: inject\n\nhello\n")
    assert rc == 0, err
    got = wait_dir(os.path.join(home.joe, "Maildir", "new"), 2)
    inj = [m for m in got if b"Subject: inject" in m][0]
    assert head_lines(inj)[0] == b"Return-Path: <anonymous@mx.example.org>"


@pytest.mark.parametrize("args,message", [
    (["-bd"], "the daemon is eqmaild"),
    (["-qp"], "eqmaild's work"),
    (["-bx"], "unsupported mode -bx"),
])
def test_sendmail_refuses_what_it_cannot_do_clearly(aliashome, args, message):
    rc, out, err = eqmail("sendmail", "--home", aliashome.path, *args)
    assert rc == 100
    assert message in err and "Traceback" not in err


def test_sendmail_accepts_error_mode_and_dsn_options(aliashome, daemon_factory):
    home = aliashome
    d = daemon_factory(home)
    rc, out, err = eqmail("sendmail", "--home", home.path, "-oem", "-oee", "-N",
                          "success,failure", "-R", "hdrs", "-V", "envid1", "-oi",
                          "joe@localhost", stdin=b"Subject: opts\n\nx\n")
    assert rc == 0, err
    assert wait_dir(os.path.join(home.joe, "Maildir", "new"), 1), d.log()


def test_control_listen_sets_the_listeners_when_none_are_given(aliashome):
    import socket
    import subprocess as sp
    import time

    from helpers import free_port

    home = aliashome
    port = free_port()
    home.write("listen", "# loopback only\nsmtp 127.0.0.1:%d\n" % port)
    home.chown()
    kwargs = dict(user=home.uid, group=home.gid, extra_groups=[]) if ROOT else {}
    proc = sp.Popen([PY, "-m", "eqmail.daemon", "--home", home.path, "--foreground"],
                    stdout=sp.PIPE, stderr=sp.STDOUT, **kwargs)
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    assert s.recv(100).startswith(b"220 ")
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("nothing listens on control/listen's port")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert "listening for SMTP on 127.0.0.1:%d" % port in out
    assert "2525" not in out
    # a bad line: exit 78, file and line named
    home.write("listen", "smtp 127.0.0.1:%d\nlmtp 127.0.0.1:24\n" % port)
    r = sp.run([PY, "-m", "eqmail.daemon", "--home", home.path, "--foreground"],
               capture_output=True, text=True, timeout=30, **kwargs)
    assert r.returncode == 78
    assert "control/listen line 2: expected smtp|submission|smtps" in r.stderr


def _ids_in(text):
    import re
    return re.findall(r"^(\d+\.\d+\.\d+)  ", text, re.M)


def test_queue_operations_while_eqmaild_delivers(aliashome, daemon_factory):
    """eqmail queue list/show/hold/delete/release/flush on 60 deferred
    messages, with deletes racing the flush's deliveries: a message said
    to be deleted is never delivered, every other one exactly once."""
    import re
    import threading

    home = aliashome
    alias = os.path.join(home.path, "alias")
    os.makedirs(alias)
    maildirmake(os.path.join(alias, "Maildir"))
    flag = os.path.join(home.path, "ok")
    put(os.path.join(alias, ".qmail-later"),
        "|test -e %s || { echo relay is down; exit 111; }\n./Maildir/\n" % flag)
    d = daemon_factory(home)
    n = 60
    for k in range(n):
        send(d, "s%d@x.org" % k, ["later@localhost"], b"Subject: m%d\r\n\r\nbody\r\n" % k)
    deadline = time.time() + 30
    while time.time() < deadline and d.log().count("deferral: relay is down") < n:
        time.sleep(0.1)
    rc, out, err = eqmail("queue", "list", "--home", home.path)
    assert rc == 0, err
    ids = _ids_in(out)
    assert len(ids) == n, out
    assert out.count("last: relay is down") == n
    assert "next try in" in out
    # filters
    rc, out, _ = eqmail("queue", "list", "--home", home.path, "--sender", "s7@x.org")
    assert _ids_in(out) and all("<s7@x.org>" in l for l in out.splitlines() if l[:1].isdigit())
    rc, out, _ = eqmail("queue", "show", "--home", home.path, ids[0])
    assert rc == 0 and "sender: <s" in out and "Subject: m" in out and "body" not in out
    rc, out, _ = eqmail("queue", "show", "--home", home.path, "--body", ids[0])
    assert "body" in out

    rc, out, err = eqmail("queue", "hold", "--home", home.path, *ids[:10])
    assert rc == 0 and out.count(": held") == 10, out + err
    assert "not running" not in out, out
    assert d.log().count("held by uid") == 10
    # deleted while waiting: never delivered
    rc, out, err = eqmail("queue", "delete", "--home", home.path, *ids[10:20])
    assert rc == 0 and out.count(": deleted") == 10, out + err
    put(flag, "")
    os.chmod(flag, 0o644)
    said = {}

    def delete():
        r, o, e = eqmail("queue", "delete", "--home", home.path, *ids[20:30])
        said["delete"] = o

    # deleted while the flush delivers: each is either deleted (and never
    # delivered) or busy (and delivered once)
    t = threading.Thread(target=delete)
    rc, out, err = eqmail("queue", "flush", "--home", home.path)
    t.start()
    t.join(60)
    assert rc == 0, err
    assert out.count("held, not tried") == 10, out
    deleted = set(re.findall(r"^(\S+): deleted$", said["delete"], re.M))
    busy = set(re.findall(r"^(\S+): busy", said["delete"], re.M))
    gone = set(re.findall(r"^(\S+): no such message", said["delete"], re.M))
    assert deleted | busy | gone == set(ids[20:30]), said
    deleted |= set(ids[10:20])

    def subjects():
        new = os.path.join(alias, "Maildir", "new")
        return [open(os.path.join(new, f), "rb").read().split(b"Subject: ")[1].split(b"\n")[0]
                for f in os.listdir(new)]

    expect = n - 10 - len(deleted)
    deadline = time.time() + 30
    while time.time() < deadline and len(subjects()) < expect:
        time.sleep(0.1)
    time.sleep(1)
    got = subjects()
    assert len(got) == len(set(got)) == expect, (len(got), expect, d.log()[-3000:])
    # the held ones wait; released, they go
    rc, out, _ = eqmail("queue", "list", "--home", home.path, "--state", "held")
    assert sorted(_ids_in(out)) == sorted(ids[:10])
    rc, out, err = eqmail("queue", "release", "--home", home.path, "--all")
    assert rc == 0 and out.count(": released") == 10, out + err
    deadline = time.time() + 30
    while time.time() < deadline and len(subjects()) < expect + 10:
        time.sleep(0.1)
    got = subjects()
    assert len(got) == len(set(got)) == expect + 10
    assert wait_empty_queue(home), d.log()
    log = d.log()
    for msgid in deleted:
        assert "msg %s deleted by uid" % msgid in log
    # another user: refused by the queue's permissions and by eqmaild
    if ROOT:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            PY, "-c", "from eqmail.queue import pickup\n"
                            "try:\n pickup.request(%r, 'queue delete 1.2.3')\n"
                            "except pickup.SubmitError as e:\n print(e.code, e.text)" % home.path],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.startswith("77 permission denied"), r
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            PY, "-m", "eqmail", "queue", "list", "--home", home.path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 77 and "permission denied" in r.stderr, r


def test_eqmail_status_for_any_user(aliashome, daemon_factory):
    import json as _json

    home = aliashome
    d = daemon_factory(home)
    send(d, "s@x.org", ["joe@localhost"], b"Subject: st\r\n\r\nx\r\n")
    assert wait_dir(os.path.join(home.joe, "Maildir", "new"), 1)
    rc, out, err = eqmail("status", "--home", home.path)
    assert rc in (0, 1), err
    lines = out.splitlines()
    assert lines[0].startswith("eqmaild 0.") and ": running, pid %d, up " % d.proc.pid in lines[0]
    assert "listening: SMTP 127.0.0.1:%d" % d.port in out
    assert "last hour: 1 delivered, 0 deferred, 0 failed" in out
    assert "memory: " in out and " MB RSS in 1 process(es)" in out
    rc, out, err = eqmail("status", "--home", home.path, "--json")
    st = _json.loads(out)
    assert st["running"] and st["pid"] == d.proc.pid and st["queue"]["messages"] == 0
    assert st["tree_rss_kb"] > 1000
    if ROOT:  # any user may ask
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            PY, "-m", "eqmail", "status", "--home", home.path, "--json"],
                           capture_output=True, text=True, timeout=60)
        assert _json.loads(r.stdout)["pid"] == d.proc.pid, r
    d.stop()
    rc, out, err = eqmail("status", "--home", home.path)
    assert rc == 3 and out.startswith("eqmaild: not running")


def test_stress_mode_frees_sessions_held_by_idle_clients(aliashome, daemon_factory):
    """Issue 21 item 7: 9 idle connections of concurrencyincoming 10 put
    eqmaild in stress mode: each idle one is closed after timeoutstress
    (2 s here), not timeoutsmtpd (1200 s), and a real client gets through."""
    import socket

    home = aliashome
    home.write("concurrencyincoming", "10\n")
    home.write("concurrencyperip", "10\n")
    home.write("timeoutstress", "2\n")
    d = daemon_factory(home)
    idle = []
    for _ in range(7):  # below 8 (80 %): no stress yet
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        assert s.recv(200).startswith(b"220 ")
        idle.append(s)
    time.sleep(3)
    for s in idle:  # still open: timeoutsmtpd applies
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(200)
        s.setblocking(True)
    t0 = time.time()
    late = socket.create_connection(("127.0.0.1", d.port), timeout=10)  # the 8th
    assert late.recv(200).startswith(b"220 ")
    idle.append(late)
    for s in idle:
        s.settimeout(10)
        try:
            got = s.recv(200)
        except socket.timeout:
            raise AssertionError("an idle session stayed open:\n" + d.log())
        assert got.startswith(b"451 timeout") or got == b"", got
    took = time.time() - t0
    assert took < 6, took
    assert "smtpd: stress: 8 sessions of 10" in d.log()
    # a real client now
    send(d, "s@x.org", ["joe@localhost"], b"Subject: after\r\n\r\nx\r\n")
    assert wait_dir(os.path.join(home.joe, "Maildir", "new"), 1)
    for s in idle:
        s.close()


def _talk(port, data, wait_first=0.0, timeout=10):
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if wait_first:
            time.sleep(wait_first)
        if data:
            s.sendall(data)
        out = b""
        while True:
            try:
                got = s.recv(4096)
            except socket.timeout:
                break
            if not got:
                break
            out += got
            if b"221 " in out or out.count(b"\r\n") > 20:
                break
        return out
    finally:
        s.close()


def test_early_talkers_are_refused_and_patient_clients_greeted(aliashome, daemon_factory):
    """Issue 21 item 6: greetdelay (postscreen's pregreet test)."""
    home = aliashome
    home.write("greetdelay", "1\n")
    d = daemon_factory(home)
    out = _talk(d.port, b"EHLO fast.example\r\n")
    assert out.startswith(b"554 SMTP protocol violation: talked before the greeting"), out
    assert b"220 " not in out
    assert wait_log(d, "smtpd: early talker 127.0.0.1")
    t0 = time.time()
    out = _talk(d.port, b"QUIT\r\n", wait_first=1.5)
    assert out.startswith(b"220 ") and b"221 " in out, out
    assert time.time() - t0 >= 1.0
    # smtprules may turn it off for a client (GREETDELAY="0")
    home.write("smtprules", '127.0.0.1:allow,GREETDELAY="0"\n')
    d.signal(__import__("signal").SIGHUP)
    assert wait_log(d, "control files reloaded")
    out = _talk(d.port, b"QUIT\r\n")
    assert out.startswith(b"220 "), out


def test_strict_pipelining_and_the_tarpit(aliashome, daemon_factory):
    """Issue 21 item 6: commands sent behind HELO without PIPELINING are
    refused; EHLO clients may pipeline; a refused RCPT waits tarpitdelay."""
    home = aliashome
    home.write("strictpipelining", "1\n")
    home.write("tarpitdelay", "1\n")
    d = daemon_factory(home)
    out = _talk(d.port, b"HELO a.example\r\nMAIL FROM:<a@b.example>\r\n", wait_first=0.3)
    assert b"554 SMTP protocol violation: pipelining without PIPELINING" in out, out
    assert b"250 " not in out.split(b"\r\n", 1)[1], out
    assert wait_log(d, "smtpd: 127.0.0.1 pipelined without PIPELINING")
    # EHLO, then a pipelined transaction: fine
    import smtplib
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.ehlo("b.example")
        assert s.does_esmtp and "pipelining" in s.esmtp_features
        t0 = time.time()
        code, _ = s.docmd("RCPT TO:<someone@elsewhere.example>")  # before MAIL: 503
        code, _ = s.docmd("MAIL FROM:<a@b.example>")
        assert code == 250
        t0 = time.time()
        code, _ = s.docmd("RCPT TO:<someone@elsewhere.example>")
        assert code == 553 and time.time() - t0 >= 1.0  # the tarpit
        t0 = time.time()
        code, _ = s.docmd("RCPT TO:<joe@localhost>")
        assert code == 250 and time.time() - t0 < 1.0


def test_greylisting_with_a_real_retrying_mta(home, daemon_factory):
    """Issue 21 item 5: eqmaild A relays to eqmaild B, which greylists
    (greydelay 2 s): A's first try gets 451, A retries (a flush, as its
    own schedule would later), and B takes the message; a known triplet
    passes at once, and a restart of B keeps what it learnt."""
    from helpers import Home

    b_home = home
    b_home.setup(greydelay="2\n", rcpthosts=("mx.example.org",))
    b = daemon_factory(b_home)
    a_home = Home()
    try:
        a_home.setup(me="a.example.org", locals_=("a.example.org",),
                     smtproutes="mx.example.org:[127.0.0.1]:%d\n" % b.port)
        a = daemon_factory(a_home)

        def inject(subject):
            rc, out, err = eqmail("inject", "--home", a_home.path, "-f", "s@a.example.org",
                                  "postmaster@mx.example.org",
                                  stdin=b"Subject: %s\n\nhi\n" % subject.encode())
            assert rc == 0, err

        inject("first")
        assert wait_log(a, "greylisted, please try again in"), a.log() + b.log()
        assert wait_log(b, "smtpd: greylisted s@a.example.org from 127.0.0.1 to "
                           "postmaster@mx.example.org")
        assert b_home.messages() == []
        time.sleep(2.2)
        assert eqmail("flush", "--home", a_home.path)[0] == 0
        got = b_home.wait_messages(1, timeout=20)
        assert len(got) == 1 and b"Subject: first" in got[0], a.log()
        # known now: the next message passes at once, after B restarts too
        greylisted = b.log().count("smtpd: greylisted")
        b.stop()
        b.start()
        a_home.write("smtproutes", "mx.example.org:[127.0.0.1]:%d\n" % b.port)
        a.signal(__import__("signal").SIGHUP)
        assert wait_log(a, "control files reloaded")
        inject("second")
        got = b_home.wait_messages(2, timeout=20)
        assert len(got) == 2, a.log() + b.log()
        assert b.log().count("smtpd: greylisted") == greylisted
    finally:
        a_home.remove()
