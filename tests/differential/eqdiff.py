"""eqdiff -- run the real eQmail 1.09 and eqmail side by side.

BUILD
    `build()` unpacks ../shared/peers/eqmail-1.09-final.tar.gz (the
    project's peer copy; EQMAIL_PEER_TARBALL overrides the path), builds
    qmail-smtpd and qmail-local without TLS as the peers README says, and
    keeps the result in /tmp/eqmail-diff-<sha256 prefix>/slot<N>/ so that
    the next session reuses it.  eQmail compiles its home in; each slot has
    its own fixed home (slot<N>/home) and a session holds the slot's flock,
    so two pytest sessions at once take two slots instead of sharing one
    home.  The qmail users and groups must exist to build (their ids are
    compiled in): `ensure_qmail_users()` creates them as root.

SMTP
    `run_smtp(side, peer, case, workdir)` writes the case's control files
    and qmail-spp plugins into that home (eqmail is pointed at the same
    directory with --home, so both read the same files), sends the whole
    dialogue on a pipe (stdin), closes it, and returns an `SmtpOutcome`:
    the normalised replies and what was queued.  Both sides hand accepted
    messages to a capture program through QMAILQUEUE (message on fd 0,
    envelope on fd 1); eqmail's own queue must stay empty.

LOCAL
    `run_local(side, peer, case, workdir)` prepares a user home with the
    case's dot-qmail files and runs eQmail's qmail-local, or eqmail's
    delivery.local.deliver() through eqlocal.py (same arguments), and
    returns a `LocalOutcome`: exit code, report, forwards and files written.

NORMALISATION (decided per field)
    replies   reply code and text must be equal.  Removed before comparing:
              eqmail's RFC 2034 status in front of the text (``553 5.7.1
              sorry...``: qmail's ``(#5.7.1)`` stays in the text and is
              compared), the EHLO lines of extensions eQmail lacks
              (``ENHANCEDSTATUSCODES``, ``CHUNKING``, ``SMTPUTF8``, ``DSN``),
              and the
              time and queue id in ``250 ok <time> qp <id>``.
    received  the smtpd Received line, date replaced by ``<date>``.
    message   the queued bytes after that Received line: exactly equal.
    envelope  sender and recipients: exactly equal.
    local     exit code, the report's lines (``did f+f+p``, program output,
              error text; ``qp N`` dropped), forward recipients and sender,
              and every file written below the home (Maildir file names
              and the date of mbox ``From `` lines normalised).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARBALL_NAME = "eqmail-1.09-final.tar.gz"
SLOTS = 4
TIMEOUT = 30          # seconds for any one program run
BUILD_TIMEOUT = 900

QMAIL_GROUPS = {"nofiles": ("alias", "qmaild", "qmaill", "qmailp"),
                "qmail": ("qmailq", "qmailr", "qmails")}


class Unavailable(Exception):
    """The peer cannot be built here (a reason for the test report)."""


def tarball() -> str:
    env = os.environ.get("EQMAIL_PEER_TARBALL")
    if env:
        return env
    for base in (os.path.join(os.path.dirname(REPO), "shared", "peers"), "/work/shared/peers"):
        path = os.path.join(base, TARBALL_NAME)
        if os.path.exists(path):
            return path
    return os.path.join(os.path.dirname(REPO), "shared", "peers", TARBALL_NAME)


def ensure_qmail_users() -> None:
    import grp
    import pwd

    for group, users in QMAIL_GROUPS.items():
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=True, timeout=60)
        for user in users:
            try:
                pwd.getpwnam(user)
            except KeyError:
                subprocess.run(["useradd", "-M", "-g", group, "-s", "/usr/sbin/nologin",
                                user], check=True, timeout=60)


@dataclass
class Peer:
    """A built eQmail: its binaries and its compiled-in home."""

    slot: str
    home: str
    smtpd: str
    local: str
    lockfd: int = -1

    def release(self) -> None:
        if self.lockfd >= 0:
            os.close(self.lockfd)
            self.lockfd = -1


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_slot(tar: str, slot: str, home: str) -> None:
    src = os.path.join(slot, "src")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    with tarfile.open(tar) as t:
        top = t.getmembers()[0].name.split("/")[0]
        t.extractall(slot)
    shutil.rmtree(src)
    os.rename(os.path.join(slot, top), src)

    def edit_first_line(name: str, line: str) -> None:
        p = os.path.join(src, name)
        with open(p) as f:
            rest = f.read().split("\n", 1)[1]
        with open(p, "w") as f:
            f.write(line + "\n" + rest)

    edit_first_line("conf-cc", "cc -O2 -DINET6 -fcommon -w")
    edit_first_line("conf-qmail", home)
    mk = os.path.join(src, "Makefile")
    with open(mk) as f:
        text = f.read()
    with open(mk, "w") as f:
        f.write(text.replace("tls.o ssl_timeoutio.o", "tls.o"))
    ensure_qmail_users()
    log = os.path.join(slot, "build.log")
    with open(log, "wb") as out:
        r = subprocess.run(["make", "qmail-smtpd", "qmail-local"], cwd=src, stdout=out,
                           stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT)
    if r.returncode != 0:
        with open(log, "rb") as f:
            tail = f.read()[-3000:].decode("utf-8", "replace")
        raise RuntimeError("building eQmail 1.09 failed (%s):\n%s" % (log, tail))


def build() -> Peer:
    """Build (or reuse) eQmail 1.09 in a free slot and lock the slot."""
    tar = tarball()
    if not os.path.exists(tar):
        raise RuntimeError("the eQmail 1.09 tarball is missing: %s (set EQMAIL_PEER_TARBALL)"
                           % tar)
    base = "/tmp/eqmail-diff-%s" % _sha256(tar)[:16]
    os.makedirs(base, exist_ok=True)
    for n in range(SLOTS):
        slot = os.path.join(base, "slot%d" % n)
        os.makedirs(slot, exist_ok=True)
        fd = os.open(os.path.join(slot, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            home = os.path.join(slot, "home")
            os.makedirs(home, exist_ok=True)
            os.chmod(home, 0o755)
            src = os.path.join(slot, "src")
            ok = os.path.join(slot, "built")
            if not (os.path.exists(ok) and os.access(os.path.join(src, "qmail-smtpd"), os.X_OK)
                    and os.access(os.path.join(src, "qmail-local"), os.X_OK)):
                if os.path.exists(ok):
                    os.unlink(ok)
                _build_slot(tar, slot, home)
                with open(ok, "w") as f:
                    f.write(tar + "\n")
            return Peer(slot, home, os.path.join(src, "qmail-smtpd"),
                        os.path.join(src, "qmail-local"), fd)
        except BaseException:
            os.close(fd)
            raise
    raise RuntimeError("all %d eQmail build slots under %s are in use" % (SLOTS, base))


# -- SMTP ------------------------------------------------------------------------------

ME = "mx.example.org"
BASE_CONTROL = {
    "me": ME + "\n",
    "locals": ME + "\n",
    "rcpthosts": "example.org\n.example.net\n" + ME + "\n",
    "badmailfrom": "spam@bad.com\n@evil.com\n.spammer.org\n",
}
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "TCPREMOTEIP": "192.0.2.1",
    "TCPLOCALIP": "198.51.100.1",
    "TCPLOCALHOST": ME,
    "TCPLOCALPORT": "25",
}
#: The checkpassword program both servers get: accepts joe/secret.
CHECKPW = """#!/bin/sh
creds=$(tr '\\0' '\\n' <&3)
[ "$creds" = "$(printf 'joe\\nsecret')" ] || exit 1
exec "$@"
"""
CAPTURE = """#!/bin/sh
f=%(dir)s/$(date +%%s%%N).$$
cat > "$f.msg"
cat <&1 > "$f.env"
%(end)s
"""


def capture_program(capdir: str, code: int) -> str:
    """The QMAILQUEUE program: keeps message and envelope in `capdir`, then
    exits with `code` (a negative code: killed by that signal)."""
    end = "kill -%d $$" % -code if code < 0 else "exit %d" % code
    return CAPTURE % {"dir": capdir, "end": end}


@dataclass
class SmtpCase:
    id: str
    lines: Tuple
    env: Dict[str, Optional[str]] = field(default_factory=dict)
    control: Dict[str, Optional[str]] = field(default_factory=dict)
    plugins: Tuple = ()      # ((section, script text), ...) in order
    spp_raw: Optional[str] = None  # control/smtpplugins as written, if given
    qexit: int = 0           # the queue program's exit code (-N: killed by signal N)
    quit: bool = True        # append QUIT
    auth: bool = True        # give both servers the checkpassword program

    def input(self) -> bytes:
        out = []
        for line in self.lines:
            if isinstance(line, bytes):
                out.append(line)
            else:
                out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")
        if self.quit:
            out.append(b"QUIT\r\n")
        return b"".join(out)


@dataclass
class Queued:
    sender: str
    rcpts: Tuple[str, ...]
    received: str
    message: bytes


@dataclass
class SmtpOutcome:
    replies: List[str]
    queued: List[Queued]
    raw: bytes = b""

    def fields(self) -> Dict[str, object]:
        return {"replies": self.replies,
                "envelope": [(q.sender, list(q.rcpts)) for q in self.queued],
                "received": [q.received for q in self.queued],
                "message": [q.message.decode("utf-8", "backslashreplace") for q in self.queued]}


def _write(path: str, text, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
    os.chmod(path, mode)


def prepare_home(home: str, case: SmtpCase) -> None:
    """Control files, plugins and the checkpassword program for one case."""
    for sub in ("control", "bin", "queue"):
        shutil.rmtree(os.path.join(home, sub), ignore_errors=True)
    control = dict(BASE_CONTROL)
    control.update(case.control)
    for name, text in control.items():
        if text is not None:
            _write(os.path.join(home, "control", name), text)
    _write(os.path.join(home, "bin", "checkpw"), CHECKPW, 0o755)
    # programs that execv(2) cannot run: not executable; no #! line (ENOEXEC)
    _write(os.path.join(home, "bin", "not-executable"), "#!/bin/sh\nexit 0\n", 0o644)
    _write(os.path.join(home, "bin", "no-shebang"), "exit 0\n", 0o755)
    if case.plugins or case.spp_raw is not None:
        conf = []
        section = None
        for i, (sect, script) in enumerate(case.plugins):
            name = "p%d" % i
            _write(os.path.join(home, "bin", "plugins", name), "#!/bin/sh\n" + script + "\n",
                   0o755)
            if sect != section:
                conf.append("[%s]" % sect)
                section = sect
            conf.append("bin/plugins/" + name)
        text = case.spp_raw if case.spp_raw is not None else "\n".join(conf) + "\n"
        _write(os.path.join(home, "control", "smtpplugins"), text)
    from eqmail.queue.store import Store  # eqmail's queue, for its fallback path

    Store.open(home)


def _env(case: SmtpCase, capdir: str) -> Dict[str, str]:
    env = dict(BASE_ENV)
    env["QMAILQUEUE"] = os.path.join(capdir, "capture")
    for k, v in case.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def split_replies(data: bytes) -> List[List[str]]:
    """The server's output as replies (lists of lines without CRLF)."""
    text = data.decode("utf-8", "backslashreplace")
    lines = text.split("\r\n")
    if lines and lines[-1] == "":
        lines.pop()
    replies, cur = [], []
    for line in lines:
        cur.append(line)
        if not re.match(r"^\d{3}-", line):
            replies.append(cur)
            cur = []
    if cur:
        replies.append(cur + ["<connection closed>"])
    return replies


