"""init/xinetd.d/eqmail-smtp: Debian's xinetd, in the foreground with the
project's service file adapted to a high loopback port, runs one
`eqmail smtpd` per connection as an unprivileged user; the message reaches
the queue and eqmaild (running as the same user on the same home) delivers it.

As root only (xinetd switches to the service's user), loopback only; xinetd
and eqmaild are stopped by PID.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from packaging_helpers import (TEST_USER, XINETD_SERVICE, delivered, ensure_user,
                               entry_point, free_port, greeting, kill_all, make_home,
                               need_root, processes_of, server_lines, swaks,
                               wait_delivered, SMTP_LINE)

XINETD = "/usr/sbin/xinetd"
ATTR = re.compile(r"^(\s*)(\w+)(\s*)(\+?=|-=)(.*)$")


def adapt(text: str, home: str, eqmail: str, user: str, port: int) -> str:
    """The shipped service file on 127.0.0.1:`port` for a throwaway home,
    the test virtualenv's eqmail and `user`; every other line as shipped.
    Fails when the file no longer has the shape the changes rely on."""
    entry = re.compile(r"(?<=[\s=])/usr/bin/eqmail(?=\s|$)", re.M)
    assert "/var/qmail" in text and entry.search(text)
    text = entry.sub(eqmail, text)
    text = text.replace("/var/qmail", home)
    out, seen = [], set()
    for line in text.splitlines():
        m = ATTR.match(line)
        if line.startswith("service "):
            line = "service eqmail-smtp-test"
        elif m:
            name = m.group(2)
            seen.add(name)
            if name == "user":
                line = "%suser = %s" % (m.group(1), user)
            elif name == "disable":
                line = "%sdisable = no" % m.group(1)
        out.append(line)
        if line.strip() == "{":
            out += ["    type = UNLISTED", "    port = %d" % port, "    bind = 127.0.0.1"]
    assert {"user", "server", "server_args", "disable"} <= seen, seen
    return "\n".join(out) + "\n"


@pytest.fixture
def stack():
    need_root("the xinetd test (xinetd switches to the service user)")
    if not os.access(XINETD, os.X_OK):
        pytest.fail("xinetd is missing: apt-get install xinetd (tests/run does as root)")
    user = ensure_user(TEST_USER)
    eqmaild, eqmail = entry_point("eqmaild"), entry_point("eqmail")
    home = make_home(user.pw_uid, user.pw_gid, whole=True)
    tmp = tempfile.mkdtemp(prefix="eqmail-xinetd-")
    procs = []
    state = {"home": home, "tmp": tmp, "user": user, "eqmail": eqmail, "procs": procs}
    try:
        # eqmaild as the same user on the same home: it makes the queue and
        # delivers what the xinetd sessions commit (woken through the trigger)
        dport = free_port()
        dlog = open(os.path.join(tmp, "eqmaild.log"), "ab")
        d = subprocess.Popen([eqmaild, "--home", home, "--foreground",
                              "--smtp", "127.0.0.1:%d" % dport],
                             cwd=home, stdin=subprocess.DEVNULL, stdout=dlog,
                             stderr=subprocess.STDOUT, user=user.pw_uid,
                             group=user.pw_gid, extra_groups=[],
                             env={"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"})
        dlog.close()
        procs.append(d)
        state["eqmaild_log"] = os.path.join(tmp, "eqmaild.log")
        assert greeting(dport, 20).startswith(b"220 "), _read(state["eqmaild_log"])
        yield state
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        kill_all(processes_of(home))
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def start_xinetd(state) -> int:
    tmp, home = state["tmp"], state["home"]
    port = free_port()
    with open(XINETD_SERVICE) as f:
        service = adapt(f.read(), home, state["eqmail"],
                        state.get("service_user", state["user"]).pw_name, port)
    conf = os.path.join(tmp, "xinetd.conf")
    with open(conf, "w") as f:
        f.write("defaults\n{\n    instances = 20\n}\n\n" + service)
    own = os.path.join(tmp, "xinetd-own.log")
    state["xinetd_log"] = own
    # RELAYCLIENT in xinetd's own environment must not reach the session
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "RELAYCLIENT": ""}
    p = subprocess.Popen([XINETD, "-dontfork", "-f", conf, "-pidfile",
                          os.path.join(tmp, "xinetd.pid"), "-filelog", own],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.STDOUT, env=env)
    state["procs"].append(p)
    first = greeting(port, 20)
    assert first.startswith(b"220 "), "no greeting through xinetd (%r)\nconf:\n%s\nxinetd:\n%s" % (
        first, service, _read(own))
    return port


@pytest.mark.parametrize("service_user", ["queue owner", "nobody"])
def test_session_through_xinetd_is_delivered(stack, service_user):
    """As the queue's owner the session commits the message itself; as
    another user (nobody) it goes through eqmaild's pickup socket."""
    home, user = stack["home"], stack["user"]
    direct = service_user == "queue owner"
    if not direct:
        stack["service_user"] = pwd.getpwnam("nobody")
        assert not os.stat(os.path.join(home, "queue")).st_mode & 0o002
    port = start_xinetd(stack)

    out = swaks(port, "joe@localhost")
    # only SMTP replies reach the client: smtpd's log lines go to the log file
    bad = [l for l in server_lines(out) if not SMTP_LINE.match(l)]
    assert not bad, "non-SMTP lines sent to the client:\n%s" % "\n".join(bad)

    files = wait_delivered(home, 1)
    assert len(files) == 1, "not delivered\nxinetd:\n%s\neqmaild:\n%s\nsmtpd:\n%s" % (
        _read(stack["xinetd_log"]), _read(stack["eqmaild_log"]),
        _read(os.path.join(home, "log", "smtpd.log")))
    assert os.stat(files[0]).st_uid == user.pw_uid
    with open(files[0], "rb") as f:
        message = f.read()
    assert b"Subject: packaging test" in message
    # the client address came from xinetd's REMOTE_HOST
    assert re.search(rb"^Received: from .*\(HELO client\.example\.com\) \(127\.0\.0\.1\)",
                     message, re.M), message
    if not direct:
        # the pickup socket's Received line names the session's uid
        nobody = stack["service_user"].pw_uid
        assert b"invoked by uid %d)" % nobody in message, message
        return  # nobody cannot write HOME/log: the session log went to /dev/null

    # the session ran as the service's user, logged to HOME/log/smtpd.log, and
    # took the client address from xinetd's REMOTE_HOST
    smtpd_log = os.path.join(home, "log", "smtpd.log")
    assert os.path.exists(smtpd_log), "no session log"
    assert os.stat(smtpd_log).st_uid == user.pw_uid
    text = _read(smtpd_log)
    assert "message accepted" in text and "from 127.0.0.1 " in text, text


