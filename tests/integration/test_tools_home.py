"""The quick start as an unprivileged user, with the real tools: after
``eqmaild --home ./eqmail-home --foreground``, qstat, inject, sendmail and
mailq run in the same directory without --home reach that daemon, even
where /var/qmail exists; a tool that fails names the home it used and how
it was chosen, with a sysexits code and one line; config-fast refuses a
name that is not a host name at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, ensure_user, free_port, give_to_user, user_dir
import helpers

PY = sys.executable
USER = "eqmailtest"


def as_user(argv, cwd, stdin=b"", env=None, namespace_var_qmail=False):
    """`argv` as the unprivileged user (ourselves when not root) in `cwd`.
    With `namespace_var_qmail` (root), in a mount namespace where
    /var/qmail/control exists: a machine with a system qmail/eqmail."""
    pw = ensure_user(USER)
    base = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "USER": pw.pw_name}
    base.update(env or {})
    if namespace_var_qmail:
        script = ('mount -t tmpfs tmpfs /var && mkdir -p /var/qmail/control && '
                  'echo other.example > /var/qmail/control/me && '
                  'exec setpriv --reuid %d --regid %d --clear-groups "$@"'
                  % (pw.pw_uid, pw.pw_gid))
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                "sh"] + list(argv)
        kw = {}
    else:
        kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[]) if ROOT else {}
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, cwd=cwd,
                          env=base, **kw)


def eqmail(*args):
    return [PY, "-m", "eqmail"] + list(args)


def wait_greeting(proc, port, log):
    helpers.wait_greeting(proc, port, lambda: read(log), timeout=20)


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def wait_files(d, count, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(d) and len(os.listdir(d)) >= count:
            break
        time.sleep(0.05)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture
def quick_start():
    """The README's quick start, run by an unprivileged user in a directory
    of their own, whose ~ holds no eqmail-home: (the directory, its
    environment, the daemon's port)."""
    with user_dir("eqmail-quick-") as d:
        os.makedirs(os.path.join(d, "user"))  # the user's ~: no eqmail-home there
        give_to_user(d)
        env = {"HOME": os.path.join(d, "user")}
        port, sub = free_port(), free_port()
        log = os.path.join(d, "eqmaild.log")
        pw = ensure_user(USER)
        kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[]) if ROOT else {}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [PY, "-m", "eqmail.daemon", "--home", "./eqmail-home", "--foreground",
                 "--smtp", "127.0.0.1:%d" % port, "--submission", "127.0.0.1:%d" % sub],
                cwd=d, env=dict(env, PATH="/usr/bin:/bin", LANG="C.UTF-8"), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        try:
            wait_greeting(proc, port, log)
            yield d, env, proc, log
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def test_tools_after_the_quick_start_reach_its_daemon(quick_start):
    d, env, proc, log = quick_start
    new = os.path.join(d, "eqmail-home", "alias", "Maildir", "new")
    out = as_user(eqmail("qstat"), d, env=env)
    assert out.returncode == 0, out
    assert out.stdout.startswith(b"messages in queue: 0\n")
    out = as_user(eqmail("inject", "joe@localhost"), d, b"Subject: one\n\nx\n", env)
    assert out.returncode == 0, out
    out = as_user(eqmail("sendmail", "ann@localhost"), d, b"Subject: two\n\ny\n", env)
    assert out.returncode == 0, out
    assert len(wait_files(new, 2)) == 2, read(log)
    for tool in ("mailq", "qread"):
        out = as_user(eqmail(tool), d, env=env)
        assert out.returncode == 0 and out.stderr == b"", out


def test_where_var_qmail_exists_the_quick_start_home_still_wins(quick_start):
    if not ROOT:
        pytest.skip("a mount namespace with /var/qmail needs root (CI runs as root)")
    d, env, proc, log = quick_start
    new = os.path.join(d, "eqmail-home", "alias", "Maildir", "new")
    out = as_user(eqmail("inject", "joe@localhost"), d, b"Subject: here\n\nx\n", env,
                  namespace_var_qmail=True)
    assert out.returncode == 0, out
    assert len(wait_files(new, 1)) == 1, read(log)
    # elsewhere, without a home of one's own, the system home is the one:
    # the failure says which and why
    out = as_user(eqmail("qstat"), "/", env=env, namespace_var_qmail=True)
    err = out.stderr.decode()
    assert out.returncode == 66, out
    assert "/var/qmail (the system home: /var/qmail/control exists)" in err, err
    assert len(err.splitlines()) == 1


