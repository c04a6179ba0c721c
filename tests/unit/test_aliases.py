"""The aliases file (eqmail.delivery.aliases): sendmail's format as
fastforward's newaliases reads it, errors with file and line."""
from __future__ import annotations

import os

import pytest

from eqmail.delivery import aliases


def parse(tmp_path, text):
    p = tmp_path / "aliases"
    p.write_text(text)
    return dict(aliases.parse(str(p)))


def test_entries_continuations_quotes_and_kinds(tmp_path):
    got = parse(tmp_path, "# c\n\nRoot: joe, \\bob\n  , x@y.org\n"
                          'prog: "|/bin/a b, c"\nfile: /var/log/m\n'
                          "inc: :INCLUDE: /etc/l\nexact@example.org: <z@y.org>\n")
    assert got["root@"].targets == ("&joe", "&bob", "&x@y.org")
    assert got["root@"].where.endswith("aliases:3")
    assert got["prog@"].targets == ("|/bin/a b, c",)
    assert got["file@"].targets == ("/var/log/m",)
    assert got["inc@"].targets == (":include:/etc/l",)
    assert got["exact@example.org"].targets == ("&z@y.org",)


@pytest.mark.parametrize("text,line,problem", [
    ("root joe\n", 1, "expected name: target"),
    ("root:\n", 1, "no target for root"),
    ("a: b\n\nc: d,,e\n", 3, "empty target"),
    ("a: b\na: c\n", 2, "a is already defined on line 1"),
    ("  a: b\n", 1, "continuation line without an entry"),
    ("a: :include:rel\n", 1, "absolute path"),
    ('a: "|x\n', 1, "unbalanced double quote"),
    ("a: error:nouser\n", 1, "unsupported target"),
    ("a: b\x01\n", 1, "control characters"),
])
def test_bad_entries_name_file_and_line(tmp_path, text, line, problem):
    with pytest.raises(aliases.AliasError) as e:
        parse(tmp_path, text)
    assert e.value.lineno == line
    assert problem in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "aliases"))


def test_compile_then_lookup_exact_domain_first(tmp_path):
    src = tmp_path / "aliases"
    src.write_text("root: joe\nroot@b.example: ann\n")
    assert aliases.compile_file(str(src)) == 2
    assert not os.path.exists(str(src) + ".tmp")

    class C:
        aliases = str(src)
    assert aliases.lookup(C, "ROOT", "a.example").targets == ("&joe",)
    assert aliases.lookup(C, "root", "B.example").targets == ("&ann",)
    assert aliases.lookup(C, "nobody", "a.example") is None
    e = aliases.lookup(C, "root", "a.example")
    assert aliases.dot_qmail_lines(e, "host.example") == ["&joe@host.example"]


def test_include_files_list_addresses_only(tmp_path):
    inc = tmp_path / "l"
    inc.write_text("# members\na@x.org, b\n\nc@y.org\n")
    assert aliases.read_include(str(inc)) == ["a@x.org", "b", "c@y.org"]
    inc.write_text("a@x.org\n|/bin/sh\n")
    with pytest.raises(aliases.AliasError, match="only addresses"):
        aliases.read_include(str(inc))
