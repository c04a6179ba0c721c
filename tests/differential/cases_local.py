"""The local deliveries, one case a line.

`L(id, files, ext=..., sender=..., message=..., ...)`: user joe's home
gets `files` (``{HOME}`` in a text becomes the home's path) and an empty
Maildir ``Maildir/``; then qmail-local, or eqmail's deliver(), runs once as
``qmail-local -- joe HOME joe[+ext] dash ext example.org sender
./Maildir/`` with the message on stdin.  Compared: the exit code (0, 99
never leaves qmail-local, 100, 111), the report, the "did" counts, the
forward (sender, recipients), and every file written below the home.
"""
from __future__ import annotations

from eqdiff import LocalCase


def L(id, files=None, **kw) -> LocalCase:
    return LocalCase(id, dict(files or {}), **kw)


ENV_VARS = ("USER HOME LOCAL HOST HOST2 HOST3 HOST4 RECIPIENT SENDER NEWSENDER EXT EXT2 "
            "EXT3 EXT4 DEFAULT DTLINE RPLINE")
#: A program line that writes the qmail-local variables (not UFLINE: it
#: holds the time) into the file "env" in the home.
ENV_PROG = ("|for v in %s; do eval \"echo $v=\\${$v-unset}\"; done > env\n" % ENV_VARS)
LOOPING = "Delivered-To: joe+x@example.org\nSubject: loop\n\nbody\n"
T33 = ("&bob@example.com\n./Maildir/\n|echo program ran\n# comment\n"
       "alice@example.net\n./mbox\n")

