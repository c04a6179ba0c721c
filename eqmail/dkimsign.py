"""dkimsign -- add a DKIM-Signature to a message, as a beforemote filter.

NAME
    eqmail dkimsign -- DKIM-sign the message on stdin (qmail-sdkim's role)

SYNOPSIS
    eqmail dkimsign [--home DIR] [--domain D] [--selector S] [--key FILE]
    eqmail dkimsign --genkey --domain D [--selector S] [--home DIR]

SUMMARY
    Reads one message on stdin (the queue's form: LF line ends) and writes
    it to stdout with one DKIM-Signature header field added at the top; the
    original bytes follow unchanged, with LF line ends.  The signature is
    computed over the form that goes on the wire -- every LF made CRLF, a
    final line end added when missing, as remote delivery sends it -- so it
    verifies at the receiver even for a bare CR at the end of a line.

    Meant as a line of control/beforemote (``eqmail dkimsign``): remote
    delivery runs it with SENDER, RECIPIENT and HOST in the environment and
    sends the message unchanged when it exits non-zero or writes nothing.

    `sign(message, home_or_config, sender)` does the same in-process and
    returns the signed message (or the message itself when there is no key).

KEY LOOKUP
    Signing domain   --domain; else the domain of the first address in the
                     From: header field; else the domain of $SENDER (the
                     envelope sender; `sender` for sign()).  Lower case; a
                     domain that is not a plain host name (an address
                     literal, ``..``, ``/``) is treated as no domain.
    Key file         --key FILE; else HOME/control/dkim/<domain>/private.key;
                     else HOME/control/dkim/default/private.key, still with
                     d=<domain>.  No key file at all: nothing to sign, the
                     message is written unchanged and the exit code is 0.
    Selector         --selector; else the first line of
                     HOME/control/dkim/<domain>/selector; else of
                     HOME/control/dkim/default/selector; else ``default``.
    Key formats      PEM RSA (PKCS#1 ``BEGIN RSA PRIVATE KEY`` or PKCS#8
                     ``BEGIN PRIVATE KEY``), signed rsa-sha256; ed25519 as a
                     PKCS#8 PEM or as dkimpy's dknewkey base64 seed, signed
                     ed25519-sha256 (RFC 8463; needs pynacl).  Encrypted keys
                     are not supported.

    qmail-sdkim (kp-org/qdkim) kept one key per domain under a control
    directory as well (control/domainkeys/<domain>/...); eqmail's layout
    is control/dkim/<domain>/{private.key,selector}, so such keys can be
    moved over file by file.

SIGNATURE
    Canonicalisation relaxed/relaxed; header fields signed: those of
    SIGN_HEADERS that the message has (From always); no l= tag; i= is
    ``@<domain>``; t= is now.

GENKEY
    ``--genkey --domain D [--selector S]`` makes an RSA 2048 key (with the
    cryptography package when it is installed, else ``openssl genrsa``),
    writes HOME/control/dkim/D/private.key (mode 0600, PEM) and
    HOME/control/dkim/D/selector (S, default ``default``), and prints the
    record to publish, split into strings of at most 255 characters as zone
    files require (RFC 1035 section 3.3.14):

        S._domainkey.D. IN TXT "v=DKIM1; k=rsa; p=MIIB..." "...AQAB"

    An existing private.key is never overwritten.

STANDARDS
    RFC 6376 (DKIM signatures; section 3.4 canonicalisation, 3.5 tags,
    3.6.1 key records, 5.4 header fields to sign), RFC 8463 (ed25519-sha256),
    RFC 8301 (RSA keys of at least 1024 bits, rsa-sha256 only).

FILES
    HOME/control/dkim/<domain>/private.key   the domain's private key
    HOME/control/dkim/<domain>/selector      its selector (first line)
    HOME/control/dkim/default/private.key    key for domains without one
    HOME/control/dkim/default/selector       selector for them

EXIT CODES
    0    signed message written, or the message unchanged when no key
         applies
    64   bad usage
    111  temporary failure, nothing written: the key cannot be read or
         parsed, dkimpy refused the message or key, dkimpy is not
         installed (``pip install eqmail[dkim]``), the message is larger
         than MAX_MESSAGE, or --genkey could not write the key

SECURITY
    The From: header comes from the network: its domain selects a directory
    under control/dkim/, so it is accepted only as a plain host name (letters,
    digits, ``-`` and ``_`` in dot-separated labels).  The private key is read
    with the filter's privileges and never written anywhere but by --genkey.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from email.utils import getaddresses
from typing import List, Optional, Tuple

from .control import Config, ConfigError, read_line
from .paths import resolve_home

#: Largest message signed, in bytes; larger ones are refused (exit 111)
#: so that a filter cannot be made to hold unbounded data in memory.
MAX_MESSAGE = 64 << 20

#: Largest key file read, bytes (an RSA 8192 PEM is about 6.5 KB).
MAX_KEY = 64 << 10

#: Header fields signed when present (RFC 6376 section 5.4.1); From always.
SIGN_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version",
                "Content-Type", "Reply-To", "In-Reply-To", "References")

#: Selector used when neither --selector nor a selector file says one.
DEFAULT_SELECTOR = "default"

#: The directory under control/dkim/ holding the fallback key and selector.
DEFAULT_DIR = "default"

#: Size of keys made by --genkey, bits (RFC 8301 section 3.2: at least 1024,
#: 2048 recommended by common practice).
GENKEY_BITS = 2048

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?$")
_SELECTOR = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
#: DER prefix of a PKCS#8 ed25519 private key (RFC 8410 section 7); the
#: 32-byte seed follows.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")


class SignError(Exception):
    """Signing failed for a temporary reason (exit 111): the key, dkimpy."""


@dataclass(frozen=True)
class KeyChoice:
    """What sign() will use: d=, s= and the key file."""

    domain: str
    selector: str
    path: str


# -- choosing domain, key and selector -------------------------------------------------

def clean_domain(text: Optional[str]) -> Optional[str]:
    """`text` as a lower-case ASCII host name, or None when it is not one.

    International names become their A-label (IDNA 2003 codec).
    """
    if not text:
        return None
    text = text.strip().rstrip(".").lower()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(text) > 253:
        return None
    labels = text.split(".")
    if not all(_LABEL.match(label) and len(label) <= 63 for label in labels):
        return None
    return text


def _header_fields(message: bytes) -> List[Tuple[str, str]]:
    """[(lower-case name, unfolded value)] of the message's header: the
    lines before the first empty one (LF or CRLF line ends)."""
    out: List[Tuple[str, str]] = []
    for raw in io.BytesIO(message):
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if not line:
            break
        if line[:1] in (" ", "\t"):
            if out:
                out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            out.append((name.strip().lower(), value.strip()))
    return out


def from_domain(message: bytes) -> Optional[str]:
    """The domain of the first address in the first From: field, or None."""
    for name, value in _header_fields(message):
        if name == "from":
            for _, addr in getaddresses([value]):
                if "@" in addr:
                    return clean_domain(addr.rpartition("@")[2])
            return None
    return None


def signing_domain(message: bytes, sender: Optional[str],
                   domain: Optional[str] = None) -> Optional[str]:
    """d= for `message`: `domain`, else From:'s domain, else `sender`'s."""
    if domain:
        return clean_domain(domain)
    found = from_domain(message)
    if found:
        return found
    if sender and "@" in sender:
        return clean_domain(sender.rpartition("@")[2])
    return None


def _selector_file(path: str) -> Optional[str]:
    value = read_line(path, None)
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not _SELECTOR.match(value):
        raise ConfigError(path, 1, "not a DKIM selector: %r" % value)
    return value


def find_key(home: str, domain: str, selector: Optional[str] = None,
             key: Optional[str] = None) -> Optional[KeyChoice]:
    """The key and selector for `domain` (see KEY LOOKUP), or None when no
    key file exists.  Raises ConfigError for a bad selector file and
    OSError when a selector file cannot be read."""
    base = os.path.join(home, "control", "dkim")
    own = os.path.join(base, domain)
    fallback = os.path.join(base, DEFAULT_DIR)
    if key is None:
        for directory in (own, fallback):
            candidate = os.path.join(directory, "private.key")
            if os.path.exists(candidate):
                key = candidate
                break
        else:
            return None
    if not selector:
        selector = (_selector_file(os.path.join(own, "selector"))
                    or _selector_file(os.path.join(fallback, "selector"))
                    or DEFAULT_SELECTOR)
    elif not _SELECTOR.match(selector):
        raise ConfigError("--selector", 1, "not a DKIM selector: %r" % selector)
    return KeyChoice(domain, selector, key)


def read_key(path: str) -> Tuple[bytes, bytes]:
    """(key as dkimpy takes it, signature algorithm) from the file `path`.

    Raises SignError when it cannot be read or is no key eqmail knows.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY + 1)
    except OSError as e:
        raise SignError("unable to read key %s: %s" % (path, e.strerror or e))
    if len(data) > MAX_KEY:
        raise SignError("key file %s is larger than %d bytes" % (path, MAX_KEY))
    data = data.replace(b"\r\n", b"\n").strip()
    if data.startswith(b"-----BEGIN"):
        if b"ENCRYPTED" in data:
            raise SignError("key %s is encrypted; eqmail needs it unencrypted" % path)
        if data.startswith(b"-----BEGIN PRIVATE KEY-----"):
            der = b"".join(data.split(b"\n")[1:-1])
            try:
                der = base64.b64decode(der, validate=False)
            except ValueError:
                raise SignError("key %s: bad PEM base64" % path)
            if len(der) == 48 and der.startswith(_ED25519_PKCS8):
                return base64.b64encode(der[16:]), b"ed25519-sha256"
        return data + b"\n", b"rsa-sha256"
    try:
        seed = base64.b64decode(data, validate=True)
    except ValueError:
        seed = b""
    if len(seed) == 32:
        return data, b"ed25519-sha256"
    raise SignError("key %s is neither a PEM key nor a base64 ed25519 seed" % path)


