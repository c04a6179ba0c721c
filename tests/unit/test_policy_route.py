"""Unit tests for eqmail.smtp.policy, eqmail.delivery.route and eqmail.smtp.reply.

Reference: behaviour reference sections 2.2-2.3 (relay rule, localiphost),
5.4 (recipient rewriting), test vectors T5-T8, T9, T16, T17.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eqmail.control import load
from eqmail.delivery import route as route_mod
from eqmail.delivery.route import LOCAL, REMOTE, Route, route
from eqmail.smtp import policy, reply
from eqmail.smtp.reply import Reply

ME = "mx.example.org"


def make_config(root, me=ME, **files):
    ctl = os.path.join(str(root), "control")
    os.makedirs(ctl, exist_ok=True)
    files.setdefault("me", me + "\n")
    for name, text in files.items():
        with open(os.path.join(ctl, name), "w") as f:
            f.write(text)
    return load(str(root))


@pytest.fixture
def t_config(tmp_path):
    """The T1-T30 fixture: me=mx.example.org, rcpthosts example.org and
    .example.net, badmailfrom spam@bad.com, @evil.com, .spammer.org."""
    return make_config(tmp_path, rcpthosts="example.org\n.example.net\n",
                       badmailfrom="spam@bad.com\n@evil.com\n.spammer.org\n")


# -- policy.check_rcpt -------------------------------------------------------------------


class TestCheckRcptRcpthosts:
    # T5
    @pytest.mark.parametrize("rcpt", ["x@example.org", "y@sub.example.net", "X@EXAMPLE.ORG"])
    def test_accepted(self, t_config, rcpt):
        assert policy.check_rcpt(t_config, rcpt, False, None) == (None, rcpt)

    @pytest.mark.parametrize("rcpt", ["z@example.net", "w@other.com", "x@sub.example.org"])
    def test_refused_nogateway(self, t_config, rcpt):
        refusal, addr = policy.check_rcpt(t_config, rcpt, False, None)
        assert refusal is reply.NOGATEWAY
        assert addr == rcpt

    def test_nogateway_text(self, t_config):
        refusal, _ = policy.check_rcpt(t_config, "w@other.com", False, None)
        assert refusal.render() == (b"553 sorry, that domain isn't in my list of allowed "
                                    b"rcpthosts (#5.7.1)\r\n")

    def test_address_without_at_accepted(self, t_config):
        # T17: RCPT TO:postmaster
        assert policy.check_rcpt(t_config, "postmaster", False, None) == (None, "postmaster")

    def test_morercpthosts(self, tmp_path):
        config = make_config(tmp_path, rcpthosts="example.org\n", morercpthosts="more.example\n")
        assert policy.check_rcpt(config, "u@more.example", False, None) == (None, "u@more.example")
        assert policy.check_rcpt(config, "u@other.example", False, None)[0] is reply.NOGATEWAY

    def test_rcpthosts_missing_uses_locals_not_open_relay(self, tmp_path):
        # eqmail's deliberate difference from qmail's T6 (README, control docstring)
        config = make_config(tmp_path, locals="mx.example.org\nlocalhost\n")
        assert config.rcpthosts_missing
        assert policy.check_rcpt(config, "u@anywhere.com", False, None)[0] is reply.NOGATEWAY
        assert policy.check_rcpt(config, "u@localhost", False, None) == (None, "u@localhost")


class TestCheckRcptBadmailfrom:
    def test_flag_refuses_every_rcpt(self, t_config):
        for rcpt in ("x@example.org", "w@other.com", "postmaster"):
            refusal, _ = policy.check_rcpt(t_config, rcpt, True, None)
            assert refusal is reply.BADMAILFROM

    def test_flag_wins_over_relayclient(self, t_config):
        refusal, _ = policy.check_rcpt(t_config, "x@example.org", True, "")
        assert refusal is reply.BADMAILFROM

    def test_badmailfrom_text(self):
        assert reply.BADMAILFROM.render() == (
            b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n")

    # T8
    @pytest.mark.parametrize("sender", ["spam@bad.com", "joe@evil.com",
                                        "joe@mail.spammer.org", "SPAM@BAD.COM"])
    def test_mail_is_bad(self, t_config, sender):
        assert policy.mail_is_bad(t_config, sender) is True

    @pytest.mark.parametrize("sender", ["joe@spammer.org", "", "joe@example.org"])
    def test_mail_is_not_bad(self, t_config, sender):
        assert policy.mail_is_bad(t_config, sender) is False


class TestCheckRcptRelayclient:
    # T7
    def test_empty_relayclient_accepts_anything(self, t_config):
        assert policy.check_rcpt(t_config, "u@other.com", False, "") == (None, "u@other.com")

    def test_relayclient_value_appended(self, t_config):
        assert policy.check_rcpt(t_config, "u@other.com", False, ".relay") == (
            None, "u@other.com.relay")

    def test_relayclient_appended_to_local_domains_too(self, t_config):
        assert policy.check_rcpt(t_config, "x@example.org", False, ".relay") == (
            None, "x@example.org.relay")

    def test_none_means_unset(self, t_config):
        assert policy.check_rcpt(t_config, "u@other.com", False, None)[0] is reply.NOGATEWAY


class TestCheckRcptLocaliphost:
    # T16
    def test_loopback_literal_rewritten_then_refused(self, t_config):
        refusal, addr = policy.check_rcpt(t_config, "postmaster@[127.0.0.1]", False, None)
        assert addr == "postmaster@mx.example.org"
        assert refusal is reply.NOGATEWAY

    def test_loopback_literal_rewritten_with_relayclient(self, t_config):
        assert policy.check_rcpt(t_config, "postmaster@[127.0.0.1]", False, "") == (
            None, "postmaster@mx.example.org")

    def test_rewritten_name_in_rcpthosts_is_accepted(self, tmp_path):
        config = make_config(tmp_path, rcpthosts="mx.example.org\n")
        assert policy.check_rcpt(config, "postmaster@[127.0.0.1]", False, None) == (
            None, "postmaster@mx.example.org")

    def test_localiphost_file_used(self, tmp_path):
        config = make_config(tmp_path, rcpthosts="example.org\n", localiphost="example.org\n")
        assert policy.check_rcpt(config, "box@[127.0.0.1]", False, None) == (
            None, "box@example.org")

    def test_connection_local_ip_rewritten(self, t_config):
        refusal, addr = policy.check_rcpt(t_config, "box@[198.51.100.1]", False, "",
                                          local_ip="198.51.100.1")
        assert (refusal, addr) == (None, "box@mx.example.org")

    def test_foreign_ip_not_rewritten(self, t_config):
        refusal, addr = policy.check_rcpt(t_config, "box@[192.0.2.9]", False, None,
                                          local_ip="198.51.100.1")
        assert addr == "box@[192.0.2.9]"
        assert refusal is reply.NOGATEWAY

    def test_foreign_ip_kept_with_relayclient(self, t_config):
        assert policy.check_rcpt(t_config, "box@[192.0.2.9]", False, "",
                                 local_ip="198.51.100.1") == (None, "box@[192.0.2.9]")

    def test_invalid_literal_not_rewritten(self, t_config):
        for rcpt in ("box@[127.0.0.256]", "box@[127.0.0.1", "box@127.0.0.1"):
            _, addr = policy.check_rcpt(t_config, rcpt, False, "")
            assert addr == rcpt

    def test_is_local_ip(self):
        assert policy.is_local_ip("127.0.0.1", None)
        assert policy.is_local_ip("127.8.9.10", None)
        assert policy.is_local_ip("198.51.100.1", "198.51.100.1")
        assert not policy.is_local_ip("198.51.100.2", "198.51.100.1")
        assert not policy.is_local_ip("192.0.2.1", None)
        assert not policy.is_local_ip("not-an-ip", "198.51.100.1")
        assert not policy.is_local_ip("192.0.2.1", "garbage")


@pytest.fixture(scope="module")
def property_config(tmp_path_factory):
    return make_config(tmp_path_factory.mktemp("policy"),
                       rcpthosts="example.org\n.example.net\n")


@given(rcpt=st.text(max_size=60), bad=st.booleans(),
       relayclient=st.one_of(st.none(), st.text(max_size=10)))
def test_check_rcpt_property(property_config, rcpt, bad, relayclient):
    config = property_config
    refusal, addr = policy.check_rcpt(config, rcpt, bad, relayclient)
    if bad:
        assert refusal is reply.BADMAILFROM
    elif relayclient is not None:
        assert refusal is None
        assert addr.endswith(relayclient)
    else:
        assert refusal in (None, reply.NOGATEWAY)


# -- policy.check_size -------------------------------------------------------------------


class TestCheckSize:
    # T9
    def test_over_limit(self):
        assert policy.check_size(100, {"SIZE": "101"}) is reply.TOO_BIG

    def test_at_limit(self):
        assert policy.check_size(100, {"SIZE": "100"}) is None

    def test_under_limit(self):
        assert policy.check_size(100, {"SIZE": "1"}) is None

    def test_no_limit(self):
        assert policy.check_size(0, {"SIZE": "999999999999"}) is None

    def test_no_size_parameter(self):
        assert policy.check_size(100, {}) is None
        assert policy.check_size(100, {"BODY": "8BITMIME"}) is None

    def test_too_big_text(self):
        assert reply.TOO_BIG.render() == (
            b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n")

    def test_non_numeric_size_never_too_big(self):
        assert policy.check_size(100, {"SIZE": "lots"}) is not reply.TOO_BIG


# -- route.route ------------------------------------------------------------------------------


@pytest.fixture
def r_config(tmp_path):
    return make_config(
        tmp_path,
        locals="mx.example.org\nlocalhost\n",
        envnoathost="mx.example.org\n",
        percenthack="gw.example.org\n",
        virtualdomains=("virt.example.com:vpfx\n"
                        ".example.com:wild\n"
                        "plain.example.com:\n"
                        "joe@other.example.com:joe-only\n"
                        "localhost:never\n"),
    )


class TestRoute:
    def test_locals(self, r_config):
        assert route(r_config, "joe@mx.example.org") == Route(
            LOCAL, "joe@mx.example.org", "joe", "mx.example.org")

    def test_locals_case_ignored(self, r_config):
        r = route(r_config, "Joe@MX.Example.ORG")
        assert r.channel == LOCAL
        assert r.local == "Joe"
        assert r.address == "Joe@MX.Example.ORG"

    def test_locals_before_virtualdomains(self, r_config):
        r = route(r_config, "joe@localhost")
        assert r == Route(LOCAL, "joe@localhost", "joe", "localhost")

    def test_no_at_gets_envnoathost(self, r_config):
        assert route(r_config, "postmaster") == Route(
            LOCAL, "postmaster@mx.example.org", "postmaster", "mx.example.org")

    def test_envnoathost_not_local(self, tmp_path):
        config = make_config(tmp_path, envnoathost="elsewhere.example\n")
        assert route(config, "joe") == Route(
            REMOTE, "joe@elsewhere.example", "joe", "elsewhere.example")

    def test_envnoathost_defaults_to_me(self, tmp_path):
        config = make_config(tmp_path)
        assert route(config, "joe").address == "joe@mx.example.org"
        assert route(config, "joe").channel == LOCAL

    def test_percenthack(self, r_config):
        assert route(r_config, "u%other.org@gw.example.org") == Route(
            REMOTE, "u@other.org", "u", "other.org")

    def test_percenthack_last_percent(self, r_config):
        r = route(r_config, "a%b%other.org@gw.example.org")
        assert r.address == "a%b@other.org"
        assert r.channel == REMOTE

    def test_percenthack_repeated(self, r_config):
        r = route(r_config, "u%mx.example.org%gw.example.org@gw.example.org")
        assert r == Route(LOCAL, "u@mx.example.org", "u", "mx.example.org")

    def test_percenthack_domain_case_ignored(self, r_config):
        assert route(r_config, "u%other.org@GW.Example.Org").address == "u@other.org"

    def test_percenthack_only_for_listed_domains(self, r_config):
        r = route(r_config, "u%other.org@elsewhere.example")
        assert r.address == "u%other.org@elsewhere.example"
        assert r.channel == REMOTE

    def test_percenthack_without_percent(self, r_config):
        assert route(r_config, "u@gw.example.org") == Route(
            REMOTE, "u@gw.example.org", "u", "gw.example.org")

    def test_no_percenthack_file(self, tmp_path):
        config = make_config(tmp_path)
        assert route(config, "u%other.org@gw.example.org").address == "u%other.org@gw.example.org"

    def test_virtual_exact_domain(self, r_config):
        r = route(r_config, "joe@virt.example.com")
        assert r.channel == LOCAL
        assert r.local == "vpfx-joe"
        assert r.domain == "virt.example.com"

    def test_virtual_suffix(self, r_config):
        r = route(r_config, "bob@deep.sub.example.com")
        assert (r.channel, r.local, r.domain) == (LOCAL, "wild-bob", "deep.sub.example.com")

    def test_virtual_full_address(self, r_config):
        r = route(r_config, "joe@other.example.com")
        assert (r.channel, r.local) == (LOCAL, "joe-only-joe")
        r = route(r_config, "bob@other.example.com")
        assert (r.channel, r.local) == (LOCAL, "wild-bob")

    def test_virtual_case_ignored_local_part_kept(self, r_config):
        r = route(r_config, "Joe@VIRT.Example.COM")
        assert (r.channel, r.local) == (LOCAL, "vpfx-Joe")

    def test_virtual_separator_always_dash(self, tmp_path):
        config = make_config(tmp_path, virtualdomains="virt.example.com:p+x\n")
        assert route(config, "a@virt.example.com").local == "p+x-a"

    def test_empty_prefix_means_remote(self, r_config):
        # 'plain.example.com:' stops the search: the .example.com entry is not used
        r = route(r_config, "joe@plain.example.com")
        assert r == Route(REMOTE, "joe@plain.example.com", "joe", "plain.example.com")

    def test_virtual_bare_suffix_domain_not_matched(self, r_config):
        # '.example.com' does not match example.com itself
        assert route(r_config, "joe@example.com").channel == REMOTE

    def test_empty_key_catches_the_rest(self, tmp_path):
        config = make_config(tmp_path, virtualdomains=":all\n")
        r = route(config, "joe@anywhere.example")
        assert (r.channel, r.local) == (LOCAL, "all-joe")
        assert route(config, "joe@mx.example.org").local == "joe"

    def test_other_is_remote(self, r_config):
        assert route(r_config, "joe@other.org") == Route(REMOTE, "joe@other.org", "joe",
                                                         "other.org")

    def test_last_at_splits(self, r_config):
        r = route(r_config, "a@b@mx.example.org")
        assert (r.channel, r.local, r.domain) == (LOCAL, "a@b", "mx.example.org")

    def test_channel_constants(self):
        assert route_mod.LOCAL != route_mod.REMOTE


@pytest.fixture(scope="module")
def route_property_config(tmp_path_factory):
    return make_config(tmp_path_factory.mktemp("route"), locals="mx.example.org\n",
                       percenthack="a.b\n", virtualdomains=".x:vx\nz:\n")


@given(recipient=st.text(alphabet="abcxyz%@.-", max_size=30))
def test_route_property(route_property_config, recipient):
    config = route_property_config
    r = route(config, recipient)
    assert r.channel in (LOCAL, REMOTE)
    assert "@" in r.address
    assert r.address.rpartition("@")[2] == r.domain
    if r.channel == REMOTE:
        assert r.local == r.address.rpartition("@")[0]


# -- reply.Reply.render ------------------------------------------------------------------


class TestReplyRender:
    def test_plain(self):
        assert Reply.of(553, "5.7.1", "sorry (#5.7.1)").render() == b"553 sorry (#5.7.1)\r\n"

    def test_plain_is_default(self):
        r = Reply.of(250, "2.1.0", "ok")
        assert r.render() == r.render(False) == b"250 ok\r\n"

    def test_enhanced(self):
        assert Reply.of(553, "5.7.1", "sorry (#5.7.1)").render(True) == (
            b"553 5.7.1 sorry (#5.7.1)\r\n")

    def test_enhanced_without_status(self):
        assert reply.GO_AHEAD.render(True) == b"354 go ahead\r\n"
        assert Reply.of(250, None, "mx.example.org").render(True) == b"250 mx.example.org\r\n"

    def test_220_never_prefixed(self):
        assert Reply.of(220, "2.0.0", "mx.example.org ESMTP").render(True) == (
            b"220 mx.example.org ESMTP\r\n")
        assert reply.greeting("mx.example.org").render(True) == b"220 mx.example.org ESMTP\r\n"

    def test_multi_line(self):
        r = Reply(250, None, ("mx.example.org", "PIPELINING", "8BITMIME", "SIZE 0"))
        assert r.render() == (b"250-mx.example.org\r\n250-PIPELINING\r\n"
                              b"250-8BITMIME\r\n250 SIZE 0\r\n")
        assert r.render(True) == r.render()

    def test_multi_line_enhanced_every_line(self):
        r = Reply(550, "5.1.1", ("first", "second"))
        assert r.render(True) == b"550-5.1.1 first\r\n550 5.1.1 second\r\n"
        assert r.render() == b"550-first\r\n550 second\r\n"

    def test_ehlo_helper(self):
        r = reply.ehlo("mx.example.org", ["PIPELINING", "8BITMIME"])
        assert r.render(True) == b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"

    def test_qmail_texts(self):
        # T3, T4, T15 wording, HELO style
        assert reply.NOOP.render() == b"250 ok\r\n"
        assert reply.RSET.render() == b"250 flushed\r\n"
        assert reply.VRFY.render() == b"252 send some mail, i'll try my best\r\n"
        assert reply.UNRECOGNISED.render() == b"500 unrecognised (#5.5.2)\r\n"
        assert reply.MAIL_FIRST.render() == b"503 MAIL first (#5.5.1)\r\n"
        assert reply.RCPT_FIRST.render() == b"503 RCPT first (#5.5.1)\r\n"
        assert reply.SYNTAX.render() == b"555 syntax error (#5.5.4)\r\n"
        assert reply.LOOPING.render() == b"554 too many hops, this message is looping (#5.4.6)\r\n"

    def test_enhanced_qmail_text(self):
        assert reply.NOGATEWAY.render(True) == (
            b"553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n")

    def test_text_and_closing(self):
        r = Reply(250, None, ("a", "b"))
        assert r.text == "a\nb"
        assert r.close is False
        c = r.closing()
        assert c.close is True and c.lines == r.lines and r.close is False
        assert reply.quit("mx.example.org").close is True
        assert reply.quit("mx.example.org").render() == b"221 mx.example.org\r\n"

    def test_accepted(self):
        assert reply.accepted(1732230000, "1732230000.123.1").render() == (
            b"250 ok 1732230000 qp 1732230000.123.1\r\n")

    def test_non_ascii_rendered_as_utf8(self):
        assert Reply.of(250, None, "h\u00e9").render() == "250 h\u00e9\r\n".encode("utf-8")


@given(st.integers(min_value=200, max_value=599),
       st.one_of(st.none(), st.sampled_from(["2.0.0", "4.3.0", "5.7.1"])),
       st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")),
                        max_size=20), min_size=1, max_size=5),
       st.booleans())
def test_render_property(code, status, lines, enhanced):
    out = Reply(code, status, tuple(lines)).render(enhanced).decode("utf-8")
    rendered = out.split("\r\n")
    assert rendered[-1] == ""
    rendered = rendered[:-1]
    assert len(rendered) == len(lines)
    for i, (line, text) in enumerate(zip(rendered, lines)):
        sep = " " if i == len(lines) - 1 else "-"
        prefix = "%d%s" % (code, sep)
        assert line.startswith(prefix)
        body = line[len(prefix):]
        if enhanced and status and code != 220:
            assert body == "%s %s" % (status, text)
        else:
            assert body == text
