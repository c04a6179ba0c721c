#!/usr/bin/env python3
"""build_ipk -- the OpenWrt .ipk and the single-file zipapp of eqmail, without the SDK.

    python3 packaging/openwrt/build_ipk.py [--outdir dist] [--release 1]
                                           [--python-version 3.11]

Writes, from the checkout it lives in:

* ``dist/eqmail_VERSION-RELEASE_all.ipk`` for OpenWrt 24.10 (opkg; the only
  opkg release whose feed has python3-gevent).  What OpenWrt's
  scripts/ipkg-build makes: a gzip'd tar of ``./debian-binary`` ("2.0\\n"),
  ``./data.tar.gz`` and ``./control.tar.gz``, in that order (opkg-lede reads
  only this format, never the ar archives of dpkg).  Every member is owned by
  0:0, names are sorted, mtimes are SOURCE_DATE_EPOCH and gzip headers carry
  no name or time, so two builds of one tree are byte-identical.

  data: the pure-Python package and the vendored cdblib under
  /usr/lib/pythonX.Y/site-packages (as .py; postinst-pkg compiles them on the
  device), the console scripts /usr/bin/eqmaild and /usr/bin/eqmail,
  /usr/sbin/sendmail -> ../bin/eqmail, the procd script /etc/init.d/eqmaild,
  the UCI file /etc/config/eqmail and /lib/upgrade/keep.d/eqmail.
  control: control, conffiles, OpenWrt's standard postinst/prerm stubs and
  the package's postinst-pkg/prerm-pkg.

* ``dist/eqmail.pyz``: a zipapp (the format `python3 -m zipapp` writes) of
  eqmail and cdblib, pure Python only.  gevent, greenlet and dnspython must
  come from the system (Debian python3-gevent python3-dnspython, OpenWrt
  python3-gevent python3-dns): C extensions cannot be imported from a zip.
  ``python3 eqmail.pyz eqmaild ...`` is the daemon, ``python3 eqmail.pyz
  [eqmail] TOOL ...`` the tools; a symlink named eqmaild, sendmail, mailq,
  ... to the .pyz acts as that program.

Stdlib only; any Python >= 3.7 runs it.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import stat
import sys
import tarfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PKGDIR = os.path.join(HERE, "eqmail")          # the SDK package: files/, vendor/
FILES = os.path.join(PKGDIR, "files")
VENDOR = os.path.join(PKGDIR, "vendor")

NAME = "eqmail"
ARCH = "all"
MAINTAINER = "eqmail maintainers <eqmail@localhost>"
#: python3-* packages of the OpenWrt packages feed (see eqmail/Makefile for
#: which import needs which)
DEPENDS = ["python3-light", "python3-gevent", "python3-dns", "python3-email",
           "python3-urllib", "python3-openssl", "python3-codecs"]
#: default_postinst creates these (user:group, ids picked from 32768 up)
REQUIRE_USER = "eqmail:eqmail alias:eqmail"
CONFFILES = ["/etc/config/eqmail"]
DESCRIPTION = """\
Small qmail-compatible mail transfer agent (Python, gevent)
 eqmail re-creates eQmail (a patched netqmail) as one greenlet-based daemon,
 eqmaild: SMTP and submission in, a durable queue, local delivery (Maildir,
 mbox, dot-qmail) and remote delivery, with qmail's control files.
 Started by procd; configured in /etc/config/eqmail (UCI) and the qmail
 control files in its home (default /srv/eqmail, on flash: /var is RAM).
 Needs OpenWrt 24.10 (python3-gevent; .ipk is opkg, i.e. up to 24.10)."""

# OpenWrt's stubs, exactly as package-ipkg.mk writes them: they run
# default_postinst / default_prerm from /lib/functions.sh, which create the
# Require-User users, source postinst-pkg / prerm-pkg, and enable+start /
# stop+disable every /etc/init.d script of the package.
POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
PRERM = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
"""
# sourced (in a subshell) by default_postinst after the users exist and
# before the init script is enabled and started
POSTINST_PKG = """#!/bin/sh
[ -n "${{IPKG_INSTROOT}}" ] && exit 0
# OpenWrt's Python writes no bytecode by itself: compile once here, so that
# eqmaild and every sendmail call start without compiling eqmail
/usr/bin/python3 -m compileall -q {site}/eqmail {site}/cdblib >/dev/null 2>&1 || true
# Require-User has made the users; without it (or with a user deleted) try
# eqmail mkusers, which needs shadow-useradd or busybox adduser
grep -qs '^eqmail:' /etc/passwd && grep -qs '^alias:' /etc/passwd || \\
	/usr/bin/eqmail mkusers --home "$(uci -q get eqmail.main.home || echo /srv/eqmail)" || true
exit 0
"""
PRERM_PKG = """#!/bin/sh
[ -n "${{IPKG_INSTROOT}}" ] && exit 0
# the bytecode postinst-pkg made is not in the package's file list
rm -rf {site}/eqmail/__pycache__ {site}/eqmail/*/__pycache__ {site}/cdblib/__pycache__
exit 0
"""