# -- signing ---------------------------------------------------------------------------

def wire_form(message: bytes) -> bytes:
    """The message as remote delivery sends it: LF -> CRLF, a final line
    end added when missing (qmail-remote's blast())."""
    if message and not message.endswith(b"\n"):
        message += b"\n"
    return message.replace(b"\n", b"\r\n")


def _import_dkim():
    try:
        import dkim  # noqa: F401 -- optional dependency eqmail[dkim]
    except ImportError:
        raise SignError("dkimpy is not installed: pip install eqmail[dkim]")
    return dkim


def sign(message: bytes, home_or_config, sender: Optional[str],
         domain: Optional[str] = None, selector: Optional[str] = None,
         key: Optional[str] = None) -> bytes:
    """Return `message` (LF line ends) with a DKIM-Signature field on top.

    `home_or_config` is the eqmail home or a loaded Config; `sender` the
    envelope sender (for the domain when From: has none); `domain`,
    `selector` and `key` override the look-ups (see KEY LOOKUP).  Returns
    `message` itself when no domain or no key applies.  Raises SignError
    (key unreadable, dkimpy missing or failing, message too large) and
    ConfigError (a bad selector file).
    """
    home = home_or_config.home if isinstance(home_or_config, Config) else home_or_config
    if len(message) > MAX_MESSAGE:
        raise SignError("message larger than %d bytes" % MAX_MESSAGE)
    d = signing_domain(message, sender, domain)
    if d is None:
        if domain:
            raise SignError("not a domain: %r" % domain)
        return message
    try:
        choice = find_key(home, d, selector, key)
    except OSError as e:
        raise SignError("unable to read the selector: %s" % e)
    if choice is None:
        return message
    privkey, algorithm = read_key(choice.path)
    dkim = _import_dkim()
    wire = wire_form(message)
    present = {name for name, _ in _header_fields(message)}
    include = [h.encode("ascii") for h in SIGN_HEADERS
               if h.lower() in present or h == "From"]
    try:
        header = dkim.sign(wire, choice.selector.encode("ascii"),
                           choice.domain.encode("ascii"), privkey,
                           canonicalize=(b"relaxed", b"relaxed"),
                           signature_algorithm=algorithm,
                           include_headers=include, linesep=b"\r\n")
    except Exception as e:  # dkimpy raises many kinds on odd keys and messages
        raise SignError("dkimpy: %s: %s" % (type(e).__name__, e))
    if not header:
        raise SignError("dkimpy returned no signature")
    header = header.replace(b"\r\n", b"\n")
    if not header.endswith(b"\n"):
        header += b"\n"
    return header + message


