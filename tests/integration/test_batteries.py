"""Fault, load and hostile-input batteries (issue 8), with a real eqmaild.

Each battery is bounded (well under a minute) and prints its figures
(messages sent/acknowledged/delivered, inputs tried and their outcomes,
connections held): run with ``-s`` to see them.

1. Crash safety: SIGKILL at random moments while clients send, and during
   a local delivery, a remote delivery and a bounce.
2. Full disk under the alias Maildir (tmpfs, root only): deliveries defer,
   never bounce, and all resume when space returns.
3. Open relay: the classic relay tricks from an unauthenticated client,
   with percenthack off and on; a catch-all smtproutes peer records every
   attempt to deliver outside.
4. SMTP protocol abuse: bare LF/CR, NUL, long lines, 10 000 RCPT, pipelined
   garbage, commands out of order, malformed AUTH, STARTTLS twice, a client
   that trickles one byte a second, 500 idle connections.
6. Hostile local data: symbolic links inside a virtual user's Maildir,
   CR/LF injection through sendmail's arguments.
7. Recovery: partial files left by a crash are removed at start; a
   hand-written envelope (as an earlier release would leave it) is read;
   ``eqmail qread`` lists exactly the envelopes.

Battery 5 (hypothesis) is tests/unit/test_fuzz.py.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import errno
import os
import random
import re
import resource
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT, ensure_user, free_port, wait_log

PY = sys.executable


# -- helpers ------------------------------------------------------------------------------

class Raw:
    """A raw SMTP client: exact bytes out, exact reply lines in."""

    def __init__(self, port, timeout=20.0, source=None):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None)
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
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self._recv()
            if not data:
                raise EOFError("connection closed; unread %r" % self.buf[:200])
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self):
        """(code, [lines]) of one possibly multi-line reply."""
        lines = []
        while True:
            text = self.line()
            lines.append(text)
            assert re.match(rb"\d{3}[ -]", text), "not an SMTP reply line: %r" % text
            if text[3:4] != b"-":
                return int(text[:3]), lines

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def cmd(self, line):
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    def at_eof(self, timeout=10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.buf == b"" and self._recv() == b""
        except socket.timeout:
            return False

    def starttls(self):
        code, lines = self.cmd("STARTTLS")
        assert code == 220, lines
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock)


def alias_home(home, dotqmail=None):
    """HOME/alias with a Maildir, the catch-all .qmail-default and the given
    extra files ({".qmail-x": text}), made before the first start (which
    keeps an existing alias/)."""
    from eqmail.delivery.local import maildirmake

    alias = os.path.join(home.path, "alias")
    os.makedirs(alias, exist_ok=True)
    os.chmod(alias, 0o755)
    maildirmake(os.path.join(alias, "Maildir"))
    files = {".qmail-default": "./Maildir/\n"}
    files.update(dotqmail or {})
    for name, text in files.items():
        with open(os.path.join(alias, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(alias, name), 0o644)
    return alias


def wait_until(pred, timeout=15.0, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def wait_drained(home, timeout=30.0):
    return wait_until(lambda: home.queued() == [], timeout)


def tagged(home, tag: bytes):
    """Counter {number: copies} of the delivered messages whose Message-ID is
    <TAG-number@battery.test>."""
    counts = collections.Counter()
    pat = re.compile(rb"\nMessage-ID: <" + re.escape(tag) + rb"-(\d+)@battery\.test>", re.I)
    for m in home.messages():
        for mo in pat.finditer(m):
            counts[int(mo.group(1))] += 1
    return counts


def message(tag: str, n: int, extra: str = "") -> bytes:
    return ("From: battery@example.com\r\nTo: rcpt@localhost\r\nSubject: %s %d%s\r\n"
            "Message-ID: <%s-%d@battery.test>\r\n\r\nmessage %s number %d\r\n"
            % (tag, n, extra, tag, n, tag, n)).encode()


def send_one(port, sender, rcpts, data: bytes, timeout=20):
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
        s.ehlo("battery.client")
        refused = s.sendmail(sender, rcpts, data)
        assert refused == {}, refused


def deliveries(daemon, kind):
    return len(re.findall(r"delivery \d+: %s:" % kind, daemon.log()))


# ========================================================== 1. crash safety

N_MESSAGES = 300
N_CLIENTS = 4
N_KILLS = 4


@pytest.mark.parametrize("path", ["direct", "queue"])
def test_crash_safety_sigkill_while_receiving_and_delivering(home, daemon_factory, path):
    """N messages over several connections while eqmaild is SIGKILLed at
    random moments and restarted.  Every message that got its 250 is
    delivered, exactly once except for at most one per kill (the delivery
    in flight: concurrencylocal=1 makes that one delivery); a message
    without its 250 may be delivered (committed, the 250 lost; or written
    to the Maildir during DATA) but never twice.  `path`: "direct", local
    mail written into the Maildir during DATA (eqmail.delivery.direct, the
    default), or "queue" (control/directlocal 0: committed, then
    delivered)."""
    home.setup(rcpthosts=("localhost",), concurrencylocal="1\n",
               directlocal="1\n" if path == "direct" else "0\n")
    alias_home(home)
    d = daemon_factory(home)
    seed = int(os.environ.get("EQMAIL_BATTERY_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    numbers = list(range(N_MESSAGES))
    lock = threading.Lock()
    acked, unacked, errors = set(), set(), collections.Counter()
    deadline = time.time() + 45

    def client(idx):
        s = None
        while time.time() < deadline:
            if s is None:
                try:
                    s = smtplib.SMTP("127.0.0.1", d.port, timeout=10)
                    s.ehlo("crash%d.client" % idx)
                except (OSError, smtplib.SMTPException):
                    s = None
                    time.sleep(0.05)
                    continue
            with lock:
                if not numbers:
                    break
                n = numbers.pop(0)
            try:
                s.sendmail("battery@example.com", ["crash@localhost"], message("crash", n))
                with lock:
                    acked.add(n)
            except (OSError, smtplib.SMTPException) as e:
                with lock:
                    unacked.add(n)   # never sent again
                    errors[type(e).__name__] += 1
                try:
                    s.close()
                except Exception:
                    pass
                s = None
        if s is not None:
            try:
                s.quit()
            except (OSError, smtplib.SMTPException):
                pass

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    kill_times = []
    t0 = time.time()
    for k in range(N_KILLS):
        # the first kill lands while the clients send, the later ones while
        # they send or while the queue is being delivered
        time.sleep(rng.uniform(0.05, 0.4) if k == 0 else rng.uniform(0.2, 1.0))
        d.kill9()
        kill_times.append(round(time.time() - t0, 2))
        time.sleep(rng.uniform(0.0, 0.3))
        d.start()
    for t in threads:
        t.join(max(1, deadline - time.time()))
    assert not any(t.is_alive() for t in threads), "clients did not finish in time"
    assert wait_drained(home, 40), d.log()[-3000:]
    counts = tagged(home, b"crash")
    delivered = set(counts)
    dups = {n: c for n, c in counts.items() if c > 1}
    print("\n[crash] %s: seed %d: %d messages over %d connections, %d SIGKILLs at %s s"
          % (path, seed, N_MESSAGES, N_CLIENTS, N_KILLS, kill_times))
    print("[crash] sent %d, acknowledged (250) %d, not acknowledged %d (%s)"
          % (len(acked) + len(unacked), len(acked), len(unacked), dict(errors)))
    print("[crash] delivered %d distinct (%d files), duplicates %s, unacknowledged but "
          "delivered %d" % (len(delivered), sum(counts.values()), dups,
                            len(delivered & unacked)))
    assert len(acked) + len(unacked) == N_MESSAGES
    assert len(acked) >= N_MESSAGES // 2, "too few messages got through to mean anything"
    lost = acked - delivered
    assert not lost, "acknowledged but never delivered: %s" % sorted(lost)
    assert sum(c - 1 for c in dups.values()) <= N_KILLS, dups
    assert not [n for n in dups if n in unacked], "unacknowledged and delivered twice"
    assert delivered <= acked | unacked
    # the queue is clean: no partial files left either
    q = os.path.join(home.path, "queue")
    left = [os.listdir(os.path.join(q, x)) for x in ("mess", "tmp", "bounce")]
    assert left == [[], [], []], (left, d.log()[-3000:])
    log = d.log()
    if path == "direct":  # the path taken: no message went through the queue
        assert "direct msg" in log and "starting delivery" not in log, log[-3000:]
    else:
        assert "direct msg" not in log


def test_crash_during_local_delivery(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    alias = alias_home(home, {".qmail-slow": "|echo attempt >> slow-attempts; sleep 3\n"
                                             "./Maildir/\n"})
    d = daemon_factory(home)
    send_one(d.port, "battery@example.com", ["slow@localhost"], message("slow", 1))
    marker = os.path.join(alias, "slow-attempts")
    assert wait_until(lambda: os.path.exists(marker), 10), d.log()
    d.kill9()
    assert home.messages() == []
    d.start()
    assert len(home.wait_messages(1, 15)) == 1, d.log()
    assert wait_drained(home), d.log()
    with open(marker) as f:
        attempts = f.read().count("attempt")
    counts = tagged(home, b"slow")
    print("\n[crash/local] program attempts %d, delivered %s" % (attempts, dict(counts)))
    assert attempts >= 2
    assert counts == {1: 1}


def test_crash_during_remote_delivery(home, daemon_factory, scripted_smtp):
    far = scripted_smtp()
    stalled = threading.Event()
    original = far.controller.handler.handle_DATA
    stalls = [8.0]

    async def handle_DATA(server, session, envelope):
        if stalls:
            stalls.pop()
            stalled.set()
            await asyncio.sleep(8.0)  # the daemon is killed meanwhile
            return "451 4.3.0 stalled"
        return await original(server, session, envelope)

    far.controller.handler.handle_DATA = handle_DATA
    home.setup(rcpthosts=("localhost",), smtproutes=":[127.0.0.1]:%d\n" % far.port,
               smtprules='127.0.0.1:allow,RELAYCLIENT=""\n', timeoutremote="30\n",
               timeoutconnect="5\n")
    alias_home(home)
    d = daemon_factory(home)
    send_one(d.port, "sender@localhost", ["far@remote.test"], message("remote", 1))
    assert stalled.wait(15), d.log()
    d.kill9()
    d.start()
    assert wait_until(lambda: len(far.messages) >= 1, 20), d.log()
    assert wait_drained(home), d.log()
    time.sleep(0.3)
    print("\n[crash/remote] connections %d, DATA attempts %d, accepted %d"
          % (far.connections, len(far.attempts) + 1, len(far.messages)))
    assert len(far.messages) == 1
    assert b"Message-ID: <remote-1@battery.test>" in far.messages[0].data
    assert home.messages() == []  # no bounce


def test_crash_during_bounce(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    alias = alias_home(home, {".qmail-fail": "|exit 100\n",
                              ".qmail-bouncer": "|echo attempt >> bounce-attempts; sleep 3\n"
                                                "./Maildir/\n"})
    d = daemon_factory(home)
    send_one(d.port, "bouncer@localhost", ["fail@localhost"], message("bounced", 1))
    marker = os.path.join(alias, "bounce-attempts")
    assert wait_until(lambda: os.path.exists(marker), 15), d.log()
    assert "bounce msg" in d.log()
    d.kill9()
    d.start()
    assert len(home.wait_messages(1, 15)) == 1, d.log()
    assert wait_drained(home), d.log()
    time.sleep(0.3)
    msgs = home.messages()
    with open(marker) as f:
        attempts = f.read().count("attempt")
    print("\n[crash/bounce] bounce delivery attempts %d, messages in the Maildir %d"
          % (attempts, len(msgs)))
    assert attempts >= 2
    assert len(msgs) == 1
    assert b"Delivered-To: bouncer@localhost" in msgs[0]
    assert b"multipart/report" in msgs[0] and b"fail@localhost" in msgs[0]
    assert b"Message-ID: <bounced-1@battery.test>" in msgs[0]  # the returned header


# ========================================================== 2. full disk

def _fill(path):
    """Write `path` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_full_maildir_defers_never_bounces_and_resumes(home, daemon_factory):
    n = 20
    home.setup(rcpthosts=("localhost",))
    alias = os.path.join(home.path, "alias")
    os.makedirs(alias)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", alias],
                   check=True, timeout=30)
    d = None
    try:
        alias_home(home)
        filler = os.path.join(alias, "filler")
        _fill(filler)
        d = daemon_factory(home)
        for i in range(n):
            send_one(d.port, "battery@example.com", ["full@localhost"], message("full", i))
        assert wait_until(lambda: deliveries(d, "deferral") >= n, 20), d.log()
        d.signal(signal.SIGALRM)  # and again, while still full
        assert wait_until(lambda: deliveries(d, "deferral") >= 2 * n, 20), d.log()
        time.sleep(0.3)
        deferrals = deliveries(d, "deferral")
        texts = set(re.findall(r"delivery \d+: deferral: (.*)", d.log()))
        assert deliveries(d, "failure") == 0 and "bounce msg" not in d.log()
        assert len(home.queued()) == n
        assert home.messages() == []
        assert os.listdir(os.path.join(alias, "Maildir", "tmp")) == []
        os.unlink(filler)
        d.signal(signal.SIGALRM)
        assert len(home.wait_messages(n, 20)) == n, d.log()
        assert wait_drained(home), d.log()
        counts = tagged(home, b"full")
        print("\n[full disk] %d sent and acknowledged, %d deferrals while full (%s), "
              "%d delivered after the space came back, failures %d"
              % (n, deferrals, " | ".join(sorted(texts)), len(counts), deliveries(d, "failure")))
        assert counts == {i: 1 for i in range(n)}
        assert deliveries(d, "failure") == 0
    finally:
        if d is not None:
            d.stop()
        subprocess.run(["umount", "-l", alias], timeout=30)


