"""The Debian package: packaging/build-deb.sh builds dist/eqmail_*.deb, and on
this machine `apt-get install ./dist/eqmail_*.deb` installs it, creates the
users and /var/qmail, and starts eqmaild; the init script's start, status,
reload and stop work on the installed daemon, mail sent with swaks to
127.0.0.1:25 lands in a system user's Maildir owned by that user, and
`apt-get remove` stops it and keeps the home, a second install finds it
again, and `apt-get purge` (of a running daemon) leaves no eqmaild behind and
removes what the package made but not mail: a message left in the alias
user's Maildir keeps /var/qmail/alias (and the users owning it).

Root only (skipped otherwise).  This test changes the machine, and undoes
what it changed at the end:

* The package is an MTA (Provides/Conflicts/Replaces: mail-transport-agent,
  as postfix and exim4 declare), so apt removes an installed MTA such as
  tests/run's Postfix.  The removed packages are installed again at the end
  (their configuration stays, since they are only removed, not purged, and
  the machine's policy-rc.d keeps them from starting).
* /etc/default/eqmaild is written before the installation (dpkg keeps it
  with --force-confold) so that eqmaild listens on 127.0.0.1:25 and :587
  only: the session's Postfix peer holds 127.0.0.25:25, so the package's
  default (all addresses) could not bind.
* A policy-rc.d that denies every start (as in Docker images) is wrapped for
  the duration: eqmaild may be started and stopped by the maintainer scripts;
  every other service still gets the original answer.
* A system user with a home and ~/Maildir receives the message; it is
  deleted with its home at the end, and so are what the purge kept of
  /var/qmail and the users eqmail and alias if the package made them.

It is skipped when eqmail is already installed, /var/qmail or
/etc/default/eqmaild exists, or 127.0.0.1:25 or :587 cannot be bound.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import time

import pytest

from packaging_helpers import REPO, alive, kill_all, need_root, swaks, wait_gone

SYS_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C",
           "DEBIAN_FRONTEND": "noninteractive"}
APT = ["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
       "-o", "Dpkg::Options::=--force-confdef"]
POLICY = "/usr/sbin/policy-rc.d"
POLICY_SAVED = "/usr/sbin/policy-rc.d.eqmail-test-saved"
INIT = "/etc/init.d/eqmaild"
DEFAULTS = "/etc/default/eqmaild"
PIDFILE = "/run/eqmaild.pid"
QMAIL = "/var/qmail"
DAEMON = "/usr/sbin/eqmaild"
RCPT_USER = "eqdebuser"
JOE = "eqdebjoe"  # a system user without a Maildir: Debian's /var/mail/USER
LISTEN = "--smtp 127.0.0.1:25 --submission 127.0.0.1:587"


def run(cmd, timeout=600.0, **kw):
    r = subprocess.run(cmd, env=SYS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=timeout, **kw)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def installed(pkg: str) -> bool:
    rc, out = run(["dpkg-query", "-W", "-f=${Status}", pkg], timeout=60)
    return rc == 0 and "ok installed" in out


def installed_mtas():
    """Installed packages that provide mail-transport-agent (what apt would
    remove for eqmail)."""
    rc, out = run(["dpkg-query", "-W", "-f=${Package}\t${Status}\t${Provides}\n"], timeout=60)
    mtas = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and "ok installed" in parts[1] and \
                "mail-transport-agent" in parts[2] and parts[0] != "eqmail":
            mtas.append(parts[0])
    return mtas


def can_bind(host: str, port: int) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as eqmaild does
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def package_daemons():
    """PIDs of live processes running the package's eqmaild (the daemon and
    its delivery helper)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if DAEMON.encode() in cmd.split(b"\0") and alive(int(name)):
            out.append(int(name))
    return sorted(out)


