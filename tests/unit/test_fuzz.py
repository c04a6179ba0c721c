"""Property-based fuzzing of the parsers hostile input reaches (issue 8,
battery 5): the SMTP command parser driven through Session.dispatch and
Session.run, dot-qmail handling (delivery.local.deliver), users/assign
(delivery.users.Assignments.from_assign), smtproutes and smtprules lines
(control.parse_smtproute / parse_smtprule).

The property everywhere: every input gets an answer -- a reply, a clean
close, a value or the module's own error (ConfigError) -- and no other
exception escapes.  Addresses and control files in general have their own
hypothesis tests in test_address.py and test_control.py.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eqmail import control, log
from eqmail.control import ConfigError, parse_smtproute, parse_smtprule
from eqmail.delivery import DEFERRAL, FAILURE, SUCCESS, Result
from eqmail.delivery.local import LocalResult, deliver, maildirmake
from eqmail.delivery.users import Assignments, Target
from eqmail.queue.store import Store
from eqmail.smtp import reply, session
from eqmail.smtp.reply import Reply
from eqmail.smtp.session import Disconnect, Session

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# -- shared fixtures (module-level, not function-scoped: hypothesis reruns the body) ------

_BASE = tempfile.mkdtemp(prefix="eqmail-fuzz-")


def teardown_module(module):
    shutil.rmtree(_BASE, ignore_errors=True)


def _home(name: str) -> str:
    home = os.path.join(_BASE, name)
    cdir = os.path.join(home, "control")
    os.makedirs(cdir, exist_ok=True)
    for fname, text in {"me": "mx.example.org\n", "locals": "mx.example.org\nlocalhost\n",
                        "rcpthosts": "mx.example.org\nlocalhost\nexample.org\n.example.net\n",
                        "badmailfrom": "spam@bad.com\n@evil.com\n.spammer.org\n",
                        "databytes": "100000\n"}.items():
        with open(os.path.join(cdir, fname), "w") as f:
            f.write(text)
    return home


_SMTP_HOME = _home("smtp")
_SMTP_CONFIG = control.load(_SMTP_HOME)
_STORE = Store.open(_SMTP_HOME)
_LOCAL_HOME = _home("local")
_LOCAL_CONFIG = control.load(_LOCAL_HOME)


@contextlib.contextmanager
def _watch_alerts():
    """Record log.alert() calls (the session logs internal errors there) and
    make failed AUTH answer at once."""
    alerts = []
    saved = (log.alert, session.AUTH_FAIL_DELAY)
    log.alert = alerts.append
    session.AUTH_FAIL_DELAY = 0
    try:
        yield alerts
    finally:
        log.alert, session.AUTH_FAIL_DELAY = saved


class _Transport:
    def __init__(self, data: bytes = b""):
        self.data = data
        self.out = bytearray()

    def recv(self, n):
        piece, self.data = self.data[:n], self.data[n:]
        return piece

    def send(self, data):
        self.out += data


# -- 1. the SMTP command parser -------------------------------------------------------------

_VERBS = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP", "QUIT",
          "AUTH", "STARTTLS", "mail", "Rcpt", "ehlo", "EXPN", "BDAT", "GET", "POST", "TURN",
          "X", ""]
_no_lf = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))
_path_text = st.text(max_size=40).map(lambda t: t.replace("\n", ""))
_paths = st.one_of(
    _path_text.map(lambda t: "FROM:<%s>" % t), _path_text.map(lambda t: "TO:<%s>" % t),
    _path_text.map(lambda t: "FROM:%s" % t), _path_text.map(lambda t: "TO:<%s" % t),
    st.tuples(_path_text, _path_text).map(lambda p: "FROM:<%s> %s" % p),
    st.tuples(_path_text, st.sampled_from(["SIZE=", "SIZE=99999999999", "SIZE=x", "BODY=8BITMIME",
                                           "AUTH=<>", "SMTPUTF8"])).map(
        lambda p: "FROM:<%s> %s" % p),
    st.sampled_from(["TO:<postmaster>", "TO:<>", "FROM:<>", "TO:<@a,@b:u@localhost>",
                     'TO:<"a>b"@localhost>', "TO:<u@[127.0.0.1]>", "TO:<u@[IPv6:::1]>",
                     "PLAIN", "LOGIN", "CRAM-MD5", "PLAIN AGpvZQBwdw==", "PLAIN =", "LOGIN *"]))
_args = st.one_of(_paths.map(lambda t: t.encode("utf-8", "surrogatepass")), _no_lf)


@st.composite
def command_line(draw):
    """One command line (no LF inside) ending in CRLF, LF or CR LF."""
    if draw(st.integers(0, 9)) == 0:
        body = draw(_no_lf)
    else:
        verb = draw(st.sampled_from(_VERBS)).encode()
        sep = draw(st.sampled_from([b" ", b"", b"  ", b"\t", b" \r"]))
        body = verb + sep + draw(_args)
    return body + draw(st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]))


def _session(data=b"", relay=False, checkpassword=None):
    t = _Transport(data)
    env = {"TCPREMOTEIP": "192.0.2.1", "TCPLOCALIP": "198.51.100.1"}
    if relay:
        env["RELAYCLIENT"] = ""
    s = Session(_SMTP_CONFIG, _STORE, t.recv, t.send, env,
                checkpassword=checkpassword)
    return s, t


@FUZZ
@given(st.lists(command_line(), max_size=25), st.booleans())
@example([b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<u@localhost>\r\n", b"DATA\r\n"], False)
@example([b"AUTH PLAIN\r\n"], False)
@example([b"\r\n", b" \r\n", b"\x00\r\n", b"HELO \xff\xfe\r\n"], True)
def test_dispatch_every_line_gets_a_reply_or_a_clean_close(lines, relay):
    """Session.dispatch on arbitrary lines: a Reply (or None when the verb
    answered itself), or Disconnect (the client went away: here, DATA and
    AUTH read from an empty transport) -- never another exception."""
    with _watch_alerts() as alerts:
        s, t = _session(relay=relay, checkpassword=["/bin/false"])
        for line in lines:
            try:
                r = s.dispatch(line)
            except Disconnect:
                break
            assert r is None or isinstance(r, Reply), r
            if r is not None:
                rendered = r.render(s.esmtp)
                assert rendered.endswith(b"\r\n") and rendered[:3].isdigit() or r.code == 0
                if r.close:
                    break
    assert alerts == []


@st.composite
def client_stream(draw):
    parts = draw(st.lists(st.one_of(command_line(), command_line(), _no_lf,
                                    st.just(b"DATA\r\n"), st.just(b".\r\n"),
                                    st.just(b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@localhost>"
                                            b"\r\nDATA\r\n"),
                                    st.binary(max_size=300)),
                          max_size=20))
    return b"".join(parts)


@FUZZ
@given(client_stream(), st.booleans())
@example(b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
         False)
@example(b"NOOP " + b"x" * 3000 + b"\r\nNOOP\r\n", False)
def test_run_on_arbitrary_bytes_never_hits_an_internal_error(data, relay):
    """Session.run over arbitrary client bytes: well-formed replies only,
    and never the 451 internal-error answer (a caught exception)."""
    with _watch_alerts() as alerts:
        s, t = _session(data, relay=relay)
        s.run()
    out = bytes(t.out)
    assert out.startswith(b"220 ")
    assert out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), line
    assert reply.INTERNAL.text.encode() not in out
    assert alerts == []


# -- 2. dot-qmail handling ------------------------------------------------------------------

_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10)
_safe_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)
_dq_line = st.one_of(
    _safe_text.map(lambda t: "#" + t),                                  # comment
    st.just(""),                                                        # blank
    st.builds(lambda n, slash: "./" + n + ("/" if slash else ""), _name, st.booleans()),
    st.builds(lambda n, slash: "{HOME}/" + n + ("/" if slash else ""), _name, st.booleans()),
    st.sampled_from(["./Maildir/", "./mbox", "./Maildir", "./mbox/", "./../eqfuzz-out/",
                     "./../eqfuzz-out", "./a/../../eqfuzz-out", "/nonexistent-eqfuzz/Maildir/",
                     "/nonexistent-eqfuzz/mbox", "{HOME}/../eqfuzz-out", "./", ".", "./.",
                     "./Maildir/ \t", "./Maildir/\r", "+", "&", "&+x"]),
    _safe_text.map(lambda t: "&" + t),                                  # forward
    st.builds(lambda a, b: a + "@" + b, _name, _name),                 # bare forward
    _safe_text.filter(lambda t: not t.lstrip(" \t")[:1] in ("|", "/", ".")
                      and not t[:1] in ("|", "/", ".")),
)
_modes = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o666, 0o664, 0o444])
_ext = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)

_counter = [0]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(_dq_line, max_size=8), st.booleans(), _modes, st.booleans(), _ext,
       st.booleans(), st.booleans())
@example(["./Maildir/", "&joe@example.org"], True, 0o644, False, "", False, False)
@example(["./../eqfuzz-out/"], True, 0o644, False, "", False, False)
@example(["", "./Maildir/"], True, 0o644, False, "", False, False)
def test_dot_qmail_contents_always_give_a_result(lines, final_newline, mode, extension, ext,
                                                 dotted_ext, sticky_home):
    """Random comment / file / forward lines in a .qmail (never programs):
    deliver() returns a LocalResult whose Result is success, deferral or
    failure, and nothing appears outside the home."""
    _counter[0] += 1
    work = os.path.join(_BASE, "dq%d" % _counter[0])
    home = os.path.join(work, "home")
    os.makedirs(home)
    try:
        os.chmod(home, 0o1755 if sticky_home else 0o755)
        maildirmake(os.path.join(home, "Maildir"))
        text = "\n".join(l.replace("{HOME}", home) for l in lines)
        if final_newline:
            text += "\n"
        ext_value = ("a." + ext) if dotted_ext else ext
        dqname = ".qmail" + (("-" + ext_value.lower().replace(".", ":")) if extension else "")
        if "/" not in dqname and len(dqname.encode("utf-8", "surrogatepass")) < 250:
            with open(os.path.join(home, dqname), "w", encoding="utf-8",
                      errors="surrogatepass") as f:
                f.write(text)
            os.chmod(os.path.join(home, dqname), mode)
        target = Target("fuzz", os.getuid(), os.getgid(), home,
                        "-" if extension else "", ext_value if extension else "")
        msg = io.BytesIO(b"Subject: fuzz\n\nbody\nFrom me\n")
        got = deliver(_LOCAL_CONFIG, msg, "sender@example.org", "fuzz", "localhost", target,
                      confined=True)
        assert isinstance(got, LocalResult)
        assert isinstance(got.result, Result)
        assert got.result.kind in (SUCCESS, DEFERRAL, FAILURE)
        assert isinstance(got.result.text, str) and "\n" not in got.result.text
        assert all(isinstance(a, str) for a in got.forwards)
        assert sorted(os.listdir(work)) == ["home"]
        assert not os.path.exists("/nonexistent-eqfuzz")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- 3. users/assign -----------------------------------------------------------------------

_field = st.one_of(st.text(max_size=12).map(lambda t: t.replace("\n", "").replace(":", "")),
                   st.sampled_from(["", "0", "1000", "-1", "1e3", "\u0661", "/home/x", "x",
                                    "99999999999999999999", "-", "+"]))


@st.composite
def assign_line(draw):
    if draw(st.integers(0, 5)) == 0:
        return draw(st.text(max_size=60)).replace("\n", "")
    kind = draw(st.sampled_from(["=", "+", "", "x", "#"]))
    fields = draw(st.lists(_field, min_size=0, max_size=9))
    line = kind + ":".join(fields)
    if draw(st.booleans()):
        line += ":"
    return line


@st.composite
def assign_file(draw):
    if draw(st.integers(0, 6)) == 0:
        return draw(st.binary(max_size=300))
    lines = draw(st.lists(assign_line(), max_size=8))
    if draw(st.booleans()):
        lines.append(".")
    if draw(st.booleans()):
        lines += draw(st.lists(assign_line(), max_size=2))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@FUZZ
@given(assign_file(), st.lists(st.text(max_size=20), max_size=5))
@example(b"=joe:joe:1000:1000:/home/joe:::\n+joe+:joe:1000:1000:/home/joe:-::\n.\n",
         ["joe", "joe+x", "JOE+Y", "other"])
@example(b"+:alias:1000:1000:/var/qmail/alias:-::\n.\n", ["anything"])
@example(b"\xff\xfe\n.\n", [])
def test_users_assign_parses_or_raises_config_error(data, locals_):
    path = os.path.join(_BASE, "assign")
    with open(path, "wb") as f:
        f.write(data)
    try:
        a = Assignments.from_assign(path)
    except ConfigError as e:
        assert "line" in str(e)
        return
    assert isinstance(a, Assignments)
    for local in locals_:
        t = a.lookup(local)
        assert t is None or isinstance(t, Target)
        if t is not None:
            assert isinstance(t.uid, int) and isinstance(t.gid, int)
            assert t.home.startswith("/")
    # users/cdb (eqmail newu) answers the same look-ups
    cdb = os.path.join(_BASE, "cdb")
    a.write_cdb(cdb, list(a.table.items()))
    b = Assignments.from_cdb(cdb)
    for local in locals_:
        assert b.lookup(local) == a.lookup(local)


# -- 4. smtproutes and smtprules lines ------------------------------------------------------

_host = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", "smtp.example.net", "[192.0.2.7]", "[2001:db8::25]", "[::1", "[x]", "127.0.0.1",
     "[127.0.0.1]"]))
_port = st.one_of(st.just(""), st.integers(-5, 70000).map(lambda n: ":%d" % n),
                  st.text(max_size=6).map(lambda t: ":" + t))


@st.composite
def route_line(draw):
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=80)), None
    key = draw(st.one_of(st.sampled_from(["", "example.com", ".example.com", "EXAMPLE.com"]),
                         st.text(max_size=15)))
    line = key + draw(st.sampled_from([":", ":", "", "::"])) + draw(_host) + draw(_port)
    password = None
    if draw(st.booleans()):
        password = "Pw" + draw(st.text(alphabet="QZXJqzxj", min_size=8, max_size=12))
        line += " " + draw(st.sampled_from(["user", "", "a b"])) + " " + password
    return line, password


@FUZZ
@given(route_line())
@example((":[2001:db8::25]:587 user secret pass", None))
@example(("example.com:[192.0.2.7]:0", None))
@example(("x:[::1]:99999 u PwQQQQQQQQQQ", "PwQQQQQQQQQQ"))
def test_smtproute_lines_parse_or_raise_config_error(case):
    line, password = case
    try:
        r = parse_smtproute("control/smtproutes", 3, line)
    except ConfigError as e:
        assert str(e).startswith("control/smtproutes line 3: ")
        if password is not None:
            assert password not in str(e)  # credentials never quoted
        return
    assert isinstance(r, control.SmtpRoute)
    assert 0 < r.port < 65536
    if password is not None:
        assert password not in repr(r)


_rule_pattern = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", "127.0.0.1", "192.168.1.", "10.0.0.0/8", "[::1]", "2001:db8::/32", "1.2.3.4/99",
     "::ffff:1.2.3.4", "a.b.", "1..", "300.1.1.1"]))
_rule_env = st.lists(st.one_of(
    st.text(max_size=15),
    st.tuples(st.sampled_from(["RELAYCLIENT", "DATABYTES", "TLSREQUIRED", "NOSPP", "x-y", "",
                               "1A"]),
              st.text(max_size=10)).map(lambda kv: '%s="%s"' % kv)), max_size=4)


@st.composite
def rule_line(draw):
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=80))
    action = draw(st.sampled_from(["allow", "deny", "Allow", "", "permit"]))
    env = draw(_rule_env)
    return draw(_rule_pattern) + ":" + action + "".join("," + e for e in env)


@FUZZ
@given(rule_line())
@example('127.0.0.1:allow,RELAYCLIENT=""')
@example("10.0.0.0/8:deny")
@example(":allow,TLSREQUIRED=\"1\"")
@example("[::1]:allow,")
def test_smtprule_lines_parse_or_raise_config_error(line):
    try:
        r = parse_smtprule("control/smtprules", 7, line)
    except ConfigError as e:
        assert str(e).startswith("control/smtprules line 7: ")
        return
    assert isinstance(r, control.ClientRule)
    assert isinstance(r.allow, bool)
    for name, value in r.env:
        assert isinstance(name, str) and isinstance(value, str)


def test_users_assign_nul_in_a_field_never_makes_deliver_raise():
    path = os.path.join(_BASE, "assign-nul")
    with open(path, "wb") as f:
        f.write(b"=joe:joe:%d:%d:/ho\0me:::\n.\n" % (os.getuid(), os.getgid()))
    try:
        a = Assignments.from_assign(path)
    except ConfigError:
        return  # refused as malformed: fine
    target = a.lookup("joe")
    got = deliver(_LOCAL_CONFIG, io.BytesIO(b"Subject: x\n\nx\n"), "s@example.org", "joe",
                  "localhost", target, confined=True)
    assert isinstance(got, LocalResult) and got.result.kind == DEFERRAL
