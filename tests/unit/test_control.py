"""Unit tests for eqmail.control: load(), ConfigHolder.reload(), config_fast().

Reference: the module docstring (defaults), behaviour reference section 1
(reading rules), 5.4 (virtualdomains order), 8 and test vector T47 (config-fast).
"""
from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eqmail import control
from eqmail.control import CONF_SPAWN, ConfigError, ConfigHolder, config_fast, host_fqdn, load

ME = "mx.example.org"


def make_home(root, me=ME, **files):
    """Write control files under `root`/control; values are str or bytes.
    `me` as str is written with a newline, as bytes verbatim; None leaves
    control/me out."""
    ctl = os.path.join(str(root), "control")
    os.makedirs(ctl, exist_ok=True)
    if isinstance(me, str):
        files["me"] = me + "\n"
    elif me is not None:
        files["me"] = me
    for name, text in files.items():
        data = text.encode("utf-8") if isinstance(text, str) else text
        with open(os.path.join(ctl, name), "wb") as f:
            f.write(data)
    return str(root)


def cpath(home, name):
    return os.path.join(os.path.abspath(home), "control", name)


def read(home, name):
    with open(cpath(home, name)) as f:
        return f.read()


# -- defaults ----------------------------------------------------------------------------


class TestDefaults:
    @pytest.fixture
    def config(self, tmp_path):
        return load(make_home(tmp_path))

    def test_home_is_absolute(self, tmp_path):
        old = os.getcwd()
        make_home(tmp_path)
        os.chdir(str(tmp_path))
        try:
            config = load(".")
        finally:
            os.chdir(old)
        assert config.home == os.path.abspath(str(tmp_path))
        assert config.path("control", "me") == os.path.join(config.home, "control", "me")

    def test_me(self, config):
        assert config.me == ME

    @pytest.mark.parametrize("name", [
        "defaultdomain", "defaulthost", "plusdomain", "idhost", "envnoathost",
        "bouncehost", "doublebouncehost", "localiphost", "helohost", "smtpgreeting",
    ])
    def test_names_default_to_me(self, config, name):
        assert getattr(config, name) == ME

    def test_bouncefrom(self, config):
        assert config.bouncefrom == "MAILER-DAEMON"

    def test_doublebounceto(self, config):
        assert config.doublebounceto == "postmaster"

    def test_locals_is_me(self, config):
        assert config.locals == frozenset([ME])

    def test_rcpthosts_is_locals_when_missing(self, config):
        assert config.rcpthosts == config.locals == frozenset([ME])
        assert config.rcpthosts_missing is True

    def test_empty_lists(self, config):
        assert config.morercpthosts == frozenset()
        assert config.virtualdomains == ()
        assert config.percenthack == frozenset()
        assert config.badmailfrom == frozenset()

    def test_numbers(self, config):
        assert config.databytes == 0
        assert config.timeoutsmtpd == 1200
        assert config.concurrencylocal == 10
        assert config.concurrencyremote == 20
        assert config.queuelifetime == 604800

    def test_defaultdelivery(self, config):
        assert config.defaultdelivery == "./Maildir/"

    def test_no_virtual_prefix(self, config):
        assert config.virtual_prefix("joe@example.org") is None

    def test_defaults_follow_me(self, tmp_path):
        config = load(make_home(tmp_path, me="mail.example.com"))
        assert config.envnoathost == "mail.example.com"
        assert config.localiphost == "mail.example.com"
        assert config.locals == frozenset(["mail.example.com"])

    def test_locals_default_is_lower_case(self, tmp_path):
        config = load(make_home(tmp_path, me="MX.Example.ORG"))
        assert config.locals == frozenset(["mx.example.org"])