def read_pid():
    try:
        with open(PIDFILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def wait_running(timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = read_pid()
        if pid and alive(pid):
            return pid
        time.sleep(0.1)
    return None


def uids(pid: int):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    return []


def init(action: str):
    return run([INIT, action], timeout=120)


# -- the build, once per session ------------------------------------------------------

@pytest.fixture(scope="session")
def deb():
    need_root("building and installing the .deb")
    t0 = time.time()
    rc, out = run([os.path.join(REPO, "packaging", "build-deb.sh")], timeout=900, cwd=REPO)
    took = time.time() - t0
    assert rc == 0, "packaging/build-deb.sh failed (%d):\n%s" % (rc, out[-6000:])
    debs = glob.glob(os.path.join(REPO, "dist", "eqmail_*_all.deb"))
    assert len(debs) == 1, debs
    print("\n.deb built in %.1f s: %s" % (took, debs[0]))
    return debs[0]


def test_deb_contents(deb):
    rc, info = run(["dpkg-deb", "-f", deb], timeout=60)
    assert rc == 0, info
    for field in ("Package: eqmail", "Architecture: all", "Provides: mail-transport-agent",
                  "Conflicts: mail-transport-agent", "Replaces: mail-transport-agent"):
        assert field in info, info
    depends = [l for l in info.splitlines() if l.startswith("Depends:")][0]
    for dep in ("python3-gevent", "python3-dnspython", "passwd"):
        assert dep in depends, depends
    assert "pure-cdb" not in depends and "cdb" not in depends, depends
    rc, listing = run(["dpkg-deb", "-c", deb], timeout=60)
    assert rc == 0, listing
    for path in ("./etc/init.d/eqmaild", "./etc/default/eqmaild", "./usr/sbin/eqmaild",
                 "./usr/bin/eqmail", "./usr/sbin/sendmail -> ../bin/eqmail",
                 "./usr/lib/python3/dist-packages/cdblib/cdblib.py",
                 "./usr/lib/python3/dist-packages/eqmail/daemon.py",
                 "./lib/systemd/system/eqmaild.service",
                 "./usr/bin/newaliases -> eqmail", "./etc/logrotate.d/eqmail",
                 "./usr/share/doc/eqmail/examples/eqmail-smtp"):
        assert path in listing, path
    ctrl = os.path.join(REPO, "build", "deb", "ctrl")
    shutil.rmtree(ctrl, ignore_errors=True)
    rc, out = run(["dpkg-deb", "-e", deb, ctrl], timeout=60)
    assert rc == 0, out
    with open(os.path.join(ctrl, "conffiles")) as f:
        assert set(f.read().split()) == {"/etc/default/eqmaild", "/etc/init.d/eqmaild",
                                         "/etc/logrotate.d/eqmail"}
    for name in ("config", "templates"):  # the debconf questions
        assert os.path.exists(os.path.join(ctrl, name)), name
    shutil.rmtree(ctrl, ignore_errors=True)


# -- install, run, purge --------------------------------------------------------------

class Machine:
    """What the test changes on the machine, and how to undo it."""

    def __init__(self):
        self.removed_mtas = []
        self.policy_wrapped = False
        self.user_made = False
        self.users_before = {}
        self.qmail_made = False
        self.saved = {}
        self.joe_made = False

    def save(self, path):
        """Keep `path` as it is now (or its absence) for cleanup()."""
        if path not in self.saved:
            try:
                with open(path, "rb") as f:
                    self.saved[path] = f.read()
            except FileNotFoundError:
                self.saved[path] = None

    def restore_files(self):
        for path, data in self.saved.items():
            if data is None:
                if os.path.exists(path):
                    os.unlink(path)
            else:
                with open(path, "wb") as f:
                    f.write(data)
        if os.path.exists("/etc/aliases.cdb") and "/etc/aliases.cdb" not in self.saved:
            os.unlink("/etc/aliases.cdb")

    # policy-rc.d: let eqmaild through, everything else as before
    def wrap_policy(self):
        if os.path.exists(POLICY_SAVED):  # a run that died before restoring
            os.replace(POLICY_SAVED, POLICY)
        if not os.path.exists(POLICY):
            return  # no policy: invoke-rc.d runs every action already
        shutil.copy2(POLICY, POLICY_SAVED)
        tmp = POLICY + ".eqmail-test-new"
        with open(tmp, "w") as f:
            f.write("#!/bin/sh\n"
                    "# written by tests/packaging/test_deb.py for its run; the original\n"
                    "# is %s and comes back at the end\n"
                    "for a; do\n"
                    "  case \"$a\" in --*) ;; eqmaild) exit 0 ;; *) break ;; esac\n"
                    "done\n"
                    "exec %s \"$@\"\n" % (POLICY_SAVED, POLICY_SAVED))
        os.chmod(tmp, 0o755)
        os.replace(tmp, POLICY)
        self.policy_wrapped = True

    def restore_policy(self):
        if self.policy_wrapped and os.path.exists(POLICY_SAVED):
            os.replace(POLICY_SAVED, POLICY)
            self.policy_wrapped = False

    def make_user(self):
        try:
            pwd.getpwnam(RCPT_USER)
        except KeyError:
            rc, out = run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin",
                           RCPT_USER], timeout=60)
            assert rc == 0, out
            self.user_made = True
        pw = pwd.getpwnam(RCPT_USER)
        maildir = os.path.join(pw.pw_dir, "Maildir")
        if not os.path.isdir(maildir):
            rc, out = run(["runuser", "-u", RCPT_USER, "--", "env", "HOME=" + pw.pw_dir,
                           "/usr/bin/eqmail", "maildirmake", maildir], timeout=60)
            assert rc == 0, "eqmail maildirmake as %s: %s" % (RCPT_USER, out)
        return pw, maildir

    def cleanup(self):
        problems = []
        if installed("eqmail"):
            rc, out = run(APT + ["purge", "eqmail"])
            if rc != 0:
                problems.append("apt-get purge eqmail: %s" % out[-2000:])
        left = package_daemons()
        if left:
            kill_all(left)
        # what the purge keeps on purpose (a home with mail in it, and the
        # users owning it) was made by this test: remove it
        if self.qmail_made:
            shutil.rmtree(QMAIL, ignore_errors=True)
            shutil.rmtree("/var/lib/eqmail", ignore_errors=True)
            for u in ("alias", "eqmail"):
                if not self.users_before.get(u, True) and _exists(u):
                    rc, out = run(["userdel", u], timeout=60)
                    if rc != 0:
                        problems.append("userdel %s: %s" % (u, out))
            if not self.users_before.get("eqmail", True):
                run(["groupdel", "eqmail"], timeout=60)
        self.restore_policy()
        self.restore_files()
        if self.joe_made:
            run(["userdel", "--remove", JOE], timeout=60)
            for path in ("/var/mail/" + JOE, "/var/mail/%s.lock" % JOE):
                if os.path.exists(path):
                    os.unlink(path)
        if self.removed_mtas:
            rc, out = run(APT + ["install", "--no-install-recommends"] + self.removed_mtas)
            if rc != 0:
                problems.append("reinstalling %s: %s" % (self.removed_mtas, out[-2000:]))
        if self.user_made:
            run(["userdel", "--remove", RCPT_USER], timeout=60)
            try:
                shutil.rmtree("/home/" + RCPT_USER)
            except OSError:
                pass
        return problems