def test_a_failing_tool_names_the_home_it_used(quick_start):
    d, env, proc, log = quick_start
    default = os.path.join(env["HOME"], "eqmail-home")
    for tool in ("qstat", "qread", "qbad"):
        out = as_user(eqmail(tool), "/", env=env)
        err = out.stderr.decode()
        assert out.returncode == 66, out
        assert err == ("eqmail %s: fatal: no such home %s (the default: no --home, no "
                       "$EQMAIL_HOME, no ./eqmail-home or ~/eqmail-home of yours); give "
                       "the daemon's with --home DIR or $EQMAIL_HOME\n" % (tool, default)), err
    out = as_user(eqmail("inject", "joe@localhost"), "/", b"Subject: x\n\nx\n", env)
    assert out.returncode != 0 and default.encode() in out.stderr, out
    # ~/eqmail-home, where the user's ~ is the quick start's directory
    out = as_user(eqmail("qstat"), "/", env={"HOME": d})
    assert out.returncode == 0 and out.stdout.startswith(b"messages in queue: 0\n"), out
    # $EQMAIL_HOME names its home in failures too
    out = as_user(eqmail("qstat"), d, env=dict(env, EQMAIL_HOME="/nonexistent"))
    assert out.returncode == 66
    assert b"no such home /nonexistent (from $EQMAIL_HOME)" in out.stderr, out


def test_an_eqmail_home_of_someone_else_is_not_used():
    with user_dir("eqmail-foreign-") as d:
        os.makedirs(os.path.join(d, "eqmail-home", "control"))
        os.makedirs(os.path.join(d, "user"))
        give_to_user(os.path.join(d, "user"))
        if not ROOT:  # we own everything we make: a directory of another
            pytest.skip("only root can make a directory that is not the user's")
        out = as_user(eqmail("qstat"), d, env={"HOME": os.path.join(d, "user")})
        assert out.returncode == 66, out
        assert b"./eqmail-home" in out.stderr and b"of yours" in out.stderr
        assert os.path.join(d, "user", "eqmail-home").encode() in out.stderr


def test_config_fast_refuses_a_bad_host_name_at_once():
    with user_dir("eqmail-cf-") as d:
        give_to_user(d)
        home = os.path.join(d, "h")
        for bad in ("bad host", "", "a..b", "x-.example", "x/y", "a@b", "ünï.example",
                    "tab\there"):
            out = as_user(eqmail("config-fast", "--home", home, bad), d)
            err = out.stderr.decode()
            assert out.returncode == 64, (bad, out)
            assert "is not a host name" in err and home in err and len(err.splitlines()) == 1
            assert not os.path.exists(os.path.join(home, "control", "me"))
        out = as_user(eqmail("config-fast", "--home", home, "Mail.Example.ORG"), d)
        assert out.returncode == 0, out
        with open(os.path.join(home, "control", "me")) as f:
            assert f.read() == "mail.example.org\n"


def test_usage_errors_are_one_line_and_64():
    for argv in (["qstat", "--bogus"], ["qbad", "show"], ["qbad", "frob"], ["nosuchtool"],
                 ["config-fast", "a", "b"], ["maildirmake"]):
        out = subprocess.run(eqmail(*argv), capture_output=True, timeout=30, cwd="/")
        assert out.returncode == 64, (argv, out)
        assert len(out.stderr.splitlines()) == 1 and b"Traceback" not in out.stderr, out


def test_mailq_is_qread_and_qbad_has_help(tmp_path):
    from eqmail.paths import init_home

    init_home(str(tmp_path), "mx.example.org")
    q = subprocess.run(eqmail("qread", "--home", str(tmp_path)), capture_output=True,
                       timeout=30)
    m = subprocess.run(eqmail("mailq", "--home", str(tmp_path)), capture_output=True,
                       timeout=30)
    assert q.returncode == m.returncode == 0 and q.stdout == m.stdout, (q, m)
    for tool in ("qbad", "mailq"):
        out = subprocess.run(eqmail(tool, "--help"), capture_output=True, timeout=30)
        assert out.returncode == 0 and b"usage: " in out.stdout and b"Home: " in out.stdout
    text = subprocess.run(eqmail("--help"), capture_output=True, timeout=30).stdout
    assert b"qbad" in text and b"mailq is qread" in text and b"./eqmail-home" in text