class TestExplicitValues:
    def test_names_read(self, tmp_path):
        config = load(make_home(tmp_path, defaultdomain="example.org\n",
                                envnoathost="other.example\n", bouncefrom="bounce\n",
                                doublebounceto="admin\n", localiphost="lip.example.org\n",
                                helohost="helo.example.org\n"))
        assert config.defaultdomain == "example.org"
        assert config.envnoathost == "other.example"
        assert config.bouncefrom == "bounce"
        assert config.doublebounceto == "admin"
        assert config.localiphost == "lip.example.org"
        assert config.helohost == "helo.example.org"
        assert config.defaulthost == ME

    def test_single_line_files_use_first_line_trailing_blanks_removed(self, tmp_path):
        config = load(make_home(tmp_path, me=b"mx.example.org \t\r\nignored.example\n",
                                envnoathost="a.example\nb.example\n"))
        assert config.me == "mx.example.org"
        assert config.envnoathost == "a.example"

    def test_me_without_final_newline(self, tmp_path):
        config = load(make_home(tmp_path, me=b"mx.example.org"))
        assert config.me == "mx.example.org"

    def test_smtpgreeting_keeps_inner_blanks(self, tmp_path):
        config = load(make_home(tmp_path, smtpgreeting="mx.example.org NO UCE  \n"))
        assert config.smtpgreeting == "mx.example.org NO UCE"

    def test_numbers_read(self, tmp_path):
        config = load(make_home(tmp_path, databytes="1000\n", timeoutsmtpd="30\n",
                                concurrencylocal="3\n", concurrencyremote="7\n",
                                queuelifetime="3600\n"))
        assert (config.databytes, config.timeoutsmtpd, config.concurrencylocal,
                config.concurrencyremote, config.queuelifetime) == (1000, 30, 3, 7, 3600)

    def test_number_with_trailing_blanks(self, tmp_path):
        assert load(make_home(tmp_path, databytes="500  \n")).databytes == 500

    @pytest.mark.parametrize("text", ["0\n", "-1\n", "-5000\n"])
    def test_timeoutsmtpd_not_positive_becomes_1(self, tmp_path, text):
        assert load(make_home(tmp_path, timeoutsmtpd=text)).timeoutsmtpd == 1

    @pytest.mark.parametrize("name", ["concurrencylocal", "concurrencyremote"])
    def test_concurrency_capped_at_120(self, tmp_path, name):
        assert CONF_SPAWN == 120
        assert getattr(load(make_home(tmp_path, **{name: "500\n"})), name) == 120
        assert getattr(load(make_home(tmp_path, **{name: "120\n"})), name) == 120
        assert getattr(load(make_home(tmp_path, **{name: "119\n"})), name) == 119

    def test_concurrencylocal_zero_allowed(self, tmp_path):
        assert load(make_home(tmp_path, concurrencylocal="0\n")).concurrencylocal == 0

    def test_defaultdelivery_read(self, tmp_path):
        config = load(make_home(tmp_path, defaultdelivery="./Mailbox\n"))
        assert config.defaultdelivery == "./Mailbox"


@given(st.integers(min_value=0, max_value=10 ** 15))
@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_databytes_round_trip_up_to_qmails_int(n):
    with tempfile.TemporaryDirectory() as root:
        home = make_home(root, databytes="%d\n" % n)
        if n <= 2 ** 31 - 1:
            assert load(home).databytes == n
        else:
            with pytest.raises(ConfigError, match="number too large"):
                load(home)


# -- list files --------------------------------------------------------------------------