SCRIPT = """#!/usr/bin/python3
# -*- coding: utf-8 -*-
import sys
from {module} import main
if __name__ == "__main__":
    sys.exit(main())
"""

#: __main__.py of the zipapp
PYZ_MAIN = '''\
"""eqmail as one file: python3 eqmail.pyz [eqmaild|eqmail] ARGS...

gevent, greenlet and dnspython come from the system's Python (they cannot be
imported from a zip).  Run as ``eqmail.pyz eqmaild ...`` (or through a
symlink named eqmaild) it is the daemon; otherwise ``eqmail.pyz [eqmail]
TOOL ...`` runs a tool, and a symlink named sendmail, mailq, qmail-inject,
... acts as that tool.
"""
import os
import sys


def main():
    archive = os.path.dirname(os.path.abspath(__file__))
    # eqmaild starts `python3 -m eqmail.chkpw` for SMTP AUTH: let such
    # children import eqmail from this archive too
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = archive + (os.pathsep + path if path else "")
    called = os.path.basename(sys.argv[0])
    if called.endswith(".pyz"):
        called = called[:-4]
    args = sys.argv[1:]
    if called != "eqmaild" and args and args[0] in ("eqmaild", "eqmail"):
        called = args.pop(0)
    if called == "eqmaild":
        sys.argv[0] = "eqmaild"
        from eqmail.daemon import main as daemon_main
        return daemon_main(args)
    from eqmail import cli
    if called in cli.ALIASES:
        return cli.main()     # it looks at sys.argv[0] itself
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
'''


#: The names eqmail takes through opkg's alternatives, and its priority.
ALTERNATIVES = ("/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq",
                "/usr/bin/newaliases")
ALT_PRIORITY = 200


def project_version(init_py: str) -> str:
    """eqmail.__version__ from eqmail/__init__.py (the one place it is kept;
    pyproject.toml reads it too)."""
    with open(init_py, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.M)
    if not m:
        raise SystemExit("build_ipk: no __version__ in %s" % init_py)
    return m.group(1)


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value:
        return int(value)
    return 0


def python_files(top: str, prefix: str):
    """(archive name, path) of the .py files under `top`, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, top).replace(os.sep, "/")
                out.append((prefix + "/" + rel, path))
    return sorted(out)


class Tree:
    """A package tree in memory: name -> (type, mode, data or link target)."""

    def __init__(self):
        self.entries = {}

    def _dirs(self, name):
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self.entries.setdefault(d, ("dir", 0o755, None))

    def file(self, name, data, mode=0o644):
        name = name.strip("/")
        self._dirs(name)
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.entries[name] = ("file", mode, data)

    def symlink(self, name, target):
        name = name.strip("/")
        self._dirs(name)
        self.entries[name] = ("symlink", 0o777, target)

    def tar_gz(self, mtime: int) -> bytes:
        """A reproducible gzip'd tar ('./' first, then sorted ./names)."""
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(_info("./", tarfile.DIRTYPE, 0o755, mtime))
            for name in sorted(self.entries):
                kind, mode, data = self.entries[name]
                arcname = "./" + name
                if kind == "dir":
                    tar.addfile(_info(arcname + "/", tarfile.DIRTYPE, mode, mtime))
                elif kind == "symlink":
                    info = _info(arcname, tarfile.SYMTYPE, mode, mtime)
                    info.linkname = data
                    tar.addfile(info)
                else:
                    info = _info(arcname, tarfile.REGTYPE, mode, mtime)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return raw.getvalue()


