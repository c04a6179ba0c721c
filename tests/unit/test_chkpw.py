"""Unit tests for eqmail.chkpw: `eqmail chkpw` (checkpassword) and `eqmail passwd`.

Reference: the module docstring (FILES, EXIT CODES, SECURITY), the
checkpassword interface and checkpassword-0.90, RFC 2195, behaviour
reference section 3.2.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import os
import stat
import sys

import pytest

from helpers import as_test_user, give_to_user, user_dir
from eqmail import children, chkpw

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHALLENGE = b"<4242.1700000000@mx.example.org>"


@pytest.fixture
def home(tmp_path):
    (tmp_path / "users").mkdir()
    return str(tmp_path)


def passwd_file(home) -> str:
    return os.path.join(home, "users", "passwd")


def set_password(monkeypatch, home, *args, stdin=b"secret\n"):
    """Run `eqmail passwd ARGS --home HOME` with `stdin` on a pipe; the exit code."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return chkpw.cmd_passwd(list(args) + ["--home", home])


def run_chkpw(home, data=None, sub=("/bin/true",), env=None, use_home=True):
    """`python -m eqmail.chkpw [--home HOME] SUB...` with `data` on fd 3 (no fd 3 when None)."""
    argv = [sys.executable, "-m", "eqmail.chkpw"] + (["--home", home] if use_home else []) + list(sub)
    e = dict(os.environ, PYTHONPATH=REPO)
    e.update(env or {})
    if data is None:
        return children.run(argv, env=e, timeout=30)
    return children.run(argv, env=e, timeout=30, extra_fd=3, extra_data=data)


def digest(secret: bytes, challenge: bytes = CHALLENGE) -> bytes:
    return hmac.new(secret, challenge, hashlib.md5).hexdigest().encode()


def add_users(home, monkeypatch):
    """joe (scrypt, `secret`), cram (cram, `s3cret`), and a comment."""
    with open(passwd_file(home), "wb") as f:
        f.write(b"# SMTP AUTH users\n")
    os.chmod(passwd_file(home), 0o640)
    assert set_password(monkeypatch, home, "joe", stdin=b"secret\n") == 0
    assert set_password(monkeypatch, home, "cram", "--cram", stdin=b"s3cret\n") == 0
    return home


@pytest.fixture
def users(home, monkeypatch):
    """A home with add_users()'s password file."""
    return add_users(home, monkeypatch)


@pytest.fixture
def user_users(monkeypatch):
    """`users` in a directory the test user owns and can reach, for
    as_test_user() (root's tmp_path is out of its reach)."""
    with user_dir("eqmail-chkpw-") as home:
        os.mkdir(os.path.join(home, "users"))
        add_users(home, monkeypatch)
        give_to_user(home)
        yield home


# -- eqmail passwd ------------------------------------------------------------------------

def test_passwd_creates_the_file_mode_0640(home, monkeypatch):
    assert set_password(monkeypatch, home, "joe") == 0
    st = os.stat(passwd_file(home))
    assert stat.S_IMODE(st.st_mode) == 0o640
    data = open(passwd_file(home), "rb").read()
    user, scheme, rest = data.rstrip(b"\n").split(b":")
    assert (user, scheme) == (b"joe", b"scrypt") and data.count(b"\n") == 1
    n, r, p, salt, digest_ = rest.split(b"$")
    assert (n, r, p) == (b"16384", b"8", b"1")
    entry = chkpw.parse_line(data.rstrip(b"\n"))
    assert len(entry.salt) == 32 and len(entry.hash) == 32
    assert entry.hash == hashlib.scrypt(b"secret", salt=entry.salt, n=16384, r=8, p=1,
                                        maxmem=chkpw.SCRYPT_MAXMEM, dklen=32)
    assert not [n for n in os.listdir(os.path.join(home, "users")) if ".tmp." in n]


def test_passwd_creates_users_dir(tmp_path, monkeypatch):
    assert set_password(monkeypatch, str(tmp_path), "joe") == 0
    assert os.path.exists(passwd_file(str(tmp_path)))


def test_passwd_cram_stores_the_secret_base64(home, monkeypatch):
    assert set_password(monkeypatch, home, "ann", "--cram", stdin=b"a:b c\r\n") == 0
    assert open(passwd_file(home), "rb").read() == b"ann:cram:YTpiIGM=\n"


