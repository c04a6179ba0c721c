"""Unit tests for eqmail.address: SMTP path parsing and the list look-ups.

Reference: behaviour reference sections 2.2 (address parsing), 2.3 (rcpthosts),
2.5 (badmailfrom) and test vectors T5, T8, T15, T17.
"""
from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from eqmail import address

from eqmail.address import (
    MAX_ADDRESS,
    AddressError,
    domain_of,
    dot_suffixes,
    in_badmailfrom,
    in_rcpthosts,
    ip_literal,
    parse_params,
    parse_path,
    split,
)

# The T1-T30 fixture of the behaviour reference, as control.load() would hold it
# (lower case).
RCPTHOSTS = frozenset(["example.org", ".example.net"])
BADMAILFROM = frozenset(["spam@bad.com", "@evil.com", ".spammer.org"])


# -- parse_path -------------------------------------------------------------------


class TestParsePathBrackets:
    def test_plain_angle_path(self):
        assert parse_path("FROM:<a@b.c>") == ("a@b.c", "")

    def test_null_path(self):
        assert parse_path("FROM:<>") == ("", "")

    def test_null_path_allowed_for_rcpt_too(self):
        assert parse_path("TO:<>") == ("", "")

    def test_from_keyword_is_not_checked(self):
        # "FROM:/TO: are never checked": only the text inside <...> counts
        assert parse_path("XYZZY<a@b.c>") == ("a@b.c", "")
        assert parse_path("TO:<a@b.c>") == ("a@b.c", "")

    def test_text_between_first_lt_and_next_gt(self):
        assert parse_path("TO: junk <u@example.org> more") == ("u@example.org", "more")

    def test_rest_holds_esmtp_parameters(self):
        addr, rest = parse_path("FROM:<a@b.c> SIZE=10 BODY=8BITMIME")
        assert addr == "a@b.c"
        assert rest == "SIZE=10 BODY=8BITMIME"

    def test_rest_is_stripped(self):
        assert parse_path("FROM:<a@b.c>   SIZE=10  \t") == ("a@b.c", "SIZE=10")

    def test_blank_inside_brackets_is_kept(self):
        # the < form ends at >, not at a blank
        assert parse_path("TO:<a b@c.d>") == ("a b@c.d", "")


class TestParsePathNoBrackets:
    def test_text_after_colon(self):
        # T17: MAIL FROM:a@b
        assert parse_path("FROM:a@b") == ("a@b", "")

    def test_leading_blanks_after_colon_skipped(self):
        assert parse_path("TO:   postmaster") == ("postmaster", "")

    def test_bare_local_part(self):
        # T17: RCPT TO:postmaster
        assert parse_path("TO:postmaster") == ("postmaster", "")

    def test_stops_at_blank_and_returns_rest(self):
        assert parse_path("FROM:a@b.c SIZE=100") == ("a@b.c", "SIZE=100")

    def test_first_colon_is_used(self):
        assert parse_path("TO:x:y@z") == ("x:y@z", "")

    def test_empty_after_colon_is_null_path(self):
        assert parse_path("FROM:") == ("", "")

    def test_no_lt_and_no_colon_is_an_error(self):
        with pytest.raises(AddressError):
            parse_path("FROM a@b.c")


class TestParsePathSourceRoute:
    def test_source_route_removed(self):
        # T17: RCPT TO:<@r.a,@r.b:u@example.org>
        assert parse_path("TO:<@r.a,@r.b:u@example.org>") == ("u@example.org", "")

    def test_single_hop_source_route_removed(self):
        assert parse_path("TO:<@relay.example:joe@example.org>") == ("joe@example.org", "")

    def test_source_route_without_colon_is_refused(self):
        # qmail skips to the end when the route has no ':' and takes "";
        # eqmail sees no closing '>' and refuses the path
        with pytest.raises(AddressError):
            parse_path("TO:<@a.example,@b.example>")

    def test_source_route_in_colon_form(self):
        assert parse_path("TO:@r.a:u@example.org") == ("u@example.org", "")

    def test_only_leading_at_is_a_route(self):
        assert parse_path("TO:<u@x:y>") == ("u@x:y", "")