# ========================================================== 3. open relay

RELAY_INPUTS = [
    "user%other.example@localhost",
    "user%other.example@LOCALHOST",
    "user%other.example@mx.example.org",
    '"user%other.example"@localhost',
    "user%other.example%localhost@localhost",
    "other.example!user@localhost",
    "other.example!user%localhost@localhost",
    "@localhost:user@other.example",
    "@localhost,@mx.example.org:user@other.example",
    "@other.example:user@localhost",
    '"user@other.example"@localhost',
    "user\\@other.example@localhost",
    "user@other.example@localhost",
    "user@other.example.",
    "user@localhost.",
    "user@other.example%localhost",
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@[IPv6:::ffff:192.0.2.1]",
    "user@OTHER.example",
    "user@LOCALHOST",
    "user@MX.Example.ORG",
    "user@xn--exmple-cua.com",
    "user@ex\u00e4mple.com",
    "us\u00e9r@localhost",
    "user@localhost@other.example",
]


def relay_run(home, daemon_factory, scripted_smtp, percenthack):
    far = scripted_smtp()
    files = dict(smtproutes=":[127.0.0.1]:%d\n" % far.port, timeoutconnect="5\n")
    if percenthack:
        files["percenthack"] = "localhost\nmx.example.org\n"
    home.setup(rcpthosts=("mx.example.org", "localhost"), **files)
    alias_home(home)
    d = daemon_factory(home)
    outcome = {}
    for i, rcpt in enumerate(RELAY_INPUTS):
        with Raw(d.port) as c:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO relay.tester")[0] == 250
            assert c.cmd("MAIL FROM:<>")[0] == 250
            code, lines = c.cmd("RCPT TO:<%s>" % rcpt)
            if code == 250:
                assert c.cmd("DATA")[0] == 354
                c.send(b"Subject: relay %d\r\nMessage-ID: <relay-%d@battery.test>\r\n\r\n"
                       b"x\r\n.\r\n" % (i, i))
                assert c.reply()[0] == 250
            outcome[rcpt] = code
            c.cmd("QUIT")
    assert wait_drained(home, 20), d.log()
    time.sleep(0.5)
    delivered = tagged(home, b"relay")
    dt = {}
    for m in home.messages():
        mo = re.search(rb"\nMessage-ID: <relay-(\d+)@", m)
        if mo:
            dt[int(mo.group(1))] = m.split(b"\n")[1].decode("utf-8", "replace")
    remote = re.findall(r"starting delivery \d+: msg \S+ to remote (.*)", d.log())
    print("\n[relay, percenthack %s] %d inputs; catch-all peer: %d connections, %d DATA"
          % ("on" if percenthack else "off", len(RELAY_INPUTS), far.connections,
             len(far.attempts)))
    for i, rcpt in enumerate(RELAY_INPUTS):
        if outcome[rcpt] != 250:
            what = "%d at RCPT" % outcome[rcpt]
        elif i in delivered:
            what = "accepted, delivered locally (%s)" % dt.get(i)
        else:
            what = "accepted, NOT delivered locally"
        print("  %-48r %s" % (rcpt, what))
    if remote:
        print("  remote deliveries attempted: %s" % remote)
    return outcome, delivered, remote, far