def test_passwd_update_keeps_other_lines_and_order(home, monkeypatch):
    with open(passwd_file(home), "wb") as f:
        f.write(b"# comment\nann:cram:YQ==\n\njoe:cram:b2xk\nbob:cram:Yg==\njoe:cram:ZHVw\n")
    os.chmod(passwd_file(home), 0o600)
    assert set_password(monkeypatch, home, "joe", "--cram", stdin=b"new") == 0
    assert open(passwd_file(home), "rb").read() == (
        b"# comment\nann:cram:YQ==\n\njoe:cram:bmV3\nbob:cram:Yg==\n")
    assert stat.S_IMODE(os.stat(passwd_file(home)).st_mode) == 0o640
    assert set_password(monkeypatch, home, "zed", "--cram", stdin=b"z\n") == 0
    assert open(passwd_file(home), "rb").read().endswith(b"bob:cram:Yg==\nzed:cram:eg==\n")


def test_passwd_delete(home, monkeypatch):
    with open(passwd_file(home), "wb") as f:
        f.write(b"ann:cram:YQ==\njoe:cram:b2xk\nbob:cram:Yg==")
    assert set_password(monkeypatch, home, "joe", "--delete", stdin=b"") == 0
    assert open(passwd_file(home), "rb").read() == b"ann:cram:YQ==\nbob:cram:Yg==\n"
    assert set_password(monkeypatch, home, "joe", "--delete", stdin=b"") == 1


@pytest.mark.parametrize("user", ["", "jo:e", "jo e", "jo\te", "jo\x01e", "#joe", "jo\x7fe"])
def test_passwd_bad_user_names(home, monkeypatch, user):
    with pytest.raises(SystemExit) as e:
        set_password(monkeypatch, home, user)
    assert e.value.code == 2
    assert not os.path.exists(passwd_file(home))


@pytest.mark.parametrize("stdin", [b"", b"\n", b"a\0b\n"])
def test_passwd_bad_passwords(home, monkeypatch, stdin):
    assert set_password(monkeypatch, home, "joe", stdin=stdin) == 2
    assert not os.path.exists(passwd_file(home))


def test_passwd_cram_and_delete_exclude_each_other(home, monkeypatch):
    with pytest.raises(SystemExit):
        set_password(monkeypatch, home, "joe", "--cram", "--delete")