class TestParsePathQuoting:
    def test_quoted_local_part(self):
        # T17 / section 2.2: "x y"@d becomes x y@d
        assert parse_path('TO: <"x y"@example.org>') == ("x y@example.org", "")

    def test_quotes_removed_anywhere(self):
        assert parse_path('TO:<"a"b"c"@d>') == ("abc@d", "")

    def test_backslash_escape_resolved(self):
        assert parse_path(r"TO:<a\b@d>") == ("ab@d", "")

    def test_escaped_quote_is_kept(self):
        assert parse_path(r'TO:<a\"b@d>') == ('a"b@d', "")

    def test_escaped_backslash_is_one_backslash(self):
        assert parse_path(r"TO:<a\\b@d>") == ("a\\b@d", "")

    def test_quotes_removed_in_colon_form(self):
        assert parse_path('FROM:"joe"@example.org') == ("joe@example.org", "")


class TestParsePathLimits:
    @staticmethod
    def _address(length: int) -> str:
        domain = "@example.org"
        return "a" * (length - len(domain)) + domain

    def test_895_characters_accepted(self):
        # T15
        addr = self._address(895)
        assert len(addr) == 895
        assert parse_path("FROM:<%s>" % addr) == (addr, "")

    def test_899_characters_accepted(self):
        addr = self._address(899)
        assert parse_path("FROM:<%s>" % addr)[0] == addr

    def test_900_characters_refused(self):
        # T15: 900 characters or more -> 555
        addr = self._address(900)
        assert len(addr) == 900 == MAX_ADDRESS
        with pytest.raises(AddressError):
            parse_path("FROM:<%s>" % addr)

    def test_much_longer_refused(self):
        with pytest.raises(AddressError):
            parse_path("FROM:<%s>" % self._address(5000))

    def test_length_counts_after_quote_removal(self):
        # 900 characters on the wire, 898 after the quotes go: accepted
        addr = '"' + "a" * 886 + '"@example.org'
        assert len(addr) == 900
        got, _ = parse_path("FROM:<%s>" % addr)
        assert len(got) == 898

    def test_length_limit_in_colon_form(self):
        with pytest.raises(AddressError):
            parse_path("FROM:" + self._address(900))


class TestParsePathControlCharacters:
    @pytest.mark.parametrize("ch", ["\x00", "\r", "\n", "\t", "\x01", "\x1b", "\x1f", "\x7f"])
    def test_control_character_refused(self, ch):
        with pytest.raises(AddressError):
            parse_path("TO:<a%sb@example.org>" % ch)

    def test_nul_refused_in_colon_form(self):
        with pytest.raises(AddressError):
            parse_path("TO:a\x00b@example.org")

    def test_escaped_control_character_still_refused(self):
        with pytest.raises(AddressError):
            parse_path("TO:<a\\\x00b@example.org>")

    def test_space_and_tilde_allowed(self):
        assert parse_path("TO:<a ~b@example.org>") == ("a ~b@example.org", "")

    def test_non_ascii_letters_allowed(self):
        assert parse_path("TO:<jörg@example.org>") == ("jörg@example.org", "")


@settings(max_examples=500)
@given(st.text())
@example("")
@example("<")
@example(":")
@example("<\\")
@example(":@")
@example('<"\\>')
def test_parse_path_raises_only_address_error(text):
    try:
        address, rest = parse_path(text)
    except AddressError:
        return
    assert isinstance(address, str) and isinstance(rest, str)
    assert len(address) < MAX_ADDRESS
    assert not any(ch < " " or ch == "\x7f" for ch in address)
    assert rest == rest.strip()


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                      blacklist_categories=("Cs",)), max_size=50),
       st.text(max_size=50))
def test_parse_path_any_prefix_raises_only_address_error(prefix, inside):
    try:
        parse_path(prefix + "<" + inside + ">")
    except AddressError:
        pass


_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_+=", min_size=1, max_size=40)


@given(_atom, _atom)
def test_parse_path_round_trips_plain_addresses(local, domain):
    addr = "%s@%s" % (local, domain)
    assert parse_path("FROM:<%s>" % addr) == (addr, "")
    assert parse_path("TO:%s" % addr) == (addr, "")
    assert parse_path("TO:<%s> SIZE=1" % addr) == (addr, "SIZE=1")


# -- parse_params, split, domain_of ------------------------------------------------


