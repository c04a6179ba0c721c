"""packaging/openwrt: the .ipk built without the SDK, the procd init script,
the UCI defaults, the SDK Makefile's agreement with them, and the zipapp.

packaging/openwrt/build-ipk.sh builds dist/eqmail_VERSION-1_all.ipk and
dist/eqmail.pyz.  The ipk is unpacked here with tarfile, as OpenWrt's opkg
reads it: a gzip'd tar of ./debian-binary, ./data.tar.gz, ./control.tar.gz
(opkg rejects ar archives).  The init script is checked with `sh -n` (and
`busybox sh -n`: busybox ash is OpenWrt's shell) and run against a stand-in
for rc.common/functions.sh/procd.sh that parses the shipped UCI file and
prints the procd calls.  The zipapp runs with the system's Python
(/usr/bin/python3), whose gevent the .pyz relies on; --help needs none.

No root needed, nothing installed, nothing started.
"""
from __future__ import annotations

import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPENWRT = os.path.join(REPO, "packaging", "openwrt")
BUILD = os.path.join(OPENWRT, "build-ipk.sh")
PKG = os.path.join(OPENWRT, "eqmail")
INIT = os.path.join(PKG, "files", "eqmaild.init")
UCI = os.path.join(PKG, "files", "eqmail.config")
MAKEFILE = os.path.join(PKG, "Makefile")
SYSTEM_PYTHON = "/usr/bin/python3"
SITE = "usr/lib/python3.11/site-packages"   # OpenWrt 24.10 ships Python 3.11
EPOCH = "1700000000"


def project_version() -> str:
    """eqmail.__version__ (pyproject.toml reads it from there)."""
    with open(os.path.join(REPO, "eqmail", "__init__.py"), encoding="utf-8") as f:
        text = f.read()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


VERSION = project_version()


