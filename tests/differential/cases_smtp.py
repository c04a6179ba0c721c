"""The SMTP dialogues, one case a line.

`S(id, line, line, ..., env=..., control=..., plugins=..., qexit=...)`:
the client lines are sent with CRLF (bytes items as they are), then QUIT
unless quit=False.  Every case runs with the control files of
eqdiff.BASE_CONTROL (me mx.example.org; rcpthosts example.org,
.example.net, mx.example.org; badmailfrom spam@bad.com, @evil.com,
.spammer.org) and the environment of eqdiff.BASE_ENV; `control` and `env`
override them (None removes).  `plugins` is a list of (section, shell
script) pairs: each becomes bin/plugins/pN and is listed under its
section in control/smtpplugins, in order.  `spp(section, *lines)` is a
plugin printing those lines.
"""
from __future__ import annotations

from eqdiff import SmtpCase


def S(id, *lines, **kw) -> SmtpCase:
    return SmtpCase(id, tuple(lines), **kw)


def spp(section, *lines):
    """A plugin of `section` printing `lines`, each with LF."""
    return (section, "".join("printf '%%s\\n' '%s'\n" % l for l in lines))


def sh(section, script):
    return (section, script)


MAIL = "MAIL FROM:<a@b.c>"
RCPT = "RCPT TO:<x@example.org>"
BODY = ("DATA", "Subject: t", "", "hi", ".")
TX = (MAIL, RCPT) + BODY
HELO = "HELO client.example"
EHLO = "EHLO client.example"
PLAIN = "AUTH PLAIN AGpvZQBzZWNyZXQ="      # \0joe\0secret
DB100 = {"DATABYTES": "100"}
LONG_ADDR = lambda n: "u" * (n - len("@example.org")) + "@example.org"  # noqa: E731