@pytest.mark.parametrize("percenthack", [False, True],
                         ids=["percenthack-off", "percenthack-on"])
def test_open_relay_battery(home, daemon_factory, scripted_smtp, percenthack):
    outcome, delivered, remote, far = relay_run(home, daemon_factory, scripted_smtp,
                                                percenthack)
    for i, rcpt in enumerate(RELAY_INPUTS):
        assert outcome[rcpt] in (250, 553, 555), (rcpt, outcome[rcpt])
        if outcome[rcpt] == 250:
            assert delivered.get(i) == 1, "%r accepted but not delivered locally" % rcpt
    # the classic tricks that name only an outside domain are refused
    for rcpt in ("@localhost:user@other.example", "user@other.example.",
                 "user@[192.0.2.1]", "user@[IPv6:2001:db8::1]", "user@OTHER.example",
                 "user@xn--exmple-cua.com", "user@ex\u00e4mple.com"):
        assert outcome[rcpt] in (553, 555), rcpt
    assert remote == [], "remote deliveries attempted: %s" % remote
    assert far.connections == 0 and far.attempts == []


# ========================================================== 4. SMTP protocol abuse

@pytest.fixture(scope="module")
def servercert_pem():
    import trustme

    ca = trustme.CA()
    return ca.issue_cert("mx.example.org").private_key_and_cert_chain_pem.bytes()


