"""Unit tests for eqmail.smtp.auth: the AUTH decoders and the checkpassword runner.

Reference: the module docstring, behaviour reference section 3 and test
vectors T19-T23, RFC 4616, RFC 2195, the checkpassword interface.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys
import textwrap
import time

import pytest

from eqmail.smtp import auth
from eqmail.smtp.auth import AuthSyntax, check, cram_challenge, decode_b64_line, decode_cram, decode_plain


def b64(data) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


# -- PLAIN ------------------------------------------------------------------------------

def test_plain_t19_initial_response():
    assert decode_plain("AGpvZQBzZWNyZXQ=") == ("joe", "secret")


def test_plain_t20_authzid_ignored():
    assert decode_plain(b64("admin\0joe\0secret")) == ("joe", "secret")


def test_plain_keeps_spaces_and_colons_in_the_password():
    assert decode_plain(b64("\0joe\0se cr:et ")) == ("joe", "se cr:et ")


@pytest.mark.parametrize("line", [
    "", "   ", "*", "!!!!", "AGpvZQBzZWNyZXQ",          # empty, cancel, junk, no padding
    b64("joe"), b64("joe\0secret"),                      # NULs missing
    b64("\0\0secret"), b64("\0joe\0"),                   # empty user, empty password
    b64("a\0joe\0secret\0more"),                         # a third NUL
])
def test_plain_malformed(line):
    with pytest.raises(AuthSyntax):
        decode_plain(line)


def test_plain_non_utf8_bytes_survive_to_fd3():
    user, password = decode_plain(b64(b"\0j\xc3\xb6e\0p\xffw"))
    assert auth.fd3_data(user, password) == b"j\xc3\xb6e\0p\xffw\0\0"


# -- LOGIN ------------------------------------------------------------------------------

def test_login_lines_t20():
    assert decode_b64_line("am9l") == "joe"
    assert decode_b64_line(b64("secret") + "\r\n") == "secret"


@pytest.mark.parametrize("line", ["", "*", "am9", "a m9l", b64(""), b64("jo\0e"), "am9l\u00e9"])
def test_login_malformed(line):
    with pytest.raises(AuthSyntax):
        decode_b64_line(line)


# -- CRAM-MD5 ---------------------------------------------------------------------------

def test_cram_challenge_t23():
    c = cram_challenge("mx.example.org", 4242, 1700000000.9)
    assert c == "<4242.1700000000@mx.example.org>"
    assert auth.encode_b64(c) == b64("<4242.1700000000@mx.example.org>")


def test_cram_response():
    digest = hmac.new(b"secret", b"<1.2@x>", hashlib.md5).hexdigest()
    assert decode_cram(b64("joe " + digest)) == ("joe", digest)
    # split at the first space; further spaces skipped like qmail-smtpd-auth
    assert decode_cram(b64("joe   " + digest)) == ("joe", digest)


@pytest.mark.parametrize("text", [
    "joe", "joe ", " " + "a" * 32, "joe " + "A" * 32, "joe " + "a" * 31, "joe " + "a" * 33,
    "joe " + "g" * 32, "joe " + "a" * 32 + " ", "j\0oe " + "a" * 32, "jo e " + "a" * 32,
])
def test_cram_malformed(text):
    with pytest.raises(AuthSyntax):
        decode_cram(b64(text))


def test_cram_bad_base64():
    with pytest.raises(AuthSyntax):
        decode_cram("not base64!")


# -- check(): the checkpassword call --------------------------------------------------------

@pytest.fixture
def fake(tmp_path):
    """A checkpassword program recording fd 3 and argv, then exiting with
    the code in $FAKE_EXIT (0 when the password is `secret`, else 1)."""
    script = tmp_path / "fakecheckpw"
    record = tmp_path / "record"
    script.write_text(textwrap.dedent("""\
        #!%s
        import os, sys
        data = b""
        while True:
            chunk = os.read(3, 512)
            if not chunk:
                break
            data += chunk
        with open(%r, "wb") as f:
            f.write(repr((data, sys.argv[1:], os.environ.get("FOO"))).encode())
        code = os.environ.get("FAKE_EXIT")
        if code is not None:
            sys.exit(int(code))
        sys.exit(0 if data.split(b"\\0")[1] == b"secret" else 1)
        """ % (sys.executable, str(record))))
    script.chmod(0o755)

    def recorded():
        return eval(record.read_bytes().decode())

    return str(script), recorded


def env(**kw):
    e = dict(os.environ)
    e.update(kw)
    return e


def test_check_ok_t19_fd3_and_argv(fake):
    prog, recorded = fake
    assert check([prog, "/bin/true"], "joe", "secret", env=env(FOO="bar")) == "ok"
    assert recorded() == (b"joe\0secret\0\0", ["/bin/true"], "bar")


def test_check_wrong_password_is_fail_without_sleeping(fake):
    prog, recorded = fake
    t = time.time()
    assert check([prog, "/bin/true"], "joe", "wrong") == "fail"
    assert time.time() - t < 3
    assert recorded()[0] == b"joe\0wrong\0\0"


def test_check_cram_t23_fd3(fake):
    prog, recorded = fake
    challenge = cram_challenge("mx.example.org", 4242, 1700000000)
    digest = hmac.new(b"secret", challenge.encode(), hashlib.md5).hexdigest()
    user, hexdigest = decode_cram(b64("joe " + digest))
    assert check([prog, "/bin/true"], user, hexdigest, challenge, env=env(FAKE_EXIT="0")) == "ok"
    assert recorded()[0] == b"joe\0%s\0<4242.1700000000@mx.example.org>\0" % digest.encode()


@pytest.mark.parametrize("code,result", [(0, "ok"), (1, "fail"), (2, "fail"), (111, "fail"),
                                         (100, "fail")])
def test_check_exit_codes(fake, code, result):
    prog, _ = fake
    assert check([prog], "joe", "secret", env=env(FAKE_EXIT=str(code))) == result


def test_check_killed_by_a_signal_is_crash():
    assert check(["sh", "-c", "kill -9 $$"], "joe", "secret") == "crash"


def test_check_timeout_is_crash():
    t = time.time()
    assert check(["sh", "-c", "sleep 10"], "joe", "secret", timeout=0.3) == "crash"
    assert time.time() - t < 5


def test_check_exec_failure_is_fail():
    assert check(["/nonexistent/checkpassword", "/bin/true"], "joe", "secret") == "fail"


def test_check_without_a_program_is_fail():
    assert check([], "joe", "secret") == "fail"


def test_check_nul_in_credentials_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    argv = ["sh", "-c", "touch %s" % marker]
    assert check(argv, "jo\0e", "secret") == "fail"
    assert check(argv, "joe", "sec\0ret") == "fail"
    assert not marker.exists()
    assert check(argv, "joe", "secret") == "ok" and marker.exists()


def test_check_end_to_end_with_eqmail_chkpw(tmp_path, monkeypatch):
    """check() running `python -m eqmail.chkpw --home HOME /bin/true` for real."""
    from eqmail import chkpw

    home = tmp_path / "home"
    (home / "users").mkdir(parents=True)
    (home / "users" / "passwd").write_bytes(
        chkpw.format_entry(b"joe", b"secret") + b"\n"
        + chkpw.format_entry(b"cram", b"s3cret", cram=True) + b"\n")
    os.chmod(home / "users" / "passwd", 0o640)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    e = env(PYTHONPATH=repo)
    argv = [sys.executable, "-m", "eqmail.chkpw", "--home", str(home), "/bin/true"]
    assert check(argv, *decode_plain("AGpvZQBzZWNyZXQ="), env=e) == "ok"
    assert check(argv, "joe", "wrong", env=e) == "fail"
    assert check(argv, "nobody", "secret", env=e) == "fail"
    challenge = cram_challenge("mx.example.org", 4242, 1700000000)
    good = hmac.new(b"s3cret", challenge.encode(), hashlib.md5).hexdigest()
    bad = hmac.new(b"wrong", challenge.encode(), hashlib.md5).hexdigest()
    assert check(argv, "cram", good, challenge, env=e) == "ok"
    assert check(argv, "cram", bad, challenge, env=e) == "fail"
    assert check(argv, "cram", "s3cret", env=e) == "ok"   # a cram user via PLAIN/LOGIN