class TestListFiles:
    def test_rcpthosts_read(self, tmp_path):
        config = load(make_home(tmp_path, rcpthosts="example.org\n.example.net\n"))
        assert config.rcpthosts == frozenset(["example.org", ".example.net"])
        assert config.rcpthosts_missing is False

    def test_rcpthosts_missing_equals_locals(self, tmp_path):
        config = load(make_home(tmp_path, locals="mx.example.org\nlocalhost\n"))
        assert config.rcpthosts == config.locals == frozenset(["mx.example.org", "localhost"])
        assert config.rcpthosts_missing is True

    def test_rcpthosts_present_but_empty(self, tmp_path):
        config = load(make_home(tmp_path, rcpthosts=""))
        assert config.rcpthosts == frozenset()
        assert config.rcpthosts_missing is False

    def test_rcpthosts_independent_of_locals(self, tmp_path):
        config = load(make_home(tmp_path, locals="mx.example.org\n", rcpthosts="example.org\n"))
        assert config.rcpthosts == frozenset(["example.org"])
        assert config.locals == frozenset(["mx.example.org"])

    def test_comments_and_blank_lines_dropped(self, tmp_path):
        config = load(make_home(tmp_path, rcpthosts=(
            "# the domains we accept\n"
            "\n"
            "example.org\n"
            "#example.com\n"
            "   \n"
            ".example.net\n"
            "\n")))
        assert config.rcpthosts == frozenset(["example.org", ".example.net"])

    def test_trailing_blanks_and_cr_removed(self, tmp_path):
        config = load(make_home(tmp_path, locals="mx.example.org \t\r\nlocalhost\t\n"))
        assert config.locals == frozenset(["mx.example.org", "localhost"])

    def test_last_line_without_newline(self, tmp_path):
        config = load(make_home(tmp_path, rcpthosts="example.org\nexample.com"))
        assert config.rcpthosts == frozenset(["example.org", "example.com"])

    def test_domains_case_folded(self, tmp_path):
        config = load(make_home(tmp_path, locals="MX.Example.ORG\n",
                                rcpthosts="Example.ORG\n.Example.NET\n",
                                morercpthosts="More.Example\n",
                                percenthack="GW.Example.ORG\n"))
        assert config.locals == frozenset(["mx.example.org"])
        assert config.rcpthosts == frozenset(["example.org", ".example.net"])
        assert config.morercpthosts == frozenset(["more.example"])
        assert config.percenthack == frozenset(["gw.example.org"])

    def test_badmailfrom_case_folded(self, tmp_path):
        config = load(make_home(tmp_path, badmailfrom="Spam@Bad.COM\n@Evil.com\n.Spammer.ORG\n"))
        assert config.badmailfrom == frozenset(["spam@bad.com", "@evil.com", ".spammer.org"])

    def test_badmailfrom_comments(self, tmp_path):
        config = load(make_home(tmp_path, badmailfrom="# bad\n\nspam@bad.com  \n"))
        assert config.badmailfrom == frozenset(["spam@bad.com"])

    def test_morercpthosts_read(self, tmp_path):
        config = load(make_home(tmp_path, rcpthosts="example.org\n",
                                morercpthosts="more.example\n.sub.example\n"))
        assert config.morercpthosts == frozenset(["more.example", ".sub.example"])

    def test_empty_locals_file(self, tmp_path):
        config = load(make_home(tmp_path, locals="# nothing local\n"))
        assert config.locals == frozenset()


# -- virtualdomains -------------------------------------------------------------------------