class TestParseParams:
    def test_key_value_pairs(self):
        assert parse_params("SIZE=100 BODY=8BITMIME") == {"SIZE": "100", "BODY": "8BITMIME"}

    def test_keys_upper_cased_values_kept(self):
        assert parse_params("size=100 body=8bitmime") == {"SIZE": "100", "BODY": "8bitmime"}

    def test_key_without_value_is_none(self):
        assert parse_params("SMTPUTF8") == {"SMTPUTF8": None}

    def test_empty_value_is_empty_string(self):
        assert parse_params("AUTH=") == {"AUTH": ""}

    def test_value_split_at_first_equals(self):
        assert parse_params("AUTH=a=b") == {"AUTH": "a=b"}

    def test_auth_with_brackets(self):
        assert parse_params("AUTH=<fake+2Buser@evil>") == {"AUTH": "<fake+2Buser@evil>"}

    def test_empty(self):
        assert parse_params("") == {}
        assert parse_params("   \t ") == {}

    def test_multiple_blanks(self):
        assert parse_params("  SIZE=1 \t  BODY=7BIT ") == {"SIZE": "1", "BODY": "7BIT"}


@given(st.text())
def test_parse_params_property(text):
    params = parse_params(text)
    assert isinstance(params, dict)
    for key, value in params.items():
        assert key == key.upper()
        assert value is None or isinstance(value, str)
        assert not any(ch.isspace() for ch in key)


class TestSplit:
    def test_simple(self):
        assert split("joe@example.org") == ("joe", "example.org")

    def test_splits_at_last_at(self):
        assert split("a@b@example.org") == ("a@b", "example.org")

    def test_no_at(self):
        assert split("postmaster") == ("postmaster", "")

    def test_empty(self):
        assert split("") == ("", "")

    def test_trailing_at(self):
        assert split("joe@") == ("joe", "")

    def test_case_kept(self):
        assert split("Joe@Example.ORG") == ("Joe", "Example.ORG")

    def test_domain_of_lower_cases(self):
        assert domain_of("Joe@Example.ORG") == "example.org"
        assert domain_of("postmaster") == ""


@given(st.text())
def test_split_property(address):
    local, domain = split(address)
    assert "@" not in domain
    if "@" in address:
        assert "%s@%s" % (local, domain) == address
    else:
        assert (local, domain) == (address, "")


# -- dot_suffixes ----------------------------------------------------------------------


class TestDotSuffixes:
    def test_longest_first(self):
        assert list(dot_suffixes("a.b.example.com")) == [".b.example.com", ".example.com", ".com"]

    def test_domain_itself_not_included(self):
        assert "example.com" not in list(dot_suffixes("example.com"))
        assert list(dot_suffixes("example.com")) == [".com"]

    def test_no_dot(self):
        assert list(dot_suffixes("localhost")) == []
        assert list(dot_suffixes("")) == []

    def test_leading_dot(self):
        assert list(dot_suffixes(".example.com")) == [".example.com", ".com"]


@given(st.text(alphabet="ab.", max_size=20))
def test_dot_suffixes_property(domain):
    keys = list(dot_suffixes(domain))
    assert keys == [domain[i:] for i, ch in enumerate(domain) if ch == "."]
    assert all(len(a) > len(b) for a, b in zip(keys, keys[1:]))


# -- in_rcpthosts ----------------------------------------------------------------------


