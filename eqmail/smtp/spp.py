"""smtp.spp -- qmail-spp: SMTP plugins from control/smtpplugins.

SUMMARY
    `Plugins.load(home, env)` reads the plugin configuration once per
    session; `run_section(plugins, section, home, env)` runs the plugins of
    one section (connection, helo, mail, rcpt, data, auth) in order and
    returns an `Outcome`: a verdict plus the side effects the plugins asked
    for (partial replies, header lines, environment changes, a new address,
    replies kept for later, log lines).  This module only runs and parses;
    the SMTP session decides what each verdict means for its command, sends
    the replies and writes the log lines (see POLICY below).

STANDARDS
    qmail-spp 0.42 by Pawel Foremski (http://qmail-spp.sourceforge.net/,
    the patch eQmail carries; README and qmail-spp's plugin documentation),
    as patched in eQmail 1.09 (behaviour reference section 4, test vectors
    T25-T30).  Replies must be SMTP reply lines (RFC 5321 section 4.2).

CONFIGURATION
    control/smtpplugins, or $SPPCONFFILE when set and non-empty (relative
    to the home).  NOSPP set to any value, even empty: no plugins.  A
    missing file: no plugins.  qmail's list-file rules apply: lines starting
    with ``#`` and empty lines are dropped, trailing blanks removed.

    A line starting with ``[`` opens a section; only its second character
    counts, case-sensitive: ``c`` connection, ``h`` helo (HELO and EHLO),
    ``m`` mail, ``r`` rcpt, ``d`` data, ``a`` auth.  ``[Connection]``,
    ``[x]`` or ``[`` open a section that runs nothing; lines before the first
    section are ignored.

    A plugin line is a path relative to the home, run without arguments
    and without a PATH search; spaces are part of the file name.  A line
    starting with ``:`` runs ``/bin/sh -c <rest>``, which allows arguments.

RUNNING
    Each plugin runs with stdin empty, cwd the home, and the session's
    environment as given by the caller (TCPREMOTEIP, SMTPHELOHOST,
    SMTPMAILFROM, SMTPRCPTTO, SMTPRCPTCOUNT, SMTPRCPTCOUNTALL,
    SMTPRCPTHOSTSOK, SMTPAUTHUSER, SMTPAUTHMETHOD ...) updated by the ``S``
    and ``U`` lines of the earlier plugins of the same run.  Its stdout is
    read line by line; its stderr comes back in `Outcome.logs`.  Each
    plugin may run `timeout` seconds (default 60), then it is killed.

    Failures refuse the command with a 451 and end the run; the failing
    plugin's stdout is thrown away (effects of earlier plugins stay):

        exit code 120, or not startable      451 qmail-spp failure: <line>: can't execute (#4.3.0)
        killed by a signal                   451 qmail-spp failure: <line>: child crashed (#4.3.0)
        still running after `timeout`        451 qmail-spp failure: <line>: timeout (#4.3.0)

    Other exit codes are ignored.  A plain (non-``:``) plugin is started
    through ``/bin/sh -c 'cd HOME && exec PLUGIN'`` (posix_spawn cannot
    change directory), so the shell's exit codes for "cannot execute" (126)
    and "not found" (127) count as "can't execute" for plain plugins too,
    as qmail-spp's exit 120 after a failed execv would.

COMMANDS
    The first character of an output line is the command, case-sensitive.
    Reading stops at the first A, N, O, E, R or D; the remaining plugins
    of the section do not run.

        A         accept the command; spp off for the rest of the session
        N         accept the command; skip the remaining plugins
        O         like N, and skip badmailfrom (MAIL); never the relay check
        E<text>   refuse the command with <text>; the session goes on
                  (connection: <text> replaces the greeting)
        R<text>   send <text>, then close the connection
        D         close the connection without a word
        P<text>   send <text> now (use 250- style continuation lines)
        S<N>=<v>  set the environment variable N (later plugins see it)
        U<N>      unset it
        H<text>   add the header line <text> under the Received line;
                  a line starting with a blank continues the previous one
        C<addr>   replace the MAIL or RCPT address (mail and rcpt only)
        LM<text>  refuse every MAIL with <text> until RSET
        LR<text>  refuse every RCPT with <text> until RSET or DATA
        LD<text>  refuse every DATA with <text> until RSET; the
                  transaction stays open

    H and L texts are forgotten at RSET and at DATA (qmail-spp's
    spp_rset), not at HELO, EHLO or STARTTLS: a [connection] plugin's
    ``LD554 you are listed`` holds for the whole session.

    Any other line is ignored, with a log line.  A plugin that prints
    nothing means "go on".

POLICY (for the caller)
    verdict "continue": no plugin decided; "accept": spp off for the
    session; "next"/"override": the command passes the plugins ("override"
    also skips badmailfrom at MAIL, but the rcpthosts/RELAYCLIENT check
    still runs at every RCPT); "reject": send `reply`, refuse the command;
    "close": send `reply`, close; "drop": close silently.  `partial` lines
    go out before anything else, `set_env`/`unset_env` change the session's
    environment, `logs` go to the log.

EQMAIL DIFFERENCES FIXED
    * ``[rcpt]`` plugins run (eQmail 1.09-1.11 lost the call), with
      SMTPRCPTTO, SMTPRCPTCOUNT, SMTPRCPTCOUNTALL, SMTPRCPTHOSTSOK set by
      the caller; ``LR`` replies therefore work.
    * ``O`` never opens the relay: it skips badmailfrom only (eQmail skipped
      rcpthosts for every RCPT of the transaction, reference section 10.2).
    * An smtpplugins file that exists but cannot be read raises
      `SppConfigError`, which the session turns into a clear 451/421
      instead of eQmail's crash before the greeting.
    * A last output line without a newline is taken whole (eQmail lost its
      last character, T29).
    * Command letters are matched exactly: ``e553 x`` is not ``E``.

SECURITY
    Plugins are local programs the administrator configured, but their
    output is untrusted text: at most MAX_LINES lines of MAX_LINE characters
    are read from stdout and from stderr per plugin (the rest is dropped
    with a log line); CR and NUL are removed; other control characters
    become ``?``; reply texts are forced to printable ASCII and to start
    with an SMTP code (else ``451 `` is put in front, with a log line);
    header lines must look like ``Name: value``; environment names must be
    ``[A-Za-z_][A-Za-z0-9_]*``.  No shell ever sees plugin output.
    Plugins run cooperatively (eqmail.children), so a slow plugin stalls
    only its own session, and never longer than `timeout`.

LIMITS
    MAX_LINES (100) lines per plugin and stream, MAX_LINE (1000) characters
    per line (RFC 5321 section 4.5.3.1.5: 512 for a reply line; 1000 keeps
    long headers usable), DEFAULT_TIMEOUT 60 seconds per plugin.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from .. import children
from ..control import SPP_SECTIONS as SECTIONS
from ..control import ConfigError, read_list

#: The second character of a ``[section]`` line and what it opens.
_SECTION_CHARS = {s[0]: s for s in SECTIONS}

#: Output lines read per plugin, from stdout and from stderr each.
MAX_LINES = 100

#: Characters kept of one output line (command letter included).
MAX_LINE = 1000

#: Seconds one plugin may run (qmail-spp has no limit; eqmail's choice).
DEFAULT_TIMEOUT = 60.0

#: qmail-spp's "can't execute" exit code (the child after a failed execv).
EXIT_CANT_EXECUTE = 120

#: The shell's exit codes when exec fails (cannot execute, not found).
_SHELL_EXEC_FAILED = (126, 127)

#: Longest address a C line may give (qmail-smtpd refuses 900 and more).
MAX_ADDRESS = 899

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_REPLY_CODE = re.compile(r"[2-5][0-9][0-9]")
_HEADER = re.compile(r"[!-9;-~]+:")

_STOPPERS = {"A": "accept", "N": "next", "O": "override", "E": "reject",
             "R": "close", "D": "drop"}
_LATER = {"M": "mail", "R": "rcpt", "D": "data"}


class SppConfigError(Exception):
    """smtpplugins exists but cannot be read or decoded.  `str()` names the
    file and the problem."""


@dataclass(frozen=True)
class Plugin:
    """One plugin line.  `line` is the line as written (for messages);
    `argv` is ``("/bin/sh", "-c", cmd)`` for ``:cmd`` lines, otherwise the
    one-element path relative to the home."""

    line: str
    argv: Tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> "Plugin":
        if line.startswith(":"):
            return cls(line, ("/bin/sh", "-c", line[1:]))
        return cls(line, (line,))

    @property
    def is_shell(self) -> bool:
        return self.line.startswith(":")


@dataclass(frozen=True)
class Plugins:
    """The plugins of every section, in file order."""

    sections: Dict[str, Tuple[Plugin, ...]]

    @classmethod
    def load(cls, home: str, env: Mapping[str, str]) -> Optional["Plugins"]:
        """Read $SPPCONFFILE (set and non-empty) or HOME/control/smtpplugins.

        Returns None when NOSPP is in `env` (any value) or the file is
        missing.  Raises SppConfigError when it exists but cannot be read
        (a directory, no permission, not UTF-8, control characters).
        """
        if "NOSPP" in env:
            return None
        path = path_of(home, env)
        # parsed once per version of the file (mtime, size, inode); a session
        # costs a stat, not a read and a parse
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SppConfigError("%s: cannot read: %s" % (path, e.strerror or e)) from None
        stamp = (path, st.st_mtime_ns, st.st_size, st.st_ino)
        cached = _loaded.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        plugins = cls._parse(path)
        _loaded[path] = (stamp, plugins)
        return plugins

    @classmethod
    def _parse(cls, path: str) -> Optional["Plugins"]:
        try:
            entries = read_list(path)
        except ConfigError as e:
            raise SppConfigError(str(e)) from None
        except OSError as e:
            raise SppConfigError("%s: cannot read: %s" % (path, e.strerror or e)) from None
        if entries is None:
            return None
        sections: Dict[str, List[Plugin]] = {s: [] for s in SECTIONS}
        current: Optional[str] = None
        for _lineno, text in entries:
            if text.startswith("["):
                # qmail-spp looks at the second character only
                current = _SECTION_CHARS.get(text[1:2])
                continue
            if current is not None:
                sections[current].append(Plugin.parse(text))
        return cls({s: tuple(p) for s, p in sections.items()})

    def get(self, section: str) -> Tuple[Plugin, ...]:
        """The plugins of `section` (empty for an unknown name)."""
        return self.sections.get(section, ())


_loaded: Dict[str, tuple] = {}



def path_of(home: str, env: Mapping[str, str]) -> str:
    """Where the plugin configuration is read from."""
    conf = env.get("SPPCONFFILE") or ""
    return os.path.join(home, conf if conf else os.path.join("control", "smtpplugins"))


@dataclass
class Outcome:
    """What the plugins of one section said.  See the module docstring."""

    verdict: str = "continue"
    reply: Optional[str] = None
    partial: List[str] = field(default_factory=list)
    headers: List[str] = field(default_factory=list)
    set_env: Dict[str, str] = field(default_factory=dict)
    unset_env: List[str] = field(default_factory=list)
    change_address: Optional[str] = None
    later: Dict[str, str] = field(default_factory=dict)
    logs: List[str] = field(default_factory=list)

    def setenv(self, name: str, value: str) -> None:
        self.set_env[name] = value
        if name in self.unset_env:
            self.unset_env.remove(name)

    def unsetenv(self, name: str) -> None:
        self.set_env.pop(name, None)
        if name not in self.unset_env:
            self.unset_env.append(name)


def failure_reply(plugin: Plugin, what: str) -> str:
    """qmail-spp's err_spp() text."""
    return "451 qmail-spp failure: %s: %s (#4.3.0)" % (_printable(plugin.line), what)