def test_passwd_prompts_twice_on_a_terminal(home, monkeypatch):
    import getpass

    class Tty(io.TextIOWrapper):
        def isatty(self):
            return True

    answers = iter(["pw1", "pw1", "pw2", "other"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "stdin", Tty(io.BytesIO(b"")))
    assert chkpw.cmd_passwd(["joe", "--cram", "--home", home]) == 0
    assert open(passwd_file(home), "rb").read() == b"joe:cram:cHcx\n"
    assert chkpw.cmd_passwd(["joe", "--cram", "--home", home]) == 2
    assert open(passwd_file(home), "rb").read() == b"joe:cram:cHcx\n"


# -- verify() in process ------------------------------------------------------------------

def test_verify_same_work_for_every_user(users, monkeypatch):
    calls = []
    real = chkpw._scrypt
    monkeypatch.setattr(chkpw, "_scrypt", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    table = chkpw.load(passwd_file(users))
    assert chkpw.verify(table, b"joe", b"secret")
    assert not chkpw.verify(table, b"joe", b"wrong")
    assert not chkpw.verify(table, b"nobody", b"secret")
    assert chkpw.verify(table, b"cram", b"s3cret")
    assert not chkpw.verify(table, b"cram", b"wrong")
    assert calls == [b"secret", b"wrong", b"secret", b"s3cret", b"wrong"]


def test_verify_cram(users):
    table = chkpw.load(passwd_file(users))
    assert chkpw.verify(table, b"cram", digest(b"s3cret"), CHALLENGE)
    assert not chkpw.verify(table, b"cram", digest(b"s3cret"), b"<other@x>")
    assert not chkpw.verify(table, b"cram", digest(b"wrong"), CHALLENGE)
    # scrypt users and unknown users cannot use CRAM-MD5, even knowing the password
    assert not chkpw.verify(table, b"joe", digest(b"secret"), CHALLENGE)
    assert not chkpw.verify(table, b"nobody", digest(b"secret"), CHALLENGE)


def test_third_field_without_a_hex_digest_is_a_timestamp(users):
    table = chkpw.load(passwd_file(users))
    assert chkpw.verify(table, b"joe", b"secret", b"1700000000")
    assert chkpw.verify(table, b"cram", b"s3cret", b"<1.2@x>")


@pytest.mark.parametrize("line", [
    b"joe", b"joe:cram", b"joe:md5:abc", b"joe:cram:!!", b"joe:cram:", b"jo e:cram:YQ==",
    b"joe:scrypt:16384$8$1$YQ==", b"joe:scrypt:16385$8$1$YQ==$" + b"A" * 44,
    b"joe:scrypt:32768$8$1$YQ==$" + b"A" * 44, b"joe:scrypt:x$8$1$YQ==$" + b"A" * 44,
    b"joe:cram:YQ==:extra",
])
def test_malformed_lines(line):
    with pytest.raises(ValueError):
        chkpw.parse_line(line)


def test_comments_and_first_duplicate_wins(home):
    with open(passwd_file(home), "wb") as f:
        f.write(b"# x\n\n  \njoe:cram:YQ==\r\njoe:cram:Yg==\n")
    os.chmod(passwd_file(home), 0o600)
    table = chkpw.load(passwd_file(home))
    assert list(table) == [b"joe"] and table[b"joe"].secret == b"a"


# -- eqmail chkpw as a program --------------------------------------------------------------

def test_chkpw_right_password_runs_the_subprogram(users):
    sub = [sys.executable, "-c", "import os, sys; sys.exit(7 if os.environ['USER'] == 'joe' else 8)"]
    f = run_chkpw(users, b"joe\0secret\0\0", sub)
    assert f.code == 7, f.stderr
    assert run_chkpw(users, b"joe\0secret\0\0").code == 0
    assert run_chkpw(users, b"joe\0secret\0\0", sub=()).code == 0


def test_chkpw_wrong_password_and_unknown_user(users):
    assert run_chkpw(users, b"joe\0wrong\0\0").code == 1
    assert run_chkpw(users, b"nobody\0secret\0\0").code == 1
    assert run_chkpw(users, b"\0secret\0\0").code == 1


def test_chkpw_cram_md5(users):
    assert run_chkpw(users, b"cram\0" + digest(b"s3cret") + b"\0" + CHALLENGE + b"\0").code == 0
    assert run_chkpw(users, b"cram\0" + digest(b"wrong") + b"\0" + CHALLENGE + b"\0").code == 1
    assert run_chkpw(users, b"joe\0" + digest(b"secret") + b"\0" + CHALLENGE + b"\0").code == 1


def test_chkpw_cram_user_via_plain(users):
    assert run_chkpw(users, b"cram\0s3cret\0\0").code == 0
    assert run_chkpw(users, b"cram\0s3cre\0\0").code == 1


def test_chkpw_home_from_environment(users):
    f = run_chkpw(users, b"joe\0secret\0\0", env={"EQMAIL_HOME": users}, use_home=False)
    assert f.code == 0, f.stderr


def test_chkpw_refuses_a_world_readable_file(users):
    os.chmod(passwd_file(users), 0o644)
    f = run_chkpw(users, b"joe\0secret\0\0")
    assert f.code == 111
    assert b"world-readable" in f.stderr and f.stderr.count(b"\n") == 1


def test_chkpw_malformed_file_is_temporary(users):
    with open(passwd_file(users), "ab") as f:
        f.write(b"broken line\n")
    f = run_chkpw(users, b"joe\0secret\0\0")
    assert f.code == 111 and b"line 4" in f.stderr


def test_chkpw_missing_file_means_no_users(home):
    assert run_chkpw(home, b"joe\0secret\0\0").code == 1


def test_chkpw_unreadable_file_is_temporary(user_users):
    # root reads any file: as root, chkpw runs as the unprivileged test user
    assert as_test_user(run_chkpw, user_users, b"joe\0secret\0\0").code == 0
    os.chmod(passwd_file(user_users), 0o000)
    f = as_test_user(run_chkpw, user_users, b"joe\0secret\0\0")
    assert f.code == 111 and b"unable to open" in f.stderr and f.stderr.count(b"\n") == 1


def test_chkpw_misuse(users):
    f = run_chkpw(users, None)
    assert f.code == 2 and b"descriptor 3" in f.stderr
    assert run_chkpw(users, b"joe").code == 2
    assert run_chkpw(users, b"joe\0secret").code == 2


def test_chkpw_input_of_512_bytes_or_more_is_refused(users):
    pad = b"x" * (512 - len(b"joe\0secret\0\0"))
    assert run_chkpw(users, b"joe\0secret\0" + pad[:-1] + b"\0").code == 0   # 511 bytes
    assert run_chkpw(users, b"joe\0secret\0" + pad + b"\0").code == 1        # 512 bytes


def test_chkpw_subprogram_that_cannot_run(users):
    f = run_chkpw(users, b"joe\0secret\0\0", sub=["/nonexistent/prog"])
    assert f.code == 111 and b"/nonexistent/prog" in f.stderr