def test_no_relaying_through_xinetd(stack):
    """RELAYCLIENT is not set for the session, even when xinetd has it."""
    port = start_xinetd(stack)
    out = swaks(port, "someone@elsewhere.example", expect_ok=False)
    assert re.search(r"^<\*\* ?553 ", out, re.M), out
    time.sleep(0.5)
    assert not delivered(stack["home"])


def test_service_file_shape():
    """What the installation relies on: no NAMEINARGS (segfaults on Debian 12's
    xinetd), an unprivileged user, stderr away from the socket."""
    with open(XINETD_SERVICE) as f:
        text = f.read()
    attrs = {}
    for line in text.splitlines():
        m = ATTR.match(line)
        if m and not line.lstrip().startswith("#"):
            attrs[m.group(2)] = m.group(5).strip()
    assert "NAMEINARGS" not in attrs.get("flags", "")
    assert attrs["user"] not in ("root", "0")
    assert attrs["wait"] == "no" and attrs["socket_type"] == "stream"
    assert attrs["server"] == "/bin/sh"
    assert "2>>" in attrs["server_args"]
    assert attrs["server_args"].endswith("smtpd --home /var/qmail")
    assert "passenv" in attrs and attrs["passenv"] == ""
    assert "RELAYCLIENT" not in attrs.get("env", "")


def test_service_shell_line_without_xinetd(tmp_path):
    """The server_args script run the way xinetd runs it (argv split on white
    space, no quoting) keeps stderr off fd 1 and falls back to /dev/null."""
    with open(XINETD_SERVICE) as f:
        args = re.search(r"^\s*server_args\s*=\s*(.*)$", f.read(), re.M).group(1).split()
    logdir = tmp_path / "home" / "log"
    logdir.mkdir(parents=True)
    args = [a.replace("/var/qmail", str(tmp_path / "home")) for a in args]
    prog = tmp_path / "fake-eqmail"
    prog.write_text("#!/bin/sh\necho \"out:$*\"\necho err-line >&2\n")
    prog.chmod(0o755)
    args = [str(prog) if a == "/usr/bin/eqmail" else a for a in args]
    r = subprocess.run(["/bin/sh"] + args, capture_output=True, text=True, timeout=30,
                       env={})
    assert r.stdout == "out:smtpd --home %s\n" % (tmp_path / "home"), r
    assert r.stderr == ""
    assert (logdir / "smtpd.log").read_text() == "err-line\n"
    # log directory missing: the session still runs, stderr goes nowhere
    shutil.rmtree(logdir)
    r = subprocess.run(["/bin/sh"] + args, capture_output=True, text=True, timeout=30,
                       env={})
    assert r.stdout.startswith("out:smtpd") and r.stderr == "", r