def run_section(plugins: Plugins, section: str, home: str, env: Mapping[str, str],
                timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Run the plugins of `section` in order and collect their answers.

    `env` is the session's environment (not changed here; S/U lines come
    back in the Outcome).  `timeout` is seconds per plugin.  Never raises
    for a plugin's behaviour.
    """
    if section not in SECTIONS:
        raise ValueError("unknown qmail-spp section %r" % section)
    out = Outcome()
    run_env = dict(env)
    for plugin in plugins.get(section):
        tag = "spp %s %s" % (section, plugin.line)
        finished, failure = _run_one(plugin, home, run_env, timeout)
        _stderr_lines(finished.stderr if finished else b"", tag, out.logs)
        if failure is not None:
            out.verdict, out.reply = "reject", failure_reply(plugin, failure)
            out.logs.append("%s: %s" % (tag, failure))
            return out
        if _parse(finished.stdout, section, tag, out, run_env):
            return out
    return out


def _run_one(plugin: Plugin, home: str, env: Dict[str, str], timeout: float):
    """(Finished or None, failure text or None) for one plugin."""
    if plugin.is_shell:
        argv = list(plugin.argv)
    else:
        path = os.path.join(home, plugin.line)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return None, "can't execute"
        argv = [path]
    finished = children.run(argv, stdin=b"", timeout=timeout, env=env, cwd=home)
    if finished.error is not None:
        return finished, "can't execute"
    if finished.timed_out:
        return finished, "timeout"
    if finished.code < 0:
        return finished, "child crashed"
    if finished.code == EXIT_CANT_EXECUTE:
        return finished, "can't execute"
    if not plugin.is_shell and finished.code in _SHELL_EXEC_FAILED:
        return finished, "can't execute"
    return finished, None


def _lines(data: bytes, tag: str, stream: str, logs: List[str]) -> List[str]:
    """Bounded, decoded lines of `data`; a last line without LF counts."""
    if not data:
        return []
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    if len(raw) > MAX_LINES:
        logs.append("%s: %s: more than %d lines, rest ignored" % (tag, stream, MAX_LINES))
        raw = raw[:MAX_LINES]
    lines = []
    for item in raw:
        text = item.decode("utf-8", "replace").replace("\r", "").replace("\0", "")
        if len(text) > MAX_LINE:
            logs.append("%s: %s: line longer than %d characters cut" % (tag, stream, MAX_LINE))
            text = text[:MAX_LINE]
        lines.append(_no_controls(text))
    return lines


def _stderr_lines(data: bytes, tag: str, logs: List[str]) -> None:
    for text in _lines(data, tag, "stderr", logs):
        logs.append("%s: %s" % (tag, text))


def _no_controls(text: str) -> str:
    """Control characters other than TAB become ``?``."""
    return "".join("?" if (ch < " " and ch != "\t") or ch == "\x7f" else ch for ch in text)


def _printable(text: str) -> str:
    """Printable ASCII only (reply texts); others become ``?``."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def _reply(text: str, tag: str, logs: List[str]) -> str:
    """A plugin's reply made a valid final SMTP reply line."""
    text = _printable(text.replace("\t", " "))
    if _REPLY_CODE.match(text) and (len(text) == 3 or text[3] in " -"):
        if text[3:4] == "-":
            logs.append("%s: continuation line %r used as final reply" % (tag, text))
            text = text[:3] + " " + text[4:]
        return text
    logs.append("%s: reply without SMTP code, 451 put in front: %r" % (tag, text))
    return "451 " + (text or "qmail-spp plugin refused (#4.3.0)")