#: EHLO keywords eqmail offers and eQmail 1.09 does not.
_EXTRA_EHLO = frozenset(["ENHANCEDSTATUSCODES", "CHUNKING", "SMTPUTF8", "DSN"])
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")
_ACCEPTED = re.compile(r"^ok \d+ qp \S+$")


def normalise_reply(lines: List[str]) -> str:
    out = []
    for line in lines:
        m = re.match(r"^(\d{3})([ -]?)(.*)$", line, re.S)
        if not m:
            out.append((None, line))
            continue
        code, _sep, text = m.groups()
        text = _ENHANCED.sub("", text, count=1)
        text = _ACCEPTED.sub("ok <time> qp <qp>", text)
        out.append((code, text))
    if len(out) > 1:  # EHLO: eqmail's extra keywords
        out = [x for x in out if x[1] not in _EXTRA_EHLO]
    rendered = []
    for i, (code, text) in enumerate(out):
        if code is None:
            rendered.append(text)
        else:
            last = i == len(out) - 1 or out[i + 1][0] is None
            rendered.append("%s%s%s" % (code, " " if last else "-", text))
    return "\n".join(rendered)


_DATE = re.compile(r"; \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\n")


def _split_message(data: bytes) -> Tuple[str, bytes]:
    """(normalised Received line, the rest) of a queued message."""
    if not data.startswith(b"Received: from "):
        return "<no Received line>", data
    first = data.index(b"\n") + 1
    end = data.index(b"\n", first) + 1 if data[first:first + 2] == b"  " else first
    rec = data[:end].decode("utf-8", "backslashreplace")
    return _DATE.sub("; <date>\n", rec), data[end:]