CASES = [
    # -- every verb ------------------------------------------------------------------
    S("greeting-quit"),
    S("helo", HELO),
    S("ehlo", EHLO),
    S("helo-no-arg", "HELO"),
    S("ehlo-no-arg", "EHLO"),
    S("noop", "NOOP"),
    S("noop-arg", "NOOP whatever"),
    S("rset", "RSET"),
    S("vrfy", "VRFY joe"),
    S("vrfy-no-arg", "VRFY"),
    S("help", "HELP"),
    S("expn", "EXPN list"),
    S("unknown-verb", "FOO bar"),
    S("empty-line", ""),
    S("verb-tab", "NOOP\tx"),
    S("lower-case", "helo x", "mail from:<a@b.c>", "rcpt to:<x@example.org>", "data",
      "Subject: t", "", "hi", "."),
    S("mixed-case", "HeLo x", "MaIl FrOm:<a@b.c>", "RcPt To:<x@example.org>", *BODY),
    S("quit-arg", "QUIT now", quit=False),
    S("eof-no-quit", HELO, quit=False),
    S("after-quit", "QUIT", "NOOP", quit=False),
    S("starttls-no-tls", EHLO, "STARTTLS"),
    S("full-helo", HELO, *TX),
    S("full-ehlo", EHLO, *TX),
    S("no-helo", *TX),
    # -- ordering errors -------------------------------------------------------------
    S("rcpt-before-mail", RCPT),
    S("data-before-mail", "DATA"),
    S("data-before-rcpt", MAIL, "DATA"),
    S("rcpt-after-rset", MAIL, "RSET", RCPT, "DATA"),
    S("rcpt-after-helo", MAIL, HELO, RCPT),
    S("rcpt-after-ehlo", MAIL, EHLO, RCPT),
    S("data-after-refused-rcpt", MAIL, "RCPT TO:<x@other.com>", "DATA"),
    S("second-mail-new-transaction", MAIL, RCPT, "MAIL FROM:<b@b.c>",
      "RCPT TO:<y@example.org>", *BODY),
    S("two-messages", *TX, "MAIL FROM:<b@b.c>", "RCPT TO:<y@example.org>", *BODY),
    S("rcpt-after-data", *TX, RCPT),
    S("data-twice", *TX, "DATA"),
    S("mail-twice-no-rcpt", MAIL, MAIL, "DATA"),
    S("rset-between", MAIL, RCPT, "RSET", "MAIL FROM:<b@b.c>", "RCPT TO:<y@example.org>",
      *BODY),
    S("noop-vrfy-in-transaction", MAIL, "NOOP", "VRFY x", RCPT, "NOOP x", *BODY),
    # -- rcpthosts, RELAYCLIENT, percenthack, localiphost ----------------------------------
    S("rcpthosts-t5", MAIL, "RCPT TO:<x@example.org>", "RCPT TO:<y@sub.example.net>",
      "RCPT TO:<z@example.net>", "RCPT TO:<w@other.com>", *BODY),
    S("rcpthosts-case", MAIL, "RCPT TO:<X@EXAMPLE.ORG>", "RCPT TO:<y@Sub.Example.NET>", *BODY),
    S("rcpthosts-missing", MAIL, "RCPT TO:<u@anywhere.com>", control={"rcpthosts": None}),
    S("rcpthosts-comments", MAIL, "RCPT TO:<u@c.org>", "RCPT TO:<u@d.org>", *BODY,
      control={"rcpthosts": "# c.org\n\nd.org  \n"}),
    S("rcpthosts-no-at", MAIL, "RCPT TO:<postmaster>", *BODY),
    S("rcpthosts-trailing-dot", MAIL, "RCPT TO:<x@example.org.>"),
    S("morercpthosts-plain", MAIL, "RCPT TO:<x@more.org>", control={"morercpthosts": "more.org\n"}),
    S("relayclient-empty", MAIL, "RCPT TO:<u@other.com>", *BODY, env={"RELAYCLIENT": ""}),
    S("relayclient-suffix", MAIL, "RCPT TO:<u@other.com>", *BODY, env={"RELAYCLIENT": ".relay"}),
    S("relayclient-set-by-plugin", MAIL, "RCPT TO:<u@other.com>",
      plugins=[spp("mail", "SRELAYCLIENT=")]),
    S("percenthack-relay", MAIL, "RCPT TO:<u%other.com@example.org>",
      control={"percenthack": "example.org\n"}),
    S("percenthack-local", MAIL, "RCPT TO:<u%sub.example.net@example.org>", *BODY,
      control={"percenthack": "example.org\n"}),
    S("percenthack-none", MAIL, "RCPT TO:<u%other.com@example.org>", *BODY),
    S("percenthack-relayclient", MAIL, "RCPT TO:<u%other.com@example.org>", *BODY,
      control={"percenthack": "example.org\n"}, env={"RELAYCLIENT": ""}),
    S("localiphost-loopback", MAIL, "RCPT TO:<postmaster@[127.0.0.1]>", *BODY),
    S("localiphost-file", MAIL, "RCPT TO:<postmaster@[127.0.0.1]>", *BODY,
      control={"localiphost": "lip.example.org\n"}),
    S("localiphost-relayclient", MAIL, "RCPT TO:<pm@[127.0.0.1]>", *BODY,
      control={"rcpthosts": "example.org\n"}, env={"RELAYCLIENT": ""}),
    S("literal-foreign", MAIL, "RCPT TO:<pm@[192.0.2.99]>"),
    # -- address oddities ----------------------------------------------------------------
    S("mail-no-brackets", "MAIL FROM:a@b.c", "RCPT TO:postmaster", *BODY),
    S("mail-space-before-bracket", "MAIL FROM: <a@b.c>", "RCPT TO: <x@example.org>", *BODY),
    S("quoted-local-part", MAIL, 'RCPT TO: <"x y"@example.org>', *BODY),
    S("source-route", MAIL, "RCPT TO:<@r.a,@r.b:u@example.org>", *BODY),
    S("escaped-char", "MAIL FROM:<a\\>b@c.d>", RCPT, *BODY),
    S("null-sender", "MAIL FROM:<>", RCPT, *BODY),
    S("rcpt-null", MAIL, "RCPT TO:<>"),
    S("mail-unclosed", "MAIL FROM:<a@b.c", RCPT),
    S("mail-bare", "MAIL", RCPT, *BODY),
    S("mail-colon-empty", "MAIL FROM:", RCPT, *BODY),
    S("mail-no-colon", "MAIL a@b.c", RCPT),
    S("mail-from-word-ignored", "MAIL TO:<a@b.c>", "RCPT FROM:<x@example.org>", *BODY),
    S("mail-trailing-spaces", "MAIL FROM:<a@b.c>   ", RCPT, *BODY),
    S("mail-double-space", "MAIL  FROM:<a@b.c>", RCPT, *BODY),
    S("address-899", "MAIL FROM:<%s>" % LONG_ADDR(899), RCPT, *BODY),
    S("address-900", "MAIL FROM:<%s>" % LONG_ADDR(900), RCPT),
    S("rcpt-address-900", MAIL, "RCPT TO:<%s>" % LONG_ADDR(900)),
    S("address-8bit", "MAIL FROM:<j\u00f6rg@b.c>", "RCPT TO:<m\u00fcller@example.org>", *BODY),
    S("address-control-char", "MAIL FROM:<a\x01b@c.d>", RCPT),
    S("address-uppercase-kept", "MAIL FROM:<A@B.C>", "RCPT TO:<X@Example.ORG>", *BODY),
    S("mail-param-body", "MAIL FROM:<a@b.c> BODY=8BITMIME", RCPT, *BODY),
    S("mail-param-size-no-limit", "MAIL FROM:<a@b.c> SIZE=123456789", RCPT, *BODY),
    S("mail-param-auth", "MAIL FROM:<a@b.c> AUTH=<fake+2Buser@evil>", RCPT, *BODY),
    S("rcpt-param", MAIL, "RCPT TO:<x@example.org> NOTIFY=NEVER", *BODY),
    S("rcpt-many", MAIL, *["RCPT TO:<u%d@example.org>" % i for i in range(50)], *BODY),
    # -- badmailfrom ---------------------------------------------------------------------
    S("bmf-exact", "MAIL FROM:<spam@bad.com>", RCPT, RCPT, "DATA"),
    S("bmf-at-domain", "MAIL FROM:<joe@evil.com>", RCPT),
    S("bmf-dot-suffix", "MAIL FROM:<joe@mail.spammer.org>", RCPT),
    S("bmf-dot-suffix-deep", "MAIL FROM:<joe@a.b.spammer.org>", RCPT),
    S("bmf-dot-suffix-not-parent", "MAIL FROM:<joe@spammer.org>", RCPT, *BODY),
    S("bmf-case", "MAIL FROM:<SPAM@BAD.COM>", RCPT),
    S("bmf-subdomain-of-at-entry", "MAIL FROM:<joe@x.evil.com>", RCPT, *BODY),
    S("bmf-relayclient", "MAIL FROM:<spam@bad.com>", "RCPT TO:<u@other.com>",
      env={"RELAYCLIENT": ""}),
    S("bmf-then-clean-mail", "MAIL FROM:<spam@bad.com>", RCPT, MAIL, RCPT, *BODY),
    S("bmf-tld", "MAIL FROM:<joe@x.com>", RCPT, control={"badmailfrom": ".com\n"}),
    S("bmf-null-sender", "MAIL FROM:<>", RCPT, *BODY, control={"badmailfrom": "\n@\n"}),
    S("bmf-comments", "MAIL FROM:<spam@bad.com>", RCPT,
      control={"badmailfrom": "# x\n\nspam@bad.com  \n"}),
    # -- databytes -----------------------------------------------------------------------
    S("databytes-ehlo", EHLO, env=DB100),
    S("databytes-control-ehlo", EHLO, control={"databytes": "100\n"}),
    S("databytes-env-wins", EHLO, control={"databytes": "10\n"}, env={"DATABYTES": "1000"}),
    S("size-over", "MAIL FROM:<a@b.c> SIZE=101", env=DB100),
    S("size-equal", "MAIL FROM:<a@b.c> SIZE=100", RCPT, *BODY, env=DB100),
    S("size-lower-case", "MAIL FROM:<a@b.c> size=101", env=DB100),
    S("size-abc", "MAIL FROM:<a@b.c> SIZE=abc", RCPT, *BODY, env=DB100),
    S("size-abc-no-limit", "MAIL FROM:<a@b.c> SIZE=abc", RCPT, *BODY),
    S("body-99", MAIL, RCPT, "DATA", "A" * 99, ".", env=DB100),
    S("body-100", MAIL, RCPT, "DATA", "A" * 100, ".", env=DB100),
    S("body-stuffed-counted-once", MAIL, RCPT, "DATA", "." * 100, ".", env=DB100),
    S("too-big-then-next", MAIL, RCPT, "DATA", "A" * 200, ".", *TX, env=DB100),
    # -- DATA contents, bare LF, long lines --------------------------------------------
    S("dot-stuffing", MAIL, RCPT, "DATA", "..dot", ".x", "...", ".", ),
    S("bare-cr-kept", MAIL, RCPT, "DATA", "a\rb", "c\r", "."),
    S("bare-lf-data", MAIL, RCPT, "DATA", b"line1\nline2\r\n.\r\n", quit=False),
    S("bare-lf-smuggling", MAIL, RCPT, "DATA", b"x\r\n\n.\nMAIL FROM:<e@vil>\r\n.\r\n",
      quit=False),
    S("bare-lf-commands", b"HELO x\n", b"MAIL FROM:<a@b.c>\n", b"RCPT TO:<x@example.org>\n",
      b"DATA\n", b"hi\r\n.\r\n", b"QUIT\n", quit=False),
    S("hops-99-plus-1", MAIL, RCPT, "DATA", *["Received: x"] * 99, "Delivered-To: y", "",
      "b", "."),
    S("hops-98-plus-1", MAIL, RCPT, "DATA", *["Received: x"] * 98, "Delivered-To: y", "",
      "b", "."),
    S("hops-received-spf", MAIL, RCPT, "DATA", *["Received-SPF: x"] * 100, "", "b", "."),
    S("hops-in-body", MAIL, RCPT, "DATA", "Subject: x", "", *["Received: x"] * 100, "."),
    S("empty-message", MAIL, RCPT, "DATA", "."),
    S("header-only", MAIL, RCPT, "DATA", "Subject: x", "."),
    S("body-8bit", MAIL, RCPT, "DATA", "Subject: caf\u00e9", "", "gr\u00fc\u00df", "."),
    S("data-long-line", MAIL, RCPT, "DATA", "x" * 5000, "."),
    S("data-line-8k-boundary", MAIL, RCPT, "DATA", "y" * 8191, "z" * 8193, "."),
    S("long-command-line", "NOOP " + "x" * 2000),
    S("command-line-1000", "NOOP " + "x" * 993),
    S("pipelined-rset", MAIL, RCPT, "RSET", "RCPT TO:<y@example.org>", *TX),
    S("pipelined-after-dot", MAIL, RCPT, b"DATA\r\nhi\r\n.\r\nNOOP\r\nMAIL FROM:<b@b.c>\r\n",
      "RCPT TO:<y@example.org>", *BODY),
    S("many-errors", *["FOO"] * 21, "NOOP"),
    S("http-get", "GET / HTTP/1.0", "NOOP"),
    # -- queue program exit codes (what the capture program returns) ------------------
    S("qq-31", *TX, qexit=31),
    S("qq-71", *TX, qexit=71),
    S("qq-11", *TX, qexit=11),
    S("qq-25", *TX, qexit=25),
    S("qq-53", *TX, qexit=53),
    S("qq-99", *TX, qexit=99),
    # -- AUTH and submission ---------------------------------------------------------------
    S("auth-plain", PLAIN, "MAIL FROM:<joe@b.c>", "RCPT TO:<u@other.com>", *BODY),
    S("auth-twice", PLAIN, PLAIN),
    S("auth-in-mail", MAIL, PLAIN),
    S("auth-unknown-mech", "AUTH FOO"),
    S("auth-bare", "AUTH"),
    S("auth-plain-prompt", "AUTH PLAIN", "YWRtaW4Aam9lAHNlY3JldA==", *TX),  # admin\0joe\0secret
    S("auth-plain-four-fields", "AUTH PLAIN AGFkbWluAGpvZQBzZWNyZXQ=", "NOOP"),
    S("auth-plain-wrong-password", "AUTH PLAIN AGpvZQB3cm9uZw==", "NOOP"),
    S("auth-login-cancel", "AUTH LOGIN", "*"),
    S("auth-plain-malformed", "AUTH PLAIN !!!"),
    S("auth-not-available", "AUTH PLAIN AGpvZQBzZWNyZXQ=", auth=False),
    S("submission-no-auth", MAIL, env={"TCPLOCALPORT": "587"}),
    S("submission-auth", PLAIN, MAIL, "RCPT TO:<u@other.com>", *BODY,
      env={"TCPLOCALPORT": "587"}),
    S("submissionport-moved", MAIL, env={"TCPLOCALPORT": "587", "SUBMISSIONPORT": "2525"}),
    # -- qmail-spp: every section, every verdict -----------------------------------------
    S("spp-conn-E", HELO, *TX, plugins=[spp("connection", "E554 go away")]),
    S("spp-conn-R", HELO, plugins=[spp("connection", "R421 bye")], quit=False),
    S("spp-conn-D", HELO, plugins=[spp("connection", "D")], quit=False),
    S("spp-conn-A", HELO, *TX, plugins=[spp("connection", "A"), spp("mail", "E550 no")]),
    S("spp-conn-N", HELO, plugins=[spp("connection", "N"), spp("connection", "E554 no")]),
    S("spp-conn-O", HELO, plugins=[spp("connection", "O"), spp("connection", "E554 no")]),
    S("spp-conn-P", HELO, plugins=[spp("connection", "P220-hello from plugin")]),
    S("spp-conn-S-U", MAIL, plugins=[spp("connection", "SFOO=bar", "SBAR=baz"),
                                     spp("helo", "UBAR"), sh("mail", 'echo "E550 $FOO/$BAR"')]),
    S("spp-conn-H-no-helo", *TX, plugins=[spp("connection", "HX-Conn: yes")]),
    S("spp-conn-H-helo", HELO, *TX, plugins=[spp("connection", "HX-Conn: yes")]),
    S("spp-conn-LM-no-helo", MAIL, MAIL, "RSET", MAIL,
      plugins=[spp("connection", "LM550 conn later mail")]),
    S("spp-conn-LM-helo", HELO, MAIL, plugins=[spp("connection", "LM550 conn later mail")]),
    S("spp-conn-LD", *TX, plugins=[spp("connection", "LD554 conn later data")]),
    S("spp-conn-C-ignored", *TX, plugins=[spp("connection", "Cchanged@example.org")]),
    S("spp-helo-E", HELO, *TX, plugins=[spp("helo", "E550 bad helo")]),
    S("spp-helo-E-ehlo", EHLO, "NOOP", plugins=[spp("helo", "E550 bad helo")]),
    S("spp-helo-R", HELO, "NOOP", plugins=[spp("helo", "R421 bye")], quit=False),
    S("spp-helo-D", HELO, "NOOP", plugins=[spp("helo", "D")], quit=False),
    S("spp-helo-A", HELO, *TX, plugins=[spp("helo", "A"), spp("mail", "E550 no")]),
    S("spp-helo-N", HELO, *TX, plugins=[spp("helo", "N"), spp("helo", "E550 no"),
                                        spp("mail", "E550 mail no")]),
    S("spp-helo-P", EHLO, plugins=[spp("helo", "P250-note")]),
    S("spp-helo-H", HELO, *TX, plugins=[spp("helo", "HX-Helo: yes")]),
    S("spp-helo-LM", HELO, MAIL, MAIL, "RSET", MAIL, plugins=[spp("helo", "LM550 later mail")]),
    S("spp-helo-LM-twice", HELO, HELO, MAIL, plugins=[spp("helo", "LM550 later mail")]),
    S("spp-helo-LD", HELO, *TX, plugins=[spp("helo", "LD554 later data")]),
    S("spp-helo-env", "HELO my.name", MAIL, plugins=[sh("mail", 'echo "E550 $SMTPHELOHOST"')]),
    S("spp-mail-E", *TX, plugins=[spp("mail", "E550 mail refused")]),
    S("spp-mail-E-second-mail", MAIL, RCPT, "MAIL FROM:<e@b.c>", *BODY,
      plugins=[sh("mail", '[ "$SMTPMAILFROM" = e@b.c ] && echo "E550 not you"; true')]),
    S("spp-mail-R", MAIL, "NOOP", plugins=[spp("mail", "R421 bye")], quit=False),
    S("spp-mail-D", MAIL, "NOOP", plugins=[spp("mail", "D")], quit=False),
    S("spp-mail-A", *TX, MAIL, plugins=[spp("mail", "A"), spp("data", "E554 no")]),
    S("spp-mail-N", *TX, plugins=[spp("mail", "N"), spp("mail", "E550 no")]),
    S("spp-mail-O-relay", MAIL, "RCPT TO:<u@other.com>", plugins=[spp("mail", "O")]),
    S("spp-mail-O-badmailfrom", "MAIL FROM:<spam@bad.com>", RCPT, *BODY,
      plugins=[spp("mail", "O")]),
    S("spp-mail-P", MAIL, plugins=[spp("mail", "P250-note from plugin")]),
    S("spp-mail-C", *TX, plugins=[spp("mail", "Cchanged@example.org")]),
    S("spp-mail-env", "MAIL FROM:<who@b.c>", plugins=[sh("mail", 'echo "E550 $SMTPMAILFROM"')]),
    S("spp-mail-H", *TX, plugins=[spp("mail", "HX-Mail: yes")]),
    S("spp-mail-H-rset", MAIL, "RSET", *TX, plugins=[sh("mail",
      '[ "$SMTPMAILFROM" = a@b.c ] && echo "HX-Mail: $SMTPMAILFROM"; true')]),
    S("spp-mail-LM", MAIL, MAIL, plugins=[spp("mail", "LM550 later mail")]),
    S("spp-mail-LR", MAIL, RCPT, plugins=[spp("mail", "LR550 later rcpt")]),
    S("spp-mail-LD", *TX, plugins=[spp("mail", "LD554 later data")]),
    S("spp-mail-LD-keeps", MAIL, RCPT, "DATA", "RCPT TO:<y@example.org>", "DATA", "RSET",
      "DATA", plugins=[spp("mail", "LD554 later data")]),
    S("spp-rcpt-E", MAIL, RCPT, plugins=[spp("rcpt", "E550 rcpt refused")]),
    S("spp-rcpt-env", MAIL, RCPT, plugins=[sh("rcpt", 'echo "E550 $SMTPRCPTTO"')]),
    S("spp-data-E", *TX, plugins=[spp("data", "E554 data refused")]),
    S("spp-data-R", *TX, plugins=[spp("data", "R421 bye")], quit=False),
    S("spp-data-D", *TX, plugins=[spp("data", "D")], quit=False),
    S("spp-data-A", *TX, *TX, plugins=[spp("data", "A"), spp("mail", "E550 no")]),
    S("spp-data-N", *TX, plugins=[spp("data", "N"), spp("data", "E554 no")]),
    S("spp-data-P-S-H", *TX, plugins=[spp("data", "HX-Spp: yes", "SFOO=bar",
                                              "P250-note from plugin"),
                                      sh("data", 'echo "HX-Foo: $FOO"')]),
    S("spp-data-LD", *TX, *TX, plugins=[spp("data", "LD554 next data")]),
    S("spp-auth-E", PLAIN, MAIL, "RCPT TO:<u@other.com>",
      plugins=[spp("auth", "E535 not today")]),
    S("spp-auth-N", PLAIN, MAIL, "RCPT TO:<u@other.com>", plugins=[spp("auth", "N")]),
    S("spp-auth-env", PLAIN, plugins=[sh("auth", 'echo "E535 $SMTPAUTHUSER $SMTPAUTHMETHOD"')]),
    S("spp-exit-120", HELO, plugins=[sh("helo", "exit 120")]),
    S("spp-crash", HELO, plugins=[sh("helo", "kill -SEGV $$")]),
    S("spp-not-executable", HELO, spp_raw="[helo]\nbin/plugins/nothere\n"),
    S("spp-shell-line", HELO, spp_raw="[helo]\n:echo \"E451 temp $0\" one\n"),
    S("spp-no-newline", HELO, plugins=[sh("helo", "printf 'E553 no newline'")]),
    S("spp-section-capital-ignored", HELO, MAIL, plugins=[],
      spp_raw="[Helo]\n:echo E550 never\n[m]\n:echo E550 short name\n"),
    S("spp-nospp", HELO, MAIL, plugins=[spp("mail", "E550 no")], env={"NOSPP": "1"}),
    S("spp-sppconffile", HELO, MAIL, spp_raw="",
      env={"SPPCONFFILE": "control/other-plugins"},
      control={"other-plugins": "[mail]\n:echo E550 from other file\n"}),
    S("spp-empty-sections", HELO, *TX,
      spp_raw="[connection]\n[helo]\n[mail]\n[rcpt]\n[data]\n#[auth]\n"),
    S("spp-order-stops-at-E", MAIL, plugins=[spp("mail", "SX=1"), spp("mail", "E550 first"),
                                             spp("mail", "E550 second")]),

]