class TestInRcpthosts:
    # T5
    def test_exact_entry(self):
        assert in_rcpthosts("x@example.org", RCPTHOSTS)

    def test_suffix_entry_matches_subdomain(self):
        assert in_rcpthosts("y@sub.example.net", RCPTHOSTS)

    def test_suffix_entry_matches_deeper_subdomain(self):
        assert in_rcpthosts("y@a.b.example.net", RCPTHOSTS)

    def test_suffix_entry_does_not_match_bare_domain(self):
        assert not in_rcpthosts("z@example.net", RCPTHOSTS)

    def test_other_domain_refused(self):
        assert not in_rcpthosts("w@other.com", RCPTHOSTS)

    def test_exact_entry_does_not_match_subdomain(self):
        assert not in_rcpthosts("x@sub.example.org", RCPTHOSTS)

    def test_suffix_only_on_dot_boundary(self):
        assert not in_rcpthosts("x@badexample.net", RCPTHOSTS)
        assert not in_rcpthosts("x@notexample.org", RCPTHOSTS)

    def test_address_without_at_passes(self):
        assert in_rcpthosts("postmaster", RCPTHOSTS)
        assert in_rcpthosts("postmaster", frozenset())

    def test_case_ignored(self):
        assert in_rcpthosts("X@EXAMPLE.ORG", RCPTHOSTS)
        assert in_rcpthosts("y@Sub.Example.NET", RCPTHOSTS)

    def test_last_at_decides(self):
        assert in_rcpthosts("a@other.com@example.org", RCPTHOSTS)
        assert not in_rcpthosts("a@example.org@other.com", RCPTHOSTS)

    def test_empty_domain_refused(self):
        assert not in_rcpthosts("joe@", RCPTHOSTS)

    def test_empty_table_refuses(self):
        assert not in_rcpthosts("x@example.org", frozenset())

    def test_morercpthosts_exact(self):
        more = frozenset(["other.com"])
        assert in_rcpthosts("w@other.com", RCPTHOSTS, more)
        assert not in_rcpthosts("w@third.com", RCPTHOSTS, more)

    def test_morercpthosts_suffix(self):
        more = frozenset([".other.com"])
        assert in_rcpthosts("w@mx.other.com", RCPTHOSTS, more)
        assert not in_rcpthosts("w@other.com", RCPTHOSTS, more)

    def test_morercpthosts_alone(self):
        assert in_rcpthosts("w@other.com", frozenset(), frozenset(["other.com"]))

    def test_top_level_suffix(self):
        assert in_rcpthosts("w@anything.com", frozenset([".com"]))


# -- in_badmailfrom --------------------------------------------------------------------


class TestInBadmailfrom:
    # T8
    def test_whole_address(self):
        assert in_badmailfrom("spam@bad.com", BADMAILFROM)

    def test_whole_address_case_ignored(self):
        assert in_badmailfrom("SPAM@BAD.COM", BADMAILFROM)

    def test_other_local_part_at_listed_address_domain(self):
        assert not in_badmailfrom("ham@bad.com", BADMAILFROM)

    def test_at_domain(self):
        assert in_badmailfrom("joe@evil.com", BADMAILFROM)
        assert in_badmailfrom("Joe@Evil.COM", BADMAILFROM)

    def test_at_domain_is_exact(self):
        assert not in_badmailfrom("joe@sub.evil.com", BADMAILFROM)
        assert not in_badmailfrom("joe@notevil.com", BADMAILFROM)

    def test_dot_suffix_blocks_subdomain(self):
        assert in_badmailfrom("joe@mail.spammer.org", BADMAILFROM)
        assert in_badmailfrom("joe@a.b.spammer.org", BADMAILFROM)
        assert in_badmailfrom("JOE@MAIL.SPAMMER.ORG", BADMAILFROM)

    def test_dot_suffix_does_not_block_bare_domain(self):
        assert not in_badmailfrom("joe@spammer.org", BADMAILFROM)

    def test_dot_suffix_only_on_dot_boundary(self):
        assert not in_badmailfrom("joe@notspammer.org", BADMAILFROM)

    def test_top_level_wildcard(self):
        assert in_badmailfrom("anyone@example.com", frozenset([".com"]))

    def test_null_sender_never(self):
        assert not in_badmailfrom("", BADMAILFROM)
        assert not in_badmailfrom("", frozenset([""]))

    def test_empty_list(self):
        assert not in_badmailfrom("spam@bad.com", frozenset())

    def test_innocent_sender(self):
        assert not in_badmailfrom("joe@example.org", BADMAILFROM)

    def test_address_without_at(self):
        assert not in_badmailfrom("postmaster", BADMAILFROM)
        assert in_badmailfrom("postmaster", frozenset(["postmaster"]))


# -- ip_literal ----------------------------------------------------------------------------