def _parse(stdout: bytes, section: str, tag: str, out: Outcome,
           run_env: Dict[str, str]) -> bool:
    """Apply one plugin's output to `out`; True when it decided (stop)."""
    header_open = False  # the previous H line was kept: blanks continue it
    for text in _lines(stdout, tag, "stdout", out.logs):
        if not text:
            continue
        cmd, arg = text[0], text[1:]
        if cmd in _STOPPERS:
            out.verdict = _STOPPERS[cmd]
            if cmd in "ER":
                out.reply = _reply(arg, tag, out.logs)
            return True
        if cmd != "H":
            header_open = False
        if cmd == "P":
            out.partial.append(_printable(arg.replace("\t", " ")))
        elif cmd == "H":
            if _HEADER.match(arg) or (header_open and arg[:1] in (" ", "\t")):
                out.headers.append(arg)
                header_open = True
            else:
                header_open = False
                out.logs.append("%s: not a header line, dropped: %r" % (tag, arg))
        elif cmd == "S":
            name, eq, value = arg.partition("=")
            if not eq or not _ENV_NAME.match(name):
                out.logs.append("%s: bad S line, ignored: %r" % (tag, arg))
                continue
            out.setenv(name, value)
            run_env[name] = value
        elif cmd == "U":
            if not _ENV_NAME.match(arg):
                out.logs.append("%s: bad U line, ignored: %r" % (tag, arg))
                continue
            out.unsetenv(arg)
            run_env.pop(arg, None)
        elif cmd == "C":
            _change_address(arg, section, tag, out)
        elif cmd == "L" and arg[:1] in _LATER:
            out.later[_LATER[arg[0]]] = _reply(arg[1:], tag, out.logs)
        else:
            out.logs.append("%s: unknown command, ignored: %r" % (tag, text))
    return False


def _change_address(arg: str, section: str, tag: str, out: Outcome) -> None:
    if section not in ("mail", "rcpt"):
        out.logs.append("%s: C ignored outside [mail] and [rcpt]" % tag)
        return
    addr = arg.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    bad = (len(addr) > MAX_ADDRESS or any(ch.isspace() or ch in "<>" for ch in addr)
           or _printable(addr) != addr or (section == "rcpt" and not addr))
    if bad:
        out.logs.append("%s: bad address in C line, ignored: %r" % (tag, arg))
        return
    out.change_address = addr