# -- greeting, Received line, environment ------------------------------------------------
CASES += [
    S("smtpgreeting", EHLO, HELO, control={"smtpgreeting": "mx.example.org NO UCE\n"}),
    S("smtpgreeting-no-me", HELO, control={"me": None, "smtpgreeting": "greet.example\n"}),
    S("received-remotehost", "HELO x", *TX, env={"TCPREMOTEHOST": "Client.Example"}),
    S("received-helo-equals-host", "HELO client.example", *TX,
      env={"TCPREMOTEHOST": "Client.Example"}),
    S("received-remoteinfo", HELO, *TX, env={"TCPREMOTEINFO": "ident"}),
    S("received-unsafe-helo", "HELO a b<c>(d)\"e'", *TX),
    S("received-no-helo-after-ehlo", EHLO, *TX),
    S("received-no-localhost", HELO, *TX, env={"TCPLOCALHOST": None}),
    S("received-no-remoteip", HELO, *TX, env={"TCPREMOTEIP": None}),
    S("received-after-auth", PLAIN, HELO, *TX),
    S("helo-twice-last-wins", "HELO one", "HELO two", *TX),
    S("ehlo-resets-transaction", MAIL, RCPT, EHLO, "DATA"),
    S("rset-arg", MAIL, "RSET now", RCPT),
    S("data-arg", MAIL, RCPT, "DATA now", "hi", "."),
    S("databytes-zero", EHLO, *TX, control={"databytes": "0\n"}),
    S("databytes-garbage", EHLO, control={"databytes": "lots\n"}),
    S("timeoutsmtpd-set", HELO, *TX, control={"timeoutsmtpd": "30\n"}),
]