def parse_envelope(env: bytes) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """qmail-queue's envelope, or None when incomplete (qmail-smtpd opens the
    queue program before DATA and abandons it for refused messages)."""
    if not env.startswith(b"F") or not env.endswith(b"\0\0"):
        return None
    parts = env[:-1].split(b"\0")[:-1]
    sender = parts[0][1:].decode("utf-8", "surrogateescape")
    rcpts = []
    for p in parts[1:]:
        if not p.startswith(b"T"):
            return None
        rcpts.append(p[1:].decode("utf-8", "surrogateescape"))
    return sender, tuple(rcpts)


def read_captures(capdir: str) -> List[Queued]:
    out = []
    names = sorted((n[:-4] for n in os.listdir(capdir) if n.endswith(".env")),
                   key=lambda n: tuple(int(x) for x in n.split(".")))
    for n in names:
        with open(os.path.join(capdir, n + ".env"), "rb") as f:
            env = parse_envelope(f.read())
        if env is None:
            continue
        with open(os.path.join(capdir, n + ".msg"), "rb") as f:
            received, message = _split_message(f.read())
        out.append(Queued(env[0], env[1], received, message))
    return out


def read_eqmail_queue(home: str) -> List[Queued]:
    from eqmail.queue.store import Store, open_message

    store = Store.open(home, create=False)
    out = []
    for msgid in store.ids():
        item = store.load(msgid)
        with open_message(store.message_path(msgid)) as f:
            received, message = _split_message(f.read())
        out.append(Queued(item.sender, tuple(item.recipients), received, message))
    return out


