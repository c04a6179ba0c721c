"""Unit tests for eqmail.dkimsign: signing, key and selector look-up, --genkey.

Reference: the module docstring (KEY LOOKUP, EXIT CODES), RFC 6376.
Signatures are checked with dkimpy's own verify(), its DNS look-up replaced
by a function answering from a dict, so no DNS server is needed.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import sys

import pytest

dkim = pytest.importorskip("dkim")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

from helpers import as_test_user, give_to_user, user_dir  # noqa: E402
from eqmail import dkimsign  # noqa: E402
from eqmail.control import load  # noqa: E402
from eqmail.dkimsign import cmd_dkimsign, sign, wire_form  # noqa: E402

MSG = (b"Received: from client (127.0.0.1) by mx.example.org\n"
       b"From: Joe <joe@example.org>\n"
       b"To: ann@example.net\n"
       b"Subject: hello\n"
       b"  folded\n"
       b"Date: Sat, 01 Jan 2000 00:00:00 +0000\n"
       b"Message-ID: <1@example.org>\n"
       b"\n"
       b"Hello,   world  \n"
       b"\n"
       b"a line with a bare CR at its end\r\n"
       b"and \r one inside\n"
       b"\n\n")


class Key:
    """An RSA key: PEM private key and the public TXT record value."""

    def __init__(self, bits=1024):
        pk = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.pem = pk.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        der = pk.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        self.txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


@pytest.fixture(scope="module")
def keys():
    return [Key(), Key()]


@pytest.fixture
def home(tmp_path):
    ctl = tmp_path / "control"
    ctl.mkdir()
    (ctl / "me").write_text("mx.example.org\n")
    return str(tmp_path)


@pytest.fixture
def user_home():
    """`home` in a directory the test user owns and can reach, for
    as_test_user() (root's tmp_path is out of its reach)."""
    with user_dir("eqmail-dkim-") as d:
        os.mkdir(os.path.join(d, "control"))
        with open(os.path.join(d, "control", "me"), "w") as f:
            f.write("mx.example.org\n")
        yield d


def put_key(home, directory, key, selector=None):
    d = os.path.join(home, "control", "dkim", directory)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "private.key"), "wb") as f:
        f.write(key.pem)
    if selector is not None:
        with open(os.path.join(d, "selector"), "w") as f:
            f.write(selector + "\n")
    return os.path.join(d, "private.key")