class TestVirtualDomains:
    def test_entries_kept_in_order(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=(
            "# virtual\nVirt.Example.COM:Vpfx\n\n.example.net:net\n")))
        assert config.virtualdomains == (("virt.example.com", "Vpfx"), (".example.net", "net"))

    def test_full_address_before_exact_domain(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=(
            "virt.example.com:exact\njoe@virt.example.com:full\n")))
        assert config.virtual_prefix("joe@virt.example.com") == "full"
        assert config.virtual_prefix("bob@virt.example.com") == "exact"

    def test_exact_domain_before_suffix(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=(
            ".example.com:suffix\nvirt.example.com:exact\n")))
        assert config.virtual_prefix("joe@virt.example.com") == "exact"
        assert config.virtual_prefix("joe@other.example.com") == "suffix"

    def test_suffix_longest_first(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=(
            ".com:tld\n.example.com:short\n.virt.example.com:long\n")))
        assert config.virtual_prefix("joe@a.virt.example.com") == "long"
        assert config.virtual_prefix("joe@b.example.com") == "short"
        assert config.virtual_prefix("joe@other.com") == "tld"

    def test_suffix_matches_on_dot_boundary_only(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=".virt.example.com:long\n"))
        assert config.virtual_prefix("joe@virt.example.com") is None
        assert config.virtual_prefix("joe@xvirt.example.com") is None

    def test_empty_key_last(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=(
            ":catchall\nvirt.example.com:exact\n")))
        assert config.virtual_prefix("joe@virt.example.com") == "exact"
        assert config.virtual_prefix("joe@other.org") == "catchall"

    def test_no_match(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains="virt.example.com:exact\n"))
        assert config.virtual_prefix("joe@other.org") is None

    def test_first_line_wins(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=(
            "virt.example.com:first\nVIRT.example.com:second\n")))
        assert config.virtual_prefix("joe@virt.example.com") == "first"

    def test_empty_prefix_is_returned_as_empty(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains=(
            ".example.com:pfx\nplain.example.com:\n")))
        assert config.virtual_prefix("joe@plain.example.com") == ""

    def test_lookup_ignores_case_prefix_keeps_case(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains="Virt.Example.com:MyPfx\n"))
        assert config.virtual_prefix("Joe@VIRT.example.COM") == "MyPfx"

    def test_prefix_may_contain_colon(self, tmp_path):
        config = load(make_home(tmp_path, virtualdomains="virt.example.com:a:b\n"))
        assert config.virtual_prefix("joe@virt.example.com") == "a:b"


# -- malformed files ----------------------------------------------------------------------