def build(outdir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, PYTHON=sys.executable)
    return subprocess.run([BUILD, "--outdir", outdir], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def dist():
    """Build into dist/ of the checkout, as the README says."""
    out = os.path.join(REPO, "dist")
    r = build(out)
    assert r.returncode == 0, r.stdout + r.stderr
    ipk = os.path.join(out, "eqmail_%s-1_all.ipk" % VERSION)
    pyz = os.path.join(out, "eqmail.pyz")
    assert r.stdout.split() == [ipk, pyz]
    return ipk, pyz


def members(data: bytes):
    """{name: (TarInfo, bytes or None)} of a gzip'd tar."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info) if info.isfile() else None
            out[info.name] = (info, f.read() if f else None)
    return out


@pytest.fixture(scope="module")
def ipk(dist):
    with open(dist[0], "rb") as f:
        raw = f.read()
    assert raw[:2] == b"\x1f\x8b", "outer archive must be gzip'd tar, not ar"
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        order = tar.getnames()
    outer = members(raw)
    return {"order": order, "outer": outer,
            "control": members(outer["./control.tar.gz"][1]),
            "data": members(outer["./data.tar.gz"][1])}


def control_fields(ipk) -> dict:
    text = ipk["control"]["./control"][1].decode("utf-8")
    fields, last = {}, None
    for line in text.splitlines():
        if line.startswith(" ") and last:
            fields[last] += "\n" + line
        else:
            last, _, value = line.partition(": ")
            fields[last] = value
    return fields


# -- the ipk --------------------------------------------------------------------------

def test_outer_archive_is_what_opkg_reads(ipk):
    assert ipk["order"] == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    assert ipk["outer"]["./debian-binary"][1] == b"2.0\n"
    for name in ("./data.tar.gz", "./control.tar.gz"):
        assert ipk["outer"][name][1][:2] == b"\x1f\x8b", name


def test_control_fields(ipk):
    f = control_fields(ipk)
    assert f["Package"] == "eqmail"
    assert f["Version"] == VERSION + "-1"
    assert f["Version"].split("-")[0] == VERSION
    assert f["Architecture"] == "all"
    depends = [d.strip() for d in f["Depends"].split(",")]
    for dep in ("python3-light", "python3-gevent", "python3-dns", "python3-email",
                "python3-urllib", "python3-openssl", "python3-codecs"):
        assert dep in depends
    assert f["Maintainer"] and f["Description"].strip()
    assert "\n " in f["Description"], "a long description follows the summary"
    users = [t.split(":")[0].split("=")[0] for t in f["Require-User"].split()]
    assert users == ["eqmail", "alias"]
    # ipkg-build: Installed-Size is the size of the uncompressed data tar
    import gzip
    assert int(f["Installed-Size"]) == len(gzip.decompress(ipk["outer"]["./data.tar.gz"][1]))


def test_alternatives_as_msmtp_mta(ipk):
    f = control_fields(ipk)
    alts = [a.strip() for a in f["Alternatives"].split(",")]
    assert alts == ["200:/usr/sbin/sendmail:/usr/bin/eqmail",
                    "200:/usr/lib/sendmail:/usr/bin/eqmail",
                    "200:/usr/bin/mailq:/usr/bin/eqmail",
                    "200:/usr/bin/newaliases:/usr/bin/eqmail"]
    with open(os.path.join(REPO, "packaging", "openwrt", "eqmail", "Makefile")) as mk:
        text = mk.read()
    for a in alts:
        assert a in text, a


def test_control_scripts(ipk):
    c = ipk["control"]
    assert c["./conffiles"][1] == b"/etc/config/eqmail\n"
    # OpenWrt's stubs, as package-ipkg.mk writes them: default_postinst makes
    # the Require-User users and enables and starts /etc/init.d/eqmaild
    assert c["./postinst"][1].decode() == (
        '#!/bin/sh\n[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0\n'
        "[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
        ". ${IPKG_INSTROOT}/lib/functions.sh\ndefault_postinst $0 $@\n")
    assert c["./prerm"][1].decode() == (
        "#!/bin/sh\n[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0\n"
        ". ${IPKG_INSTROOT}/lib/functions.sh\ndefault_prerm $0 $@\n")
    post = c["./postinst-pkg"][1].decode()
    assert "eqmail mkusers" in post and "compileall" in post and "/" + SITE in post
    assert "__pycache__" in c["./prerm-pkg"][1].decode()
    for name in ("./postinst", "./prerm", "./postinst-pkg", "./prerm-pkg"):
        assert c[name][0].mode == 0o755, name
    for name in ("./postinst", "./prerm", "./postinst-pkg", "./prerm-pkg"):
        r = subprocess.run(["sh", "-n"], input=c[name][1], capture_output=True)
        assert r.returncode == 0, (name, r.stderr)


def test_file_list(ipk):
    data = ipk["data"]
    names = set(data)
    want_py = set()
    for top, dirs, files in os.walk(os.path.join(REPO, "eqmail")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for n in files:
            if n.endswith(".py"):
                rel = os.path.relpath(os.path.join(top, n), REPO)
                want_py.add("./%s/%s" % (SITE, rel))
    have_py = {n for n in names if n.startswith("./%s/eqmail/" % SITE) and n.endswith(".py")}
    assert have_py == want_py
    for n in ("__init__.py", "cdblib.py", "djb_hash.py", "LICENSE"):
        assert "./%s/cdblib/%s" % (SITE, n) in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]
    assert not [n for n in names if "/gevent" in n or "/greenlet" in n or "/dns/" in n]
    for path, mode in (("./etc/init.d/eqmaild", 0o755), ("./etc/config/eqmail", 0o644),
                       ("./usr/bin/eqmaild", 0o755), ("./usr/bin/eqmail", 0o755),
                       ("./lib/upgrade/keep.d/eqmail", 0o644)):
        info, _ = data[path]
        assert info.isfile() and info.mode == mode, path
    assert data["./etc/init.d/eqmaild"][1] == open(INIT, "rb").read()
    assert data["./etc/config/eqmail"][1] == open(UCI, "rb").read()
    # sendmail, mailq and newaliases come through opkg's alternatives
    assert "./usr/sbin/sendmail" not in data
    for script, module in (("eqmaild", "eqmail.daemon"), ("eqmail", "eqmail.cli")):
        text = data["./usr/bin/" + script][1].decode()
        assert text.startswith("#!/usr/bin/python3\n") and "from %s import main" % module in text
    # no /var: it is RAM on OpenWrt
    assert not [n for n in names if n.startswith("./var")]


def test_everything_root_owned_and_reproducible(ipk, dist, tmp_path):
    for part in ("outer", "control", "data"):
        for name, (info, _) in ipk[part].items():
            assert (info.uid, info.gid) == (0, 0), (part, name)
            assert (info.uname, info.gname) in (("root", "root"), ("", "")), (part, name)
            assert info.mtime == int(EPOCH), (part, name)
    r = build(str(tmp_path))
    assert r.returncode == 0, r.stderr
    for path in dist:
        again = os.path.join(str(tmp_path), os.path.basename(path))
        assert open(path, "rb").read() == open(again, "rb").read(), path


def test_console_scripts_of_the_package_run(ipk, tmp_path):
    """The data tree, unpacked: /usr/bin/eqmail{,d} and a sendmail symlink
    (opkg's alternative) run with the system's Python (3.11 here, as on OpenWrt 24.10)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("no %s" % SYSTEM_PYTHON)
    root = tmp_path / "root"
    with tarfile.open(fileobj=io.BytesIO(ipk["outer"]["./data.tar.gz"][1]), mode="r:gz") as t:
        t.extractall(str(root))
    # the link opkg's alternatives make
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
    (root / "usr/sbin/sendmail").symlink_to("../bin/eqmail")
    env = dict(os.environ, PYTHONPATH=str(root / SITE), PYTHONDONTWRITEBYTECODE="1")
    for argv, expect in (([str(root / "usr/bin/eqmaild"), "--help"], "usage: eqmaild"),
                         ([str(root / "usr/bin/eqmail"), "--help"], "usage: eqmail TOOL"),
                         ([str(root / "usr/sbin/sendmail"), "--help"], "usage: sendmail")):
        r = subprocess.run([SYSTEM_PYTHON] + argv, env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and expect in r.stdout + r.stderr, (argv, r.stderr)


# -- the SDK Makefile agrees with the ipk ------------------------------------------------

def test_sdk_makefile(ipk):
    with open(MAKEFILE, encoding="utf-8") as f:
        mk = f.read()
    assert re.search(r"^include \$\(TOPDIR\)/rules\.mk$", mk, re.M)
    assert re.search(r"python3-package\.mk$", mk, re.M)
    assert re.search(r"^PKG_NAME:=eqmail$", mk, re.M)
    assert re.search(r"^PKG_VERSION:=(.*)$", mk, re.M).group(1) == VERSION
    assert re.search(r"^PKG_BUILD_DEPENDS:=.*python3/host", mk, re.M)
    assert "$(eval $(call Py3Package,eqmail))" in mk
    assert "$(eval $(call BuildPackage,eqmail))" in mk
    deps = re.search(r"^\s+DEPENDS:=((?:.*\\\n)*.*)", mk, re.M).group(1)
    deps = sorted(d.lstrip("+") for d in deps.replace("\\\n", " ").split())
    f = control_fields(ipk)
    assert deps == sorted(d.strip() for d in f["Depends"].split(","))
    assert re.search(r"^\s*USERID:=(.*)$", mk, re.M).group(1).strip() == f["Require-User"]
    conffiles = re.search(r"define Package/eqmail/conffiles\n(.*?)endef", mk, re.S).group(1)
    assert conffiles.split() == ["/etc/config/eqmail"]
    for needle in ("./files/eqmaild.init $(1)/etc/init.d/eqmaild",
                   "./files/eqmail.config $(1)/etc/config/eqmail",
                   "200:/usr/sbin/sendmail:/usr/bin/eqmail", "./vendor/cdblib",
                   "24.10"):
        assert needle in mk, needle


# -- the procd init script ------------------------------------------------------------

def shells():
    found = [("sh", ["sh"])]
    if shutil.which("busybox"):
        found.append(("busybox", ["busybox", "sh"]))
    return found


def test_init_script_syntax():
    with open(INIT, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("START=95", "STOP=10", "USE_PROCD=1", 'EXTRA_COMMANDS="flush"'):
        assert re.search("^%s$" % re.escape(line), text, re.M), line
    for name, sh in shells():
        r = subprocess.run(sh + ["-n", INIT], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
    for name, sh in shells():
        r = subprocess.run(sh + ["-n", os.path.join(OPENWRT, "build-ipk.sh")],
                           capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)


def test_busybox_sh_n():
    """OpenWrt's /bin/sh is busybox ash (tests/run installs Debian's busybox)."""
    if not shutil.which("busybox"):
        pytest.skip("busybox is not installed (tests/run installs it as root)")
    r = subprocess.run(["busybox", "sh", "-n", INIT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# A stand-in for what rc.common gives an init script with USE_PROCD=1: UCI
# files read as shell (config/option/list), config_get & co., and procd_*
# functions that print their arguments.  Commands with side effects (mkdir,
# ln, logger, eqmail) only print (eqmail to fd 3, as the script silences it).
STANDIN = r'''
exec 3>&1
config() { _cs=$2; }
option() { eval "_C_${_cs}_$1=\$2"; }
list() {
	eval "_ln=\${_C_${_cs}_$1_N:-0}"; _ln=$((_ln + 1))
	eval "_C_${_cs}_$1_N=$_ln; _C_${_cs}_$1_$_ln=\$2"
}
config_load() { . "$UCI_DIR/$1"; }
config_get() { eval "$1=\${_C_$2_$3:-\$4}"; }
config_get_bool() {
	config_get "$@"
	eval "case \"\$$1\" in 1|on|true|yes|enabled) $1=1;; 0|off|false|no|disabled) $1=0;; *) $1=\$4;; esac"
}
config_list_foreach() {
	_ls=$1 _lo=$2 _lf=$3; shift 3
	eval "_ln=\${_C_${_ls}_${_lo}_N:-0}"; _li=1
	while [ "$_li" -le "$_ln" ]; do
		eval "_lv=\$_C_${_ls}_${_lo}_$_li"
		"$_lf" "$_lv" "$@"
		_li=$((_li + 1))
	done
}
user_exists() { case " $USERS " in *" $1 "*) return 0;; esac; return 1; }
procd_open_instance() { echo "open_instance"; }
procd_close_instance() { echo "close_instance"; }
procd_set_param() { _pp=$1; shift; printf 'set %s' "$_pp"; printf ' [%s]' "$@"; echo; }
procd_append_param() { _pp=$1; shift; printf 'append %s' "$_pp"; printf ' [%s]' "$@"; echo; }
procd_send_signal() { echo "signal $1 $2 $3"; }
procd_add_config_trigger() { echo "trigger $*"; }
logger() { echo "logger $*"; }
mkdir() { echo "mkdir $*"; }
ln() { echo "ln $*"; }
eqmail() { echo "eqmail $*" >&3; }   # the script silences its output
. "$INIT"
for f in $CALLS; do
	echo "== $f"
	"$f"; echo "rc $?"
done
'''


def run_init(sh, uci_text, calls="start_service", users="eqmail alias", tmp_path=None):
    d = pathlib.Path(tempfile.mkdtemp(prefix="uci-", dir=str(tmp_path)))
    (d / "eqmail").write_text(uci_text)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "UCI_DIR": str(d),
           "INIT": INIT, "CALLS": calls, "USERS": users}
    r = subprocess.run(sh + ["-c", STANDIN], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.stderr == "", r.stderr
    assert r.returncode == 0, r.stdout
    return r.stdout


@pytest.mark.parametrize("shell", shells(), ids=lambda s: s[0])
def test_init_script_defaults(shell, tmp_path):
    with open(UCI, encoding="utf-8") as f:
        out = run_init(shell[1], f.read(), "start_service service_triggers reload_service flush",
                       tmp_path=tmp_path)
    lines = out.splitlines()
    start = lines[lines.index("== start_service") + 1:lines.index("== service_triggers")]
    assert "open_instance" in start and start[-2:] == ["close_instance", "rc 0"]
    assert ("set command [/usr/bin/eqmaild] [--home] [/srv/eqmail] [--foreground] "
            "[--pidfile] [/var/run/eqmaild.pid]") in start
    # no listener in the shipped file: eqmaild's own defaults as root
    assert not [l for l in start if l.startswith("append command")]
    for want in ("set respawn [3600] [5] [5]", "set stdout [1]", "set stderr [1]",
                 "set pidfile [/var/run/eqmaild.pid]", "set term_timeout [70]",
                 "set env [EQMAIL_HOME=/srv/eqmail]", "mkdir -p /srv"):
        assert want in start, (want, start)
    assert not [l for l in start if l.startswith(("eqmail ", "logger"))]   # users exist
    assert "trigger config.change eqmail /etc/init.d/eqmaild restart" in lines
    i = lines.index("== reload_service")
    assert lines[i + 1] == "signal eqmaild * HUP"
    i = lines.index("== flush")
    assert lines[i + 1] == "signal eqmaild * ALRM"


@pytest.mark.parametrize("shell", shells(), ids=lambda s: s[0])
def test_init_script_uci_options(shell, tmp_path):
    uci = """
config eqmail 'main'
	option enabled 'yes'
	option home '/mnt/sda1/eqmail'
	list smtp '0.0.0.0:25'
	list smtp '[::]:25'
	list submission '192.168.1.1:587'
	list smtps '0.0.0.0:465'
	option user 'mailer'
	option checkpassword '/usr/bin/checkpassword /bin/true'
	option term_timeout '30'
"""
    out = run_init(shell[1], uci, users="", tmp_path=tmp_path).splitlines()
    assert ("set command [/usr/bin/eqmaild] [--home] [/mnt/sda1/eqmail] [--foreground] "
            "[--pidfile] [/var/run/eqmaild.pid]") in out
    appended = [l for l in out if l.startswith("append command")]
    assert appended == ["append command [--smtp] [0.0.0.0:25]",
                        "append command [--smtp] [[::]:25]",
                        "append command [--submission] [192.168.1.1:587]",
                        "append command [--smtps] [0.0.0.0:465]",
                        "append command [--user] [mailer]",
                        "append command [--checkpassword] [/usr/bin/checkpassword /bin/true]"]
    assert "set term_timeout [30]" in out
    # not the default home: its parent (a mount point) is not created
    assert not [l for l in out if l.startswith("mkdir")]
    # users missing: the first start runs eqmail mkusers
    assert "eqmail mkusers --home /mnt/sda1/eqmail" in out


@pytest.mark.parametrize("shell", shells(), ids=lambda s: s[0])
def test_init_script_disabled_and_bad_home(shell, tmp_path):
    out = run_init(shell[1], "config eqmail 'main'\n\toption enabled '0'\n", tmp_path=tmp_path)
    assert "open_instance" not in out and "rc 0" in out
    out = run_init(shell[1], "config eqmail 'main'\n\toption home 'eqmail'\n",
                   tmp_path=tmp_path)
    assert "open_instance" not in out and "rc 1" in out and "not an absolute path" in out
    out = run_init(shell[1], "config eqmail 'main'\n\toption home '/tmp/eqmail'\n",
                   tmp_path=tmp_path)
    assert "open_instance" in out and "is in RAM" in out


def test_uci_defaults_file():
    with open(UCI, encoding="utf-8") as f:
        text = f.read()
    assert re.search(r"^config eqmail 'main'$", text, re.M)
    assert re.search(r"^\toption home '/srv/eqmail'$", text, re.M)
    assert re.search(r"^\toption enabled '1'$", text, re.M)
    home = re.search(r"^\toption home '([^']*)'$", text, re.M).group(1)
    assert not home.startswith(("/var/", "/tmp/")), "the queue must not be in RAM"


# -- the zipapp -----------------------------------------------------------------------

def system_python():
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("no %s" % SYSTEM_PYTHON)
    return SYSTEM_PYTHON


def test_zipapp_contents(dist):
    pyz = dist[1]
    with open(pyz, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    with zipfile.ZipFile(pyz) as z:
        names = z.namelist()
    assert "__main__.py" in names and "eqmail/__init__.py" in names
    assert "eqmail/daemon.py" in names and "eqmail/cli.py" in names
    assert "cdblib/__init__.py" in names and "cdblib/cdblib.py" in names
    # pure Python only: gevent, greenlet, dnspython come from the system
    assert not [n for n in names if n.endswith((".so", ".pyd", ".pyc"))]
    assert not [n for n in names if n.split("/")[0] in ("gevent", "greenlet", "dns", "zope")]


@pytest.mark.parametrize("argv,expect", [
    (["eqmaild", "--help"], "usage: eqmaild"),
    (["eqmail", "--help"], "usage: eqmail TOOL"),
    (["--help"], "usage: eqmail TOOL"),
    (["eqmaild", "--version"], "eqmaild " + VERSION),
])
def test_zipapp_runs_with_system_python(dist, argv, expect, tmp_path):
    py = system_python()
    r = subprocess.run([py, dist[1]] + argv, capture_output=True, text=True, timeout=60,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout


def test_zipapp_help_needs_no_gevent(dist, tmp_path):
    """--help of both entry points works even where gevent is missing."""
    py = system_python()
    code = ("import runpy, sys\n"
            "for m in ('gevent', 'greenlet', 'dns'): sys.modules[m] = None\n"
            "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    for argv in (["eqmaild", "--help"], ["eqmail", "--help"]):
        r = subprocess.run([py, "-c", code, dist[1]] + argv, capture_output=True, text=True,
                           timeout=60, cwd=str(tmp_path))
        assert r.returncode == 0, (argv, r.stderr)
        assert "usage:" in r.stdout


def test_zipapp_symlink_names_and_vendored_cdblib(dist, tmp_path):
    """A symlink named sendmail acts as sendmail; eqmail newu writes users/cdb
    with the vendored cdblib imported from the zip."""
    py = system_python()
    link = tmp_path / "sendmail"
    os.symlink(dist[1], str(link))
    r = subprocess.run([py, str(link), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: sendmail" in r.stdout + r.stderr, r.stderr
    home = tmp_path / "home"
    (home / "users").mkdir(parents=True)
    (home / "control").mkdir()
    (home / "control" / "me").write_text("mx.example.org\n")
    (home / "users" / "assign").write_text("=joe:joe:1000:1000:/home/joe:::\n.\n")
    r = subprocess.run([py, dist[1], "eqmail", "newu", "--home", str(home)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "1 assignments" in r.stdout
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cdblib\n"
            "assert cdblib.__file__.startswith(sys.argv[1]), cdblib.__file__\n"
            "r = cdblib.Reader(open(sys.argv[2], 'rb').read()); print(sorted(r.keys()))\n")
    r = subprocess.run([py, "-c", code, dist[1], str(home / "users" / "cdb")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "b'!joe'" in r.stdout
    # children started as `python3 -m eqmail.chkpw` (SMTP AUTH) find eqmail
    # through the PYTHONPATH the zipapp sets
    code = ("import os, runpy, subprocess, sys\n"
            "sys.argv = [sys.argv[1], 'eqmail', '--version']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "subprocess.run([sys.executable, '-c', 'import eqmail.chkpw'], check=True)\n")
    r = subprocess.run([py, "-c", code, dist[1]], capture_output=True, text=True, timeout=60,
                       cwd=str(tmp_path), env={k: v for k, v in os.environ.items()
                                               if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("shell", shells(), ids=lambda s: s[0])
def test_init_script_mail_options(shell, tmp_path):
    """mailname and smarthost become control/me and control/smtproutes at
    start and at reload; without the option the file it wrote goes, an
    admin's own file stays."""
    home = tmp_path / "home"
    (home / "control").mkdir(parents=True)
    (home / "control" / "me").write_text("old.example.org\n")
    (home / "control" / "locals").write_text("old.example.org\n")
    uci = ("config eqmail 'main'\n\toption home '%s'\n\toption mailname 'r.example.org'\n"
           "\toption smarthost 'smtp.example.net:587'\n\toption smarthost_login 'me'\n"
           "\toption smarthost_password 'pw'\n" % home)
    out = run_init(shell[1], uci, "reload_service", tmp_path=tmp_path)
    assert "eqmail config-fast --home %s r.example.org" % home in out
    assert "signal eqmaild * HUP" in out
    routes = home / "control" / "smtproutes"
    assert routes.read_text().splitlines()[1] == ":smtp.example.net:587 me pw"
    assert routes.stat().st_mode & 0o777 == 0o640
    assert "r.example.org" in (home / "control" / "locals").read_text().split()
    uci = "config eqmail 'main'\n\toption home '%s'\n\toption smarthost '[2001:db8::1]'\n" % home
    run_init(shell[1], uci, "start_service", tmp_path=tmp_path)
    assert routes.read_text().splitlines()[1] == ":[2001:db8::1]:25"
    run_init(shell[1], "config eqmail 'main'\n\toption home '%s'\n" % home, "start_service",
             tmp_path=tmp_path)
    assert not routes.exists()
    routes.write_text(":relay.example.org\n")  # the admin's own
    run_init(shell[1], "config eqmail 'main'\n\toption home '%s'\n" % home, "reload_service",
             tmp_path=tmp_path)
    assert routes.read_text() == ":relay.example.org\n"