def dnsfunc(records):
    """dkimpy dnsfunc answering {"sel._domainkey.dom": txt} and nothing else."""
    asked = []

    def lookup(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        asked.append(name.rstrip("."))
        return records.get(name.rstrip("."))
    lookup.asked = asked
    return lookup


def verifies(signed: bytes, records) -> bool:
    """dkim.verify() over the CRLF form remote delivery sends."""
    return dkim.verify(wire_form(signed), dnsfunc=dnsfunc(records))


def tags(signed: bytes) -> dict:
    """The tags of the DKIM-Signature field at the top of `signed`."""
    assert signed.startswith(b"DKIM-Signature:")
    lines = signed.split(b"\n")
    field = [lines[0]]
    for line in lines[1:]:
        if not line[:1] in (b" ", b"\t"):
            break
        field.append(line)
    value = b"".join(field).split(b":", 1)[1]
    out = {}
    for part in value.split(b";"):
        if b"=" in part:
            k, _, v = part.partition(b"=")
            out[k.strip().decode()] = re.sub(rb"\s+", b"", v).decode()
    return out


def run(argv, data=b"", env=None, monkeypatch=None):
    """Run cmd_dkimsign in-process: (exit code, stdout bytes, stderr text)."""
    stdin = io.TextIOWrapper(io.BytesIO(data))
    out = io.BytesIO()
    stdout = io.TextIOWrapper(out, write_through=True)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.delenv("SENDER", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    rc = cmd_dkimsign(argv)
    stdout.flush()
    return rc, out.getvalue(), stderr.getvalue()


# -- signing ---------------------------------------------------------------------------

def test_signature_verifies_over_the_wire_form(home, keys, monkeypatch):
    put_key(home, "example.org", keys[0], selector="s1")
    rc, out, err = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert (rc, err) == (0, "")
    t = tags(out)
    assert (t["d"], t["s"], t["c"], t["a"]) == ("example.org", "s1", "relaxed/relaxed",
                                                "rsa-sha256")
    header_len = len(out) - len(MSG)
    assert out[header_len:] == MSG            # original bytes unchanged after the field
    assert b"\r\n" not in out[:header_len]    # the new field has LF line ends
    assert out[:header_len].endswith(b"\n")
    records = {"s1._domainkey.example.org": keys[0].txt}
    assert verifies(out, records)
    # the check can fail: a changed body, a wrong key
    assert not verifies(out.replace(b"world", b"World"), records)
    assert not verifies(out, {"s1._domainkey.example.org": keys[1].txt})


def test_signed_headers_are_those_present(home, keys, monkeypatch):
    put_key(home, "example.org", keys[0])
    rc, out, _ = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert rc == 0
    h = tags(out)["h"].lower().split(":")
    assert h == ["from", "to", "subject", "date", "message-id"]
    assert "received" not in h and "cc" not in h


def test_message_without_final_newline(home, keys, monkeypatch):
    put_key(home, "example.org", keys[0])
    msg = MSG.rstrip(b"\n")
    rc, out, _ = run(["--home", home], msg, monkeypatch=monkeypatch)
    assert rc == 0 and out.endswith(msg)
    assert verifies(out, {"default._domainkey.example.org": keys[0].txt})


def test_sign_api_with_config_and_home(home, keys):
    put_key(home, "example.org", keys[0])
    records = {"default._domainkey.example.org": keys[0].txt}
    assert verifies(sign(MSG, load(home), None), records)
    assert verifies(sign(MSG, home, None), records)


# -- domain, key and selector look-up ---------------------------------------------------

def test_key_option_wins(home, keys, tmp_path, monkeypatch):
    put_key(home, "example.org", keys[0])
    other = tmp_path / "other.pem"
    other.write_bytes(keys[1].pem)
    rc, out, _ = run(["--home", home, "--key", str(other)], MSG, monkeypatch=monkeypatch)
    assert rc == 0
    assert tags(out)["d"] == "example.org"
    assert verifies(out, {"default._domainkey.example.org": keys[1].txt})
    assert not verifies(out, {"default._domainkey.example.org": keys[0].txt})


def test_domain_key_before_default_key(home, keys, monkeypatch):
    put_key(home, "example.org", keys[0])
    put_key(home, "default", keys[1])
    rc, out, _ = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert rc == 0
    assert verifies(out, {"default._domainkey.example.org": keys[0].txt})


def test_default_key_keeps_the_domain(home, keys, monkeypatch):
    put_key(home, "default", keys[1], selector="fallback")
    rc, out, _ = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert rc == 0
    t = tags(out)
    assert (t["d"], t["s"]) == ("example.org", "fallback")
    assert verifies(out, {"fallback._domainkey.example.org": keys[1].txt})


def test_no_key_writes_the_message_unchanged(home, keys, monkeypatch):
    put_key(home, "example.net", keys[0])     # another domain's key is not used
    rc, out, err = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert (rc, out, err) == (0, MSG, "")


def test_no_domain_writes_the_message_unchanged(home, keys, monkeypatch):
    put_key(home, "default", keys[0])
    msg = b"Subject: no from\n\nbody\n"
    rc, out, _ = run(["--home", home], msg, monkeypatch=monkeypatch)
    assert (rc, out) == (0, msg)


def test_domain_option_then_from_then_sender(home, keys, monkeypatch):
    put_key(home, "default", keys[0])
    rc, out, _ = run(["--home", home, "--domain", "Example.COM"], MSG,
                     env={"SENDER": "x@sender.example"}, monkeypatch=monkeypatch)
    assert rc == 0 and tags(out)["d"] == "example.com"
    assert verifies(out, {"default._domainkey.example.com": keys[0].txt})
    rc, out, _ = run(["--home", home], MSG, env={"SENDER": "x@sender.example"},
                     monkeypatch=monkeypatch)
    assert tags(out)["d"] == "example.org"
    msg = MSG.replace(b"From: Joe <joe@example.org>", b"From: undisclosed")
    rc, out, _ = run(["--home", home], msg, env={"SENDER": "x@Sender.Example"},
                     monkeypatch=monkeypatch)
    assert rc == 0 and tags(out)["d"] == "sender.example"


def test_from_domain_cannot_leave_the_key_directory(home, keys, monkeypatch):
    evil = os.path.join(home, "control", "evil")
    os.makedirs(evil)
    with open(os.path.join(evil, "private.key"), "wb") as f:
        f.write(keys[0].pem)
    msg = MSG.replace(b"joe@example.org", b"joe@../evil")
    rc, out, _ = run(["--home", home], msg, monkeypatch=monkeypatch)
    assert (rc, out) == (0, msg)
    assert dkimsign.clean_domain("../evil") is None
    assert dkimsign.clean_domain("[127.0.0.1]") is None
    assert dkimsign.clean_domain("a/b.example") is None
    assert dkimsign.clean_domain("Mail.Example.ORG.") == "mail.example.org"


@pytest.mark.parametrize("files, option, expected", [
    ({"example.org": "own", "default": "dflt"}, None, "own"),
    ({"default": "dflt"}, None, "dflt"),
    ({}, None, "default"),
    ({"example.org": "own", "default": "dflt"}, "cli", "cli"),
])
def test_selector_lookup(home, keys, monkeypatch, files, option, expected):
    put_key(home, "example.org", keys[0])
    for directory, selector in files.items():
        d = os.path.join(home, "control", "dkim", directory)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "selector"), "w") as f:
            f.write(selector + "\n# comment\n")
    argv = ["--home", home] + (["--selector", option] if option else [])
    rc, out, _ = run(argv, MSG, monkeypatch=monkeypatch)
    assert rc == 0 and tags(out)["s"] == expected
    assert verifies(out, {"%s._domainkey.example.org" % expected: keys[0].txt})