class TestConfigError:
    def test_message_names_file_and_line(self):
        e = ConfigError("/h/control/x", 7, "bad")
        assert (e.path, e.lineno, e.problem) == ("/h/control/x", 7, "bad")
        assert "/h/control/x" in str(e) and "7" in str(e)

    def test_missing_me(self, tmp_path):
        home = make_home(tmp_path, me=None, locals="example.org\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "me")
        assert cpath(home, "me") in str(info.value)

    def test_missing_control_directory(self, tmp_path):
        with pytest.raises(ConfigError):
            load(str(tmp_path))

    def test_empty_me(self, tmp_path):
        with pytest.raises(ConfigError):
            load(make_home(tmp_path, me=b""))

    def test_me_with_white_space(self, tmp_path):
        home = make_home(tmp_path, me="mx example.org")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "me")
        assert info.value.lineno == 1

    @pytest.mark.parametrize("text", ["lots\n", "12k\n", "1.5\n", "+5\n", "0x10\n", "1 2\n"])
    def test_databytes_not_a_number(self, tmp_path, text):
        home = make_home(tmp_path, databytes=text)
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "databytes")
        assert info.value.lineno == 1
        assert cpath(home, "databytes") in str(info.value)

    def test_negative_databytes(self, tmp_path):
        home = make_home(tmp_path, databytes="-1\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "databytes")

    @pytest.mark.parametrize("name", ["timeoutsmtpd", "concurrencylocal",
                                      "concurrencyremote", "queuelifetime"])
    def test_other_numbers_not_a_number(self, tmp_path, name):
        home = make_home(tmp_path, **{name: "soon\n"})
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, name)

    def test_white_space_inside_rcpthosts_domain_line_3(self, tmp_path):
        home = make_home(tmp_path, rcpthosts="example.org\n.example.net\nexample .com\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.lineno == 3
        assert cpath(home, "rcpthosts") in str(info.value)
        assert "line 3" in str(info.value)

    def test_line_numbers_count_comments_and_blank_lines(self, tmp_path):
        home = make_home(tmp_path, rcpthosts="# comment\n\nexample.org\n\nbad\tdomain\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.lineno == 5
        assert info.value.path == cpath(home, "rcpthosts")

    @pytest.mark.parametrize("entry", ["joe@example.org", "example.org/x", "a b"])
    def test_not_a_domain_in_locals(self, tmp_path, entry):
        home = make_home(tmp_path, locals="mx.example.org\n%s\n" % entry)
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "locals")
        assert info.value.lineno == 2

    def test_control_character_in_list(self, tmp_path):
        home = make_home(tmp_path, rcpthosts="example.org\nexa\x01mple.com\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.lineno == 2

    def test_virtualdomains_line_without_colon(self, tmp_path):
        home = make_home(tmp_path, virtualdomains="virt.example.com:pfx\nbroken.example.com\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "virtualdomains")
        assert info.value.lineno == 2
        assert cpath(home, "virtualdomains") in str(info.value)

    def test_virtualdomains_white_space(self, tmp_path):
        home = make_home(tmp_path, virtualdomains="virt.example.com: pfx\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.lineno == 1

    def test_badmailfrom_white_space(self, tmp_path):
        home = make_home(tmp_path, badmailfrom="spam@bad.com\nx y@z\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "badmailfrom")
        assert info.value.lineno == 2

    def test_non_utf8_list_file(self, tmp_path):
        home = make_home(tmp_path, rcpthosts=b"example.org\n\xff\xfe.example\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "rcpthosts")
        assert info.value.lineno == 2
        assert cpath(home, "rcpthosts") in str(info.value)

    def test_non_utf8_me(self, tmp_path):
        home = make_home(tmp_path, me=b"mx.\xe9xample.org\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, "me")
        assert info.value.lineno == 1

    def test_non_utf8_in_a_later_ignored_line_of_single_line_file(self, tmp_path):
        # the whole file must be text, even lines the reader does not use
        home = make_home(tmp_path, helohost=b"helo.example.org\n\xff\n")
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.lineno == 2

    @pytest.mark.parametrize("name", ["databytes", "timeoutsmtpd", "concurrencyremote"])
    def test_unicode_digit_in_number_file_is_config_error(self, tmp_path, name):
        home = make_home(tmp_path, **{name: "\u00b2\n"})
        with pytest.raises(ConfigError) as info:
            load(home)
        assert info.value.path == cpath(home, name)


LIST_FILES = ["locals", "rcpthosts", "morercpthosts", "percenthack",
              "virtualdomains", "badmailfrom"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(name=st.sampled_from(LIST_FILES), data=st.binary(max_size=200))
@example(name="rcpthosts", data=b"\xff")
@example(name="virtualdomains", data=b"x")
@example(name="virtualdomains", data=b":\n")
@example(name="locals", data=b".x\n")
@example(name="badmailfrom", data=b"\x00\n")
@example(name="rcpthosts", data=b"a\x85b\n")
@example(name="percenthack", data=b"\r\r\n")
def test_arbitrary_bytes_in_list_file(name, data):
    with tempfile.TemporaryDirectory() as root:
        home = make_home(root, **{name: data})
        try:
            config = load(home)
        except ConfigError as e:
            assert e.path == cpath(home, name)
            assert e.lineno >= 1
            assert cpath(home, name) in str(e)
            return
        if name in ("locals", "rcpthosts", "morercpthosts", "percenthack"):
            entries = getattr(config, name)
            assert all(entry == entry.lower() and entry and not any(
                ch.isspace() for ch in entry) for entry in entries)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(data=st.binary(max_size=100))
@example(data=b"x\n")
@example(data=b" 7 \n")
@example(data=b"-\n")
def test_arbitrary_bytes_in_timeoutsmtpd(data):
    # ASCII-only text plus arbitrary bytes; the Unicode-digit case is tested above
    if any(b >= 0x80 for b in data):
        data = bytes(b & 0x7f for b in data)
    with tempfile.TemporaryDirectory() as root:
        home = make_home(root, timeoutsmtpd=data)
        try:
            config = load(home)
        except ConfigError as e:
            assert e.path == cpath(home, "timeoutsmtpd")
            return
        assert config.timeoutsmtpd >= 1


# -- ConfigHolder -------------------------------------------------------------------------


class TestConfigHolder:
    def test_initial_snapshot(self, tmp_path):
        holder = ConfigHolder(make_home(tmp_path, rcpthosts="example.org\n"))
        assert holder.current.rcpthosts == frozenset(["example.org"])

    def test_initial_bad_config_raises(self, tmp_path):
        with pytest.raises(ConfigError):
            ConfigHolder(make_home(tmp_path, databytes="many\n"))

    def test_good_change_is_taken(self, tmp_path):
        home = make_home(tmp_path, rcpthosts="example.org\n")
        holder = ConfigHolder(home)
        old = holder.current
        make_home(tmp_path, rcpthosts="example.org\nexample.com\n", databytes="100\n")
        assert holder.reload() is True
        assert holder.current is not old
        assert holder.current.rcpthosts == frozenset(["example.org", "example.com"])
        assert holder.current.databytes == 100
        # the old snapshot itself is unchanged (immutable)
        assert old.rcpthosts == frozenset(["example.org"])
        assert old.databytes == 0

    def test_malformed_change_keeps_old_snapshot(self, tmp_path):
        home = make_home(tmp_path, rcpthosts="example.org\n")
        holder = ConfigHolder(home)
        old = holder.current
        make_home(tmp_path, rcpthosts="example.org\nexample .com\n")
        assert holder.reload() is False
        assert holder.current is old
        assert holder.current.rcpthosts == frozenset(["example.org"])

    def test_missing_me_on_reload_keeps_old_snapshot(self, tmp_path):
        home = make_home(tmp_path)
        holder = ConfigHolder(home)
        old = holder.current
        os.unlink(cpath(home, "me"))
        assert holder.reload() is False
        assert holder.current is old

    def test_recovers_after_fix(self, tmp_path):
        home = make_home(tmp_path)
        holder = ConfigHolder(home)
        make_home(tmp_path, databytes="lots\n")
        assert holder.reload() is False
        make_home(tmp_path, databytes="42\n")
        assert holder.reload() is True
        assert holder.current.databytes == 42

    def test_unicode_digit_on_reload_keeps_old_snapshot(self, tmp_path):
        home = make_home(tmp_path)
        holder = ConfigHolder(home)
        old = holder.current
        make_home(tmp_path, databytes="\u00b2\n")
        assert holder.reload() is False
        assert holder.current is old


# -- config_fast / host_fqdn ---------------------------------------------------------------


class TestConfigFast:
    def test_t47_first_run(self, tmp_path):
        home = str(tmp_path)
        config_fast(home, "mail.example.com")
        assert read(home, "me") == "mail.example.com\n"
        assert read(home, "defaultdomain") == "example.com\n"
        assert read(home, "plusdomain") == "example.com\n"
        assert read(home, "locals") == "mail.example.com\n"
        assert read(home, "rcpthosts") == "mail.example.com\n"
        plugins = read(home, "smtpplugins").split()
        assert plugins == ["[connection]", "[helo]", "[mail]", "[rcpt]", "[data]", "#[auth]"]

    def test_t47_second_run_rewrites_only_me_and_defaultdomain(self, tmp_path):
        home = str(tmp_path)
        config_fast(home, "mail.example.com")
        with open(cpath(home, "smtpplugins"), "a") as f:
            f.write("# mine\n")
        plugins = read(home, "smtpplugins")
        config_fast(home, "a.b.example.com")
        assert read(home, "me") == "a.b.example.com\n"
        assert read(home, "defaultdomain") == "b.example.com\n"
        assert read(home, "plusdomain") == "example.com\n"
        assert read(home, "locals") == "mail.example.com\n"
        assert read(home, "rcpthosts") == "mail.example.com\n"
        assert read(home, "smtpplugins") == plugins

    def test_existing_files_kept(self, tmp_path):
        home = make_home(tmp_path, me="old.example", defaultdomain="old\n",
                         plusdomain="plus.example\n", locals="local.example\n",
                         rcpthosts="rcpt.example\n", smtpplugins="[mail]\n")
        config_fast(home, "mail.example.com", extra_locals=["localhost"])
        assert read(home, "me") == "mail.example.com\n"
        assert read(home, "defaultdomain") == "example.com\n"
        assert read(home, "plusdomain") == "plus.example\n"
        assert read(home, "locals") == "local.example\n"
        assert read(home, "rcpthosts") == "rcpt.example\n"
        assert read(home, "smtpplugins") == "[mail]\n"

    def test_missing_ones_written_present_ones_kept(self, tmp_path):
        home = make_home(tmp_path, me=None, locals="local.example\n")
        config_fast(home, "mail.example.com")
        assert read(home, "locals") == "local.example\n"
        assert read(home, "rcpthosts") == "mail.example.com\n"

    def test_extra_locals(self, tmp_path):
        home = str(tmp_path)
        config_fast(home, "mail.example.com", extra_locals=["localhost"])
        assert read(home, "locals") == "mail.example.com\nlocalhost\n"
        assert read(home, "rcpthosts") == "mail.example.com\nlocalhost\n"

    def test_extra_locals_not_duplicated(self, tmp_path):
        home = str(tmp_path)
        config_fast(home, "mail.example.com", extra_locals=["mail.example.com", "localhost"])
        assert read(home, "locals") == "mail.example.com\nlocalhost\n"

    @pytest.mark.parametrize("fqdn,defaultdomain,plusdomain", [
        ("mail.example.com", "example.com", "example.com"),
        ("a.b.example.com", "b.example.com", "example.com"),
        ("example.com", "example.com", "example.com"),
        ("localhost", "localhost", "localhost"),
    ])
    def test_derived_names(self, tmp_path, fqdn, defaultdomain, plusdomain):
        home = str(tmp_path)
        config_fast(home, fqdn)
        assert read(home, "me") == fqdn + "\n"
        assert read(home, "defaultdomain") == defaultdomain + "\n"
        assert read(home, "plusdomain") == plusdomain + "\n"

    def test_fqdn_lower_cased_and_stripped(self, tmp_path):
        home = str(tmp_path)
        config_fast(home, " Mail.Example.COM\n")
        assert read(home, "me") == "mail.example.com\n"
        assert read(home, "locals") == "mail.example.com\n"

    def test_creates_control_directory_and_no_temp_files(self, tmp_path):
        home = str(tmp_path / "new-home")
        config_fast(home, "mail.example.com")
        names = sorted(os.listdir(os.path.join(home, "control")))
        assert names == sorted(["me", "defaultdomain", "plusdomain", "locals",
                                "rcpthosts", "smtpplugins"])

    def test_result_loads(self, tmp_path):
        home = str(tmp_path)
        config_fast(home, "mail.example.com", extra_locals=["localhost"])
        config = load(home)
        assert config.me == "mail.example.com"
        assert config.defaultdomain == "example.com"
        assert config.plusdomain == "example.com"
        assert config.locals == frozenset(["mail.example.com", "localhost"])
        assert config.rcpthosts == config.locals
        assert config.rcpthosts_missing is False


def test_host_fqdn_non_empty_lower_case():
    name = host_fqdn()
    assert isinstance(name, str)
    assert name
    assert name == name.lower()
    assert not any(ch.isspace() for ch in name)


def test_host_fqdn_avoids_localhost_entry(monkeypatch):
    monkeypatch.setattr(control.socket, "getfqdn", lambda: "localhost.localdomain")
    monkeypatch.setattr(control.socket, "gethostname", lambda: "Pi-Board")
    assert host_fqdn() == "pi-board"


def test_host_fqdn_lower_cases_fqdn(monkeypatch):
    monkeypatch.setattr(control.socket, "getfqdn", lambda: "Mail.Example.COM")
    assert host_fqdn() == "mail.example.com"
