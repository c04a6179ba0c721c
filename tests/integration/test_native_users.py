"""System users' mail as on Debian (issue 20, items 1 and 3), with eqmaild
started as root: the package's defaultdelivery (``|dot-forward .forward``
then ``./Maildir/``) and control/mailspool.

* a user with ~/Maildir/ gets it (qmail's way);
* a user without one gets the mbox SPOOL/USER, made mode 0660 in the
  spool's group, dot-locked while written (Debian policy 11.6), never
  waiting a week for a Maildir;
* a user with ~/.forward is forwarded as it says (addresses, programs,
  ``\\user`` to keep a copy); its program runs without the mail group.
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import ROOT, free_port, wait_log
from test_privsep import _start_as_root

pytestmark = pytest.mark.skipif(not ROOT, reason="system users need a root eqmaild")

USERS = ("eqmailann", "eqmailbob", "eqmailcid")


@pytest.fixture
def people():
    """Three system users with homes of their own in /tmp (none with a
    Maildir yet); a spool directory root:mail 2775 like /var/mail."""
    base = tempfile.mkdtemp(prefix="eqmail-people-", dir="/tmp")
    os.chmod(base, 0o755)
    spool = os.path.join(base, "spool")
    os.mkdir(spool)
    mail = grp.getgrnam("mail").gr_gid
    os.chown(spool, 0, mail)
    os.chmod(spool, 0o2775)
    out = {}
    for name in USERS:
        home = os.path.join(base, name)
        subprocess.run(["useradd", "--no-create-home", "--home-dir", home, "--shell",
                        "/usr/sbin/nologin", name], check=True, timeout=30)
        pw = pwd.getpwnam(name)
        os.mkdir(home)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o755)
        out[name] = pw
    yield base, spool, out
    for name in USERS:
        subprocess.run(["userdel", name], timeout=30)
    shutil.rmtree(base, ignore_errors=True)


def _put_as(pw, path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)


def _wait(pred, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_maildir_spool_and_dot_forward_for_system_users(home, people):
    base, spool, pw = people
    ann, bob, cid = pw["eqmailann"], pw["eqmailbob"], pw["eqmailcid"]
    # ann: ~/Maildir/ exists -> Maildir; bob: nothing -> the spool
    subprocess.run(["setpriv", "--reuid=%d" % ann.pw_uid, "--regid=%d" % ann.pw_gid,
                    "--clear-groups", "mkdir", "-p", ann.pw_dir + "/Maildir/new",
                    ann.pw_dir + "/Maildir/cur", ann.pw_dir + "/Maildir/tmp"], check=True)
    # cid: ~/.forward with a program, a forward to ann, and \cid (a copy here)
    groups_out = os.path.join(cid.pw_dir, "groups")
    _put_as(cid, os.path.join(cid.pw_dir, ".forward"),
            "# cid's forward\n\"|id -G > %s\", eqmailann\n\\eqmailcid\n" % groups_out)
    home.setup(defaultdelivery="|dot-forward .forward\n./Maildir/\n", mailspool=spool + "\n")
    port = free_port()
    proc, d = _start_as_root(home, port)
    try:
        assert wait_log(d, "started"), d.log()
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            for name in USERS:
                s.sendmail("a@example.com", ["%s@localhost" % name],
                           b"Subject: to %s\r\n\r\nFrom the start\r\nhello\r\n" % name.encode())
        # ann: the Maildir, twice (her own message and cid's forward)
        ann_new = os.path.join(ann.pw_dir, "Maildir", "new")
        assert _wait(lambda: len(os.listdir(ann_new)) == 2), d.log()
        # bob: the spool mbox, 0660 bob:mail, no dot-lock left
        box = os.path.join(spool, "eqmailbob")
        assert _wait(lambda: os.path.exists(box) and os.path.getsize(box) > 0), d.log()
        st = os.stat(box)
        assert (st.st_uid, st.st_gid) == (bob.pw_uid, grp.getgrnam("mail").gr_gid)
        assert st.st_mode & 0o777 == 0o660
        with open(box, "rb") as f:
            data = f.read()
        assert data.startswith(b"From a@example.com ")
        assert b"Delivered-To: eqmailbob@localhost\n" in data
        assert b"\n>From the start\n" in data  # mbox quoting
        assert not os.path.exists(box + ".lock")
        # cid: the program ran (without the mail group), and a copy in the spool
        cidbox = os.path.join(spool, "eqmailcid")
        assert _wait(lambda: os.path.exists(groups_out) and os.path.exists(cidbox)), d.log()
        with open(groups_out) as f:
            groups = [int(g) for g in f.read().split()]
        assert grp.getgrnam("mail").gr_gid not in groups
        assert groups == [cid.pw_gid]
        with open(cidbox, "rb") as f:
            assert b"Subject: to eqmailcid" in f.read()
        # a second message appends to bob's mbox
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail("b@example.com", ["eqmailbob@localhost"], b"Subject: two\r\n\r\n2\r\n")
        assert _wait(lambda: open(box, "rb").read().count(b"\nFrom ") == 1), d.log()
        assert "does not exist" not in d.log()
        # sendmail -bv tells the same story
        out = subprocess.run([sys.executable, "-m", "eqmail", "verify",
                              "--home", home.path, "eqmailbob@localhost",
                              "eqmailcid@localhost"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out
        assert "  mbox %s" % box in out.stdout
        assert "  from %s/.forward" % cid.pw_dir in out.stdout
        assert "  program id -G > %s" % groups_out in out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_writable_forward_file_is_not_followed(home, people):
    base, spool, pw = people
    bob = pw["eqmailbob"]
    _put_as(bob, os.path.join(bob.pw_dir, ".forward"), "someone@example.net\n", mode=0o666)
    home.setup(defaultdelivery="|dot-forward .forward\n./Maildir/\n", mailspool=spool + "\n")
    port = free_port()
    proc, d = _start_as_root(home, port)
    try:
        assert wait_log(d, "started"), d.log()
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail("a@example.com", ["eqmailbob@localhost"], b"Subject: x\r\n\r\nx\r\n")
        assert wait_log(d, "is writable by others"), d.log()
        assert "deferral" in d.log()
        assert not os.path.exists(os.path.join(spool, "eqmailbob"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
