"""smtp.tls -- the SMTP server's TLS: contexts from control files, a self-signed start.

SUMMARY
    `server_context(home, ciphers)` builds the gevent SSL context for
    STARTTLS and implicit-TLS listeners from control/servercert.pem (the
    certificate chain and its private key in one PEM file, as eQmail keeps
    them), control/tlsserverciphers (OpenSSL cipher list, lines joined with
    ``:``; the environment variable TLSCIPHERS wins) and a minimum of
    TLS 1.2.  It returns None when servercert.pem is missing: STARTTLS is
    then not offered.  `make_self_signed(home, name)` writes a new
    servercert.pem (``eqmail mkservercert``).

STANDARDS
    RFC 3207 (STARTTLS), RFC 8314 (implicit TLS for submission, port 465),
    RFC 8996 (no TLS 1.0/1.1); eQmail's TLS patch for the file names.

SECURITY
    servercert.pem holds a private key: it is written 0600.  A certificate
    that cannot be loaded is logged once per load and STARTTLS is then not
    offered (the session goes on in plain text, as eQmail does).
"""
from __future__ import annotations

import os
from typing import Optional

from .. import log

_cache: dict = {}


def server_context(home: str, ciphers: str = ""):
    """The server SSL context, or None without a usable servercert.pem.
    Cached while the file and the cipher list are unchanged."""
    path = os.path.join(home, "control", "servercert.pem")
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_mtime_ns, st.st_size, ciphers)
    ctx = _cache.get(key)
    if ctx is not None:
        return ctx
    import gevent.ssl as ssl

    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        ctx.load_cert_chain(path)
        if ciphers:
            ctx.set_ciphers(ciphers)
    except (OSError, ssl.SSLError, ValueError) as e:
        log.alert("unable to use control/servercert.pem: %s; STARTTLS is off" % e)
        return None
    _cache.clear()
    _cache[key] = ctx
    return ctx


def close(sock) -> None:
    """Close a connection; a TLS one first sends its close_notify alert
    (RFC 8446 section 6.1), waiting at most 2 seconds.  Never raises."""
    if hasattr(sock, "unwrap"):
        try:
            sock.settimeout(2)
            sock.unwrap()
        except (OSError, ValueError):
            pass
    try:
        sock.close()
    except OSError:
        pass


def cipher_name(sock) -> str:
    """``<cipher>`` for the Received line's ``ESMTPS (<cipher> encrypted)``."""
    try:
        c = sock.cipher()
        return "%s %s" % (c[1], c[0]) if c else "TLS"
    except (OSError, AttributeError):
        return "TLS"


def make_self_signed(home: str, name: str, days: int = 3650) -> str:
    """Write HOME/control/servercert.pem: a new RSA 2048 key and a
    self-signed certificate for `name` (CN and subjectAltName), made with
    the openssl command.  Returns the path.  Raises OSError, RuntimeError."""
    import shutil  # here, not at the top: every session imports this module,
    import subprocess  # and shutil brings bz2 and lzma (0.6 MB of RSS)
    import tempfile

    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed (apt-get install openssl)")
    control = os.path.join(home, "control")
    os.makedirs(control, exist_ok=True)
    path = os.path.join(control, "servercert.pem")
    with tempfile.TemporaryDirectory(dir=control) as tmp:
        key, cert = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
        out = subprocess.run(
            [openssl, "req", "-new", "-x509", "-nodes", "-days", str(days),
             "-newkey", "rsa:2048", "-subj", "/CN=%s" % name,
             "-addext", "subjectAltName=DNS:%s" % name,
             "-keyout", key, "-out", cert],
            capture_output=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError("openssl failed: %s"
                               % out.stderr.decode("utf-8", "replace").strip()[-300:])
        new = os.path.join(tmp, "servercert.pem")
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            for part in (cert, key):
                with open(part, "rb") as src:
                    f.write(src.read())
            f.flush()
            os.fsync(f.fileno())
        os.replace(new, path)
    return path


def describe(path: str) -> Optional[str]:
    """The subject and end date of a certificate file, for messages."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    out = subprocess.run([openssl, "x509", "-noout", "-subject", "-enddate", "-in", path],
                         capture_output=True, timeout=30)
    return out.stdout.decode("utf-8", "replace").strip() if out.returncode == 0 else None