def test_bad_selector_file_is_a_failure(home, keys, monkeypatch):
    put_key(home, "example.org", keys[0], selector="bad selector")
    rc, out, err = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert (rc, out) == (111, b"")
    assert "selector" in err and err.count("\n") == 1


# -- failures ----------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    b"-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n",
    b"garbage\n",
    b"",
])
def test_broken_key_exit_111_no_output(home, monkeypatch, content):
    d = os.path.join(home, "control", "dkim", "example.org")
    os.makedirs(d)
    with open(os.path.join(d, "private.key"), "wb") as f:
        f.write(content)
    rc, out, err = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert (rc, out) == (111, b"")
    assert err.startswith("eqmail dkimsign: fatal: ") and err.count("\n") == 1


def test_missing_key_option_exit_111(home, monkeypatch):
    rc, out, err = run(["--home", home, "--key", os.path.join(home, "nope.pem")], MSG,
                       monkeypatch=monkeypatch)
    assert (rc, out) == (111, b"") and "nope.pem" in err


def test_unreadable_key_exit_111(user_home, keys, monkeypatch):
    # root reads any file: as root, dkimsign runs as the unprivileged test user
    path = put_key(user_home, "example.org", keys[0])
    give_to_user(user_home)
    rc, out, _ = as_test_user(run, ["--home", user_home], MSG, monkeypatch=monkeypatch)
    assert rc == 0 and out.endswith(MSG)
    os.chmod(path, 0)
    rc, out, err = as_test_user(run, ["--home", user_home], MSG, monkeypatch=monkeypatch)
    assert (rc, out) == (111, b"") and "unable to read key" in err


def test_too_large_exit_111(home, keys, monkeypatch):
    put_key(home, "example.org", keys[0])
    monkeypatch.setattr(dkimsign, "MAX_MESSAGE", len(MSG) - 1)
    rc, out, err = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert (rc, out) == (111, b"") and "larger" in err
    monkeypatch.setattr(dkimsign, "MAX_MESSAGE", len(MSG))
    rc, out, _ = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert rc == 0 and out.endswith(MSG)


