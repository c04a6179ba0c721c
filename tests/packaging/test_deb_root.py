"""The .deb as a Debian admin uses it (issue 20), in a clean bookworm root made
by mmdebstrap and run in a network namespace of its own (only its loopback):
the package installed with apt non-interactively (debconf: local only, the
preseeded recipient of root's mail), then

* cron's exact sendmail command line (`env -i`, `-FCronDaemon -i -B8BITMIME
  -oem root`) reaches root's recipient, a system user without a Maildir, in
  /var/mail/USER, which s-nail reads;
* /etc/aliases made by the package, an entry added and compiled by
  newaliases, followed for SMTP mail; sendmail -bv shows the way;
* ~/.forward with a program and a copy kept (\\user);
* eqmail status and eqmail queue list;
* dpkg-reconfigure with preseeded answers (satellite, a smarthost);
* apt-get purge leaves no daemon and keeps the users' mail.

Root only.  The root's tarball is cached in /var/cache/eqmail-tests (a week);
the first run downloads about 60 MB from the machine's Debian mirror.
Everything the test starts runs in the namespace and the root, and is killed
(by the root it runs in) and unmounted at the end.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

from packaging_helpers import need_root
from test_deb import deb  # noqa: F401  (the session's .deb)

CACHE = "/var/cache/eqmail-tests"
TARBALL = os.path.join(CACHE, "bookworm-root.tar")
MAX_AGE = 7 * 86400
MIRROR = "http://deb.debian.org/debian"
# what the package needs (installed offline in the namespace) and what the
# test uses: s-nail to read the spool, procps for ps
INCLUDE = ("python3-gevent,python3-dnspython,passwd,debconf,openssl,s-nail,procps,"
           "ca-certificates")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
       "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
APT = ["apt-get", "-y", "-q", "--no-install-recommends", "-o",
       "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


def _tarball() -> str:
    if os.path.exists(TARBALL) and time.time() - os.stat(TARBALL).st_mtime < MAX_AGE:
        return TARBALL
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is missing (.ci/run installs it)")
    os.makedirs(CACHE, exist_ok=True)
    tmp = TARBALL[:-4] + ".new.tar"  # mmdebstrap picks the format by the name
    r = subprocess.run(["mmdebstrap", "--variant=apt", "--include=" + INCLUDE, "bookworm",
                        tmp, MIRROR], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, "mmdebstrap failed:\n%s" % (r.stdout + r.stderr)[-4000:]
    os.replace(tmp, TARBALL)
    return TARBALL


class Root:
    """A bookworm root in a directory, its /proc mounted, entered through a
    network namespace that has only its loopback."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="eqmail-debroot-", dir="/var/tmp")
        self.ns = "eqmail-deb-%d" % os.getpid()
        with tarfile.open(_tarball()) as t:
            t.extractall(self.path, numeric_owner=True)
        subprocess.run(["mount", "-t", "proc", "proc", os.path.join(self.path, "proc")],
                       check=True, timeout=30)
        subprocess.run(["ip", "netns", "add", self.ns], check=True, timeout=30)
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"],
                       check=True, timeout=30)
        # no init system in a chroot: invoke-rc.d would block every start
        # without a policy that allows it (a machine with init needs none)
        policy = os.path.join(self.path, "usr", "sbin", "policy-rc.d")
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(policy, 0o755)
        with open(os.path.join(self.path, "etc", "hostname"), "w") as f:
            f.write("debroot\n")
        with open(os.path.join(self.path, "etc", "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n127.0.1.1 debroot.example.org debroot\n")

    def run(self, cmd, input=None, timeout=300, check=True):
        """`cmd` (a shell command line) in the root and the namespace."""
        r = subprocess.run(["ip", "netns", "exec", self.ns, "chroot", self.path,
                            "/bin/sh", "-c", cmd], input=input, capture_output=True,
                           timeout=timeout, env=ENV)
        out = (r.stdout + r.stderr).decode("utf-8", "replace")
        if check:
            assert r.returncode == 0, "%s -> %d:\n%s" % (cmd, r.returncode, out[-4000:])
        return r.returncode, out

    def file(self, path) -> str:
        return os.path.join(self.path, path.lstrip("/"))

    def read(self, path) -> bytes:
        with open(self.file(path), "rb") as f:
            return f.read()

    def pids(self):
        """Processes whose root directory is this root."""
        out = []
        real = os.path.realpath(self.path)
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.readlink("/proc/%s/root" % name) == real:
                        out.append(int(name))
                except OSError:
                    pass
        return out

    def wait(self, pred, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return True
            time.sleep(0.1)
        return False

    def remove(self):
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
            time.sleep(0.5)
        subprocess.run(["umount", "-l", os.path.join(self.path, "proc")], timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], timeout=30)
        shutil.rmtree(self.path, ignore_errors=True)


@pytest.fixture
def root(deb):  # noqa: F811
    need_root("a Debian root in a network namespace")
    for tool in ("ip", "chroot"):
        if shutil.which(tool) is None:
            pytest.fail("%s is missing (.ci/run installs iproute2)" % tool)
    r = Root()
    try:
        yield r
    finally:
        r.remove()


def _peek(root, proc) -> bytes:
    """What the sink printed so far (nothing once it waits: non-blocking)."""
    import select

    out = b""
    while select.select([proc.stdout], [], [], 0)[0]:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        out += chunk
    root.seen = getattr(root, "seen", b"") + out
    return root.seen


def _daemon(root):
    try:
        pid = int(root.read("/run/eqmaild.pid").decode().strip())
    except (OSError, ValueError):
        return None
    return pid if pid in root.pids() else None


def test_the_package_in_a_clean_debian_root(root, deb):  # noqa: F811
    shutil.copy(deb, root.file("/tmp/eqmail.deb"))
    # the admin's answer for root's mail, as a preseed file would give it
    root.run("useradd --create-home --shell /bin/sh joe")
    root.run("echo 'eqmail eqmail/root_address string joe' | debconf-set-selections")
    rc, out = root.run(" ".join(APT) + " install /tmp/eqmail.deb", timeout=600)
    assert "Setting up eqmail" in out, out
    assert root.wait(lambda: _daemon(root)), "eqmaild is not running:\n" + out
    control = "/var/qmail/control/"
    assert b"smtp 127.0.0.1:25\n" in root.read(control + "listen")  # local only
    mailname = root.read("/etc/mailname").decode().strip()
    assert mailname and root.read(control + "me").decode().strip() == mailname
    assert b"\nroot: joe\n" in root.read("/etc/aliases")
    assert os.path.exists(root.file("/etc/aliases.cdb"))

    # cron's own command line, with cron's empty environment: root -> joe,
    # who has no Maildir: /var/mail/joe, read with s-nail
    root.run("env -i /usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem root",
             input=b"Subject: Cron <root@debroot> true\n\nfrom cron\n")
    box = "/var/mail/joe"
    assert root.wait(lambda: os.path.exists(root.file(box)) and
                     b"from cron" in root.read(box)), root.run("eqmail queue list")[1]
    data = root.read(box)
    assert data.startswith(b"From root@%s " % mailname.encode())
    assert b"From: \"CronDaemon\" <root@%s>" % mailname.encode() in data
    rc, out = root.run("runuser -u joe -- s-nail -e", check=False)
    assert rc == 0, "s-nail sees no mail for joe: " + out
    rc, out = root.run("runuser -u joe -- s-nail -H")
    assert "Cron <root@debroot> true" in out

    # /etc/aliases: a list with joe, compiled by newaliases, over SMTP
    root.run("printf 'team: joe, root\\n' >> /etc/aliases && newaliases")
    rc, out = root.run("sendmail -bv team")
    assert "forward to joe@%s" % mailname in out and "from alias at /etc/aliases:" in out
    root.run("printf 'Subject: to the team\\n\\nhello\\n' | sendmail -f me@%s team@localhost"
             % mailname)
    assert root.wait(lambda: root.read(box).count(b"Subject: to the team") == 2), \
        root.run("eqmail queue list")[1]  # joe, and root's copy that goes to joe

    # ~/.forward: a program and a copy kept here
    root.run("useradd --create-home --shell /bin/sh ann")
    root.run("runuser -u ann -- sh -c 'printf \"\\\"|cat > $HOME/got\\\", \\\\\\\\ann\\n\" "
             "> $HOME/.forward && chmod 644 $HOME/.forward'")
    assert b"\\ann" in root.read("/home/ann/.forward")
    root.run("printf 'Subject: fwd\\n\\nx\\n' | sendmail ann")
    assert root.wait(lambda: os.path.exists(root.file("/home/ann/got")) and
                     os.path.exists(root.file("/var/mail/ann"))), root.run(
        "eqmail queue list; sendmail -bv ann")[1]
    assert b"Subject: fwd" in root.read("/home/ann/got")

    # the admin's view
    rc, out = root.run("eqmail status", check=False)
    assert rc in (0, 1) and ": running, pid %d" % _daemon(root) in out, out
    assert "last hour: " in out
    rc, out = root.run("eqmail queue list")
    assert out.strip() == "", out  # everything delivered

    # dpkg-reconfigure, non-interactive, with preseeded answers: a satellite
    root.run("printf '%s\\n' 'eqmail eqmail/mode select satellite' "
             "'eqmail eqmail/mailname string sat.example.org' "
             "'eqmail eqmail/smarthost string 127.0.0.1:2526' | debconf-set-selections")
    root.run("dpkg-reconfigure -fnoninteractive eqmail", timeout=300)
    assert b":127.0.0.1:2526\n" in root.read(control + "smtproutes")
    assert root.read("/etc/mailname") == b"sat.example.org\n"
    assert root.wait(lambda: _daemon(root)), "eqmaild did not come back"
    rc, out = root.run("sendmail -bv someone@example.net")
    assert "relay 127.0.0.1:2526 (control/smtproutes)" in out
    # and mail for the world goes through that smarthost (a real SMTP
    # server in the namespace: aiosmtpd's, printing what it receives)
    sink = subprocess.Popen(["ip", "netns", "exec", root.ns, sys.executable, "-m", "aiosmtpd",
                             "-n", "-l", "127.0.0.1:2526"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        time.sleep(1.5)
        root.run("printf 'Subject: out\\n\\nvia the smarthost\\n' | sendmail far@example.net")
        assert root.wait(lambda: b"MESSAGE FOLLOWS" in _peek(root, sink) or False, 30) or \
            b"via the smarthost" in root.run("eqmail queue list")[1].encode(), "not relayed"
    finally:
        sink.kill()
        got = getattr(root, "seen", b"") + sink.communicate(timeout=10)[0]
    assert b"via the smarthost" in got and b"Subject: out" in got, got[-2000:]
    # an internet site: every address (no control/listen), still serving
    root.run("echo 'eqmail eqmail/mode select internet site' | debconf-set-selections && "
             "dpkg-reconfigure -fnoninteractive eqmail", timeout=300)
    assert not os.path.exists(root.file(control + "listen"))
    assert root.wait(lambda: _daemon(root)), "eqmaild did not come back"

    # purge: no daemon left, the users' mail kept, newaliases' cdb gone
    root.run(" ".join(APT) + " purge eqmail", timeout=600)
    assert root.wait(lambda: _daemon(root) is None and not [
        p for p in root.pids() if b"eqmaild" in open("/proc/%d/cmdline" % p, "rb").read()
    ], 20), "eqmaild left after purge"
    assert b"from cron" in root.read(box)
    assert not os.path.exists(root.file("/etc/aliases.cdb"))
    assert not os.path.exists(root.file("/usr/sbin/sendmail"))