class TestIpLiteral:
    def test_ipv4(self):
        assert ip_literal("[192.0.2.1]") == "192.0.2.1"
        assert ip_literal("[127.0.0.1]") == "127.0.0.1"

    def test_ipv6(self):
        assert ip_literal("[IPv6:2001:db8::1]") == "2001:db8::1"
        assert ip_literal("[IPv6:::1]") == "::1"

    def test_ipv6_tag_case_ignored(self):
        assert ip_literal("[ipv6:2001:db8::1]") == "2001:db8::1"
        assert ip_literal("[IPV6:2001:db8::1]") == "2001:db8::1"

    def test_ipv6_normalised(self):
        assert ip_literal("[IPv6:2001:DB8:0:0:0:0:0:1]") == "2001:db8::1"

    @pytest.mark.parametrize("domain", [
        "example.org",
        "192.0.2.1",            # no brackets
        "[192.0.2.1",
        "192.0.2.1]",
        "[]",
        "[256.0.0.1]",
        "[192.0.2]",
        "[192.0.2.1.5]",
        "[ 192.0.2.1]",
        "[example.org]",
        "[::1]",                # IPv6 needs the IPv6: tag
        "[2001:db8::1]",
        "[IPv6:]",
        "[IPv6:192.0.2.1]",
        "[IPv6:2001:db8::g]",
        "[IPv6:1:2:3:4:5:6:7:8:9]",
        "[IPv4:192.0.2.1]",
    ])
    def test_invalid(self, domain):
        assert ip_literal(domain) is None

    def test_ipv6_zone_index_is_not_a_valid_literal(self):
        assert ip_literal("[IPv6:fe80::1%eth0]") is None


@given(st.text())
def test_ip_literal_never_raises(text):
    for domain in (text, "[" + text + "]", "[IPv6:" + text + "]"):
        result = ip_literal(domain)
        assert result is None or isinstance(result, str)


@given(st.ip_addresses(v=4))
def test_ip_literal_ipv4_round_trip(ip):
    assert ip_literal("[%s]" % ip) == str(ip)


@given(st.ip_addresses(v=6))
def test_ip_literal_ipv6_round_trip(ip):
    assert ip_literal("[IPv6:%s]" % ip.exploded) == str(ip)


def test_quoted_terminator_continues_the_path():
    # qmail's addrparse: a '>' inside double quotes does not end the path
    assert parse_path('TO:<"a>b"@example.org> SIZE=1') == ("a>b@example.org", "SIZE=1")


def test_missing_closing_bracket_is_refused():
    with pytest.raises(AddressError):
        parse_path("TO:<joe@example.org")


# -- qmail's quote2() and VERP senders ---------------------------------------------------

@pytest.mark.parametrize("addr,quoted", [
    ("a@x.org", "a@x.org"), ("", ""), ("#@[]", "#@[]"), ("a b@x.org", '"a b"@x.org'),
    ("a.b@x.org", "a.b@x.org"), (".a@x.org", '".a"@x.org'), ("a..b@x.org", '"a..b"@x.org'),
    ("a.@x.org", '"a."@x.org'), ('q"t@x.org', '"q\\"t"@x.org'), ("b\\s@x.org", '"b\\\\s"@x.org'),
    ("x@y@x.org", '"x@y"@x.org'), ("nodomain", "nodomain"), ("a(b)@x", '"a(b)"@x'),
    ("j\udcf6@x.org", '"j\udcf6"@x.org'),  # a byte that is not UTF-8: quoted
    ("j\u00f6@x.org", "j\u00f6@x.org"),    # UTF-8 is atext (RFC 6532), unlike qmail
])
def test_quote_address_as_qmails_quote2(addr, quoted):
    assert address.quote_address(addr) == quoted


def test_quote_address_utf8_keeps_non_ascii_atoms():
    assert address.quote_address("j\u00f6@x.org", utf8=True) == "j\u00f6@x.org"
    assert address.quote_address("j \u00f6@x.org", utf8=True) == '"j \u00f6"@x.org'


@pytest.mark.parametrize("sender,rcpt,out", [
    ("joe+list-owner-@example.org-@[]", "bob@far.test", "joe+list-owner-bob=far.test@example.org"),
    ("o-@h-@[]", "a@b", "o-a=b@h"),
    ("plain@x.org", "bob@far.test", "plain@x.org"),
    ("", "bob@far.test", ""),
    ("o-@h-@[]", "nodomain", "o-@h-@[]"),
    ("-@[]", "a@b", "-@[]"),
])
def test_verp_sender_as_qmail_sends(sender, rcpt, out):
    assert address.verp_sender(sender, rcpt) == out


def test_verp_bounce_sender():
    assert address.verp_bounce_sender("o-@h-@[]") == "o-@h"
    assert address.verp_bounce_sender("a@b") == "a@b"
    assert address.verp_bounce_sender("") == ""