def run_smtp(side: str, peer: Peer, case: SmtpCase, workdir: str) -> SmtpOutcome:
    """One session of `case` on `side` ("eQmail" or "eqmail")."""
    prepare_home(peer.home, case)
    capdir = os.path.join(workdir, side)
    os.makedirs(capdir)
    _write(os.path.join(capdir, "capture"), capture_program(capdir, case.qexit),
           0o755)
    env = _env(case, capdir)
    auth = [os.path.join(peer.home, "bin", "checkpw"), "/bin/true"] if case.auth else []
    if side == "eQmail":
        argv = [peer.smtpd] + auth
    else:
        argv = [sys.executable, "-m", "eqmail", "smtpd", "--home", peer.home] + (
            [ME] + auth if auth else [])
    proc = subprocess.run(argv, input=case.input(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, cwd=REPO, timeout=TIMEOUT)
    queued = read_captures(capdir)
    if side == "eqmail":
        own = read_eqmail_queue(peer.home)
        assert not own, ("eqmail smtpd put %d message(s) into its own queue although "
                         "QMAILQUEUE was set" % len(own))
    replies = [normalise_reply(r) for r in split_replies(proc.stdout)]
    if side == "eQmail":
        assert replies or case.plugins, "eQmail's qmail-smtpd said nothing: %r" % proc.stderr
    return SmtpOutcome(replies, queued, proc.stdout)


# -- local delivery -----------------------------------------------------------------------

@dataclass
class LocalCase:
    id: str
    files: Dict[str, str]            # dot-qmail (and other) files in the home
    ext: str = ""                    # the extension ("" = the bare user)
    sender: str = "s@x.org"
    message: str = "From: s@x.org\nSubject: test\n\nhello\nFrom me\n>From you\n.dot\n"
    domain: str = "example.org"
    defaultdelivery: str = "./Maildir/"
    modes: Dict[str, int] = field(default_factory=dict)   # chmod after writing
    dirs: Tuple[str, ...] = ("Maildir/", )                # maildirs to make
    qexit: int = 0                                        # forwards' queue exit code
    home_mode: int = 0o755
    dash: Optional[str] = None                            # default: "-" when ext

    @property
    def the_dash(self) -> str:
        return self.dash if self.dash is not None else ("-" if self.ext else "")

    @property
    def local(self) -> str:
        return "joe+" + self.ext if self.the_dash else "joe"


@dataclass
class LocalOutcome:
    code: int
    report: List[str]
    did: str
    forwards: Optional[Tuple[str, Tuple[str, ...]]]
    files: Dict[str, str]

    def fields(self) -> Dict[str, object]:
        return {"exit": self.code, "report": self.report, "did": self.did,
                "forwards": self.forwards, "files": self.files}


def _make_user_home(path: str, case: LocalCase) -> None:
    os.makedirs(path)
    for d in case.dirs:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, d, sub), exist_ok=True)
    for name, text in case.files.items():
        _write(os.path.join(path, name), text.replace("{HOME}", path), 0o644)
    for name, mode in case.modes.items():
        os.chmod(os.path.join(path, name), mode)
    os.chmod(path, case.home_mode)


