"""Where eqmail differs from eQmail 1.09, and the eqmail bugs the suite
expects to fail for now.

KNOWN_DIFFERENCES maps a case id to a `Known`: why the two differ, the
behaviour reference's §10 bug number when eqmail fixes that bug on
purpose, and the difference itself exactly as the comparison reports it:
field -> (eQmail 1.09, eqmail), and for replies {reply index: (eQmail
1.09, eqmail)} (index 0 is the greeting; None = no such reply).  A listed
case must differ in exactly that way: one that starts agreeing, or differs
in another way, fails.

EXPECTED_FAILURES maps a case id to (reason, field): an eqmail bug; the case
is an xfail(strict=True) that must fail in exactly that field ("several"
for more than one field), so it turns red both when fixed (remove the
entry) and when it breaks in some other way.

`python3 tests/differential/known.py --readme` writes the README's table
"Where eqmail differs from eQmail 1.09, and why" from KNOWN_DIFFERENCES;
test_table.py checks that the README matches.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import pytest

NOGATEWAY = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
SYNTAX = "555 syntax error (#5.5.4)"
QUIT = "221 mx.example.org"
RECEIVED = "Received: from unknown (192.0.2.1)\n  by mx.example.org with SMTP; <date>\n"


@dataclass
class Known:
    reason: str
    diff: Optional[Dict[str, object]]  # None: see as_if
    bug: Optional[int] = None          # behaviour reference §10 bug number
    #: instead of a literal diff: the name of a rewrite in AS_IF; eQmail on the
    #: case must then agree with eqmail on the rewritten case (and differ from
    #: eqmail on the case itself)
    as_if: Optional[str] = None
    table: Tuple[str, str] = ("", "")  # the table's cells for an as_if entry


def _no_rcpt_checks(case):
    """The case as eQmail 1.09 sees it: [rcpt] plugins never run, LR never sent."""
    plugins = tuple((sect, re.sub(r"^printf '%s\\n' 'LR[^\n]*\n", "", script, flags=re.M))
                    for sect, script in case.plugins if sect != "rcpt")
    return dataclasses.replace(case, plugins=plugins)


AS_IF = {"no-rcpt-checks": _no_rcpt_checks}
NO_RCPT = ("eQmail never runs the RCPT side of qmail-spp: [rcpt] plugins and LR texts have "
           "no effect (eQmail agrees with eqmail on the case without them)")
NO_RCPT_CELLS = ("as if no [rcpt] plugin and no LR line existed",
                 "[rcpt] plugins run; LR refuses RCPT")


def _queued(sender, rcpts, body="Subject: t\n\nhi\n"):
    return {"envelope": ([(sender, rcpts)], []), "message": ([body], []),
            "received": ([RECEIVED], [])}


# A refused MAIL/DATA followed by DATA, "Subject: t", "", "hi", ".", QUIT: eQmail
# went on and queued; eqmail answers the body lines as commands.
def _body_as_commands(start, eq_from_start, py_from_start):
    d = {}
    for i in range(max(len(eq_from_start), len(py_from_start))):
        a = eq_from_start[i] if i < len(eq_from_start) else None
        b = py_from_start[i] if i < len(py_from_start) else None
        if a != b:
            d[start + i] = (a, b)
    return d


_PY_BODY = ["500 unrecognised (#5.5.2)"] * 4 + [QUIT]   # "Subject: t" "" "hi" "." QUIT

PROGRAM_SILENT = ("a program that fails without a word: eqmail's report names the exit "
                  "code, qmail-local's report is empty")

KNOWN_DIFFERENCES: Dict[str, Known] = {
    # -- SMTP ---------------------------------------------------------------------------
    "help": Known(
        "eqmail's own HELP text (netqmail's points at netqmail's home page)",
        {"replies": {1: ("214 netqmail home page: http://qmail.org/netqmail",
                         "214 eqmail: see RFC 5321; commands HELO EHLO MAIL RCPT DATA RSET "
                         "NOOP VRFY HELP QUIT")}}),
    "rcpthosts-missing": Known(
        "without control/rcpthosts eQmail accepts every recipient (an open relay); eqmail "
        "accepts the locals only and logs a warning",
        {"replies": {2: ("250 ok", NOGATEWAY)}}, bug=3),
    "morercpthosts-plain": Known(
        "eqmail reads control/morercpthosts as a plain list; eQmail reads only the "
        "morercpthosts.cdb that qmail-newmrh builds",
        {"replies": {2: (NOGATEWAY, "250 ok")}}),
    "relayclient-set-by-plugin": Known(
        "a plugin that sets RELAYCLIENT (S) opens the relay check in eqmail, the one way a "
        "plugin can (O cannot, bug 2); eQmail reads RELAYCLIENT once at start-up",
        {"replies": {2: (NOGATEWAY, "250 ok")}}),
    "percenthack-relay": Known(
        "with percenthack, eQmail checks rcpthosts only for user%other@local as given and "
        "so relays to other; eqmail checks the address delivery will use as well",
        {"replies": {2: ("250 ok", NOGATEWAY)}}),
    "rcpt-null": Known(
        "RCPT TO:<> names no mailbox (RFC 5321); eQmail queues an empty recipient",
        {"replies": {2: ("250 ok", SYNTAX)}}),
    "mail-unclosed": Known(
        "a path without its closing > is refused; qmail-smtpd takes it ('why bother?')",
        {"replies": {1: ("250 ok", SYNTAX), 2: ("250 ok", "503 MAIL first (#5.5.1)")}}),
    "mail-bare": Known(
        "a bare MAIL is refused (555): it names no reverse-path (RFC 5321 "
        "4.1.1.2); eQmail takes it as MAIL FROM:<> and queues mail with the null sender, "
        "which can never bounce",
        dict(_queued("", ["x@example.org"]), replies=_body_as_commands(
            1, ["250 ok", "250 ok", "354 go ahead", "250 ok <time> qp <qp>", QUIT],
            [SYNTAX, "503 MAIL first (#5.5.1)", "503 MAIL first (#5.5.1)"] + _PY_BODY))),
    "mail-no-colon": Known(
        "as mail-bare: MAIL without < and without : is refused (555); eQmail "
        "takes it as the null sender (250)",
        {"replies": {1: ("250 ok", SYNTAX), 2: ("250 ok", "503 MAIL first (#5.5.1)")}}),
    "address-control-char": Known(
        "eqmail refuses control characters in an address; eQmail queues them",
        {"replies": {1: ("250 ok", SYNTAX), 2: ("250 ok", "503 MAIL first (#5.5.1)")}}),
    "mail-param-auth": Known(
        "MAIL's AUTH= parameter is ignored: in eQmail an unauthenticated client puts the "
        "identity of its choice into the Received line",
        {"received": (["Received: from unknown (?fake+user@evil?@192.0.2.1)\n"
                       "  by mx.example.org with SMTP; <date>\n"], [RECEIVED])}, bug=9),
    "size-abc": Known(
        "a SIZE parameter that is not a number is refused (555, RFC 1870 "
        "section 6: SIZE=<digits>); eQmail reads it as 0 and accepts it when databytes "
        "is set",
        dict(_queued("a@b.c", ["x@example.org"]), replies=_body_as_commands(
            1, ["250 ok", "250 ok", "354 go ahead", "250 ok <time> qp <qp>", QUIT],
            [SYNTAX, "503 MAIL first (#5.5.1)", "503 MAIL first (#5.5.1)"] + _PY_BODY))),
    "long-command-line": Known(
        "command lines are limited to 1000 octets (RFC 5321 4.5.3.1.4); eQmail reads "
        "lines of any length into memory",
        {"replies": {1: ("250 ok", "500 line too long (#5.5.2)")}}, bug=14),
    "many-errors": Known(
        "eqmail hangs up with 421 at the 20th refused command; eQmail answers for ever",
        {"replies": {20: ("500 unrecognised (#5.5.2)", "421 too many errors, closing (#4.7.0)"),
                     21: ("500 unrecognised (#5.5.2)", None), 22: ("250 ok", None),
                     23: (QUIT, None)}}),
    "http-get": Known(
        "eqmail hangs up on an HTTP verb before HELO (cross-protocol requests); eQmail "
        "answers 500 and goes on",
        {"replies": {2: ("250 ok", None), 3: (QUIT, None)}}),
    "auth-login-cancel": Known(
        "AUTH LOGIN prompts are base64 (RFC 4954); eQmail sends them in plain text",
        {"replies": {1: ("334 Username:", "334 VXNlcm5hbWU6")}}),
    "auth-plain-four-fields": Known(
        "an AUTH PLAIN response of four NUL-separated fields is malformed (RFC 4616): "
        "eqmail answers 501, eQmail checks fields 2 and 3 as user and password",
        {"replies": {1: ("535 authentication failed (#5.7.1)",
                         "501 malformed auth input (#5.5.4)")}}),
    "submission-no-auth": Known(
        "eQmail's 530 ends with a stray space before CRLF",
        {"replies": {1: ("530 Authorization required (#5.7.1) ",
                         "530 Authorization required (#5.7.1)")}}),
    "spp-helo-LM-twice": Known(
        "a [helo] plugin's LM at two HELOs: eQmail keeps both texts and sends two 550 "
        "lines (two replies) to one MAIL; eqmail sends one",
        {"replies": {4: ("550 later mail", QUIT), 5: (QUIT, None)}}),
    "spp-mail-E-second-mail": Known(
        "every MAIL ends the earlier transaction, even a refused one (a [mail] "
        "plugin's E here): RCPT and DATA pipelined behind it get 503 instead of sending "
        "the message with the earlier sender, as eQmail does",
        dict(_queued("a@b.c", ["x@example.org"]), replies=_body_as_commands(
            4, ["354 go ahead", "250 ok <time> qp <qp>", QUIT],
            ["503 MAIL first (#5.5.1)"] + _PY_BODY))),
    "spp-mail-O-relay": Known(
        "a [mail] plugin's O skips badmailfrom only; in eQmail it also skips rcpthosts for "
        "the transaction (an open relay)",
        {"replies": {2: ("250 ok", NOGATEWAY)}}, bug=2),
    "spp-mail-LR": Known(
        "eQmail never runs the RCPT checks of qmail-spp, so LR texts are never sent; "
        "eqmail refuses the next RCPT with it",
        {"replies": {2: ("250 ok", "550 later rcpt")}}, bug=1),
    "spp-rcpt-E": Known(
        "eQmail never runs [rcpt] plugins; eqmail does",
        {"replies": {2: ("250 ok", "550 rcpt refused")}}, bug=1),
    "spp-rcpt-env": Known(
        "eQmail never runs [rcpt] plugins (SMTPRCPTTO is never set); eqmail does",
        {"replies": {2: ("250 ok", "550 x@example.org")}}, bug=1),
    "spp-no-newline": Known(
        "eQmail drops the last character of a plugin's last line when it has no LF",
        {"replies": {1: ("553 no newlin", "553 no newline")}}),
    "smtpgreeting-no-me": Known(
        "control/me is required: eqmail will not start without it (421); eQmail runs on "
        "smtpgreeting alone",
        {"replies": {0: ("220 greet.example ESMTP", "421 unable to read controls (#4.3.0)"),
                     1: ("250 greet.example", None), 2: ("221 greet.example", None)}}),
    "databytes-garbage": Known(
        "a control file that is not a number stops eqmail (421 unable to read controls); "
        "eQmail silently uses the default",
        {"replies": {0: ("220 mx.example.org ESMTP", "421 unable to read controls (#4.3.0)"),
                     1: ("250-mx.example.org\n250-PIPELINING\n250-8BITMIME\n250-SIZE 0\n"
                         "250 AUTH LOGIN PLAIN CRAM-MD5", None),
                     2: ("221 mx.example.org", None)}}),
    "received-no-localhost": Known(
        "without TCPLOCALHOST the Received line's by-host is control/me in eqmail, "
        "TCPLOCALIP in eQmail",
        {"received": (["Received: from unknown (HELO client.example) (192.0.2.1)\n"
                       "  by 198.51.100.1 with SMTP; <date>\n"],
                      ["Received: from unknown (HELO client.example) (192.0.2.1)\n"
                       "  by mx.example.org with SMTP; <date>\n"])}),
    **{"m-%s-%s" % (section, letter): Known(NO_RCPT, None, bug=1, as_if="no-rcpt-checks",
                                            table=NO_RCPT_CELLS)
       for section, letter in [("connection", "LR"), ("helo", "LR"), ("mail", "LR"),
                               ("auth", "LR")] + [("rcpt", v) for v in (
                                   "E", "R", "D", "P", "S", "U", "H", "C", "LM", "LR", "LD")]},
    # -- local delivery --------------------------------------------------------------------
    "prog-100-silent": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 100. (#5.0.0)"])}),
    "prog-111-silent": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 111. (#4.3.0)"])}),
    "prog-65": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 65. (#5.0.0)"])}),
    "prog-70": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 70. (#5.0.0)"])}),
    "prog-76": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 76. (#5.0.0)"])}),
    "prog-77": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 77. (#5.0.0)"])}),
    "prog-78": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 78. (#5.0.0)"])}),
    "prog-112": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 112. (#5.0.0)"])}),
    "prog-2": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 2. (#4.3.0)"])}),
    "prog-75": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 75. (#4.3.0)"])}),
    "prog-fails-after-maildir": Known(PROGRAM_SILENT, {"report": (
        [], ["program failed with exit code 111. (#4.3.0)"])}),
    "prog-crash": Known(
        "a program killed by a signal: eqmail's report names the signal, qmail-local "
        "says 'Aack, child crashed.'",
        {"report": (["Aack, child crashed. (#4.3.0)"],
                    ["Unable to run: killed by signal 11. (#4.3.0)"])}),
    "maildir-missing": Known(
        "a missing Maildir: eqmail's report names it",
        {"report": (["Unable to chdir to maildir. (#4.2.1)"],
                    ["Maildir {HOME}/./NoMaildir/ does not exist or is not a Maildir. "
                     "(#4.2.1)"])}),
    "mbox-missing-dir": Known(
        "an mbox that cannot be opened: eqmail gives the full path and the system's error "
        "text (qmail's error_str words it differently)",
        {"report": (["Unable to open ./nodir/mbox: file does not exist. (#4.2.1)"],
                    ["Unable to open {HOME}/./nodir/mbox: No such file or directory. "
                     "(#4.2.1)"])}),
}

EXPECTED_FAILURES: Dict[str, Tuple[str, str]] = {
}


# -- used by the tests ------------------------------------------------------------------------

def params(cases):
    """pytest params for `cases`, with the strict xfail of EXPECTED_FAILURES."""
    import eqdiff

    out = []
    for case in cases:
        marks = []
        if case.id in EXPECTED_FAILURES:
            reason, fieldname = EXPECTED_FAILURES[case.id]
            marks.append(pytest.mark.xfail(strict=True, reason=reason,
                                           raises=eqdiff.FIELD_ERRORS[fieldname]))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def judge(case_id: str, diffs: Dict[str, object], shown: str) -> None:
    import eqdiff

    known = KNOWN_DIFFERENCES.get(case_id)
    if known is not None:
        assert known.as_if is None, "the test runs as_if entries itself"
        assert diffs == known.diff, (
            "%s is listed in KNOWN_DIFFERENCES but now %s" % (
                case_id, "agrees: remove the entry" if not diffs else
                "differs like this instead:\n" + eqdiff.explain(case_id, diffs, shown)))
        return
    eqdiff.raise_for(case_id, diffs, shown)


# -- the README table -------------------------------------------------------------------------

def _first(diff: Dict[str, object]) -> Tuple[str, str]:
    """The first differing value of each side, for the table."""
    if "replies" in diff and diff["replies"]:
        i = min(diff["replies"])
        a, b = diff["replies"][i]
        return (a or "(connection closed)"), (b or "(connection closed)")
    name = next(iter(diff))
    a, b = diff[name]
    return "%s: %r" % (name, a), "%s: %r" % (name, b)


def _cell(text: str) -> str:
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return "`%s`" % text.replace("`", "'") if text else ""


README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "README.md")
BEGIN = "<!-- differences: written by python3 tests/differential/known.py --readme -->"
END = "<!-- end of differences -->"


def table() -> str:
    """The README's table: one row per reason (cases with the same reason
    share a row); the first differing reply or field of the first case."""
    out = ["| cases | eQmail 1.09 | eqmail | why | fixes |", "|---|---|---|---|---|"]
    rows: Dict[Tuple[str, Optional[int]], list] = {}
    for case_id, k in KNOWN_DIFFERENCES.items():
        rows.setdefault((k.reason, k.bug), []).append((case_id, k))
    for (reason, bug), members in rows.items():
        k = members[0][1]
        a, b = _first(k.diff) if k.as_if is None else k.table
        out.append("| %s | %s | %s | %s | %s |" % (
            ", ".join(c for c, _ in members), _cell(a), _cell(b), reason.replace("|", "\\|"),
            "" if bug is None else "§10.%d" % bug))
    return "\n".join(out) + "\n"


def readme_block(text: str) -> str:
    """The generated part of README.md `text` (between BEGIN and END)."""
    start = text.index(BEGIN) + len(BEGIN) + 1
    return text[start:text.index(END, start)]


def write_readme() -> None:
    with open(README) as f:
        text = f.read()
    start = text.index(BEGIN) + len(BEGIN) + 1
    end = text.index(END, start)
    with open(README, "w") as f:
        f.write(text[:start] + table() + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        write_readme()
    else:
        sys.stdout.write(table())
