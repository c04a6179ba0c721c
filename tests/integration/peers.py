"""Far ends for the remote-delivery tests, all on loopback.

- `TestCA`: a trustme certificate authority shared by every TLS peer.
- `DNSServer`: Debian's unbound as an authoritative-only server for ``test.``
  on 127.0.0.153:53 (root only: port 53, and resolv.conf cannot name a port).
  The daemon finds it through ``EQMAIL_RESOLV_CONF=<dns.resolv_conf>``.
- `PostfixPeer`: a real Postfix 3.7 instance of its own (own config, queue and
  data directories under /tmp; /etc/postfix is not touched) on
  127.0.0.25:25 only, final destination for ``far.test``, Maildir delivery to
  the local user ``farmail``, STARTTLS offered, no relaying (root only).
- `ScriptedSMTP`: an aiosmtpd server in a thread of the test process whose
  replies each test scripts (greeting, per-recipient RCPT, DATA sequence,
  STARTTLS, AUTH, implicit TLS); it records what it received.

Everything is started on demand, bounded in time and stopped by PID.
The pytest fixtures are in tests/integration/conftest.py.
"""
from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

ROOT = os.geteuid() == 0

UNBOUND = "/usr/sbin/unbound"
POSTFIX = "/usr/sbin/postfix"