_MAILDIR_NAME = re.compile(r"^(.*/)?(new|tmp|cur)/\d+\.[^/]+$")
_FROM_LINE = re.compile(rb"^From (\S+) [A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}$",
                        re.M)


def _files(home: str, inputs: Dict[str, str]) -> Dict[str, str]:
    """Every file below `home` that the case did not write, normalised
    (the home's path reads ``{HOME}``)."""
    out = {}
    counts: Dict[str, int] = {}
    for top, dirs, files in os.walk(home):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, home)
            if rel in inputs:
                continue
            with open(path, "rb") as f:
                data = f.read()
            if _MAILDIR_NAME.match(rel):
                d = os.path.dirname(rel)
                counts[d] = counts.get(d, 0) + 1
                rel = "%s/<msg%d>" % (d, counts[d])
            data = _FROM_LINE.sub(rb"From \1 <ctime>", data)
            data = data.replace(home.encode(), b"{HOME}")
            out[rel] = data.decode("utf-8", "backslashreplace")
    return out


def _report(text: str) -> Tuple[List[str], str]:
    lines, did = [], ""
    for line in text.split("\n"):
        line = line.strip()
        if not line or re.match(r"^qp \d+$", line):
            continue
        if re.match(r"^did \d+\+\d+\+\d+$", line):
            did = line
            continue
        lines.append(line)
    return lines, did