# -- the queue program's exit codes (the capture program's exit code) -----------------
CASES += [S("qq-exit-%d" % code, *TX, qexit=code)
          for code in (0, 1, 40, 41, 51, 52, 54, 55, 56, 61, 62, 63, 64, 65, 66, 72, 73, 74, 81,
                       91, 100, 115, 120)]
CASES += [
    S("qq-missing", *TX, env={"QMAILQUEUE": "/nonexistent/qq"}),
    S("qq-not-executable", *TX, env={"QMAILQUEUE": "bin/not-executable"}),
    S("qq-no-shebang", *TX, env={"QMAILQUEUE": "bin/no-shebang"}),
    S("qq-crash", *TX, qexit=-11),
    S("qq-two-messages-second-fails", *TX, *TX, qexit=71),
]

# -- qmail-spp matrix: every section x every verdict letter ------------------------------
# The dialogue passes through all six sections (AUTH first, then HELO and two
# transactions).  In the section under test, a plugin prints the verdict; a
# second plugin (the witness) adds a header naming its section and $FOO, so
# the queued messages show whether it still ran and what S/U did.
VERDICTS = {"A": "A", "N": "N", "O": "O", "E": "E550 refused by plugin",
            "R": "R421 closing by plugin", "D": "D", "P": "P250-note by plugin",
            "S": "SFOO=bar", "U": "UFOO", "H": "HX-Verdict: yes", "C": "Cnew@example.org",
            "LM": "LM550 later mail", "LR": "LR550 later rcpt", "LD": "LD554 later data"}
SECTIONS = ("connection", "helo", "mail", "rcpt", "data", "auth")
MATRIX = (PLAIN, HELO, MAIL, RCPT, *BODY, "MAIL FROM:<b@b.c>", "RCPT TO:<y@example.org>", *BODY)


def _witness(section):
    return sh(section, 'echo "HX-Witness-%s: ${FOO-unset}"' % section)


CASES += [S("m-%s-%s" % (section, letter), *MATRIX, env={"FOO": "base"},
            plugins=[spp(section, line), _witness(section)])
          for section in SECTIONS for letter, line in VERDICTS.items()]