# -- genkey ----------------------------------------------------------------------------

def _genrsa() -> Tuple[bytes, bytes]:
    """(PEM private key, DER SubjectPublicKeyInfo) of a new RSA key."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        return _genrsa_openssl()
    pk = rsa.generate_private_key(public_exponent=65537, key_size=GENKEY_BITS)
    pem = pk.private_bytes(serialization.Encoding.PEM,
                           serialization.PrivateFormat.TraditionalOpenSSL,
                           serialization.NoEncryption())
    der = pk.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, der


def _genrsa_openssl() -> Tuple[bytes, bytes]:
    try:
        pem = subprocess.run(["openssl", "genrsa", str(GENKEY_BITS)], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=120).stdout
        der = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"],
                             input=pem, check=True, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SignError("neither the cryptography package nor openssl could make "
                        "a key: %s" % e)
    return pem, der


def txt_record(domain: str, selector: str, public_der: bytes, kind: str = "rsa") -> str:
    """The zone-file line publishing `public_der`, in strings of <= 255."""
    value = "v=DKIM1; k=%s; p=%s" % (kind, base64.b64encode(public_der).decode("ascii"))
    parts = ['"%s"' % value[i:i + 255] for i in range(0, len(value), 255)]
    return "%s._domainkey.%s. IN TXT %s" % (selector, domain, " ".join(parts))


def genkey(home: str, domain: str, selector: str = DEFAULT_SELECTOR) -> str:
    """Make an RSA key for `domain` under HOME/control/dkim/ (see GENKEY).

    Returns the TXT record line.  Raises SignError when the key exists or
    cannot be made, OSError when the files cannot be written.
    """
    directory = os.path.join(home, "control", "dkim", domain)
    path = os.path.join(directory, "private.key")
    if os.path.exists(path):
        raise SignError("%s exists; remove it first to make a new key" % path)
    pem, der = _genrsa()
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".private.key.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # never replaces a key made meanwhile
    finally:
        os.unlink(tmp)
    sel_tmp = os.path.join(directory, ".selector.tmp")
    with open(sel_tmp, "w") as f:
        f.write(selector + "\n")
    os.replace(sel_tmp, os.path.join(directory, "selector"))
    return txt_record(domain, selector, der)


# -- the tool --------------------------------------------------------------------------

def _fail(text: str) -> int:
    """Write `text` as one printable line on stderr; return 111."""
    text = "".join(ch if ch.isprintable() else "_" for ch in " ".join(text.split()))
    sys.stderr.write("eqmail dkimsign: fatal: %s\n" % text)
    sys.stderr.flush()
    return 111


def cmd_dkimsign(argv: List[str]) -> int:
    """`eqmail dkimsign`: sign stdin to stdout, or --genkey.  Exit code."""
    p = argparse.ArgumentParser(
        prog="eqmail dkimsign",
        description="DKIM-sign the message on stdin (LF line ends) and write it to "
                    "stdout with a DKIM-Signature field on top; unchanged when no key "
                    "applies. Domain: --domain, else From:'s, else $SENDER's. Key: "
                    "--key, else HOME/control/dkim/DOMAIN/private.key, else "
                    "HOME/control/dkim/default/private.key. Selector: --selector, else "
                    "the selector file next to either, else 'default'. Exit 111 and "
                    "no output on any failure. For control/beforemote.")
    p.add_argument("--home", metavar="DIR", help="the eqmail home (default: see `eqmail --help`)")
    p.add_argument("--domain", metavar="D", help="signing domain (d=)")
    p.add_argument("--selector", metavar="S", help="selector (s=)")
    p.add_argument("--key", metavar="FILE", help="private key file (PEM)")
    p.add_argument("--genkey", action="store_true",
                   help="make an RSA 2048 key for --domain and print its DNS TXT record")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 64
    home = resolve_home(args.home)

    if args.genkey:
        domain = clean_domain(args.domain)
        if domain is None:
            sys.stderr.write("eqmail dkimsign: --genkey needs --domain with a domain name\n")
            return 64
        selector = args.selector or DEFAULT_SELECTOR
        if not _SELECTOR.match(selector):
            sys.stderr.write("eqmail dkimsign: not a DKIM selector: %r\n" % selector)
            return 64
        try:
            record = genkey(home, domain, selector)
        except SignError as e:
            return _fail(str(e))
        except OSError as e:
            return _fail("unable to write the key: %s" % e)
        sys.stdout.write(record + "\n")
        sys.stdout.flush()
        return 0

    stdin = sys.stdin.buffer
    chunks = []
    size = 0
    while size <= MAX_MESSAGE:
        chunk = stdin.read(min(1 << 20, MAX_MESSAGE + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_MESSAGE:
        return _fail("message larger than %d bytes" % MAX_MESSAGE)
    message = b"".join(chunks)
    try:
        out = sign(message, home, os.environ.get("SENDER"), domain=args.domain,
                   selector=args.selector, key=args.key)
    except (SignError, ConfigError) as e:
        return _fail(str(e))
    try:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    except OSError as e:
        return _fail("unable to write the message: %s" % e)
    return 0


if __name__ == "__main__":
    sys.exit(cmd_dkimsign(sys.argv[1:]))