def abuse_daemon(home, daemon_factory, pem, **files):
    files.setdefault("timeoutsmtpd", "2\n")
    home.setup(rcpthosts=("mx.example.org", "localhost"), **files)
    path = os.path.join(home.control, "servercert.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    alias_home(home)
    return daemon_factory(home)


def test_abuse_bare_lf_cr_and_nul(home, daemon_factory, servercert_pem):
    d = abuse_daemon(home, daemon_factory, servercert_pem)
    tried = []

    def expect(c, line, codes, raw=False):
        tried.append(line)
        if raw:
            c.send(line)
            code, lines = c.reply()
        else:
            code, lines = c.cmd(line)
        assert code in codes, (line, lines)
        return code

    with Raw(d.port) as c:
        assert c.reply()[0] == 220
        expect(c, b"HELO bare.lf\n", (250,), raw=True)          # qmail takes bare LF here
        expect(c, b"NOOP\rRSET\r\n", (500,), raw=True)           # one reply, not two
        expect(c, b"NOOP", (250,))                               # ... as the next one shows
        expect(c, b"HELO a\0b", (250,))
        expect(c, b"MAIL FROM:<a\0b@example.com>", (555,))
        expect(c, b"MAIL FROM:<a\rb@example.com>", (555,))
        expect(c, b"MAIL FROM:<ok@example.com>\n", (250,), raw=True)
        expect(c, b"RCPT TO:<x\0y@localhost>", (555,))
        expect(c, b"RCPT TO:<x\ry@localhost>", (555,))
        expect(c, b"RCPT TO:<nul\x7f@localhost>", (555,))
        expect(c, b"RCPT TO:<nul@localhost>", (250,))
        expect(c, b"DATA", (354,))
        c.send(b"Subject: nul and cr\r\nMessage-ID: <nul-1@battery.test>\r\n\r\n"
               b"bare\rCR and \0NUL\r\n.\r\n")
        assert c.reply()[0] == 250
        # a bare LF in DATA: 451 and the connection is closed
        expect(c, b"MAIL FROM:<ok@example.com>", (250,))
        expect(c, b"RCPT TO:<lf@localhost>", (250,))
        expect(c, b"DATA", (354,))
        c.send(b"Subject: bare lf\r\n\r\nbare\nLF\r\n.\r\n")
        code, lines = c.reply()
        assert code == 451 and b"smtplf" in lines[0], lines
        assert c.at_eof()
    with Raw(d.port) as c:  # a bare CR before the dot is data, not an end
        assert c.reply()[0] == 220
        c.send(b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<cr@localhost>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(b"Subject: cr dot\r\nMessage-ID: <cr-1@battery.test>\r\n\r\nx\r.\r\ny\r\n.\r\n")
        assert c.reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
    msgs = home.wait_messages(2)
    assert len(msgs) == 2, d.log()
    by_id = {re.search(rb"Message-ID: <(\S+)@", m).group(1): m for m in msgs}
    assert by_id[b"nul-1"].endswith(b"\n\nbare\rCR and \0NUL\n")
    assert by_id[b"cr-1"].endswith(b"\n\nx\r.\ny\n")
    assert "Traceback" not in d.log() and "internal error" not in d.log()
    print("\n[abuse/bare] %d command lines with bare LF/CR/NUL tried; 2 messages delivered"
          % len(tried))


def test_abuse_long_lines(home, daemon_factory, servercert_pem):
    d = abuse_daemon(home, daemon_factory, servercert_pem)
    long_data = b"y" * 5000
    with Raw(d.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO long")[0] == 250
        for size in (999, 1000, 5000, 1 << 20):
            code, lines = c.cmd(b"NOOP " + b"x" * size)
            assert code == 500 and b"line too long" in lines[0], (size, lines)
            assert c.cmd("NOOP")[0] == 250
        assert c.cmd(b"NOOP " + b"x" * 993)[0] == 250  # 1000 octets with CRLF: fine
        assert c.cmd(b"MAIL FROM:<" + b"a" * 950 + b"@example.com>")[0] == 555
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<long@localhost>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: long line\r\n\r\n" + long_data + b"\r\n.\r\n")
        assert c.reply()[0] == 250
    msgs = home.wait_messages(1)
    assert len(msgs) == 1 and msgs[0].endswith(b"\n\n" + long_data + b"\n")
    print("\n[abuse/long] command lines of 1001, 1002, 5002 and 1 MiB + 2 octets refused "
          "with 500 and the session went on; a 5000-octet data line delivered intact")


def test_abuse_ten_thousand_rcpt(home, daemon_factory, servercert_pem):
    d = abuse_daemon(home, daemon_factory, servercert_pem)
    n = 10000
    with Raw(d.port, timeout=30) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO many")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        batch = b"".join(b"RCPT TO:<r%d@localhost>\r\n" % i for i in range(n))
        t0 = time.time()
        sender = threading.Thread(target=c.send, args=(batch,), daemon=True)
        sender.start()
        codes = collections.Counter()
        texts = set()
        for _ in range(n):
            code, lines = c.reply()
            codes[code] += 1
            if code != 250:
                texts.add(lines[0])
        sender.join(30)
        elapsed = time.time() - t0
        assert codes == {250: 1000, 452: n - 1000}, codes
        assert texts == {b"452 4.5.3 too many recipients (#4.5.3)"}
        assert c.cmd("NOOP")[0] == 250   # the session survives
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<after@localhost>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: after 10000\r\n\r\nx\r\n.\r\n")
        assert c.reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
    assert len(home.wait_messages(1)) == 1
    print("\n[abuse/rcpt] %d pipelined RCPT in %.2f s: %s; the session went on"
          % (n, elapsed, dict(codes)))


def test_abuse_pipelined_garbage_and_out_of_order(home, daemon_factory, servercert_pem):
    d = abuse_daemon(home, daemon_factory, servercert_pem)
    rng = random.Random(8)
    garbage = [bytes(rng.choice([b for b in range(256) if b not in (10, 13)])
                     for _ in range(rng.randrange(1, 200))) for _ in range(10)]
    with Raw(d.port) as c:
        assert c.reply()[0] == 220
        # before HELO: out of order, and verbs that are not SMTP
        assert c.cmd("RCPT TO:<x@localhost>")[0] == 503
        assert c.cmd("DATA")[0] == 503
        assert c.cmd("STARTTLS now")[0] == 501
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250  # qmail needs no HELO
        assert c.cmd("DATA")[0] == 503                       # no RCPT yet
        c.send(b"EHLO g\r\n" + b"".join(g + b"\r\n" for g in garbage) + b"NOOP\r\n")
        assert c.reply()[0] == 250
        codes = [c.reply()[0] for _ in garbage]
        assert all(code in (500, 501, 502, 503, 555) for code in codes), codes
        assert c.reply()[0] == 250
        # keep going until the error limit closes the session
        c.send(b"".join(b"BOGUS%d\r\n" % i for i in range(30)))
        last = None
        while True:
            try:
                code, lines = c.reply()
            except EOFError:
                break
            last = code
        assert last == 421
    with Raw(d.port) as c:
        assert c.reply()[0] == 220
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.reply()[0] == 500
        assert c.at_eof()
    with Raw(d.port) as c:  # still serving
        assert c.reply()[0] == 220
        assert c.cmd("NOOP")[0] == 250
    assert "Traceback" not in d.log() and "internal error" not in d.log()
    print("\n[abuse/garbage] %d garbage lines pipelined, replies %s; 30 more: 421 and closed"
          % (len(garbage), codes))


def test_abuse_malformed_auth_and_starttls_twice(home, daemon_factory, servercert_pem):
    d = abuse_daemon(home, daemon_factory, servercert_pem)
    b64 = lambda s: base64.b64encode(s).decode()  # noqa: E731
    cases = [
        (["AUTH PLAIN !!!!"], 501),
        (["AUTH PLAIN", "%%%%"], 501),
        (["AUTH PLAIN", "===="], 501),
        (["AUTH PLAIN " + b64(b"no-nul-bytes")], 501),
        (["AUTH PLAIN " + b64(b"\0only-user")], 501),
        (["AUTH LOGIN", "@@@"], 501),
        (["AUTH LOGIN " + b64(b"joe"), "not base64!"], 501),
        (["AUTH CRAM-MD5", "!!"], 501),
        (["AUTH CRAM-MD5", b64(b"nospace")], 501),
        (["AUTH PLAIN", "*"], 501),
        (["AUTH XYZZY"], 504),
    ]
    seen = []
    with Raw(d.port) as c:
        assert c.reply()[0] == 220
        code, lines = c.cmd("EHLO auth")
        assert any(l.startswith(b"250-AUTH") or l.startswith(b"250 AUTH") for l in lines), lines
        for steps, want in cases:
            for step in steps[:-1]:
                code, lines = c.cmd(step)
                assert code == 334, (steps, lines)
            code, lines = c.cmd(steps[-1])
            seen.append(code)
            assert code == want, (steps, lines)
            assert c.cmd("NOOP")[0] == 250
        # an AUTH response longer than 12288 octets ends the session
        assert c.cmd("AUTH PLAIN")[0] == 334
        c.send(b"A" * 20000 + b"\r\n")
        assert c.at_eof()
    with Raw(d.port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO tls")[0] == 250
        c.starttls()
        assert c.cmd("EHLO tls2")[0] == 250
        assert c.cmd("STARTTLS")[0] == 502
        assert c.cmd("STARTTLS")[0] == 502
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    assert "Traceback" not in d.log() and "internal error" not in d.log()
    print("\n[abuse/auth] %d malformed AUTH exchanges: %s; STARTTLS twice: 502, session on"
          % (len(cases), seen))


def _trickle(port, data: bytes, before=(), interval=1.0, limit=10.0):
    """Send `before` lines, then `data` one byte every `interval` s; return
    (seconds from the first trickled byte to the server's reply or EOF,
    the reply line, bytes sent)."""
    with Raw(port) as c:
        assert c.reply()[0] == 220
        for line in before:
            code, lines = c.cmd(line)
            assert code in (250, 354), (line, lines)
        t0 = time.time()
        sent = 0
        c.sock.settimeout(interval)
        while time.time() - t0 < limit:
            if sent < len(data):
                try:
                    c.send(data[sent:sent + 1])
                    sent += 1
                except OSError:
                    return time.time() - t0, b"(reset)", sent
            try:
                got = c.sock.recv(4096)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return time.time() - t0, b"(reset)", sent
            return time.time() - t0, got.strip(), sent
        return None, b"", sent


def test_abuse_one_byte_per_second_client_is_timed_out(home, daemon_factory, servercert_pem):
    """timeoutsmtpd=2 bounds each command line and each piece of DATA, not
    each recv(): a client trickling one byte a second is ended with 451."""
    d = abuse_daemon(home, daemon_factory, servercert_pem)
    results = {}
    results["command"] = _trickle(d.port, b"NOOP trickle trickle\r\n")
    results["data"] = _trickle(d.port, b"Subject: slow\r\n\r\nslow body\r\n.\r\n",
                               before=["HELO slow", "MAIL FROM:<a@example.com>",
                                       "RCPT TO:<slow@localhost>", "DATA"])
    results["silent"] = _trickle(d.port, b"", limit=6)
    for what, (elapsed, got, sent) in results.items():
        print("\n[abuse/slow] %s: %s after %s s and %d bytes sent"
              % (what, got, None if elapsed is None else round(elapsed, 1), sent))
    for what, (elapsed, got, sent) in results.items():
        assert elapsed is not None and elapsed < 5, (what, elapsed, got)
        assert got.startswith(b"451") and b"timeout" in got, (what, got)
    time.sleep(0.5)
    assert home.queued() == []


def test_abuse_500_idle_connections(home, daemon_factory, servercert_pem):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 and (hard == resource.RLIM_INFINITY or hard >= 2048):
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    # the daemon gets the common default soft limit of 1024 descriptors
    # (children inherit it); this process needs 500 sockets and more
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))
    try:
        d = abuse_daemon(home, daemon_factory, servercert_pem, timeoutsmtpd="60\n",
                         concurrencyincoming="200\n", concurrencyperip="1000\n")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with open("/proc/%d/limits" % d.proc.pid) as f:
        fd_limit = [l for l in f.read().splitlines() if l.startswith("Max open files")][0]
    held, codes, clients = [], collections.Counter(), []
    t0 = time.time()
    try:
        for i in range(500):
            c = Raw(d.port, timeout=10)
            clients.append(c)
            code, _ = c.reply()
            codes[code] += 1
            if code == 220:
                held.append(c)
            else:
                assert c.at_eof(5)
                c.close()
        opened = time.time() - t0
        daemon_fds = len(os.listdir("/proc/%d/fd" % d.proc.pid))
        assert d.proc.poll() is None
        # a new client while 200 are held: an answer (421) within 1 s
        t1 = time.time()
        with Raw(d.port, timeout=5) as c:
            code, lines = c.reply()
        busy_wait = time.time() - t1
        assert code == 421 and busy_wait < 1.0, (code, busy_wait)
        # the held sessions are alive
        for c in held[:5] + held[-5:]:
            assert c.cmd("NOOP")[0] == 250
        # free ten: a new client gets its greeting within 1 s and can send
        for c in held[:10]:
            c.cmd("QUIT")
            c.close()
        del held[:10]
        time.sleep(0.2)
        t2 = time.time()
        with Raw(d.port, timeout=5) as c:
            code, _ = c.reply()
            greet_wait = time.time() - t2
            assert code == 220 and greet_wait < 1.0, (code, greet_wait)
            assert c.cmd("HELO new")[0] == 250
            assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<new@localhost>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: while 190 held\r\n\r\nx\r\n.\r\n")
            assert c.reply()[0] == 250
        assert len(home.wait_messages(1)) == 1
    finally:
        for c in clients:
            c.close()
    print("\n[abuse/conns] 500 connections opened in %.2f s: %s; held %d; daemon fds %d "
          "(%s); new client while full: 421 in %.3f s; after freeing 10: 220 in %.3f s"
          % (opened, dict(codes), 200, daemon_fds, " ".join(fd_limit.split()), busy_wait,
             greet_wait))
    assert codes == {220: 200, 421: 300}
    assert "Traceback" not in d.log()


# ========================================================== 6. hostile local data


@pytest.mark.parametrize("linked", ["new", "tmp"])
def test_symlinked_maildir_subdirectory_defers_nothing_written_outside(home, daemon_factory,
                                                                        linked):
    from eqmail.delivery.local import maildirmake

    home.setup()
    alias_home(home)
    base = os.path.join(home.path, "homes")
    joe = os.path.join(base, "joe")
    os.makedirs(joe)
    os.chmod(base, 0o755)
    os.chmod(joe, 0o755)
    maildirmake(os.path.join(joe, "Maildir"))
    outside = os.path.join(home.path, "outside")
    os.makedirs(outside)
    os.chmod(outside, 0o755)
    sub = os.path.join(joe, "Maildir", linked)
    os.rmdir(sub)
    os.symlink(outside, sub)
    with open(os.path.join(joe, ".qmail"), "w") as f:
        f.write("./Maildir/\n")
    os.makedirs(os.path.join(home.path, "users"), exist_ok=True)
    with open(os.path.join(home.path, "users", "assign"), "w") as f:
        f.write("=joe:joe:%d:%d:%s:::\n.\n" % (home.uid, home.gid, joe))
    d = daemon_factory(home)
    send_one(d.port, "s@example.com", ["joe@localhost"], message("symlink", 1))
    assert wait_until(lambda: deliveries(d, "deferral") + deliveries(d, "success")
                      + deliveries(d, "failure") >= 1, 15), d.log()
    time.sleep(0.3)
    texts = re.findall(r"delivery \d+: (\w+): (.*)", d.log())
    print("\n[hostile/symlink] Maildir/%s -> %s: %s; files outside: %s"
          % (linked, outside, texts, os.listdir(outside)))
    assert os.listdir(outside) == []
    assert [k for k, _ in texts] == ["deferral"]
    assert len(home.queued()) == 1


def _other_user():
    pw = ensure_user("eqmailsender")
    return pw.pw_uid, pw.pw_gid, pw.pw_name


def _sendmail_as_other(home, args, stdin=b"Subject: inj\n\nbody\n"):
    uid, gid, name = _other_user()
    kw = dict(user=uid, group=gid, extra_groups=[]) if ROOT else {}
    return subprocess.run([PY, "-m", "eqmail", "sendmail", "--home", home.path] + args,
                          input=stdin, capture_output=True, timeout=30, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "USER": name, "LOGNAME": name}, **kw)


def test_sendmail_crlf_injection_refused(home, daemon_factory):
    home.setup(rcpthosts=("localhost",))
    alias_home(home)
    daemon_factory(home)  # the pickup socket for the other user
    attempts = {
        "-F LF Bcc": ["-F", "x\nBcc: victim@localhost", "joe@localhost"],
        "-F CRLF Bcc": ["-F", "x\r\nBcc: victim@localhost", "joe@localhost"],
        "-F CR": ["-F", "x\rTo: victim@localhost", "joe@localhost"],
        "-f LF": ["-f", "a@example.com\nBcc: victim@localhost", "joe@localhost"],
        "rcpt CRLF": ["joe@localhost\r\nvictim@localhost"],
        "rcpt LF header": ["joe@localhost\nBcc: victim@localhost"],
        "rcpt control char": ["joe@localhost\x01victim@localhost"],
        "-t header with -F": ["-t", "-F", "y\nCc: victim@localhost"],
    }
    codes = {}
    for what, args in attempts.items():
        stdin = b"To: joe@localhost\nSubject: inj\n\nbody\n" if "-t" in args else None
        out = _sendmail_as_other(home, args, **({"stdin": stdin} if stdin else {}))
        codes[what] = out.returncode
    # a clean one goes through (the refusals are not a broken setup)
    ok = _sendmail_as_other(home, ["-F", "Plain Name", "joe@localhost"],
                            b"Subject: clean\nMessage-ID: <clean-1@battery.test>\n\nok\n")
    home.wait_messages(1)
    time.sleep(1.0)
    msgs = home.messages()
    print("\n[hostile/sendmail] exit codes %s; clean injection %d; delivered %d"
          % (codes, ok.returncode, len(msgs)))
    assert ok.returncode == 0, ok
    assert codes == {k: 100 for k in attempts}
    assert len(msgs) == 1 and b"<clean-1@battery.test>" in msgs[0]
    assert b"victim" not in msgs[0]
    assert wait_drained(home)


# ========================================================== 7. recovery and qread

def _dead_pid():
    pid = 4000000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def _qread(home):
    kw = dict(user=home.uid, group=home.gid, extra_groups=[]) if ROOT else {}
    out = subprocess.run([PY, "-m", "eqmail", "qread", "--home", home.path],
                         capture_output=True, timeout=30, cwd="/",
                         env={"PATH": "/usr/bin:/bin"}, **kw)
    assert out.returncode == 0, out
    return out.stdout.decode()


def _to_version_1(q, home):
    """Rewrite every queue file under `q` the way eqmail 0.1 stored it:
    the data in mess/ID, the envelope (V1, progress kept) in envelope/ID."""
    from eqmail.queue.store import Store, encode_envelope, open_message

    store = Store(q)
    for name in home.queued():
        item = store.load(name)
        with open_message(store.message_path(name)) as f:
            data = f.read()
        env, offsets = encode_envelope(item.birth, item.uid, item.pid, item.sender,
                                       item.recipients, version=b"V1")
        env = bytearray(env)
        for off, done in zip(offsets, item.done):
            if done:
                env[off:off + 1] = b"D"
        for path, content in ((os.path.join(q, "mess", name), data),
                              (os.path.join(q, "envelope", name), bytes(env))):
            with open(path, "wb") as f:
                f.write(content)
            if ROOT:
                os.chown(path, home.uid, home.gid)


def test_recovery_cleans_partial_files_and_qread_lists_the_envelopes(home, daemon_factory):
    """A queue written by the previous release (version 1: data in mess/,
    a hand-written envelope in envelope/ with a record type no release
    knows, which readers must skip) is converted at start, and crash
    leftovers of both versions are removed, while eqmaild was stopped."""
    from eqmail.queue.store import Store

    closed = free_port()
    home.setup(rcpthosts=("localhost", "mx.example.org"), concurrencylocal="0\n",
               smtproutes=":[127.0.0.1]:%d\n" % closed, timeoutconnect="2\n")
    alias_home(home)
    d = daemon_factory(home)
    send_one(d.port, "one@example.com", ["a@localhost", "b@mx.example.org"], message("q", 1))
    send_one(d.port, "", ["c@localhost"], message("q", 2))
    assert wait_until(lambda: len(home.queued()) == 2)
    assert d.stop() == 0
    q = os.path.join(home.path, "queue")
    dead = _dead_pid()
    now = int(time.time())
    os.mkdir(os.path.join(q, "envelope"), 0o700)
    if ROOT:
        os.chown(os.path.join(q, "envelope"), home.uid, home.gid)
    _to_version_1(q, home)  # the two messages queued above, as 0.1 wrote them
    # an "earlier release" message: written by hand, with an unknown record X
    old_id = "%d.%d.77" % (now - 3600, dead)
    with open(os.path.join(q, "mess", old_id), "wb") as f:
        f.write(b"Received: (from an earlier release)\nSubject: old\n"
                b"Message-ID: <q-3@battery.test>\n\nold queue\n")
    with open(os.path.join(q, "envelope", old_id), "wb") as f:
        f.write(b"V1\0B%d\0u0\0p%d\0Xsome future field\0Fold@example.com\0"
                b"Dgone@localhost\0Told@localhost\0Tfar@remote.test\0" % (now - 3600, dead))
    # crash leftovers: version 1 data without an envelope (partial, or a
    # finished message), a message being written, failures of a message
    # that finished
    v1_junk = {os.path.join(q, "mess", "%d.%d.1" % (now, dead)): b"Received: partial\n",
               os.path.join(q, "mess", "%d.%d.2" % (now, dead)): b"Received: complete\n\nx\n"}
    junk = {os.path.join(q, "tmp", "%d.%d.2" % (now, dead)): b"Received: x\n",
            os.path.join(q, "bounce", "%d.%d.3" % (now, dead)): b'{"recipient": "x"}\n'}
    for path, data in list(v1_junk.items()) + list(junk.items()):
        with open(path, "wb") as f:
            f.write(data)
    d.start()
    assert wait_log(d, "queue upgrade: 3 messages converted to version 2"), d.log()
    assert wait_log(d, "queue recovery removed %d partial files" % len(junk)), d.log()
    for path in list(v1_junk) + list(junk):
        assert not os.path.exists(path), path
    assert not os.path.exists(os.path.join(q, "envelope"))
    store = Store(q)
    envelopes = {name: store.load(name) for name in home.queued()}
    assert len(envelopes) == 3 and old_id in envelopes
    text = _qread(home)
    listed = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT  #(\S+)  (\d+)  <([^>]*)> ", line)
        if m:
            current = m.group(1)
            listed[current] = (m.group(3), [])
            continue
        m = re.match(r"(  done)?\t(local|remote)\t<(.*)>$", line)
        assert m and current, line
        listed[current][1].append((m.group(3), bool(m.group(1)), m.group(2)))
    expect = {i: (e.sender, [(r, dn) for r, dn in zip(e.recipients, e.done)])
              for i, e in envelopes.items()}
    got = {i: (s, [(r, dn) for r, dn, _ in rs]) for i, (s, rs) in listed.items()}
    print("\n[recovery] %d partial files removed at start; qread lists %d messages, "
          "%d recipients; the envelopes hold %d and %d"
          % (len(junk), len(listed), sum(len(r) for _, r in listed.values()),
             len(envelopes), sum(len(e.recipients) for e in envelopes.values())))
    assert got == expect
    channels = {r: ch for _, rs in listed.values() for r, _, ch in rs}
    assert channels == {"a@localhost": "local", "b@mx.example.org": "local",
                        "c@localhost": "local", "gone@localhost": "local",
                        "old@localhost": "local", "far@remote.test": "remote"}
    # the old message is delivered by this release; the done recipient is not
    home.write("concurrencylocal", "10\n")
    d.signal(signal.SIGHUP)
    assert wait_until(lambda: len(tagged(home, b"q")) == 3, 15), d.log()
    counts = tagged(home, b"q")
    assert counts == {1: 2, 2: 1, 3: 1}
    assert b"Delivered-To: old@localhost" in [m for m in home.messages()
                                              if b"<q-3@" in m][0]
    # only the remote recipient of the old message stays (its relay is closed)
    assert wait_until(lambda: home.queued() == [old_id], 15), (home.queued(), d.log())
    text = _qread(home)
    assert "  done\tlocal\t<old@localhost>" in text and "\tremote\t<far@remote.test>" in text