CASES = [
    # -- which file, defaultdelivery ------------------------------------------------------
    L("default-bare-user"),
    L("default-mbox", defaultdelivery="./Mailbox"),
    L("empty-dot-qmail", {".qmail": ""}),
    L("dot-qmail-bare", {".qmail": "./Maildir/\n"}),
    L("ext-exact", {".qmail-foo": "./Maildir/\n"}, ext="foo"),
    L("ext-missing", {".qmail": "./Maildir/\n"}, ext="nothere"),
    L("ext-default", {".qmail-default": ENV_PROG}, ext="anything"),
    L("ext-prefix-default", {".qmail-foo-default": ENV_PROG, ".qmail-default": "./nope\n"},
      ext="foo-bar-baz"),
    L("ext-deepest-default", {".qmail-a-b-default": ENV_PROG, ".qmail-a-default": "./nope\n"},
      ext="a-b-c"),
    L("ext-exact-beats-default", {".qmail-a-b": ENV_PROG, ".qmail-a-default": "./nope\n"},
      ext="a-b"),
    L("ext-upper-case", {".qmail-foo-default": ENV_PROG}, ext="Foo-Bar"),
    L("ext-dot", {".qmail-a:b": ENV_PROG}, ext="a.b"),
    L("ext-plus-not-split", {".qmail-a+b": ENV_PROG}, ext="a+b"),
    L("ext-empty-with-dash", {".qmail-": ENV_PROG, ".qmail": "./nope\n"}, dash="-"),
    # -- the environment of programs -----------------------------------------------------
    L("env-bare", {".qmail": ENV_PROG}),
    L("env-ext", {".qmail-foo": ENV_PROG}, ext="foo"),
    L("env-host-two-labels", {".qmail-foo": ENV_PROG}, ext="foo"),
    L("env-host-four-labels", {".qmail-foo": ENV_PROG}, ext="foo", domain="a.b.mail.example.org"),
    L("env-host-one-label", {".qmail-foo": ENV_PROG}, ext="foo", domain="localhost"),
    L("env-null-sender", {".qmail": ENV_PROG}, sender=""),
    L("env-owner", {".qmail-list": ENV_PROG, ".qmail-list-owner": "./Maildir/\n"}, ext="list"),
    L("env-owner-default", {".qmail-list": ENV_PROG, ".qmail-list-owner": "./Maildir/\n",
                            ".qmail-list-owner-default": "./Maildir/\n"}, ext="list"),
    L("env-owner-null-sender", {".qmail-list": ENV_PROG, ".qmail-list-owner": "x\n"},
      ext="list", sender=""),
    L("env-ext-words", {".qmail-a-default": ENV_PROG}, ext="a-b-c-d-e"),
    # -- Maildir and mbox ------------------------------------------------------------------
    L("maildir-relative", {".qmail": "./Maildir/\n"}),
    L("maildir-absolute", {".qmail": "{HOME}/Maildir/\n"}),
    L("maildir-missing", {".qmail": "./NoMaildir/\n"}),
    L("maildir-two", {".qmail": "./Maildir/\n./Other/\n"}, dirs=("Maildir/", "Other/")),
    L("mbox-new", {".qmail": "./mbox\n"}),
    L("mbox-existing", {".qmail": "./mbox\n", "mbox": "From old Mon Jan  1 00:00:00 2001\n\nold\n\n"}),
    L("mbox-absolute", {".qmail": "{HOME}/mbox\n"}),
    L("mbox-null-sender", {".qmail": "./mbox\n"}, sender=""),
    L("mbox-sender-with-space", {".qmail": "./mbox\n"}, sender="a b@x.org"),
    L("mbox-from-quoting", {".qmail": "./mbox\n"},
      message="Subject: q\n\nFrom me\n>From you\n>>From them\nFromage\n From x\n"),
    L("mbox-no-final-newline", {".qmail": "./mbox\n"}, message="Subject: x\n\nno newline"),
    L("mbox-empty-message", {".qmail": "./mbox\n"}, message=""),
    L("mbox-missing-dir", {".qmail": "./nodir/mbox\n"}),
    L("maildir-null-sender", {".qmail": "./Maildir/\n"}, sender=""),
    L("maildir-8bit", {".qmail": "./Maildir/\n"},
      message="Subject: caf\u00e9\n\ngr\u00fc\u00df\n"),
    # -- programs and their exit codes -------------------------------------------------------
    L("prog-0", {".qmail": "|echo hello\n"}),
    L("prog-0-silent", {".qmail": "|true\n"}),
    L("prog-99", {".qmail-z": "|exit 99\n|echo second\nbob@example.com\n"}, ext="z"),
    L("prog-99-after-forward", {".qmail": "bob@example.com\n|exit 99\ncarol@example.com\n"}),
    L("prog-99-after-file", {".qmail": "./Maildir/\n|exit 99\n./mbox\n"}),
    L("prog-100", {".qmail": "|echo no such user; exit 100\n./Maildir/\n"}),
    L("prog-100-silent", {".qmail": "|exit 100\n"}),
    L("prog-111", {".qmail": "|echo try later; exit 111\n./Maildir/\n"}),
    L("prog-111-silent", {".qmail": "|exit 111\n"}),
    L("prog-64", {".qmail": "|echo usage; exit 64\n"}),
    L("prog-65", {".qmail": "|exit 65\n"}),
    L("prog-70", {".qmail": "|exit 70\n"}),
    L("prog-76", {".qmail": "|exit 76\n"}),
    L("prog-77", {".qmail": "|exit 77\n"}),
    L("prog-78", {".qmail": "|exit 78\n"}),
    L("prog-112", {".qmail": "|exit 112\n"}),
    L("prog-1", {".qmail": "|echo oops; exit 1\n"}),
    L("prog-2", {".qmail": "|exit 2\n"}),
    L("prog-75", {".qmail": "|exit 75\n"}),
    L("prog-crash", {".qmail": "|kill -SEGV $$\n"}),
    L("prog-stdin", {".qmail": "|cat > got\n"}),
    L("prog-stdin-twice", {".qmail": "|head -c 7 > first\n|cat > second\n"}),
    L("prog-stderr", {".qmail": "|echo to stderr >&2\n"}),
    L("prog-multiline-output", {".qmail": "|echo one; echo two\n"}),
    L("prog-cwd", {".qmail": "|pwd > where\n"}),
    L("prog-then-maildir", {".qmail": "|echo one\n./Maildir/\n"}),
    L("prog-fails-after-maildir", {".qmail": "./Maildir/\n|exit 111\n"}),
    # -- forwards ----------------------------------------------------------------------------
    L("forward-ampersand", {".qmail": "&bob@example.com\n"}),
    L("forward-plain", {".qmail": "bob@example.com\n"}),
    L("forward-several", {".qmail": "bob@example.com\n&carol@example.net\ndave\n"}),
    L("forward-with-file", {".qmail": T33}),
    L("forward-owner", {".qmail-list": "bob@example.com\n", ".qmail-list-owner": "x\n"},
      ext="list"),
    L("forward-owner-default", {".qmail-list": "bob@example.com\n", ".qmail-list-owner": "x\n",
                                ".qmail-list-owner-default": "x\n"}, ext="list"),
    L("forward-null-sender", {".qmail-list": "bob@example.com\n", ".qmail-list-owner": "x\n"},
      ext="list", sender=""),
    L("forward-bounce-sender", {".qmail-list": "bob@example.com\n", ".qmail-list-owner": "x\n"},
      ext="list", sender="#@[]"),
    L("forward-only-x-bit", {".qmail": "bob@example.com\n"}, modes={".qmail": 0o755}),
    L("forward-ampersand-space", {".qmail": "& bob@example.com\n"}),
    # -- the dot-qmail file's own rules ------------------------------------------------------
    L("comments-and-blank-lines", {".qmail": "# first\n./Maildir/\n\n# another\n"}),
    L("trailing-blanks", {".qmail": "./Maildir/ \t\n|echo x  \n"}),
    L("first-line-blank", {".qmail": "\n./Maildir/\n"}),
    L("no-final-newline", {".qmail": "./Maildir/"}),
    L("x-bit-with-file", {".qmail": "./Maildir/\n"}, modes={".qmail": 0o755}),
    L("x-bit-with-prog", {".qmail": "|true\n"}, modes={".qmail": 0o755}),
    L("plus-list-then-file", {".qmail": "+list\n./Maildir/\n"}),
    L("plus-list-then-forward", {".qmail": "+list\nbob@example.com\n"}),
    L("plus-other", {".qmail": "+other\n./Maildir/\n"}),
    L("dot-qmail-writable", {".qmail": "./Maildir/\n"}, modes={".qmail": 0o666}),
    L("home-writable", {".qmail": "./Maildir/\n"}, home_mode=0o757),
    L("home-sticky", {".qmail": "./Maildir/\n"}, home_mode=0o1755),
    L("home-group-writable", {".qmail": "./Maildir/\n"}, home_mode=0o775),
    L("loop-delivered-to", {".qmail-x": "./Maildir/\n"}, ext="x", message=LOOPING),
    L("loop-other-delivered-to", {".qmail-y": "./Maildir/\n"}, ext="y", message=LOOPING),
    L("loop-in-body-only", {".qmail-x": "./Maildir/\n"}, ext="x",
      message="Subject: x\n\nDelivered-To: joe+x@example.org\n"),
    L("loop-case-differs", {".qmail-x": "./Maildir/\n"}, ext="x",
      message="delivered-to: joe+x@example.org\n\nb\n"),
]
