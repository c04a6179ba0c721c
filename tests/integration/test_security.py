"""SMTP service security with real clients on loopback: STARTTLS (and its
command-injection guard), implicit TLS, SMTP AUTH through checkpassword,
TLSREQUIRED, the submission listener, qmail-spp plugins, control/smtprules
and the connection limits (behaviour reference sections 2.7, 2.8, 3, 4 and
T18-T30).

Most cases share one eqmaild (``mailhost``: --smtp, --submission and --smtps
listeners, a certificate from ``eqmail mkservercert``, users from ``eqmail
passwd``); clients pick a loopback source address (127.0.0.x) to meet a
given control/smtprules line.  Cases that need their own control files
start their own daemon.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import time

import pytest

from helpers import ROOT, Daemon, Home, free_port, wait_log

ME = "mx.example.org"
USER, PASSWORD = "joe", "Open-Sesame-77"          # scrypt: PLAIN and LOGIN
CRAM_USER, CRAM_SECRET = "cram", "Cram-Secret-42"  # passwd --cram: CRAM-MD5 too
OUTSIDE = "user@outside.example"
#: smtprules of the shared daemon, by client source address
DENIED_IP, RELAY_IP, TLSREQ_IP = "127.0.0.2", "127.0.0.3", "127.0.0.7"
MAILHOST_RULES = ('%s:deny\n%s:allow,RELAYCLIENT=""\n%s:allow,TLSREQUIRED=1\n'
                  % (DENIED_IP, RELAY_IP, TLSREQ_IP))
TIMEOUT = 20


# -- helpers -----------------------------------------------------------------------

def eqmail(home: Home, *args, input_text=None):
    """Run ``python -m eqmail TOOL --home H ...`` (bounded)."""
    tool, rest = args[0], list(args[1:])
    return subprocess.run([sys.executable, "-m", "eqmail", tool, "--home", home.path] + rest,
                          input=input_text.encode() if input_text is not None else None,
                          capture_output=True, timeout=120)


def b64(data) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode("ascii")


def plain(user: str, password: str) -> str:
    return b64("\0%s\0%s" % (user, password))


def cram_answer(challenge_b64: str, user: str, secret: str) -> str:
    challenge = base64.b64decode(challenge_b64)
    digest = hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest()
    return b64("%s %s" % (user, digest))


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


class Client:
    """A raw SMTP client: exact replies, optional source address, STARTTLS."""

    def __init__(self, port, host="127.0.0.1", source=None, tls=False, timeout=TIMEOUT):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            if source:
                s.bind((source, 0))
            s.connect((host, port))
            if tls:
                s = client_context().wrap_socket(s)
        except BaseException:
            s.close()
            raise
        self.sock = s
        self.buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            return b""

    def line(self) -> str:
        while b"\n" not in self.buf:
            data = self._recv()
            if not data:
                raise EOFError("connection closed; unread: %r" % self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r").decode("ascii", "replace")

    def reply(self):
        """(code, lines) of one (multi-line) reply."""
        lines = []
        while True:
            text = self.line()
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), lines

    def send(self, data: bytes):
        self.sock.sendall(data)

    def cmd(self, line: str):
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self):
        code, lines = self.cmd("STARTTLS")
        assert code == 220, lines
        assert self.buf == b""
        self.sock = client_context().wrap_socket(self.sock)

    def at_eof(self, timeout: float = 10.0) -> bool:
        """Does the server close the connection (nothing more to read)?"""
        self.sock.settimeout(timeout)
        try:
            return self.buf == b"" and self._recv() == b""
        except socket.timeout:
            return False


def install_cert(home: Home, pem: bytes) -> None:
    path = os.path.join(home.control, "servercert.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def add_users(home: Home) -> None:
    for user, password, extra in ((USER, PASSWORD, []), (CRAM_USER, CRAM_SECRET, ["--cram"])):
        out = eqmail(home, "passwd", user, *extra, input_text=password + "\n")
        assert out.returncode == 0, out.stderr
    path = os.path.join(home.path, "users", "passwd")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    if ROOT:
        os.chown(path, home.uid, home.gid)


def setup_home(home: Home, pem=None, users=True, **files) -> Home:
    """mx.example.org with locals/rcpthosts mx.example.org and localhost;
    outside.example is routed to a closed port, so relayed mail stays queued."""
    files.setdefault("smtproutes", "outside.example:127.0.0.1:1\n")
    home.setup(me=ME, rcpthosts=(ME, "localhost"), **files)
    if pem is not None:
        install_cert(home, pem)
    if users:
        add_users(home)
    return home


def listeners(submission=False, smtps=False, smtp6=False):
    """(extra eqmaild arguments, {kind: port})."""
    args, ports = [], {}
    if submission:
        ports["submission"] = free_port()
        args += ["--submission", "127.0.0.1:%d" % ports["submission"]]
    if smtps:
        ports["smtps"] = free_port()
        args += ["--smtps", "127.0.0.1:%d" % ports["smtps"]]
    if smtp6:
        ports["smtp6"] = free_port6()
        args += ["--smtp", "[::1]:%d" % ports["smtp6"]]
    return args, ports


def start(daemon_factory, home, submission=False, smtps=False, smtp6=False, args=()):
    extra, ports = listeners(submission, smtps, smtp6)
    d = daemon_factory(home, extra + list(args))
    d.ports = ports
    return d


def write_plugin(home: Home, name: str, script: str) -> str:
    """HOME/bin/plugins/NAME, mode 755 (chowned with the home at start)."""
    d = os.path.join(home.path, "bin", "plugins")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    return "bin/plugins/" + name


def message_to(home: Home, rcpt: str, timeout: float = 15.0) -> bytes:
    """The delivered message whose Delivered-To is `rcpt`."""
    want = b"\nDelivered-To: " + rcpt.encode() + b"\n"
    deadline = time.time() + timeout
    while time.time() < deadline:
        for m in home.messages():
            if want in m:
                return m
        time.sleep(0.05)
    raise AssertionError("no message for %s delivered; have %d" % (rcpt, len(home.messages())))


def swaks(port, *args):
    out = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port),
                          "--timeout", "20"] + list(args),
                         capture_output=True, timeout=60)
    return out.returncode, out.stdout.decode("utf-8", "replace") + out.stderr.decode(
        "utf-8", "replace")


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servercert():
    """One certificate made by `eqmail mkservercert` (RSA key generation is
    slow); each home gets a copy, mode 0600."""
    h = Home()
    try:
        h.setup(me=ME)
        out = eqmail(h, "mkservercert")
        assert out.returncode == 0, out.stderr
        path = os.path.join(h.control, "servercert.pem")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path, "rb") as f:
            pem = f.read()
        assert b"PRIVATE KEY" in pem and b"CERTIFICATE" in pem
        return pem
    finally:
        h.remove()


@pytest.fixture(scope="module")
def mailhost(servercert):
    """The shared daemon: --smtp (plain, STARTTLS offered), --submission and
    --smtps on 127.0.0.1, default checkpassword (eqmail chkpw), smtprules
    MAILHOST_RULES."""
    home = setup_home(Home(), servercert, smtprules=MAILHOST_RULES)
    extra, ports = listeners(submission=True, smtps=True)
    d = Daemon(home, extra)
    d.ports = ports
    try:
        d.start()
        yield d
    finally:
        try:
            d.stop()
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(5)
            home.remove()


# -- 1. swaks: STARTTLS + AUTH on submission; an external checkpassword ---------------

@pytest.mark.parametrize("mech,user,password", [
    ("PLAIN", USER, PASSWORD), ("LOGIN", USER, PASSWORD), ("CRAM-MD5", CRAM_USER, CRAM_SECRET)])
def test_swaks_submission_tls_auth_then_relay(mailhost, mech, user, password):
    code, out = swaks(mailhost.ports["submission"], "--tls", "--auth", mech,
                      "--auth-user", user, "--auth-password", password,
                      "--ehlo", "client.example", "--from", "%s@%s" % (user, ME),
                      "--to", OUTSIDE, "--quit-after", "RCPT")
    assert code == 0, out
    assert "<-  220 ready for tls" in out, out
    assert "<~  235 2.7.0 ok, %s, go ahead (#2.0.0)" % user in out, out
    assert " ~> RCPT TO:<%s>" % OUTSIDE in out
    assert "<~  250 2.1.5 ok" in out, out
    # the password never reaches the log
    assert password not in mailhost.log()


def test_swaks_external_checkpassword_sees_fd3(home, daemon_factory, servercert):
    setup_home(home, servercert, users=False)
    fd3 = os.path.join(home.path, "fd3.out")
    script = os.path.join(home.path, "bin", "checkpw")
    os.makedirs(os.path.dirname(script))
    with open(script, "w") as f:
        f.write("#!%s\n"
                "import os, sys\n"
                "data = b''\n"
                "while True:\n"
                "    chunk = os.read(3, 4096)\n"
                "    if not chunk:\n"
                "        break\n"
                "    data += chunk\n"
                "with open(%r, 'ab') as f:\n"
                "    f.write(data)\n"
                "if data != b'joe\\0pw\\0\\0':\n"
                "    sys.exit(1)\n"
                "os.execvp(sys.argv[1], sys.argv[1:])\n" % (sys.executable, fd3))
    os.chmod(script, 0o755)
    d = daemon_factory(home, ["--checkpassword", script])
    code, out = swaks(d.port, "--auth", "PLAIN", "--auth-user", "joe", "--auth-password", "pw",
                      "--from", "joe@%s" % ME, "--to", OUTSIDE, "--quit-after", "RCPT")
    assert code == 0, out + d.log()
    assert "<-  235 2.7.0 ok, joe, go ahead (#2.0.0)" in out, out
    assert "<-  250 2.1.5 ok" in out, out
    with open(fd3, "rb") as f:
        assert f.read() == b"joe\0pw\0\0"


# -- 2. implicit TLS (smtps) with smtplib ---------------------------------------------

def test_smtps_auth_and_delivery(mailhost, servercert, tmp_path):
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(servercert[:servercert.index(b"-----END CERTIFICATE-----") + 26])
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False  # the certificate is for mx.example.org, not 127.0.0.1
    with smtplib.SMTP_SSL("127.0.0.1", mailhost.ports["smtps"], context=ctx,
                          timeout=TIMEOUT) as s:
        code, _ = s.ehlo("client.example")
        assert code == 250
        assert "starttls" not in s.esmtp_features  # already in TLS
        assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN", "CRAM-MD5"]
        s.user, s.password = USER, PASSWORD
        assert s.auth("PLAIN", s.auth_plain)[0] == 235
        s.sendmail("%s@%s" % (USER, ME), ["smtps@localhost"],
                   b"Subject: over smtps\r\n\r\nimplicit TLS\r\n")
    msg = message_to(mailhost.home, "smtps@localhost")
    lines = msg.split(b"\n")
    assert lines[2].startswith(b"Received: from unknown (HELO client.example) "), lines[2]
    assert lines[2].endswith(b"(joe@127.0.0.1)"), lines[2]
    assert lines[3].startswith(b"  by mx.example.org with ESMTPSA ("), lines[3]
    assert b" encrypted); " in lines[3]
    assert msg.endswith(b"Subject: over smtps\n\nimplicit TLS\n")


# -- 3. STARTTLS ----------------------------------------------------------------------

def test_starttls_pipelined_commands_are_discarded(mailhost):
    """RFC 3207 section 4.2 (CVE-2011-0411 class): what came with STARTTLS in
    plain text must not be executed inside TLS."""
    with Client(mailhost.port) as c:
        assert c.reply()[0] == 220
        c.send(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<inject@example.com>\r\n")
        code, lines = c.reply()
        assert code == 250 and "250-STARTTLS" in lines, lines
        assert c.reply() == (220, ["220 ready for tls"])
        assert c.buf == b""  # nothing else came in plain text
        c.sock = client_context().wrap_socket(c.sock)
        c.send(b"EHLO y\r\nRCPT TO:<joe@localhost>\r\nQUIT\r\n")
        code, lines = c.reply()  # the first reply inside TLS is the EHLO's
        assert code == 250 and lines[0] == "250-mx.example.org", lines
        assert not any("STARTTLS" in x for x in lines)
        # the injected MAIL never ran: no transaction exists
        assert c.reply() == (503, ["503 5.5.1 MAIL first (#5.5.1)"])
        assert c.reply()[0] == 221
        assert c.at_eof()


def test_starttls_twice_and_with_argument(mailhost):
    with Client(mailhost.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO x")[0] == 250
        assert c.cmd("STARTTLS now") == (
            501, ["501 5.5.4 Syntax error (no parameters allowed) (#5.5.4)"])
        c.starttls()  # the session went on in plain text
        assert c.cmd("EHLO y")[0] == 250
        assert c.cmd("STARTTLS") == (502, ["502 5.5.1 unimplemented (#5.5.1)"])
        assert c.cmd("NOOP")[0] == 250  # still in TLS, still talking
        assert c.cmd("QUIT")[0] == 221


def test_openssl_s_client_starttls(mailhost):
    out = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect",
         "127.0.0.1:%d" % mailhost.port, "-quiet", "-crlf"],
        input=b"EHLO client.example\nQUIT\n", capture_output=True, timeout=30)
    text = out.stdout.decode("utf-8", "replace")
    err = out.stderr.decode("utf-8", "replace")
    # s_client's own EHLO and STARTTLS went in plain text (not shown); this
    # EHLO was answered inside TLS, so STARTTLS is no longer offered
    assert text.startswith("250-mx.example.org\r\n"), text + err
    assert "250-PIPELINING" in text and "STARTTLS" not in text, text
    assert text.endswith("221 2.0.0 mx.example.org\r\n"), text + err
    assert "CN = mx.example.org" in err  # the certificate of mkservercert
    # a clean end: the server's close_notify (else OpenSSL 3 says
    # "unexpected eof while reading" and exits 1)
    assert out.returncode == 0, text + err


def _ends_with_close_notify(sock) -> bool:
    """After QUIT and 221: did the server end TLS with close_notify (a clean
    b"") rather than a bare TCP close (OpenSSL: unexpected eof)?"""
    try:
        while sock.recv(4096):
            pass
        return True
    except ssl.SSLError as e:
        assert "UNEXPECTED_EOF" in str(e) or isinstance(e, ssl.SSLEOFError), e
        return False


def _strict_eof_context() -> ssl.SSLContext:
    ctx = client_context()
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return ctx


@pytest.mark.parametrize("listener", ["starttls", "smtps"])
def test_tls_session_ends_with_close_notify(mailhost, listener):
    if listener == "smtps":
        raw = socket.create_connection(("127.0.0.1", mailhost.ports["smtps"]), timeout=TIMEOUT)
        sock = _strict_eof_context().wrap_socket(raw, suppress_ragged_eofs=False)
    else:
        raw = socket.create_connection(("127.0.0.1", mailhost.port), timeout=TIMEOUT)
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline() == b"220 ready for tls\r\n"
        sock = _strict_eof_context().wrap_socket(raw, suppress_ragged_eofs=False)
    with sock:
        if listener == "smtps":
            buf = b""
            while not buf.endswith(b"\r\n"):
                buf += sock.recv(4096)
            assert buf.startswith(b"220 ")
        sock.sendall(b"QUIT\r\n")
        buf = b""
        while not buf.endswith(b"\r\n"):
            buf += sock.recv(4096)
        assert buf.startswith(b"221 ")
        assert _ends_with_close_notify(sock)


# -- 4. TLSREQUIRED --------------------------------------------------------------------

#: (listener, client source): the submission listener's default, and
#: TLSREQUIRED=1 from smtprules on the plain SMTP listener
TLSREQ_CASES = [("submission", None), ("smtp", TLSREQ_IP)]


def _tlsreq_client(mailhost, listener, source) -> Client:
    port = mailhost.ports["submission"] if listener == "submission" else mailhost.port
    return Client(port, source=source)


@pytest.mark.parametrize("listener,source", TLSREQ_CASES)
def test_tlsrequired_plain_login_only_inside_tls(mailhost, listener, source):
    with _tlsreq_client(mailhost, listener, source) as c:
        assert c.reply()[0] == 220
        code, lines = c.cmd("EHLO x")
        assert "250-STARTTLS" in lines and "250 AUTH CRAM-MD5" in lines, lines
        refused = (538, ["538 5.7.11 AUTH PLAIN/LOGIN not available without TLS (#5.3.3)"])
        assert c.cmd("AUTH PLAIN " + plain(USER, PASSWORD)) == refused
        assert c.cmd("AUTH LOGIN") == refused
        c.starttls()
        code, lines = c.cmd("EHLO y")
        assert "250 AUTH LOGIN PLAIN CRAM-MD5" in lines, lines
        assert c.cmd("AUTH PLAIN " + plain(USER, PASSWORD)) == (
            235, ["235 2.7.0 ok, joe, go ahead (#2.0.0)"])
        assert c.cmd("QUIT")[0] == 221


@pytest.mark.parametrize("listener,source", TLSREQ_CASES)
@pytest.mark.parametrize("verb", ["CRAM-MD5", "cram-md5"])
def test_tlsrequired_cram_md5_without_tls(mailhost, listener, source, verb):
    with _tlsreq_client(mailhost, listener, source) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO x")[0] == 250
        code, lines = c.cmd("AUTH " + verb)
        assert code == 334, lines
        challenge = base64.b64decode(lines[0][4:]).decode()
        assert challenge.startswith("<") and challenge.endswith("@%s>" % ME), challenge
        assert c.cmd(cram_answer(lines[0][4:], CRAM_USER, CRAM_SECRET)) == (
            235, ["235 2.7.0 ok, cram, go ahead (#2.0.0)"])
        assert c.cmd("MAIL FROM:<cram@%s>" % ME)[0] == 250
        assert c.cmd("RCPT TO:<%s>" % OUTSIDE)[0] == 250  # AUTH opened relaying
        assert c.cmd("QUIT")[0] == 221


# -- 5. submission: AUTH before MAIL --------------------------------------------------

def test_submission_requires_auth_then_relays(mailhost):
    with Client(mailhost.ports["submission"]) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO x")[0] == 250
        code, lines = c.cmd("MAIL FROM:<joe@%s>" % ME)
        assert code == 530 and "Authorization required (#5.7.1)" in lines[0], lines
        assert c.cmd("RCPT TO:<%s>" % OUTSIDE)[0] == 503  # no transaction was opened
        c.starttls()
        assert c.cmd("EHLO x")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain(USER, PASSWORD))[0] == 235
        assert c.cmd("MAIL FROM:<joe@%s>" % ME) == (250, ["250 2.1.0 ok"])
        assert c.cmd("RCPT TO:<%s>" % OUTSIDE) == (250, ["250 2.1.5 ok"])
        assert c.cmd("QUIT")[0] == 221


def test_plain_smtp_without_auth_does_not_relay(mailhost):
    with Client(mailhost.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO x")[0] == 250
        assert c.cmd("MAIL FROM:<joe@%s>" % ME)[0] == 250
        assert c.cmd("RCPT TO:<%s>" % OUTSIDE)[0] == 553
        assert c.cmd("QUIT")[0] == 221


# -- 6. wrong passwords -------------------------------------------------------------------

def test_wrong_password_delay_no_leak_and_three_strikes(mailhost):
    wrong = "Wr0ng-Pa55-xyzzy"
    with Client(mailhost.port, timeout=30) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO x")[0] == 250
        t0 = time.monotonic()
        assert c.cmd("AUTH PLAIN " + plain(USER, wrong)) == (
            535, ["535 5.7.8 authentication failed (#5.7.1)"])
        assert time.monotonic() - t0 >= 4.0
        # LOGIN counts the same
        assert c.cmd("AUTH LOGIN " + b64(USER))[0] == 334
        t0 = time.monotonic()
        assert c.cmd(b64(wrong))[0] == 535
        assert time.monotonic() - t0 >= 4.0
        code, lines = c.cmd("AUTH PLAIN " + plain(USER, wrong + "3"))
        assert (code, lines) == (
            421, ["421 4.7.0 too many failed authentications, closing (#4.7.0)"])
        assert c.at_eof()
    log = mailhost.log()
    assert "auth plain failed: user joe from 127.0.0.1" in log, log
    assert wrong not in log and b64(wrong) not in log
    assert plain(USER, wrong) not in log


# -- 7. qmail-spp ------------------------------------------------------------------------

def _spp_home(home, servercert, plugins: str, **files):
    setup_home(home, servercert, badmailfrom="spam@bad.com\n", smtpplugins=plugins, **files)
    return home


def test_spp_rcpt_plugin_rejects_with_its_own_text(home, daemon_factory, servercert):
    p = write_plugin(home, "rcpt", '#!/bin/sh\ncase "$SMTPRCPTTO" in\n'
                     '  nope@localhost) echo "E550 5.7.1 not this one" ;;\nesac\n')
    d = start(daemon_factory, _spp_home(home, servercert, "[rcpt]\n%s\n" % p))
    with smtplib.SMTP("127.0.0.1", d.port, timeout=TIMEOUT) as s:
        s.ehlo("x")
        s.mail("a@example.com")
        assert s.rcpt("nope@localhost") == (550, b"5.7.1 not this one")
        assert s.rcpt("fine@localhost")[0] == 250
        assert s.data(b"Subject: rcpt plugin\r\n\r\nx\r\n")[0] == 250
    msg = message_to(home, "fine@localhost")
    assert b"Subject: rcpt plugin" in msg
    assert not any(b"Delivered-To: nope@localhost" in m for m in home.messages())


def test_spp_data_plugin_header_under_received(home, daemon_factory, servercert):
    p = write_plugin(home, "data", "#!/bin/sh\necho 'HX-Spp: yes'\n")
    d = start(daemon_factory, _spp_home(home, servercert, "[data]\n%s\n" % p))
    with smtplib.SMTP("127.0.0.1", d.port, timeout=TIMEOUT) as s:
        s.sendmail("a@example.com", ["spp@localhost"], b"Subject: data plugin\r\n\r\nbody\r\n")
    lines = message_to(home, "spp@localhost").split(b"\n")
    assert lines[2].startswith(b"Received: from ") and lines[3].startswith(b"  by "), lines
    assert lines[4] == b"X-Spp: yes", lines
    assert lines[5] == b"Subject: data plugin"


def test_spp_connection_plugin_sets_tlsrequired(home, daemon_factory, servercert):
    p = write_plugin(home, "conn", "#!/bin/sh\necho STLSREQUIRED=1\n")
    d = start(daemon_factory, _spp_home(home, servercert, "[connection]\n%s\n" % p))
    with Client(d.port) as c:
        assert c.reply()[0] == 220
        assert "250 AUTH CRAM-MD5" in c.cmd("EHLO x")[1]
        assert c.cmd("AUTH PLAIN " + plain(USER, PASSWORD))[0] == 538
        c.starttls()
        assert c.cmd("EHLO y")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain(USER, PASSWORD))[0] == 235
        assert c.cmd("QUIT")[0] == 221


def test_spp_hanging_plugin_times_out_with_451(home, daemon_factory, servercert):
    p = write_plugin(home, "hang", "#!/bin/sh\nsleep 97\n")
    d = start(daemon_factory, _spp_home(home, servercert, "[helo]\n%s\n" % p,
                                        timeoutplugins="2\n"))
    with Client(d.port) as c:
        assert c.reply()[0] == 220
        t0 = time.monotonic()
        assert c.cmd("HELO x") == (
            451, ["451 qmail-spp failure: bin/plugins/hang: timeout (#4.3.0)"])
        assert 1.5 <= time.monotonic() - t0 < 10
        # the session survives
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<hang@localhost>")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    # the plugin was killed with its children (its sleep too)
    deadline = time.time() + 5
    while _processes("sleep 97") and time.time() < deadline:
        time.sleep(0.1)
    assert _processes("sleep 97") == []


def _processes(cmdline: str):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if f.read().replace(b"\0", b" ").strip() == cmdline.encode():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_spp_missing_plugin_file_451_and_session_goes_on(home, daemon_factory, servercert):
    # eqmaild refuses to start with such a line (tests/integration/
    # test_qmail_exact.py); a file changed afterwards is read by the sessions
    d = start(daemon_factory, _spp_home(home, servercert, "[helo]\n"))
    home.write("smtpplugins", "[helo]\nbin/plugins/missing\n")
    with Client(d.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("HELO x") == (
            451, ["451 qmail-spp failure: bin/plugins/missing: can't execute (#4.3.0)"])
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<missing@localhost>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        assert c.cmd("Subject: still here\r\n\r\nok\r\n.")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    assert b"Subject: still here" in message_to(home, "missing@localhost")


def test_spp_no_smtpplugins_file_is_a_normal_session(mailhost):
    assert not os.path.exists(os.path.join(mailhost.home.control, "smtpplugins"))
    with smtplib.SMTP("127.0.0.1", mailhost.port, timeout=TIMEOUT) as s:
        s.sendmail("a@example.com", ["nospp@localhost"], b"Subject: no spp\r\n\r\nx\r\n")
    assert b"Subject: no spp" in message_to(mailhost.home, "nospp@localhost")


def test_spp_unreadable_smtpplugins_451_at_connect(home, daemon_factory, servercert):
    d = start(daemon_factory, setup_home(home, servercert, users=False))
    where = os.path.join(home.control, "smtpplugins")
    os.mkdir(where)  # read per session: a directory where the file should be
    try:
        for _ in range(2):
            with Client(d.port) as c:
                assert c.reply() == (
                    451, ["451 qmail-spp failure: unable to read control/smtpplugins (#4.3.0)"])
                assert c.at_eof()
        assert d.proc.poll() is None, d.log()
        assert "unable to read control/smtpplugins" in d.log()
        assert "Traceback" not in d.log()
    finally:
        os.rmdir(where)
    with Client(d.port) as c:
        assert c.reply()[0] == 220


def test_spp_nospp_from_smtprules(home, daemon_factory, servercert):
    ran = os.path.join(home.path, "spp-ran")
    p = write_plugin(home, "conn", '#!/bin/sh\necho "$TCPREMOTEIP" >> %s\n'
                     'echo "E554 5.7.1 plugin says go away"\n' % ran)
    _spp_home(home, servercert, "[connection]\n%s\n" % p,
              smtprules="127.0.0.1:allow,NOSPP=1\n")
    d = start(daemon_factory, home)  # its greeting check comes from 127.0.0.1
    with Client(d.port, source="127.0.0.5") as c:  # no rule: the plugin runs
        assert c.reply() == (554, ["554 5.7.1 plugin says go away"])
    with smtplib.SMTP("127.0.0.1", d.port, timeout=TIMEOUT) as s:
        assert s.sendmail("a@example.com", ["nospp@localhost"],
                          b"Subject: NOSPP\r\n\r\nx\r\n") == {}
    message_to(home, "nospp@localhost")
    with open(ran) as f:
        assert f.read().split() == ["127.0.0.5"]


def test_spp_mail_plugin_override_does_not_open_relaying(home, daemon_factory, servercert):
    p = write_plugin(home, "override", "#!/bin/sh\necho O\n")
    d = start(daemon_factory, _spp_home(home, servercert, "[mail]\n%s\n" % p))
    with Client(d.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO x")[0] == 250
        assert c.cmd("MAIL FROM:<spam@bad.com>")[0] == 250
        assert c.cmd("RCPT TO:<joe@localhost>")[0] == 250  # O skipped badmailfrom
        assert c.cmd("RCPT TO:<%s>" % OUTSIDE) == (
            553, ["553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"])
        assert c.cmd("QUIT")[0] == 221


# -- 8. smtprules and connection limits ---------------------------------------------------

def test_smtprules_deny(mailhost):
    with Client(mailhost.port, source=DENIED_IP) as c:
        assert c.reply() == (
            554, ["554 sorry, your address is not allowed to use this service (#5.7.1)"])
        assert c.at_eof()
    assert wait_log(mailhost, "denied by control/smtprules: %s" % DENIED_IP)


def test_smtprules_relayclient(mailhost):
    for source, expect in ((RELAY_IP, 250), ("127.0.0.1", 553)):
        with Client(mailhost.port, source=source) as c:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO x")[0] == 250
            assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
            code, lines = c.cmd("RCPT TO:<%s>" % OUTSIDE)
            assert code == expect, (source, lines)
            assert c.cmd("QUIT")[0] == 221


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1)")
@pytest.mark.parametrize("rule,expect", [('[::1]:allow,RELAYCLIENT=""', "relay"),
                                         ("::1:deny", "deny")])
def test_smtprules_ipv6(home, daemon_factory, rule, expect):
    setup_home(home, users=False, smtprules=rule + "\n")
    d = start(daemon_factory, home, smtp6=True)
    with Client(d.ports["smtp6"], host="::1") as c:
        if expect == "deny":
            assert c.reply() == (
                554, ["554 sorry, your address is not allowed to use this service (#5.7.1)"])
            assert c.at_eof()
            return
        assert c.reply()[0] == 220
        assert c.cmd("EHLO x")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<%s>" % OUTSIDE)[0] == 250
        assert c.cmd("QUIT")[0] == 221
    # the rule is for ::1 only: IPv4 loopback still may not relay
    with Client(d.port) as c:
        assert c.reply()[0] == 220
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.com>")
        assert c.cmd("RCPT TO:<%s>" % OUTSIDE)[0] == 553


def test_concurrencyperip(home, daemon_factory):
    setup_home(home, users=False, concurrencyperip="2\n")
    d = start(daemon_factory, home)
    ip = "127.0.0.4"
    first, second = Client(d.port, source=ip), Client(d.port, source=ip)
    try:
        assert first.reply()[0] == 220 and second.reply()[0] == 220
        with Client(d.port, source=ip) as third:
            assert third.reply() == (421, ["421 too many connections, try again later (#4.7.0)"])
            assert third.at_eof()
        with Client(d.port, source="127.0.0.5") as other:  # per IP, not in total
            assert other.reply()[0] == 220
            other.cmd("QUIT")
        assert first.cmd("QUIT")[0] == 221
        assert first.at_eof()
        deadline = time.time() + 5
        while True:  # the slot frees once the server has finished the first session
            with Client(d.port, source=ip) as again:
                code, _ = again.reply()
                if code == 220 or time.time() > deadline:
                    break
            time.sleep(0.1)
        assert code == 220
    finally:
        first.close()
        second.close()
    assert "too many connections (" in d.log() and "from %s)" % ip in d.log()