def run_local(side: str, peer: Peer, case: LocalCase, workdir: str) -> LocalOutcome:
    base = os.path.join(workdir, side)
    os.makedirs(base)
    capdir = os.path.join(base, "cap")
    os.makedirs(capdir)
    _write(os.path.join(capdir, "capture"), capture_program(capdir, case.qexit),
           0o755)
    home = os.path.join(base, "joe")
    _make_user_home(home, case)
    args = ["--", "joe", home, case.local, case.the_dash, case.ext, case.domain, case.sender,
            case.defaultdelivery]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin",
           "QMAILQUEUE": os.path.join(capdir, "capture")}
    msgpath = os.path.join(base, "message")
    _write(msgpath, case.message)
    with open(msgpath, "rb") as msg:
        if side == "eQmail":
            proc = subprocess.run([peer.local] + args, stdin=msg, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=env, cwd=home,
                                  timeout=TIMEOUT)
            code = proc.returncode
            assert code in (0, 100, 111), "qmail-local exited %d: %r" % (code, proc.stdout)
            lines, did = _report(proc.stdout.decode("utf-8", "backslashreplace"))
            caps = read_captures_raw(capdir)
            forwards = caps[0] if caps else None
        else:
            eqhome = os.path.join(base, "eqmail-home")
            _write(os.path.join(eqhome, "control", "me"), ME + "\n")
            env["EQMAIL_HOME"] = eqhome
            proc = subprocess.run([sys.executable, os.path.join(HERE, "eqlocal.py")] + args,
                                  stdin=msg, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env, cwd=home, timeout=TIMEOUT)
            try:
                got = json.loads(proc.stdout.decode("utf-8"))
            except ValueError:
                raise AssertionError("eqlocal.py failed: %r %r" % (proc.stdout, proc.stderr))
            code = {"success": 0, "failure": 100, "deferral": 111}[got["kind"]]
            text = got["text"]
            if code == 0:
                # "did a+b+c/" then the programs' output, "/"-joined
                head, _, notes = text.partition("/")
                text = notes + "\n" + head
            lines, did = _report(text)
            forwards = None
            if got["forwards"] and code == 0:
                forwards = (got["newsender"], tuple(got["forwards"]))
    files = _files(home, case.files)
    lines = [l.replace(home, "{HOME}") for l in lines]
    return LocalOutcome(code, lines, did, forwards, files)


def read_captures_raw(capdir: str):
    """[(sender, rcpts)] of the forwards qmail-local queued."""
    out = []
    for n in sorted(x for x in os.listdir(capdir) if x.endswith(".env")):
        with open(os.path.join(capdir, n), "rb") as f:
            env = parse_envelope(f.read())
        if env is not None:
            out.append(env)
    return out


# -- comparing ------------------------------------------------------------------------------

def diff_fields(eq: Dict[str, object], py: Dict[str, object]) -> Dict[str, object]:
    """{field: difference}: replies as {index: (eQmail, eqmail)}, every
    other field as (eQmail value, eqmail value)."""
    out: Dict[str, object] = {}
    for name in eq:
        a, b = eq[name], py[name]
        if a == b:
            continue
        if name == "replies":
            d = {}
            for i in range(max(len(a), len(b))):
                x = a[i] if i < len(a) else None
                y = b[i] if i < len(b) else None
                if x != y:
                    d[i] = (x, y)
            out[name] = d
        else:
            out[name] = (a, b)
    return out


class Differ(AssertionError):
    """eQmail and eqmail differ (the base of the field-specific errors)."""


class SeveralDiffer(Differ):
    """They differ in more than one field."""


class RepliesDiffer(Differ):
    pass


class EnvelopeDiffers(Differ):
    pass


class MessageDiffers(Differ):
    pass


class ReceivedDiffers(Differ):
    pass


class ExitDiffers(Differ):
    pass


class ReportDiffers(Differ):
    pass


class DidDiffers(Differ):
    pass


class ForwardsDiffer(Differ):
    pass


class FilesDiffer(Differ):
    pass


FIELD_ERRORS = {"replies": RepliesDiffer, "envelope": EnvelopeDiffers,
                "message": MessageDiffers, "received": ReceivedDiffers,
                "exit": ExitDiffers, "report": ReportDiffers, "did": DidDiffers,
                "forwards": ForwardsDiffer, "files": FilesDiffer, "several": SeveralDiffer}


def explain(case_id: str, diffs: Dict[str, object], input_text: str = "") -> str:
    out = ["%s: eQmail 1.09 and eqmail differ" % case_id]
    if input_text:
        out.append("input: %s" % input_text)
    for name, d in diffs.items():
        if name == "replies":
            for i, (a, b) in d.items():
                out.append("  reply %d:\n    eQmail: %r\n    eqmail: %r" % (i, a, b))
        else:
            out.append("  %s:\n    eQmail: %r\n    eqmail: %r" % (name, d[0], d[1]))
    return "\n".join(out)


def raise_for(case_id: str, diffs: Dict[str, object], input_text: str = "") -> None:
    if not diffs:
        return
    cls = FIELD_ERRORS[next(iter(diffs))] if len(diffs) == 1 else SeveralDiffer
    raise cls(explain(case_id, diffs, input_text))