def _info(name, kind, mode, mtime) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def gzip_bytes(data: bytes) -> bytes:
    """gzip without file name and with mtime 0 (as `gzip -n`)."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as g:
        g.write(data)
    return out.getvalue()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def build_data(pyver: str) -> Tree:
    site = "usr/lib/python%s/site-packages" % pyver
    tree = Tree()
    for arcname, path in python_files(os.path.join(REPO, "eqmail"), site + "/eqmail"):
        tree.file(arcname, read(path))
    for arcname, path in python_files(os.path.join(VENDOR, "cdblib"), site + "/cdblib"):
        tree.file(arcname, read(path))
    tree.file(site + "/cdblib/LICENSE", read(os.path.join(VENDOR, "cdblib", "LICENSE")))
    tree.file("usr/bin/eqmaild", SCRIPT.format(module="eqmail.daemon"), 0o755)
    tree.file("usr/bin/eqmail", SCRIPT.format(module="eqmail.cli"), 0o755)
    tree.file("etc/init.d/eqmaild", read(os.path.join(FILES, "eqmaild.init")), 0o755)
    tree.file("etc/config/eqmail", read(os.path.join(FILES, "eqmail.config")), 0o644)
    tree.file("lib/upgrade/keep.d/eqmail", read(os.path.join(FILES, "eqmail.keep")), 0o644)
    return tree


def build_control(version: str, installed_size: int, pyver: str) -> Tree:
    site = "/usr/lib/python%s/site-packages" % pyver
    fields = [
        ("Package", NAME),
        ("Version", version),
        ("Depends", ", ".join(DEPENDS)),
        ("Source", "packaging/openwrt/eqmail"),
        ("SourceName", NAME),
        ("License", "PublicDomain MIT"),
        ("LicenseFiles", "cdblib/LICENSE"),
        ("Section", "mail"),
        ("Require-User", REQUIRE_USER),
        # opkg's alternatives (as msmtp-mta): another package's sendmail
        # with a higher priority may take the names, and gives them back
        ("Alternatives", ", ".join("%d:%s:/usr/bin/eqmail" % (ALT_PRIORITY, link)
                                   for link in ALTERNATIVES)),
        ("Architecture", ARCH),
        ("Installed-Size", str(installed_size)),
        ("Maintainer", MAINTAINER),
        ("Description", DESCRIPTION),
    ]
    control = "".join("%s: %s\n" % kv for kv in fields)
    tree = Tree()
    tree.file("control", control)
    tree.file("conffiles", "".join(c + "\n" for c in CONFFILES))
    tree.file("postinst", POSTINST, 0o755)
    tree.file("prerm", PRERM, 0o755)
    tree.file("postinst-pkg", POSTINST_PKG.format(site=site), 0o755)
    tree.file("prerm-pkg", PRERM_PKG.format(site=site), 0o755)
    return tree


def build_ipk(outdir: str, release: str, pyver: str, mtime: int) -> str:
    version = "%s-%s" % (project_version(os.path.join(REPO, "eqmail", "__init__.py")), release)
    data_tree = build_data(pyver)
    data_tar = data_tree.tar_gz(mtime)
    # ipkg-build's Installed-Size: the size of the uncompressed data tar
    control_tar = build_control(version, len(data_tar), pyver).tar_gz(mtime)
    outer = Tree()
    outer.file("debian-binary", "2.0\n")
    outer.file("data.tar.gz", gzip_bytes(data_tar))
    outer.file("control.tar.gz", gzip_bytes(control_tar))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        # ipkg-build's order: debian-binary, data, control; no './' entry
        for name in ("debian-binary", "data.tar.gz", "control.tar.gz"):
            _, mode, data = outer.entries[name]
            info = _info("./" + name, tarfile.REGTYPE, mode, mtime)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = os.path.join(outdir, "%s_%s_%s.ipk" % (NAME, version, ARCH))
    _write(path, gzip_bytes(raw.getvalue()))
    return path


def build_pyz(outdir: str, mtime: int) -> str:
    # zip timestamps cannot be before 1980
    stamp = time.gmtime(max(mtime, 315532800))[:6]
    members = [("__main__.py", PYZ_MAIN.encode("utf-8"))]
    for arcname, path in python_files(os.path.join(REPO, "eqmail"), "eqmail"):
        members.append((arcname, read(path)))
    for arcname, path in python_files(os.path.join(VENDOR, "cdblib"), "cdblib"):
        members.append((arcname, read(path)))
    members.append(("cdblib/LICENSE", read(os.path.join(VENDOR, "cdblib", "LICENSE"))))
    raw = io.BytesIO()
    raw.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as z:
        for arcname, data in sorted(members):
            info = zipfile.ZipInfo(arcname, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.create_system = 3
            z.writestr(info, data)
    path = os.path.join(outdir, "%s.pyz" % NAME)
    _write(path, raw.getvalue(), 0o755)
    return path


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outdir", default=os.path.join(REPO, "dist"))
    p.add_argument("--release", default="1", help="PKG_RELEASE (default 1)")
    p.add_argument("--python-version", default="3.11",
                   help="the target's Python (OpenWrt 24.10: 3.11)")
    p.add_argument("--no-pyz", action="store_true", help="build the .ipk only")
    args = p.parse_args(argv)
    if not re.match(r"^3\.[0-9]+$", args.python_version):
        p.error("--python-version: expected 3.N")
    os.makedirs(args.outdir, exist_ok=True)
    mtime = source_date_epoch()
    print(build_ipk(args.outdir, args.release, args.python_version, mtime))
    if not args.no_pyz:
        print(build_pyz(args.outdir, mtime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
