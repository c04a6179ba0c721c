"""Unit tests for eqmail.smtp.spp (qmail-spp).

Reference: behaviour reference section 4 (qmail-spp), section 10 bugs 1
and 2, test vectors T25-T30.  Plugins are small shell scripts in a
throwaway home under bin/plugins/.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from helpers import as_test_user, give_to_user
from eqmail.smtp import spp
from eqmail.smtp.spp import Plugin, Plugins, SppConfigError, run_section


@pytest.fixture
def home():
    d = tempfile.mkdtemp(prefix="eqmail-spp-")
    os.makedirs(os.path.join(d, "control"))
    os.makedirs(os.path.join(d, "bin", "plugins"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def base_env(**extra):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TCPREMOTEIP": "192.0.2.1"}
    env.update(extra)
    return env


def plugin(home, name, body):
    """Write bin/plugins/<name> (a sh script), return its plugin line."""
    path = os.path.join(home, "bin", "plugins", name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return "bin/plugins/" + name


def config(home, text, name="smtpplugins"):
    with open(os.path.join(home, "control", name), "w") as f:
        f.write(text)


def load(home, **env):
    return Plugins.load(home, base_env(**env))


def run(home, section, *bodies, timeout=10.0, env=None):
    """One section with one plugin per body; returns the Outcome."""
    lines = [plugin(home, "p%d" % i, body) for i, body in enumerate(bodies)]
    config(home, "[%s]\n%s\n" % (section, "\n".join(lines)))
    plugins = load(home)
    return run_section(plugins, section, home, env or base_env(), timeout=timeout)


# -- loading -----------------------------------------------------------------------

def test_sections_by_second_character(home):
    config(home, "bin/before\n[connection]\nbin/c\n[Connection]\nbin/ignored\n"
                 "[h]\nbin/h\n[mail]\nbin/m\n# [rcpt] comment\n\n[rcpt]   \nbin/r  \n"
                 "[data]\n:bin/d one two\n[auth]\nbin/a b c\n[x]\nbin/x\n")
    p = load(home)
    assert [pl.line for pl in p.get("connection")] == ["bin/c"]
    assert [pl.line for pl in p.get("helo")] == ["bin/h"]
    assert [pl.line for pl in p.get("mail")] == ["bin/m"]
    assert [pl.line for pl in p.get("rcpt")] == ["bin/r"]
    assert p.get("data") == (Plugin(":bin/d one two", ("/bin/sh", "-c", "bin/d one two")),)
    # spaces are part of the file name for a plain plugin line
    assert p.get("auth") == (Plugin("bin/a b c", ("bin/a b c",)),)
    assert set(p.sections) == set(spp.SECTIONS)
    every = [pl.line for s in spp.SECTIONS for pl in p.get(s)]
    assert "bin/before" not in every and "bin/ignored" not in every and "bin/x" not in every


def test_section_char_is_case_sensitive(home):
    config(home, "[Helo]\nbin/x\n[HELO]\nbin/y\n")
    assert all(load(home).get(s) == () for s in spp.SECTIONS)


def test_missing_file_means_no_plugins(home):
    assert load(home) is None


def test_missing_home_means_no_plugins(home):
    assert Plugins.load(os.path.join(home, "nope"), base_env()) is None


def test_nospp_any_value_disables(home):
    config(home, "[helo]\nbin/h\n")
    assert load(home, NOSPP="") is None
    assert load(home, NOSPP="1") is None
    assert load(home) is not None


def test_sppconffile_overrides_path(home):
    config(home, "[helo]\nbin/default\n")
    config(home, "[helo]\nbin/other\n", name="other")
    assert [p.line for p in load(home, SPPCONFFILE="control/other").get("helo")] == ["bin/other"]
    absolute = os.path.join(home, "control", "other")
    assert [p.line for p in load(home, SPPCONFFILE=absolute).get("helo")] == ["bin/other"]
    # empty SPPCONFFILE: the default file
    assert [p.line for p in load(home, SPPCONFFILE="").get("helo")] == ["bin/default"]
    assert load(home, SPPCONFFILE="control/missing") is None


def test_unreadable_directory_raises(home):
    os.makedirs(os.path.join(home, "control", "smtpplugins"))
    with pytest.raises(SppConfigError) as e:
        load(home)
    assert "smtpplugins" in str(e.value)


def read_text(path):
    with open(path) as f:
        return f.read()


def test_unreadable_permission_raises(home):
    # root reads mode 000 files: as root, load() runs as the unprivileged test
    # user, who owns the home (under /tmp, which it can traverse)
    config(home, "[helo]\nbin/h\n")
    path = os.path.join(home, "control", "smtpplugins")
    give_to_user(home)
    assert as_test_user(read_text, path) == "[helo]\nbin/h\n"
    os.chmod(path, 0)
    with pytest.raises(SppConfigError) as e:
        as_test_user(load, home)
    assert str(e.value).startswith(path + ": cannot read: ")


def test_undecodable_raises(home):
    with open(os.path.join(home, "control", "smtpplugins"), "wb") as f:
        f.write(b"[helo]\nbin/\xff\n")
    with pytest.raises(SppConfigError):
        load(home)


# -- running: verdicts ---------------------------------------------------------------

def test_no_output_continues(home):
    o = run(home, "helo", "exit 0\n", "exit 3\n")
    assert (o.verdict, o.reply) == ("continue", None)


def test_E_rejects_with_text_as_printed(home):
    o = run(home, "mail", "echo 'E554 go away'\n")
    assert (o.verdict, o.reply) == ("reject", "554 go away")


def test_R_closes_with_text(home):
    o = run(home, "connection", "echo 'R421 bye'\n")
    assert (o.verdict, o.reply) == ("close", "421 bye")


@pytest.mark.parametrize("letter, verdict", [("A", "accept"), ("N", "next"),
                                             ("O", "override"), ("D", "drop")])
def test_stop_letters(home, letter, verdict):
    marker = os.path.join(home, "second-ran")
    o = run(home, "mail", "echo %s\necho 'E550 not read'\n" % letter,
            "touch %s\necho 'E550 second'\n" % marker)
    assert (o.verdict, o.reply) == (verdict, None)
    assert not os.path.exists(marker)


def test_reading_stops_at_first_decision(home):
    o = run(home, "rcpt", "echo 'HX-A: 1'\necho 'E550 first'\necho 'HX-B: 2'\necho 'SFOO=x'\n")
    assert (o.verdict, o.reply) == ("reject", "550 first")
    assert o.headers == ["X-A: 1"] and o.set_env == {}


def test_later_plugins_run_when_earlier_say_nothing(home):
    o = run(home, "helo", "echo 'HX-One: 1'\n", "echo 'E553 second'\n")
    assert (o.verdict, o.reply, o.headers) == ("reject", "553 second", ["X-One: 1"])


def test_lowercase_letters_are_not_commands(home):
    o = run(home, "mail", "echo 'e550 no'\necho 'a'\necho 'n'\n")
    assert o.verdict == "continue"
    assert sum("unknown command" in l for l in o.logs) == 3


def test_reply_without_code_gets_451(home):
    o = run(home, "mail", "echo 'Esorry no code'\n")
    assert o.reply == "451 sorry no code"
    assert any("451" in l for l in o.logs)


def test_continuation_reply_becomes_final(home):
    o = run(home, "mail", "echo 'E550-more'\n")
    assert o.reply == "550 more"


def test_reply_texts_sanitised(home):
    o = run(home, "mail", r"printf 'E550 a\rb\001c\303\251\n'" + "\n")
    assert o.reply == "550 ab?c?"


# -- running: side effects ---------------------------------------------------------------

def test_P_lines_sent_as_given(home):
    o = run(home, "data", "echo 'P250-note from plugin'\necho 'P250-two'\n")
    assert o.verdict == "continue" and o.partial == ["250-note from plugin", "250-two"]


def test_H_lines_validated(home):
    o = run(home, "data", "echo 'HX-Spp: yes'\necho 'Hnot a header'\necho 'H orphan'\n"
                          "echo 'H: empty name'\necho 'HX-Long: a'\nprintf 'H\\tcontinued\\n'\n"
                          "echo N\necho 'H after stop'\n")
    assert o.headers == ["X-Spp: yes", "X-Long: a", "\tcontinued"]
    assert sum("not a header" in l for l in o.logs) == 3


def test_S_and_U(home):
    o = run(home, "helo", "echo SFOO=bar\necho STLSREQUIRED=1\necho URELAYCLIENT\n"
                          "echo 'S1BAD=x'\necho 'SNOEQUALS'\necho 'Ubad-name'\necho SEMPTY=\n")
    assert o.set_env == {"FOO": "bar", "TLSREQUIRED": "1", "EMPTY": ""}
    assert o.unset_env == ["RELAYCLIENT"]
    assert sum("bad S line" in l or "bad U line" in l for l in o.logs) == 3


def test_S_then_U_nets_out(home):
    o = run(home, "helo", "echo SFOO=1\necho UFOO\necho UBAR\necho SBAR=2\n")
    assert o.set_env == {"BAR": "2"} and o.unset_env == ["FOO"]


def test_S_U_visible_to_later_plugins(home):
    o = run(home, "data", "echo SFOO=bar\necho UTCPREMOTEIP\n",
            'echo "HX-Foo: $FOO"\necho "HX-Ip: ${TCPREMOTEIP-unset}"\n')
    assert o.headers == ["X-Foo: bar", "X-Ip: unset"]


def test_environment_passed(home):
    o = run(home, "mail", 'echo "E553 $TCPREMOTEIP $SMTPMAILFROM"\n',
            env=base_env(SMTPMAILFROM="a@b.c"))
    assert o.reply == "553 192.0.2.1 a@b.c"


def test_rcpt_section_runs_with_its_variables(home):
    env = base_env(SMTPRCPTTO="u@example.org", SMTPRCPTCOUNT="1",
                   SMTPRCPTCOUNTALL="2", SMTPRCPTHOSTSOK="1")
    o = run(home, "rcpt", 'echo "E550 $SMTPRCPTTO $SMTPRCPTCOUNT $SMTPRCPTCOUNTALL '
                          '$SMTPRCPTHOSTSOK"\n', env=env)
    assert o.reply == "550 u@example.org 1 2 1"


def test_cwd_is_home_and_stdin_empty(home):
    o = run(home, "helo", 'echo "HX-Dir: $(pwd -P)"\necho "HX-In: $(cat)."\n')
    assert o.headers == ["X-Dir: " + os.path.realpath(home), "X-In: ."]


def test_C_in_mail_and_rcpt_only(home):
    assert run(home, "mail", "echo Cchanged@example.org\n").change_address == "changed@example.org"
    assert run(home, "rcpt", "echo 'C<x@example.org>'\n").change_address == "x@example.org"
    assert run(home, "mail", "echo C\n").change_address == ""  # the null sender
    o = run(home, "data", "echo Cx@example.org\n")
    assert o.change_address is None and any("C ignored" in l for l in o.logs)
    o = run(home, "rcpt", "echo 'Ca b@example.org'\n")
    assert o.change_address is None and any("bad address" in l for l in o.logs)


def test_later_replies(home):
    o = run(home, "helo", "echo 'LM550 later mail'\necho 'LR550 x'\necho 'LD554 later data'\n"
                          "echo 'LXnothing'\n")
    assert o.verdict == "continue"
    assert o.later == {"mail": "550 later mail", "rcpt": "550 x", "data": "554 later data"}
    assert any("unknown command" in l for l in o.logs)


def test_stderr_logged(home):
    o = run(home, "helo", "echo 'looking at it' >&2\necho N\n")
    assert o.verdict == "next"
    assert any("bin/plugins/p0" in l and "looking at it" in l for l in o.logs)


def test_last_line_without_newline_kept_whole(home):
    o = run(home, "mail", "printf 'E553 no newline'\n")
    assert o.reply == "553 no newline"


def test_output_bounded(home):
    o = run(home, "data", "i=0\nwhile [ $i -lt 300 ]; do echo \"HX-N: $i\"; i=$((i+1)); done\n"
                          "echo 'E550 too late'\n")
    assert len(o.headers) == spp.MAX_LINES and o.verdict == "continue"
    assert any("more than" in l for l in o.logs)
    o = run(home, "mail", "printf 'E550 '; head -c 5000 /dev/zero | tr '\\0' x; echo\n")
    assert len(o.reply) == spp.MAX_LINE - 1 and any("cut" in l for l in o.logs)


# -- failures ------------------------------------------------------------------------------

def test_exit_120(home):
    o = run(home, "helo", "echo 'HX-Lost: 1'\nexit 120\n")
    assert (o.verdict, o.reply) == (
        "reject", "451 qmail-spp failure: bin/plugins/p0: can't execute (#4.3.0)")
    assert o.headers == []


def test_other_exit_codes_ignored(home):
    o = run(home, "helo", "echo 'E550 still'\nexit 1\n")
    assert o.reply == "550 still"


def test_missing_or_not_executable_plugin(home):
    config(home, "[helo]\nbin/plugins/argsE one two\n")
    o = run_section(load(home), "helo", home, base_env())
    assert o.reply == "451 qmail-spp failure: bin/plugins/argsE one two: can't execute (#4.3.0)"
    path = plugin(home, "noexec", "echo N\n")
    os.chmod(os.path.join(home, path), 0o644)
    config(home, "[helo]\n%s\n" % path)
    o = run_section(load(home), "helo", home, base_env())
    assert o.reply == "451 qmail-spp failure: bin/plugins/noexec: can't execute (#4.3.0)"


def test_bad_interpreter_cannot_execute(home):
    path = os.path.join(home, "bin", "plugins", "badshebang")
    with open(path, "w") as f:
        f.write("#!/nonexistent/interpreter\necho N\n")
    os.chmod(path, 0o755)
    config(home, "[helo]\nbin/plugins/badshebang\n")
    o = run_section(load(home), "helo", home, base_env())
    assert o.verdict == "reject" and "can't execute" in o.reply


def test_shell_form_takes_arguments(home):
    plugin(home, "argsE", 'echo "E451 temp $1 $2"\n')
    config(home, "[helo]\n:bin/plugins/argsE one two\n")
    o = run_section(load(home), "helo", home, base_env())
    assert o.reply == "451 temp one two"


def test_crash(home):
    o = run(home, "mail", "echo 'E550 never'\nkill -9 $$\n")
    assert (o.verdict, o.reply) == (
        "reject", "451 qmail-spp failure: bin/plugins/p0: child crashed (#4.3.0)")


def test_timeout(home):
    marker = os.path.join(home, "second-ran")
    t = time.time()
    o = run(home, "rcpt", "sleep 10\n", "touch %s\n" % marker, timeout=0.5)
    assert time.time() - t < 5
    assert (o.verdict, o.reply) == (
        "reject", "451 qmail-spp failure: bin/plugins/p0: timeout (#4.3.0)")
    assert not os.path.exists(marker)
    assert any("timeout" in l for l in o.logs)


def test_failure_keeps_earlier_plugins_effects(home):
    o = run(home, "data", "echo 'HX-First: 1'\n", "exit 120\n")
    assert o.verdict == "reject" and o.headers == ["X-First: 1"]


def test_empty_or_unknown_section(home):
    config(home, "[helo]\n")
    assert run_section(load(home), "helo", home, base_env()).verdict == "continue"
    with pytest.raises(ValueError):
        run_section(load(home), "quit", home, base_env())