@pytest.fixture
def machine(deb):
    need_root("installing the .deb")
    if installed("eqmail"):
        pytest.skip("eqmail is installed on this machine already: not touching it")
    for path in (QMAIL, DEFAULTS):
        if os.path.exists(path):
            pytest.skip("%s exists: the package test needs a machine without it" % path)
    for port in (25, 587):
        if not can_bind("127.0.0.1", port):
            pytest.skip("127.0.0.1:%d is in use (another MTA is running)" % port)
    if package_daemons():
        pytest.skip("a %s is running already" % DAEMON)
    m = Machine()
    m.wrap_policy()
    try:
        yield m
    finally:
        problems = m.cleanup()
        assert not problems, "\n".join(problems)


def test_install_start_deliver_reload_stop_purge(deb, machine):
    # the settings the package's start uses: loopback only (see the module doc)
    with open(os.path.join(REPO, "init", "eqmaild.default")) as f:
        text = f.read()
    assert '\nDAEMON_ARGS=""\n' in text
    with open(DEFAULTS, "w") as f:
        f.write(text.replace('\nDAEMON_ARGS=""\n', '\nDAEMON_ARGS="%s"\n' % LISTEN))

    machine.removed_mtas = installed_mtas()  # apt removes them for eqmail
    machine.users_before = {u: _exists(u) for u in ("eqmail", "alias")}
    machine.qmail_made = True
    for path in ("/etc/aliases", "/etc/mailname"):
        machine.save(path)
    # port 25 is taken during the installation: the install still succeeds
    # and says so (issue 20 item 5); eqmaild starts once the port is free
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", 25))
    blocker.listen(1)
    try:
        rc, out = run(APT + ["install", "--no-install-recommends", deb])
    finally:
        blocker.close()
    assert rc == 0, "apt-get install failed (%d):\n%s" % (rc, out[-6000:])
    assert installed("eqmail")
    assert "eqmaild did not start (is port 25 or 587 in use" in out, out[-3000:]
    assert not package_daemons()
    rc, text = init("start")
    assert rc == 0, text
    for mta in machine.removed_mtas:
        assert not installed(mta), "%s should have been replaced" % mta
    with open(DEFAULTS) as f:
        assert LISTEN in f.read(), "dpkg replaced the administrator's /etc/default/eqmaild"

    # postinst: users, the embedded default home, alias/ owned by alias
    eqmail = pwd.getpwnam("eqmail")
    alias = pwd.getpwnam("alias")
    assert os.path.exists(os.path.join(QMAIL, "control", "me"))
    assert os.stat(os.path.join(QMAIL, "alias")).st_uid == alias.pw_uid
    assert os.path.islink("/usr/sbin/sendmail")

    # debconf, non-interactive: local only, the mail name from the host;
    # system users get Debian's defaults; /etc/aliases compiled
    control = os.path.join(QMAIL, "control")
    with open(os.path.join(control, "listen")) as f:
        listen = f.read()
    assert "smtp 127.0.0.1:25\n" in listen and "0.0.0.0" not in listen
    with open("/etc/mailname") as f:
        mailname = f.read().strip()
    with open(os.path.join(control, "me")) as f:
        assert f.read().strip() == mailname
    with open(os.path.join(control, "defaultdelivery")) as f:
        assert f.read() == "|dot-forward .forward\n./Maildir/\n"
    with open(os.path.join(control, "mailspool")) as f:
        assert f.read() == "/var/mail\n"
    assert os.path.exists("/etc/aliases") and os.path.exists("/etc/aliases.cdb")

    # started by hand once port 25 was free
    pid = wait_running()
    assert pid, "eqmaild did not start:\n%s" % text
    with open("/proc/%d/comm" % pid) as f:
        assert f.read().strip() == "eqmaild"
    assert uids(pid) == [eqmail.pw_uid] * 4, "eqmaild runs as %s, not eqmail" % uids(pid)
    rc, text = init("start")
    assert rc == 0, text
    assert read_pid() == pid, "a second start replaced the daemon"

    # a system user's Maildir, owned by that user
    pw, maildir = machine.make_user()
    swaks(25, "%s@localhost" % RCPT_USER)
    new = os.path.join(maildir, "new")
    deadline = time.time() + 30
    while time.time() < deadline and not os.listdir(new):
        time.sleep(0.1)
    files = os.listdir(new)
    assert len(files) == 1, "not delivered to %s (queue: %s)" % (
        new, run(["/usr/bin/eqmail", "qstat"], timeout=60)[1])
    st = os.stat(os.path.join(new, files[0]))
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
    with open(os.path.join(new, files[0]), "rb") as f:
        assert b"Subject: packaging test" in f.read()

    # an address without a user of its own: the alias user's catch-all
    swaks(25, "postmaster@localhost")
    alias_new = os.path.join(QMAIL, "alias", "Maildir", "new")
    deadline = time.time() + 30
    while time.time() < deadline and not os.listdir(alias_new):
        time.sleep(0.1)
    alias_files = os.listdir(alias_new)
    assert len(alias_files) == 1, "not delivered to %s" % alias_new
    assert os.stat(os.path.join(alias_new, alias_files[0])).st_uid == alias.pw_uid

    # a system user without a Maildir, mailed by root as cron does (env -i):
    # /var/mail/USER, 0660 USER:mail, from root@mailname
    rc, out = run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", JOE])
    assert rc == 0, out
    machine.joe_made = True
    r = subprocess.run(["env", "-i", "/usr/sbin/sendmail", JOE], input=b"Subject: cron\n\nhi\n",
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r
    box = "/var/mail/" + JOE
    deadline = time.time() + 30
    while time.time() < deadline and not (os.path.exists(box) and os.path.getsize(box)):
        time.sleep(0.1)
    assert os.path.exists(box), run(["/usr/bin/eqmail", "qread"], timeout=60)[1]
    st = os.stat(box)
    assert st.st_uid == pwd.getpwnam(JOE).pw_uid and st.st_mode & 0o777 == 0o660
    import grp
    assert st.st_gid == grp.getgrnam("mail").gr_gid
    with open(box, "rb") as f:
        data = f.read()
    assert data.startswith(b"From root@%s " % mailname.encode()), data[:200]
    assert b"Subject: cron" in data
    # /etc/aliases: an alias to that user, compiled by newaliases
    with open("/etc/aliases", "a") as f:
        f.write("eqdebteam: %s\n" % JOE)
    rc, out = run(["newaliases"])
    assert rc == 0 and "aliases" in out, out
    rc, out = run(["/usr/sbin/sendmail", "-bv", "eqdebteam"])
    assert rc == 0 and "forward to %s@%s" % (JOE, mailname) in out, out
    swaks(25, "eqdebteam@localhost")
    deadline = time.time() + 30
    while time.time() < deadline and open(box, "rb").read().count(b"\nFrom ") < 1:
        time.sleep(0.1)
    assert open(box, "rb").read().count(b"\nFrom ") == 1, "the alias was not followed"
    # sendmail -q: any user may flush
    rc, out = run(["runuser", "-u", JOE, "--", "/usr/sbin/sendmail", "-q"])
    assert rc == 0, out

    rc, text = init("status")
    assert rc == 0, text
    rc, text = init("reload")
    assert rc == 0, text
    time.sleep(1)
    assert read_pid() == pid and alive(pid), "reload changed the PID"
    assert init("status")[0] == 0

    # dpkg-reconfigure, non-interactive, with preseeded answers: a satellite
    sel = ("eqmail eqmail/mode select satellite\n"
           "eqmail eqmail/mailname string sat.example.org\n"
           "eqmail eqmail/smarthost string 127.0.0.1:2526\n"
           "eqmail eqmail/smarthost_login string\n")
    r = subprocess.run(["debconf-set-selections"], input=sel.encode(), capture_output=True,
                       timeout=60, env=SYS_ENV)
    assert r.returncode == 0, r
    rc, out = run(["dpkg-reconfigure", "-fnoninteractive", "eqmail"])
    assert rc == 0, out
    with open(os.path.join(control, "smtproutes")) as f:
        assert ":127.0.0.1:2526\n" in f.read()
    st = os.stat(os.path.join(control, "smtproutes"))
    assert st.st_mode & 0o777 == 0o640 and st.st_gid == pwd.getpwnam("eqmail").pw_gid
    with open("/etc/mailname") as f:
        assert f.read() == "sat.example.org\n"
    with open(os.path.join(control, "me")) as f:
        assert f.read() == "sat.example.org\n"
    rc, out = run(["/usr/sbin/sendmail", "-bv", "someone@example.net"])
    assert "relay 127.0.0.1:2526 (control/smtproutes)" in out, out
    pid = wait_running()
    assert pid, "eqmaild did not come back after dpkg-reconfigure:\n%s" % out

    rc, text = init("stop")
    assert rc == 0, text
    assert not os.path.exists(PIDFILE), "stop left the pidfile"
    assert not wait_gone([pid]), "eqmaild %d still runs after stop" % pid
    assert not wait_gone(package_daemons(), 10.0)
    assert init("status")[0] == 3

    # remove keeps the home (configuration, queue, the alias user's mail),
    # the users and the conffiles, and stops the daemon
    rc, text = init("start")
    assert rc == 0, text
    pid = wait_running()
    assert pid
    rc, out = run(APT + ["remove", "eqmail"])
    assert rc == 0, "apt-get remove failed (%d):\n%s" % (rc, out[-6000:])
    assert not wait_gone([pid]), "eqmaild %d survived the removal" % pid
    assert not wait_gone(package_daemons(), 10.0)
    assert os.listdir(alias_new) == alias_files, "remove touched alias/Maildir"
    for path in (os.path.join(QMAIL, "control", "me"), DEFAULTS, INIT):
        assert os.path.exists(path), "remove deleted %s" % path
    assert _exists("eqmail") and _exists("alias")

    # installed again: the same home, started by the package
    rc, out = run(APT + ["install", "--no-install-recommends", deb])
    assert rc == 0, "apt-get install (again) failed (%d):\n%s" % (rc, out[-6000:])
    pid = wait_running()
    assert pid, "the reinstalled package did not start eqmaild:\n%s" % out[-3000:]
    assert os.listdir(alias_new) == alias_files

    # purge with the daemon running
    rc, out = run(APT + ["purge", "eqmail"])
    assert rc == 0, "apt-get purge failed (%d):\n%s" % (rc, out[-6000:])
    assert not installed("eqmail")
    assert not wait_gone([pid]), "eqmaild %d survived the purge" % pid
    assert not wait_gone(package_daemons(), 10.0), "eqmaild processes left after purge"
    for path in (INIT, DEFAULTS, PIDFILE, "/usr/sbin/sendmail", "/var/lib/eqmail",
                 "/etc/aliases.cdb"):
        assert not os.path.lexists(path), "%s left after purge" % path
    # what the package made goes, the mail stays: the queue was empty and
    # went; alias/ holds a message and stays, and with it the home and the
    # users (files of theirs remain)
    assert sorted(os.listdir(QMAIL)) == ["alias"], os.listdir(QMAIL)
    assert os.listdir(alias_new) == alias_files, "purge deleted the alias user's mail"
    assert _exists("eqmail") and _exists("alias")
    # the system user's mail is never the package's to remove
    assert os.listdir(new) == files


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False