def test_dkimpy_missing(home, keys, monkeypatch):
    put_key(home, "example.org", keys[0])
    monkeypatch.setitem(sys.modules, "dkim", None)
    rc, out, err = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert (rc, out) == (111, b"")
    assert "pip install eqmail[dkim]" in err and err.count("\n") == 1


def test_ed25519_keys_are_recognised(tmp_path):
    pk = ed25519.Ed25519PrivateKey.generate()
    seed = pk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    pem = pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
    (tmp_path / "a").write_bytes(pem)
    (tmp_path / "b").write_bytes(base64.b64encode(seed) + b"\n")
    for name in "ab":
        key, algorithm = dkimsign.read_key(str(tmp_path / name))
        assert (base64.b64decode(key), algorithm) == (seed, b"ed25519-sha256")
    (tmp_path / "c").write_bytes(Key().pem.replace(b"\n", b"\r\n"))
    assert dkimsign.read_key(str(tmp_path / "c"))[1] == b"rsa-sha256"


def test_ed25519_signature_verifies(home, monkeypatch):
    pytest.importorskip("nacl")
    pk = ed25519.Ed25519PrivateKey.generate()
    d = os.path.join(home, "control", "dkim", "example.org")
    os.makedirs(d)
    with open(os.path.join(d, "private.key"), "wb") as f:
        f.write(pk.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()))
    pub = pk.public_key().public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw)
    rc, out, _ = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert rc == 0 and tags(out)["a"] == "ed25519-sha256"
    assert verifies(out, {"default._domainkey.example.org":
                          b"v=DKIM1; k=ed25519; p=" + base64.b64encode(pub)})


# -- genkey ----------------------------------------------------------------------------

def txt_of(record: str) -> bytes:
    """The TXT value of a zone-file line: its quoted strings joined."""
    return "".join(re.findall(r'"([^"]*)"', record)).encode()


@pytest.mark.parametrize("backend", ["cryptography", "openssl"])
def test_genkey(home, monkeypatch, backend):
    if backend == "openssl":
        if not shutil.which("openssl"):
            pytest.skip("no openssl")
        monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives", None)
    rc, out, err = run(["--home", home, "--genkey", "--domain", "Example.org",
                        "--selector", "k1"], monkeypatch=monkeypatch)
    assert (rc, err) == (0, "")
    record = out.decode()
    assert re.match(r'^k1\._domainkey\.example\.org\. IN TXT "v=DKIM1; k=rsa; p=[^"]*"'
                    r'( "[^"]*")*\n$', record), record
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', record))
    d = os.path.join(home, "control", "dkim", "example.org")
    assert os.stat(os.path.join(d, "private.key")).st_mode & 0o777 == 0o600
    with open(os.path.join(d, "selector")) as f:
        assert f.read() == "k1\n"
    assert sorted(os.listdir(d)) == ["private.key", "selector"]
    monkeypatch.undo()
    rc, signed, _ = run(["--home", home], MSG, monkeypatch=monkeypatch)
    assert rc == 0 and tags(signed)["s"] == "k1"
    assert verifies(signed, {"k1._domainkey.example.org": txt_of(record)})


def test_genkey_keeps_an_existing_key(home, keys, monkeypatch):
    path = put_key(home, "example.org", keys[0])
    rc, out, err = run(["--home", home, "--genkey", "--domain", "example.org"],
                       monkeypatch=monkeypatch)
    assert (rc, out) == (111, b"") and "exists" in err
    with open(path, "rb") as f:
        assert f.read() == keys[0].pem


def test_genkey_needs_a_domain(home, monkeypatch):
    rc, out, _ = run(["--home", home, "--genkey"], monkeypatch=monkeypatch)
    assert (rc, out) == (64, b"")
    rc, out, _ = run(["--home", home, "--genkey", "--domain", "../x"],
                     monkeypatch=monkeypatch)
    assert (rc, out) == (64, b"")