def _mkdtemp(prefix: str) -> str:
    """A fresh directory under /tmp that other users (the daemon's user,
    postfix) may enter."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    return path


def _write(path: str, data, mode: int = 0o644) -> str:
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _kill_pid(pid: int, timeout: float = 5.0) -> None:
    """TERM then KILL one process by PID (not a child of ours)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _stop_child(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- TLS


class TestCA:
    """A trustme CA.  `ca_file` (the CA certificate, PEM) is world-readable,
    for the daemon's user; `issue(names)` gives (cert chain file, key file)."""

    __test__ = False  # not a pytest test class

    def __init__(self):
        import trustme
        self.ca = trustme.CA(organization_name="eqmail tests")
        self.dir = _mkdtemp("eqmail-ca-")
        self.ca_file = _write(os.path.join(self.dir, "ca.pem"), self.ca.cert_pem.bytes())
        self._n = 0

    def leaf(self, names: Sequence[str], expired: bool = False):
        if expired:  # valid for a day, a week ago
            import datetime
            past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=7)
            return self.ca.issue_cert(*names, not_before=past,
                                      not_after=past + datetime.timedelta(days=1))
        return self.ca.issue_cert(*names)

    def issue(self, names: Sequence[str], directory: Optional[str] = None,
              key_mode: int = 0o644) -> Tuple[str, str]:
        """Write a certificate for `names` (DNS names or IP addresses) and its
        key as PEM files; returns (cert_file, key_file).  The cert file holds
        the leaf then the CA."""
        cert = self.leaf(names)
        self._n += 1
        d = directory or self.dir
        cert_file = os.path.join(d, "cert%d.pem" % self._n)
        key_file = os.path.join(d, "key%d.pem" % self._n)
        _write(cert_file, b"".join(b.bytes() for b in cert.cert_chain_pems))
        _write(key_file, cert.private_key_pem.bytes(), key_mode)
        return cert_file, key_file

    def server_context(self, names: Sequence[str], expired: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.leaf(names, expired).configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Verifies against this CA only, with host name checks."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- DNS

_TXT_STRING = re.compile(rb'"((?:[^"\\]|\\.)*)"|(\S+)', re.S)


def _unescape(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x5C and i + 1 < len(raw):  # backslash
            if raw[i + 1:i + 4].isdigit() and len(raw[i + 1:i + 4]) == 3:
                out.append(int(raw[i + 1:i + 4]))
                i += 4
                continue
            out.append(raw[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


def _escape(data: bytes) -> str:
    out = []
    for b in data:
        if b in (0x22, 0x5C):
            out.append("\\" + chr(b))
        elif b == 0x27 or b < 0x20 or b > 0x7E:  # ' would end unbound's quoting
            out.append("\\%03d" % b)
        else:
            out.append(chr(b))
    return '"' + "".join(out) + '"'


def _split_txt(rdata: str) -> str:
    """TXT/SPF rdata with every character-string cut to at most 255 bytes."""
    parts = []
    for quoted, bare in _TXT_STRING.findall(rdata.encode("utf-8")):
        data = _unescape(quoted if quoted or not bare else bare)
        if not data:
            parts.append('""')
        for i in range(0, len(data), 255):
            parts.append(_escape(data[i:i + 255]))
    return " ".join(parts)


_TYPES_AT = re.compile(r"^(\S+)((?:\s+(?:\d+|IN|CH|HS))*)\s+(TXT|SPF)\s+(.*)$", re.I | re.S)


def unbound_local_data(record: str) -> str:
    """One zone-file line as an unbound local-data line (long TXT split)."""
    record = record.strip()
    m = _TYPES_AT.match(record)
    if m:
        record = "%s%s %s %s" % (m.group(1), m.group(2), m.group(3).upper(),
                                 _split_txt(m.group(4)))
    if "'" in record:
        raise ValueError("a single quote in a DNS record: %r" % record)
    return "local-data: '%s'" % record


class DNSServer:
    """unbound, authoritative-only, for the zones `zones` (local-zone static:
    names not in `records` give NXDOMAIN) from `records`, zone-file lines
    such as ``"far.test. 300 IN MX 10 mx1.far.test."``.  Queries outside
    the zones get `outside` (an unbound local-zone type for ".": "refuse" by
    default, so that nothing waits for the root servers; "static" answers
    NXDOMAIN instead).  PTR records for 127.x.x.x work too.

    `resolv_conf` is a world-readable file ``nameserver 127.0.0.153``:
    give it to the daemon as EQMAIL_RESOLV_CONF."""

    ADDRESS = "127.0.0.153"

    def __init__(self, records: Sequence[str] = (), zones: Sequence[str] = ("test.",),
                 address: str = ADDRESS, port: int = 53, outside: str = "refuse",
                 start: bool = True):
        self.records = list(records)
        self.zones = list(zones)
        self.address = address
        self.port = port
        self.outside = outside
        self.dir = _mkdtemp("eqmail-dns-")
        self.conf = os.path.join(self.dir, "unbound.conf")
        self.logfile = os.path.join(self.dir, "unbound.log")
        self.resolv_conf = _write(os.path.join(self.dir, "resolv.conf"),
                                  "nameserver %s\n" % address)
        self.proc: Optional[subprocess.Popen] = None
        if start:
            self.start()

    def config(self) -> str:
        lines = [
            "server:",
            "  interface: %s" % self.address,
            "  port: %d" % self.port,
            "  do-daemonize: no",
            '  chroot: ""',
            '  username: ""',
            '  directory: "%s"' % self.dir,
            '  pidfile: ""',
            "  use-syslog: no",
            '  logfile: ""',
            "  verbosity: 1",
            "  log-queries: yes",
            "  num-threads: 1",
            "  do-ip6: no",
            "  do-tcp: yes",
            "  access-control: 127.0.0.0/8 allow",
            '  module-config: "iterator"',
            "  harden-glue: no",
            "  cache-max-ttl: 0",
            "  cache-max-negative-ttl: 0",
            "  prefetch: no",
            '  local-zone: "." %s' % self.outside,
        ]
        for zone in self.zones:
            lines.append('  local-zone: "%s" static' % zone)
        for rec in self.records:
            lines.append("  " + unbound_local_data(rec))
        lines += ["remote-control:", "  control-enable: no", ""]
        return "\n".join(lines)

    def start(self, timeout: float = 10.0) -> "DNSServer":
        if not ROOT and self.port < 1024:
            raise PermissionError("DNSServer on port %d needs root" % self.port)
        if not os.path.exists(UNBOUND):
            raise FileNotFoundError("%s is missing (apt-get install unbound)" % UNBOUND)
        _write(self.conf, self.config())
        check = subprocess.run(["unbound-checkconf", self.conf], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise ValueError("bad unbound configuration:\n%s%s\n%s"
                             % (check.stdout, check.stderr, self.config()))
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen([UNBOUND, "-d", "-c", self.conf], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.dir)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import dns.message
        import dns.query
        import dns.rcode
        deadline = time.time() + timeout
        q = dns.message.make_query(self.zones[0] if self.zones else ".", "SOA")
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("unbound exited with %s:\n%s"
                                   % (self.proc.returncode, self.log()))
            try:
                dns.query.udp(q, self.address, port=self.port, timeout=0.2)
                return
            except (OSError, dns.exception.Timeout):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("unbound did not answer within %s s:\n%s" % (timeout, self.log()))

    def resolver(self):
        """A dnspython resolver that asks this server only."""
        import dns.resolver
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [self.address]
        r.port = self.port
        r.timeout = r.lifetime = 3.0
        return r

    def log(self) -> str:
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            _stop_child(self.proc)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- Postfix


class PostfixPeer:
    """A Postfix instance of its own on `address`:25 (root only).

    Own config_directory, queue_directory and data_directory under a
    temporary directory (``postfix -c DIR``), so the system's /etc/postfix
    and its queue are left as they are.  mydestination = `domain`; the local
    user `user` (created with useradd when missing, home under /tmp) receives
    into ~/Maildir/; unknown local users are refused at RCPT (550 5.1.1);
    relaying is refused (454/554 5.7.1); STARTTLS is offered with a
    certificate of `ca` for mx1.far.test, far.test and the address.
    Postfix logs to `logfile` through postlogd (maillog_file)."""

    def __init__(self, ca: TestCA, address: str = "127.0.0.25", port: int = 25,
                 domain: str = "far.test", hostname: str = "mx1.far.test",
                 user: str = "farmail", extra_config: Optional[Dict[str, str]] = None):
        self.ca = ca
        self.address = address
        self.port = port
        self.domain = domain
        self.hostname = hostname
        self.user = user
        self.extra_config = dict(extra_config or {})
        self.dir = _mkdtemp("eqmail-postfix-")
        self.config_dir = os.path.join(self.dir, "etc")
        self.queue_dir = os.path.join(self.dir, "spool")
        self.data_dir = os.path.join(self.dir, "lib")
        self.logfile = os.path.join(self.dir, "postfix.log")
        self.home = os.path.join("/tmp", "eqmail-" + user)
        self.maildir = os.path.join(self.home, "Maildir")
        self.started = False

    # --- setup

    def _ensure_user(self):
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            subprocess.run(["useradd", "--home-dir", self.home, "--no-create-home",
                            "--shell", "/usr/sbin/nologin", self.user],
                           check=True, timeout=30)
            pw = pwd.getpwnam(self.user)
        self.home = pw.pw_dir
        self.maildir = os.path.join(self.home, "Maildir")
        os.makedirs(self.home, exist_ok=True)
        os.chown(self.home, pw.pw_uid, pw.pw_gid)
        os.chmod(self.home, 0o755)
        return pw

    def main_cf(self) -> Dict[str, str]:
        return {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "myhostname": self.hostname,
            "mydomain": self.domain,
            "myorigin": "$mydomain",
            "mydestination": self.domain,
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.254/32",
            "relay_domains": "",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "default_transport": "error:no remote delivery from the test peer",
            "relay_transport": "error:no remote delivery from the test peer",
            "alias_maps": "",
            "alias_database": "",
            "home_mailbox": "Maildir/",
            "mailbox_command": "",
            "biff": "no",
            "local_header_rewrite_clients": "",
            "smtpd_peername_lookup": "no",
            "smtpd_banner": "$myhostname ESMTP Postfix (eqmail test peer)",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": self.cert_file,
            "smtpd_tls_key_file": self.key_file,
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtp_tls_security_level": "none",
            "maillog_file": self.logfile,
            "maillog_file_prefixes": "/var, /dev/stdout, /tmp",
            "smtputf8_enable": "yes",
            "message_size_limit": "10240000",
            "delay_warning_time": "0",
            "queue_run_delay": "10s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "20s",
            **self.extra_config,
        }

    def master_cf(self) -> str:
        svc = [
            ("%s:%d" % (self.address, self.port), "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("local", "unix", "-", "n", "n", "-", "-", "local"),
            ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        return "".join(" ".join(s) + "\n" for s in svc)

    def _postfix(self, *args, timeout: float = 60.0, check: bool = True):
        env = dict(os.environ, MAIL_CONFIG=self.config_dir)
        res = subprocess.run([POSTFIX, "-c", self.config_dir] + list(args),
                             capture_output=True, text=True, timeout=timeout, env=env)
        if check and res.returncode != 0:
            raise RuntimeError("postfix %s failed (%s):\n%s%s\n%s"
                               % (" ".join(args), res.returncode, res.stdout,
                                  res.stderr, self.log()))
        return res

    def start(self, timeout: float = 30.0) -> "PostfixPeer":
        if not ROOT:
            raise PermissionError("PostfixPeer needs root")
        if not os.path.exists(POSTFIX):
            raise FileNotFoundError("%s is missing (apt-get install postfix)" % POSTFIX)
        self._ensure_user()
        pf = pwd.getpwnam("postfix")
        os.makedirs(self.config_dir, exist_ok=True)
        os.chmod(self.config_dir, 0o755)
        tls_dir = os.path.join(self.config_dir, "tls")
        os.makedirs(tls_dir, exist_ok=True)
        os.chmod(tls_dir, 0o755)
        self.cert_file, self.key_file = self.ca.issue(
            [self.hostname, self.domain, self.address], tls_dir, key_mode=0o640)
        os.chown(self.key_file, 0, pf.pw_gid)
        os.makedirs(self.data_dir, exist_ok=True)
        os.chown(self.data_dir, pf.pw_uid, pf.pw_gid)
        os.chmod(self.data_dir, 0o700)
        os.makedirs(self.queue_dir, exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        _write(os.path.join(self.config_dir, "main.cf"),
               "".join("%s = %s\n" % kv for kv in self.main_cf().items()))
        _write(os.path.join(self.config_dir, "master.cf"), self.master_cf())
        if self.port == 25 and not _can_bind(self.address, self.port):
            raise RuntimeError("%s:%d is in use (a system MTA on 0.0.0.0:25?)"
                               % (self.address, self.port))
        self._postfix("start")
        self.started = True
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with socket.create_connection((self.address, self.port), timeout=2) as s:
                    if s.makefile("rb").readline().startswith(b"220 "):
                        s.sendall(b"QUIT\r\n")
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("postfix did not greet on %s:%d within %s s:\n%s"
                           % (self.address, self.port, timeout, self.log()))

    def master_pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        try:
            self._postfix("stop", timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pass
        if pid:
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                _kill_pid(pid)
        self.started = False

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.maildir, ignore_errors=True)

    # --- results

    def message_files(self) -> List[str]:
        new = os.path.join(self.maildir, "new")
        if not os.path.isdir(new):
            return []
        paths = [os.path.join(new, n) for n in os.listdir(new)]
        return sorted(paths, key=lambda p: (os.stat(p).st_mtime, p))

    def messages(self) -> List[bytes]:
        """Bytes of each message in ~farmail/Maildir/new, oldest first."""
        out = []
        for p in self.message_files():
            with open(p, "rb") as f:
                out.append(f.read())
        return out

    def wait_messages(self, count: int = 1, timeout: float = 15.0) -> List[bytes]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            msgs = self.messages()
            if len(msgs) >= count:
                return msgs
            time.sleep(0.05)
        return self.messages()

    def clear(self) -> None:
        """Forget the delivered messages (between tests)."""
        for sub in ("new", "cur", "tmp"):
            d = os.path.join(self.maildir, sub)
            if os.path.isdir(d):
                for n in os.listdir(d):
                    try:
                        os.unlink(os.path.join(d, n))
                    except OSError:
                        pass

    def log(self, lines: int = 200) -> str:
        """The last `lines` lines of Postfix's log."""
        try:
            with open(self.logfile, "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])


def _can_bind(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def system_postfix_running() -> bool:
    """Whether the system's own Postfix (/etc/postfix) is running."""
    if not os.path.exists("/etc/postfix/main.cf") or not os.path.exists(POSTFIX):
        return False
    try:
        return subprocess.run([POSTFIX, "status"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------- scripted SMTP


@dataclass
class Attempt:
    """One DATA (or BDAT-less) transaction as the server saw it."""
    mail_from: str
    rcpt_tos: List[str]
    data: bytes
    reply: str
    tls: bool
    auth_user: Optional[str]
    helo: Optional[str]
    peer: Tuple


@dataclass
class SessionRecord:
    peer: Tuple
    helo: Optional[str] = None
    tls: bool = False
    auth_user: Optional[str] = None
    commands: List[str] = field(default_factory=list)


def _reply_from(script: Union[str, Sequence[str], None], index: int) -> Optional[str]:
    """A reply from a fixed string or a per-attempt sequence (the last one
    repeats)."""
    if script is None:
        return None
    if isinstance(script, str):
        return script
    if not script:
        return None
    return script[min(index, len(script) - 1)]


class _Handler:
    def __init__(self, owner: "ScriptedSMTP"):
        self.owner = owner

    def _session(self, server) -> SessionRecord:
        rec = getattr(server, "_eq_record", None)
        if rec is None:
            rec = SessionRecord(peer=server.session.peer)
            server._eq_record = rec
            with self.owner._lock:
                self.owner.sessions.append(rec)
        rec.tls = server.transport is not None and \
            server.transport.get_extra_info("ssl_object") is not None
        return rec

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        rec = self._session(server)
        rec.helo = hostname
        rec.commands.append("EHLO " + hostname)
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        rec = self._session(server)
        rec.helo = hostname
        rec.commands.append("HELO " + hostname)
        session.host_name = hostname
        return "250 {}".format(server.hostname)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        rec = self._session(server)
        rec.commands.append("MAIL FROM:<%s>%s" % (address, "".join(" " + o for o in mail_options)))
        o = self.owner
        with o._lock:
            n = o._mail_count
            o._mail_count += 1
        reply = _reply_from(o.mail_replies, n)
        if reply and not reply.startswith("2"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        rec = self._session(server)
        rec.commands.append("RCPT TO:<%s>" % address)
        o = self.owner
        key = address.lower()
        with o._lock:
            n = o._rcpt_counts.get(key, 0)
            o._rcpt_counts[key] = n + 1
        reply = _reply_from(o.rcpt_replies.get(key), n)
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        rec = self._session(server)
        rec.commands.append("DATA")
        o = self.owner
        with o._lock:
            n = o._data_count
            o._data_count += 1
        reply = _reply_from(o.data_replies, n) or "250 2.0.0 OK queued"
        data = envelope.original_content or b""
        att = Attempt(mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
                      data=data, reply=reply, tls=rec.tls, auth_user=rec.auth_user,
                      helo=rec.helo, peer=session.peer)
        with o._lock:
            o.attempts.append(att)
            if reply.startswith("2"):
                o.messages.append(att)
        return reply

    async def handle_RSET(self, server, session, envelope):
        self._session(server).commands.append("RSET")
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        self._session(server).commands.append("QUIT")
        return "221 Bye"

    def handle_STARTTLS(self, server, session, envelope):
        self._session(server).commands.append("STARTTLS")
        return True


def _make_smtp_class():
    from aiosmtpd.smtp import SMTP

    class ScriptedSMTPProtocol(SMTP):
        """aiosmtpd's SMTP with an optional scripted greeting: a non-2xx
        greeting is sent, then QUIT gets 221 and anything else 503 until
        the client leaves."""

        eq_greeting: Optional[str] = None
        eq_owner = None

        async def _handle_client(self):
            owner = self.eq_owner
            with owner._lock:
                owner.connections += 1
            greeting = self.eq_greeting
            if greeting is None or greeting.startswith("2"):
                if greeting is not None:
                    self.__ident__ = ""  # the 220 line is "220 hostname"
                    self.hostname = greeting[4:]
                return await super()._handle_client()
            await self.push(greeting)
            while self.transport is not None:
                try:
                    line = await asyncio.wait_for(self._reader.readuntil(), 30)
                except Exception:
                    break
                if line.strip().upper() == b"QUIT":
                    await self.push("221 Bye")
                    break
                await self.push("503 5.5.1 Bad sequence of commands")
            if self.transport is not None:
                self.transport.close()

    return ScriptedSMTPProtocol


class ScriptedSMTP:
    """An SMTP server in a thread of the test process.

    host, port: where to listen (port 25 on 127.0.0.26..29 as root; None or
        0: a free port; "::1" for IPv6).
    greeting: the whole greeting line, e.g. "421 4.3.2 busy" or
        "554 5.7.1 go away" (then QUIT gets 221, anything else 503);
        None: "220 <hostname> ...".
    rcpt_replies: {address: reply or [reply per attempt...]}, e.g.
        {"nobody@far.test": "550 5.1.1 no such user"}; addresses compared
        without case; others get 250.
    data_replies: replies to successive DATA transactions across sessions,
        e.g. ["451 4.3.0 try later", "250 2.0.0 ok"]; the last repeats.
    mail_replies: likewise for MAIL FROM (e.g. ["452 4.3.1 full", "250 ok"]).
    starttls: offer STARTTLS with a certificate of `ca` for `tls_names`.
    auth: (user, password): AUTH PLAIN and LOGIN offered after STARTTLS
        (or at once with implicit TLS) and required before MAIL;
        wrong credentials get 535 5.7.8.
    implicit_tls: TLS from the first byte (port 465 style).
    hostname: name in the greeting and EHLO reply.

    Records: `connections` (count, including refused greetings), `sessions` (SessionRecord per connection that said something),
    `attempts` (every DATA with its reply), `messages` (the accepted ones):
    mail_from, rcpt_tos, data (bytes as received, CRLF, dot-unstuffed).
    """

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, *,
                 greeting: Optional[str] = None,
                 rcpt_replies: Optional[Dict[str, Union[str, Sequence[str]]]] = None,
                 data_replies: Union[str, Sequence[str], None] = None,
                 mail_replies: Union[str, Sequence[str], None] = None,
                 starttls: bool = False, ca: Optional[TestCA] = None,
                 tls_names: Optional[Sequence[str]] = None,
                 auth: Optional[Tuple[str, str]] = None,
                 implicit_tls: bool = False,
                 hostname: str = "scripted.far.test",
                 smtputf8: bool = True,
                 tls_expired: bool = False,
                 start: bool = True):
        self.host = host
        self.port = port or free_port(host)
        self.greeting = greeting
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.data_replies = data_replies
        self.mail_replies = mail_replies
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.hostname = hostname
        self.smtputf8 = smtputf8  # offer SMTPUTF8 (RFC 6531)
        self.tls_expired = tls_expired  # a certificate that expired a week ago
        self._own_ca = None
        if (starttls or implicit_tls) and ca is None:
            ca = self._own_ca = TestCA()
        self.ca = ca
        self.tls_names = list(tls_names or [hostname, "localhost", host])
        self.connections = 0
        self.sessions: List[SessionRecord] = []
        self.attempts: List[Attempt] = []
        self.messages: List[Attempt] = []
        self._lock = threading.Lock()
        self._mail_count = 0
        self._data_count = 0
        self._rcpt_counts: Dict[str, int] = {}
        self.controller = None
        if start:
            self.start()

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult, LoginPassword
        ok = False
        user = None
        if isinstance(auth_data, LoginPassword) and self.auth is not None:
            user = auth_data.login.decode("utf-8", "replace")
            ok = (user, auth_data.password.decode("utf-8", "replace")) == tuple(self.auth)
        rec = server.event_handler._session(server)
        rec.commands.append("AUTH %s %s %s" % (mechanism, user, "ok" if ok else "failed"))
        if ok:
            rec.auth_user = user
        return AuthResult(success=ok, handled=False)

    def start(self) -> "ScriptedSMTP":
        from aiosmtpd.controller import Controller
        protocol = _make_smtp_class()
        owner = self
        context = None
        if self.starttls or self.implicit_tls:
            context = self.ca.server_context(self.tls_names, self.tls_expired)
        smtp_kwargs = dict(ident="ESMTP scripted",
                           enable_SMTPUTF8=self.smtputf8, timeout=60)
        if self.starttls and not self.implicit_tls:
            smtp_kwargs["tls_context"] = context
        if self.auth is not None:
            smtp_kwargs.update(authenticator=self._authenticator, auth_required=True,
                               auth_require_tls=not self.implicit_tls)

        class _Controller(Controller):
            def factory(self):
                with warnings.catch_warnings():
                    # AUTH without STARTTLS in implicit TLS mode is fine
                    warnings.simplefilter("ignore", UserWarning)
                    srv = protocol(self.handler, **self.SMTP_kwargs)
                srv.eq_greeting = owner.greeting
                srv.eq_owner = owner
                return srv

        self.controller = _Controller(
            _Handler(self), hostname=self.host, port=self.port,
            ssl_context=context if self.implicit_tls else None,
            server_hostname=self.hostname, ready_timeout=10, **smtp_kwargs)
        self.controller.start()
        # the controller's readiness probe (it has read the greeting) was
        # one connection: forget it
        with self._lock:
            self.connections = 0
            self.sessions.clear()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            try:
                self.controller.stop()
            except AssertionError:
                pass
            self.controller = None
        if self._own_ca is not None:
            self._own_ca.remove()
            self._own_ca = None

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    def wait_messages(self, count: int = 1, timeout: float = 15.0) -> List[Attempt]:
        return self._wait(lambda: self.messages, count, timeout)

    def wait_attempts(self, count: int = 1, timeout: float = 15.0) -> List[Attempt]:
        return self._wait(lambda: self.attempts, count, timeout)

    def _wait(self, get, count, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                items = list(get())
            if len(items) >= count:
                return items
            time.sleep(0.05)
        with self._lock:
            return list(get())
