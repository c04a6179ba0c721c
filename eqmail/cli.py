"""cli -- `eqmail TOOL ...`, the multi-call entry point for eqmail's tools.

TOOLS
    smtpd        one SMTP session on stdin/stdout (for xinetd or tcpserver)
    config-fast  write the basic control files for a host name
    maildirmake  create a Maildir
    qstat        count the messages in the queue
    qread        list the messages in the queue with their recipients (mailq)
    qbad         list, show and remove damaged queue files set aside in queue/bad/
    (`eqmail --help` lists them all)

HOME
    Every tool finds the home the same way as eqmaild (eqmail.paths: --home,
    $EQMAIL_HOME, ./eqmail-home of yours, ~/eqmail-home of yours, /var/qmail,
    ~/eqmail-home), and every failure message names the home it used and
    how it was chosen.

EXIT CODES (sysexits, besides each tool's own: queue, inject and sendmail
keep qmail's)
    64 bad usage or argument; 66 no such home, queue or file; 70 internal
    error; 73 cannot write; 74 read or write error; 77 permission denied
    (the queue belongs to the daemon's user); 78 bad control file.  Errors
    are one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from typing import List, Optional

from . import __version__
from .paths import HOME_RULE, find_home, resolve_home

TOOLS = {}

EX_USAGE = 64
EX_NOINPUT = 66
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_NOPERM = 77
EX_CONFIG = 78


def tool(name: str, summary: str):
    def register(func):
        TOOLS[name] = (func, summary)
        return func
    return register


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 64 (EX_USAGE)."""

    def error(self, message):
        self.exit(EX_USAGE, "%s: usage: %s (%s --help)\n" % (self.prog, message, self.prog))


def _parser(name: str, description: str, home: bool = True) -> argparse.ArgumentParser:
    p = _Parser(prog="eqmail " + name, description=description, epilog=HOME_RULE if home else None)
    if home:
        p.add_argument("--home", metavar="DIR",
                       help="the eqmail home (default: see below and `eqmail --help`)")
    return p


def _fatal(tool: str, code: int, text: str) -> int:
    """One line on stderr; returns `code`."""
    sys.stderr.write("eqmail %s: fatal: %s\n" % (tool, text))
    return code


def _home_text(home_arg: Optional[str]) -> str:
    """``home DIR (how it was chosen)``: every failure message names it."""
    path, how = find_home(home_arg)
    return "home %s (%s)" % (path, how)


def _owner(path: str) -> str:
    import pwd

    try:
        uid = os.stat(path).st_uid
    except OSError:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def _queue_failure(tool: str, home_arg: Optional[str], e: OSError) -> int:
    """The exit code and one line for an OSError met opening the queue."""
    home = resolve_home(home_arg)
    where = _home_text(home_arg)
    qdir = os.path.join(home, "queue")
    if isinstance(e, PermissionError):
        # the queue is the daemon user's (mode 0700): name that user
        owner = _owner(qdir) or _owner(home) or "another user"
        run_as = "root" if owner == "root" else "%s or as root" % (
            owner if owner != "another user" else "that user")
        return _fatal(tool, EX_NOPERM, "permission denied reading the queue %s of %s: it "
                      "belongs to %s; run this as %s" % (qdir, where, owner, run_as))
    if isinstance(e, FileNotFoundError):
        if not os.path.isdir(home):
            return _fatal(tool, EX_NOINPUT, "no such %s; give the daemon's with --home DIR "
                          "or $EQMAIL_HOME" % where)
        return _fatal(tool, EX_NOINPUT, "no queue in %s (eqmaild makes it at its first "
                      "start)" % where)
    return _fatal(tool, EX_IOERR, "unable to read the queue of %s: %s"
                  % (where, e.strerror or e))


# -- smtpd ----------------------------------------------------------------------------

@tool("smtpd", "one SMTP session on stdin/stdout (xinetd, tcpserver, inetd)")
def cmd_smtpd(argv: List[str]) -> int:
    p = _parser("smtpd", "Serve one SMTP session on stdin/stdout, as qmail-smtpd does "
                "under tcpserver or xinetd: `eqmail smtpd [--home DIR] [HOST CHECKPROGRAM "
                "SUBPROGRAM...]`, HOST naming this host in the CRAM-MD5 challenge and "
                "CHECKPROGRAM a checkpassword program for AUTH. The client address comes "
                "from TCPREMOTEIP, else xinetd's REMOTE_HOST; TCPLOCALIP, TCPLOCALHOST, "
                "TCPLOCALPORT, TCPREMOTEHOST, TCPREMOTEINFO, RELAYCLIENT, DATABYTES, "
                "TLSREQUIRED, NOSPP, SPPCONFFILE and SUBMISSIONPORT (default 587: AUTH "
                "required before MAIL when TCPLOCALPORT equals it) are read as qmail-smtpd "
                "reads them. QMAILQUEUE names a program that takes each message (fd 0) and "
                "its envelope (fd 1) instead of the queue, as netqmail's qmail-queue "
                "replacement. STARTTLS is offered when stdin is a socket and "
                "control/servercert.pem exists. Log lines go to stderr, or to syslog when "
                "stderr is the client's socket (inetd), never to the client.")
    p.add_argument("auth", nargs="*", metavar="HOST CHECKPROGRAM SUBPROGRAM",
                   help="qmail-smtpd-auth's arguments")
    args = p.parse_args(argv)
    home = resolve_home(args.home)

    import stat

    import gevent.os
    import gevent.socket

    from . import log
    from .control import ConfigError, load
    from .queue.pickup import queue_for
    from .smtp import reply, tls
    from .smtp.session import Session

    log.set_prefix("eqmail-smtpd[%d]: " % os.getpid())
    if stat.S_ISSOCK(os.fstat(2).st_mode):
        # under inetd/xinetd stderr is the client's socket (eQmail's bug 13):
        # log lines go to syslog instead, or nowhere
        if os.path.exists("/dev/log"):
            log.to_syslog("eqmail-smtpd")
        else:
            log.to_null()
    env = dict(os.environ)
    if not env.get("TCPREMOTEIP") and env.get("REMOTE_HOST"):
        env["TCPREMOTEIP"] = env["REMOTE_HOST"]
    from .workers import plain_ip

    for name in ("TCPREMOTEIP", "TCPLOCALIP"):  # ::ffff:127.0.0.1 as eqmaild logs it
        if env.get(name):
            env[name] = plain_ip(env[name])
    sock = None
    if stat.S_ISSOCK(os.fstat(0).st_mode):  # xinetd/inetd/tcpserver hand us the socket
        try:
            sock = gevent.socket.socket(fileno=os.dup(0))
        except OSError:
            sock = None

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[gevent.os.nb_write(1, view):]

    try:
        config = load(home)
        # the queue itself, or eqmaild's pickup socket for a user who cannot
        # write it (xinetd's service user)
        store = queue_for(home)
    except (ConfigError, OSError) as e:
        log.alert("unable to read controls or queue of %s: %s" % (_home_text(args.home), e))
        send(reply.CONTROLS.render())
        return 1
    if not env.get("TCPLOCALHOST"):
        env["TCPLOCALHOST"] = args.auth[0] if args.auth else config.me
    checkpassword = args.auth[1:] if len(args.auth) >= 2 else None
    submission = env.get("TCPLOCALPORT", "") == (env.get("SUBMISSIONPORT") or "587")
    ctx = tls.server_context(home, env.get("TLSCIPHERS") or config.tlsserverciphers)
    conn = {"sock": sock}

    def starttls():
        conn["sock"] = ctx.wrap_socket(conn["sock"], server_side=True)
        return conn["sock"].recv, conn["sock"].sendall, tls.cipher_name(conn["sock"])

    if sock is not None:
        recv, send_ = sock.recv, sock.sendall
    else:
        gevent.os.make_nonblocking(0)
        gevent.os.make_nonblocking(1)
        recv, send_ = (lambda n: gevent.os.nb_read(0, n)), send
    Session(config, store, recv, send_, env,
            starttls=starttls if ctx is not None and sock is not None else None,
            checkpassword=checkpassword, submission=submission).run()
    if conn["sock"] is not None:
        tls.close(conn["sock"])
    return 0


@tool("mkservercert", "make a self-signed control/servercert.pem for STARTTLS")
def cmd_mkservercert(argv: List[str]) -> int:
    p = _parser("mkservercert", "Write HOME/control/servercert.pem (mode 0600): a new "
                "RSA 2048 key and a self-signed certificate for NAME (default control/me), "
                "made with the openssl command. eqmaild offers STARTTLS and serves --smtps "
                "with it; replace it with a certificate from a CA when you have one "
                "(certificate chain and key in one PEM file).")
    p.add_argument("name", nargs="?", help="the host name (default: control/me)")
    p.add_argument("--days", type=int, default=3650, help="validity in days (3650)")
    args = p.parse_args(argv)
    from .control import read_line
    from .smtp.tls import describe, make_self_signed

    from .control import ConfigError

    home = resolve_home(args.home)
    try:
        name = args.name or read_line(os.path.join(home, "control", "me"), None)
    except (ConfigError, OSError) as e:
        return _fatal("mkservercert", EX_CONFIG, "%s: %s" % (_home_text(args.home), e))
    if not name:
        return _fatal("mkservercert", EX_USAGE, "no NAME and no control/me in %s"
                      % _home_text(args.home))
    try:
        path = make_self_signed(home, name, args.days)
    except (OSError, RuntimeError) as e:
        return _fatal("mkservercert", EX_CANTCREAT, "%s: %s" % (_home_text(args.home), e))
    print("%s: %s" % (path, describe(path) or "written"))
    return 0


# -- config-fast ------------------------------------------------------------------------

@tool("config-fast", "write the basic control files for FQDN (eQmail's config-fast)")
def cmd_config_fast(argv: List[str]) -> int:
    p = _parser("config-fast", "Write control/me and control/defaultdomain for FQDN, and "
                "plusdomain, locals, rcpthosts and an empty smtpplugins when missing "
                "(eQmail's config-fast).")
    p.add_argument("fqdn", nargs="?", help="this host's FQDN (default: hostname -f); "
                   "refused unless it is a host name (letters, digits, '-' and '_' in "
                   "dot-separated labels)")
    args = p.parse_args(argv)
    from .control import config_fast, host_fqdn

    home = resolve_home(args.home)
    fqdn = (args.fqdn if args.fqdn is not None else host_fqdn()).strip().lower()
    problem = fqdn_problem(fqdn)
    if problem:
        return _fatal("config-fast", EX_USAGE, "%r is not a host name (%s); nothing written "
                      "to %s" % (fqdn, problem, _home_text(args.home)))
    try:
        config_fast(home, fqdn)
    except OSError as e:
        code = EX_NOPERM if isinstance(e, PermissionError) else EX_CANTCREAT
        return _fatal("config-fast", code, "unable to write the control files of %s: %s"
                      % (_home_text(args.home), e))
    return 0


def fqdn_problem(name: str) -> str:
    """Why `name` cannot be control/me (and the other names config-fast
    writes), or "" when it can: dot-separated labels of ASCII letters,
    digits, ``-`` and ``_`` (no label empty or longer than 63, no ``-`` at
    either end), at most 253 characters.  eqmaild's next start would
    refuse a control/me with white space in it (exit 78); this refuses
    that and more, at once, before anything is written."""
    if not name:
        return "empty"
    if len(name) > 253:
        return "longer than 253 characters"
    for label in name.split("."):
        if not label:
            return "an empty label"
        if len(label) > 63:
            return "a label longer than 63 characters"
        bad = [ch for ch in label if not (ch.isascii() and (ch.isalnum() or ch in "-_"))]
        if bad:
            return "the character %r" % bad[0]
        if label.startswith("-") or label.endswith("-"):
            return "a label that begins or ends with '-'"
    return ""


# -- maildirmake ------------------------------------------------------------------------

@tool("maildirmake", "create a Maildir (tmp/, new/, cur/)")
def cmd_maildirmake(argv: List[str]) -> int:
    p = _parser("maildirmake", "Create the Maildir DIR with tmp/, new/ and cur/, mode 0700.",
                home=False)
    p.add_argument("dir")
    args = p.parse_args(argv)
    from .delivery.local import maildirmake

    try:
        maildirmake(args.dir)
    except OSError as e:
        return _fatal("maildirmake", EX_NOPERM if isinstance(e, PermissionError)
                      else EX_CANTCREAT, str(e))
    return 0


# -- qstat / qread / qbad -------------------------------------------------------------------

def _open_store(home: str):
    from .queue.store import Store

    return Store.open(home, create=False)


def _survey(tool: str, store):
    """(the committed messages, the count of problems) of the queue, read
    as eqmaild reads them; a damaged file or one that cannot be read is
    named on stderr, files being written are skipped.  Raises OSError
    when mess/ cannot be listed."""
    from .queue.store import Damaged, NotCommitted

    items, problems = [], 0
    for msgid in store.ids():
        try:
            items.append(store.load(msgid))
        except (FileNotFoundError, NotCommitted):
            continue  # finished meanwhile, or being written
        except Damaged as e:
            problems += 1
            sys.stderr.write("eqmail %s: warning: msg %s: damaged queue file (%s), not "
                             "counted; eqmaild moves it to %s/\n" % (tool, msgid, e, store.bad))
        except (OSError, ValueError) as e:
            problems += 1
            sys.stderr.write("eqmail %s: warning: msg %s: unable to read: %s\n"
                             % (tool, msgid, e))
    try:
        bad = len(store.bad_names())
    except OSError:
        bad = 0
    if bad:
        sys.stderr.write("eqmail %s: note: %d damaged queue file%s set aside in %s/, not "
                         "counted (eqmail qbad)\n" % (tool, bad, "" if bad == 1 else "s",
                                                      store.bad))
    return items, problems


@tool("qstat", "count the messages in the queue (qmail-qstat)")
def cmd_qstat(argv: List[str]) -> int:
    p = _parser("qstat", "Print the number of messages in the queue, as qmail-qstat does. "
                "Every file is read as eqmaild reads it: a message still being written "
                "is not counted, nor a damaged queue file (named on stderr; eqmaild moves "
                "those to queue/bad/, see eqmail qbad). Exit 66 without a queue, 77 when "
                "the queue belongs to another user (the daemon's: run it as that user).")
    args = p.parse_args(argv)
    try:
        store = _open_store(resolve_home(args.home))
        items, _ = _survey("qstat", store)
    except OSError as e:
        return _queue_failure("qstat", args.home, e)
    print("messages in queue: %d" % len(items))
    print("messages in queue but not yet preprocessed: 0")
    return 0


@tool("qread", "list queued messages and their recipients (qmail-qread; also mailq)")
def cmd_qread(argv: List[str]) -> int:
    p = _parser("qread", "List each queued message: date, #id, size, <sender>, then one "
                "line per recipient, local or remote, `done` when finished; ` bouncing` "
                "when failures wait for the bounce "
                "(qmail-qread's format; dates in UTC). Damaged queue files are named on "
                "stderr, not listed (see eqmail qbad). Exit 66 without a queue, 77 when "
                "the queue belongs to another user, 78 for a bad control file.")
    args = p.parse_args(argv)
    home = resolve_home(args.home)
    from .control import ConfigError, load
    from .delivery.route import route

    try:
        store = _open_store(home)
    except OSError as e:
        return _queue_failure("qread", args.home, e)
    try:
        config = load(home)
    except ConfigError as e:
        return _fatal("qread", EX_CONFIG, "%s: %s" % (_home_text(args.home), e))
    except OSError as e:
        return _fatal("qread", EX_IOERR, "%s: unable to read the control files: %s"
                      % (_home_text(args.home), e))
    try:
        items, _ = _survey("qread", store)
    except OSError as e:
        return _queue_failure("qread", args.home, e)
    for item in items:
        date = time.strftime("%d %b %Y %H:%M:%S", time.gmtime(item.birth))
        bouncing = os.path.exists(os.path.join(store.bounce, item.id))
        print("%s GMT  #%s  %d  <%s> %s" % (date, item.id, max(item.size, 0), item.sender,
                                            " bouncing" if bouncing else ""))
        for rcpt, done in zip(item.recipients, item.done):
            channel = route(config, rcpt).channel
            print("%s\t%s\t<%s>" % ("  done" if done else "", channel, rcpt))
    return 0


QBAD_DESCRIPTION = (
    "Damaged queue files: a committed message whose queue file no longer reads as one "
    "(cut short, zeroed, bits flipped) is never delivered; eqmaild moves it once to "
    "HOME/queue/bad/ and logs one alert line naming it. "
    "`eqmail qbad` (or `qbad list`) prints one line per file: its name (the queue ID), "
    "its size, when it was set aside, the sender if it can be read, and what is wrong. "
    "`qbad show NAME` prints what can be read of its envelope, an empty line, then the "
    "file's bytes as they are (the message data when its end still says where the data "
    "ends). `qbad rm NAME...` deletes files for good. Run it as the daemon's user or "
    "root (the queue is theirs). Exit 66 for an unknown NAME, 77 without permission.")


@tool("qbad", "list, show or remove damaged queue files set aside in queue/bad/")
def cmd_qbad(argv: List[str]) -> int:
    p = _parser("qbad", QBAD_DESCRIPTION)
    p.add_argument("action", nargs="?", default="list", choices=("list", "show", "rm"),
                   help="list (the default), show NAME, rm NAME...")
    p.add_argument("names", nargs="*", metavar="NAME", help="a file in queue/bad/")
    args = p.parse_args(argv)
    if args.action == "list" and args.names:
        p.error("list takes no NAME")
    if args.action == "show" and len(args.names) != 1:
        p.error("show takes one NAME")
    if args.action == "rm" and not args.names:
        p.error("rm takes at least one NAME")
    try:
        store = _open_store(resolve_home(args.home))
        names = store.bad_names()
    except OSError as e:
        return _queue_failure("qbad", args.home, e)
    if args.action == "list":
        for name in names:
            code = _qbad_line(store, name, args.home)
            if code:
                return code
        return 0
    for name in args.names:
        if name not in names:
            return _fatal("qbad", EX_NOINPUT, "no damaged queue file %r in %s/ of %s"
                          % (name, store.bad, _home_text(args.home)))
    if args.action == "show":
        return _qbad_show(store, args.names[0], args.home)
    for name in args.names:
        try:
            store.remove_bad(name)
        except OSError as e:
            return _bad_file_failure(store, name, args.home, e)
    return 0


def _bad_file_failure(store, name: str, home_arg: Optional[str], e: OSError) -> int:
    if isinstance(e, PermissionError):
        return _queue_failure("qbad", home_arg, e)
    if isinstance(e, FileNotFoundError):
        return _fatal("qbad", EX_NOINPUT, "no damaged queue file %r in %s/ of %s"
                      % (name, store.bad, _home_text(home_arg)))
    return _fatal("qbad", EX_IOERR, "%s/%s: %s" % (store.bad, name, e.strerror or e))


def _qbad_line(store, name: str, home_arg: Optional[str]) -> int:
    try:
        item, why, size = store.examine_bad(name)
        when = os.lstat(store.bad_path(name)).st_ctime
    except FileNotFoundError:
        return 0  # removed meanwhile
    except OSError as e:
        return _bad_file_failure(store, name, home_arg, e)
    sender = "<%s>" % item.sender if item is not None else "(no envelope)"
    print("%s  %d bytes  set aside %s GMT  %s  %s"
          % (name, size, time.strftime("%d %b %Y %H:%M:%S", time.gmtime(when)), sender,
             why or "reads as a good queue file now"))
    return 0


def _qbad_show(store, name: str, home_arg: Optional[str]) -> int:
    from .queue.store import data_size

    path = store.bad_path(name)
    try:
        item, why, size = store.examine_bad(name)
        when = os.lstat(path).st_ctime
        try:
            end = data_size(path)
        except ValueError:
            end = size  # no trailer: all of it
        out = sys.stdout.buffer
        lines = ["file: %s" % path, "size: %d bytes" % size,
                 "set aside: %s GMT" % time.strftime("%d %b %Y %H:%M:%S", time.gmtime(when)),
                 "damage: %s" % (why or "none found now")]
        if item is not None:
            lines.append("born: %s GMT" % time.strftime("%d %b %Y %H:%M:%S",
                                                        time.gmtime(item.birth)))
            lines.append("sender: <%s>" % item.sender)
            lines += ["recipient: <%s>%s" % (r, " done" if d else "")
                      for r, d in zip(item.recipients, item.done)]
        else:
            lines.append("envelope: unreadable")
        lines.append("data: %s" % ("the first %d bytes of the file" % end if end != size
                                   else "the whole file (no readable end)"))
        out.write(("\n".join(lines) + "\n\n").encode("utf-8", "backslashreplace"))
        with open(path, "rb") as f:
            left = end
            while left > 0:
                chunk = f.read(min(65536, left))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
        out.flush()
    except OSError as e:
        return _bad_file_failure(store, name, home_arg, e)
    return 0


# -- queue / newu -------------------------------------------------------------------------

@tool("queue", "qmail-queue (message on fd 0, envelope on fd 1); with list, show, "
      "delete, hold, release, requeue or flush: the admin's queue operations")
def cmd_queue(argv: List[str]) -> int:
    from .queueadmin import OPS

    if any(a in OPS for a in argv[:3]):  # qmail-queue takes no arguments
        from .queueadmin import main as admin

        return admin(argv)
    p = _parser("queue", "`eqmail queue list|show|delete|hold|release|requeue|flush "
                "...` are the admin's queue operations (eqmail queue list --help). "
                "Without them: qmail-queue compatible: read the message on fd 0 and the envelope "
                "(F<sender>\\0T<rcpt>\\0...\\0) on fd 1, queue them, print nothing, and "
                "exit 0, or with qmail-queue's codes (11-40 permanent, others temporary) "
                "and one line on stderr naming the home. "
                "Works for any local user through eqmaild's pickup socket.")
    args = p.parse_args(argv)
    from .queue import pickup

    try:
        with os.fdopen(1, "rb", closefd=False) as envfile:
            env = envfile.read(pickup.MAX_ENVELOPE + 1)
    except OSError:
        return 54
    try:
        if len(env) > pickup.MAX_ENVELOPE:
            raise pickup.SubmitError(91)
        sender, recipients = pickup.parse_envelope(env)
        pickup.submit(resolve_home(args.home), sender, recipients, b"", sys.stdin.buffer)
    except pickup.SubmitError as e:
        sys.stderr.write("eqmail queue: %s: %s\n" % (_home_text(args.home), e.text))
        return e.code
    return 0


@tool("newu", "compile users/assign into users/cdb (qmail-newu)")
def cmd_newu(argv: List[str]) -> int:
    p = _parser("newu", "Compile HOME/users/assign into HOME/users/cdb atomically, as "
                "qmail-newu does; eqmaild uses the cdb when it exists.")
    args = p.parse_args(argv)
    from .control import ConfigError
    from .delivery.users import newu

    try:
        count = newu(resolve_home(args.home))
    except ConfigError as e:
        return _fatal("newu", EX_CONFIG, "%s: %s" % (_home_text(args.home), e))
    except OSError as e:
        code = {PermissionError: EX_NOPERM, FileNotFoundError: EX_NOINPUT}.get(type(e), EX_IOERR)
        return _fatal("newu", code, "%s: %s" % (_home_text(args.home), e))
    print("users/cdb: %d assignments" % count)
    return 0


@tool("newaliases", "compile the aliases file (/etc/aliases) for the alias user")
def cmd_newaliases(argv: List[str]) -> int:
    p = _parser("newaliases", "Compile the sendmail-style aliases file (the first line "
                "of HOME/control/aliases, else /etc/aliases) into FILE.cdb, written to "
                "FILE.tmp and renamed, as fastforward's newaliases does; eqmaild follows "
                "it for addresses that no user owns (the alias user's, when ~alias has "
                "no .qmail file of their own). A bad entry is named with its file and "
                "line, and the old FILE.cdb stays in use (exit 78). Without the aliases "
                "file there is nothing to do (exit 0). Also `newaliases` and "
                "`sendmail -bi`. Format: `name: target, ...` where a target is an "
                "address, a local name, |command, /file or :include:/file.")
    args = p.parse_args(argv)
    from .control import ConfigError, load
    from .delivery import aliases

    home = resolve_home(args.home)
    try:
        source = aliases.source_path(load(home))
    except ConfigError as e:
        return _fatal("newaliases", EX_CONFIG, "%s: %s" % (_home_text(args.home), e))
    except OSError:
        source = aliases.DEFAULT_SOURCE  # no home yet: the system's file
    if not os.path.exists(source):
        print("newaliases: no %s: nothing to compile" % source)
        return 0
    try:
        count = aliases.compile_file(source)
    except aliases.AliasError as e:
        return _fatal("newaliases", EX_CONFIG, "%s (%s.cdb not changed)" % (e, source))
    except OSError as e:
        code = EX_NOPERM if isinstance(e, PermissionError) else EX_CANTCREAT
        return _fatal("newaliases", code, "%s: %s" % (
            getattr(e, "filename", None) or source, e.strerror or e))
    print("newaliases: %s.cdb: %d aliases" % (source, count))
    return 0


def _load_config(tool: str, home_arg: Optional[str]):
    """The Config of the home `home_arg` names, or the exit code after one
    fatal line (78 for a bad control file, 66 when they cannot be read)."""
    from .control import ConfigError, load

    try:
        return load(resolve_home(home_arg))
    except ConfigError as e:
        return _fatal(tool, EX_CONFIG, "%s: %s" % (_home_text(home_arg), e))
    except OSError as e:
        return _fatal(tool, EX_NOINPUT, "%s: unable to read the control files: %s"
                      % (_home_text(home_arg), e.strerror or e))


@tool("verify", "print where addresses would go, sending nothing (sendmail -bv)")
def cmd_verify(argv: List[str]) -> int:
    p = _parser("verify", "For each ADDRESS, print where eqmaild would deliver it: local "
                "(users/assign, system user or alias user; the dot-qmail file, "
                "defaultdelivery, /etc/aliases entry, ~/.forward or mail spool it follows) "
                "or remote (smtproutes relay or MX), following forwards. Nothing is sent. "
                "What the caller cannot read (another user's home) is said so: run it as "
                "root to see everything. Exit 0 when every address is deliverable, 100 "
                "when one would bounce, 111 for temporary trouble. Also `sendmail -bv`.")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    args = p.parse_args(argv)
    from .verify import explain

    config = _load_config("verify", args.home)
    if isinstance(config, int):
        return config
    worst = 0
    for address in args.addresses:
        lines, code = explain(config, address)
        print("\n".join(lines))
        worst = max(worst, code)
    return worst


@tool("tlsrpt", "write (and mail) the day's SMTP TLS reports (RFC 8460)")
def cmd_tlsrpt(argv: List[str]) -> int:
    p = _parser("tlsrpt", "Turn one day's TLS sessions under MTA-STS and DANE policies "
                "(HOME/queue/tlsrpt/DAY, counted by eqmaild) into one RFC 8460 JSON "
                "report per policy domain, written to HOME/queue/tlsrpt/reports/DAY/"
                "DOMAIN.json; one line per report on stdout: the domain, the file and "
                "the mailto: addresses of its _smtp._tls record. With --send, each "
                "report is mailed there (multipart/report, report-type tlsrpt, the JSON "
                "gzip'd) through the queue. Day files older than 7 days are removed. "
                "Run it daily from cron, as the queue's owner or root: "
                "`5 0 * * * eqmail tlsrpt --send`. Exit 0, 66 when the day has no "
                "sessions, 75 when a report cannot be queued.")
    p.add_argument("--date", metavar="YYYY-MM-DD",
                   help="the day (UTC) to report on (default: yesterday)")
    p.add_argument("--send", action="store_true", help="mail each report to its rua")
    args = p.parse_args(argv)
    import json
    import re

    from .delivery import tlsrpt

    home = resolve_home(args.home)
    config = _load_config("tlsrpt", args.home)
    if isinstance(config, int):
        return config
    day = args.date or time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    if not re.match(r"^\d{4}-\d\d-\d\d$", day):
        return _fatal("tlsrpt", EX_USAGE, "--date wants YYYY-MM-DD, not %r" % day)
    tlsrpt.prune(config)
    try:
        reports = tlsrpt.build(config, day)
    except FileNotFoundError:
        print("eqmail tlsrpt: no TLS sessions under a policy on %s" % day, file=sys.stderr)
        return EX_NOINPUT
    except OSError as e:
        return _fatal("tlsrpt", EX_NOINPUT, "%s: %s" % (day, e.strerror or e))
    outdir = config.path("queue", "tlsrpt", "reports", day)
    os.makedirs(outdir, mode=0o700, exist_ok=True)
    failed = 0
    for domain, report in sorted(reports.items()):
        path = os.path.join(outdir, domain + ".json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
        to = tlsrpt.rua(domain)
        print("%s %s %s" % (domain, path, ",".join(to) or "-"))
        if args.send and to:
            import io

            from .queue import pickup

            data = tlsrpt.message(config, domain, report, to)
            try:
                pickup.submit(home, "postmaster@%s" % config.me, to, b"", io.BytesIO(data))
            except pickup.SubmitError as e:
                failed += 1
                print("eqmail tlsrpt: %s: unable to queue the report: %s"
                      % (domain, e.text), file=sys.stderr)
    return 75 if failed else 0


@tool("status", "one screen on eqmaild: pid, uptime, listeners, queue, deliveries, "
      "memory, certificate, alerts")
def cmd_status(argv: List[str]) -> int:
    p = _parser("status", "Ask the running eqmaild (any local user may) for its pid, "
                "version, uptime and listeners, the queue (messages, held, bouncing, the "
                "oldest one's age), deliveries, deferrals and failures of the last hour "
                "and day, session workers, the memory of its process tree, the server "
                "certificate's expiry and its last alerts. Exit 0 when all is well, 1 "
                "when something needs the admin (an alert in the last hour, a message "
                "older than a day, a certificate expired or expiring within 14 days), "
                "3 when eqmaild is not running.")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    args = p.parse_args(argv)
    from .status import main as status

    return status(resolve_home(args.home), args.json, _home_text(args.home))


@tool("flush", "try every queued message now (sendmail -q, postqueue -f)")
def cmd_flush(argv: List[str]) -> int:
    p = _parser("flush", "Ask eqmaild to try every queued message now, as SIGALRM does, "
                "through its pickup socket: any local user may ask (eqmaild starts at "
                "most one flush every 5 seconds). Also `sendmail -q`. Exit 69 when "
                "eqmaild is not running.")
    args = p.parse_args(argv)
    from .queue import pickup

    home = resolve_home(args.home)
    try:
        pickup.request_flush(home)
    except pickup.SubmitError as e:
        return _fatal("flush", 69, "%s: %s" % (_home_text(args.home), e.text))
    return 0


@tool("inject", "qmail-inject: complete a message's header and queue it")
def cmd_inject(argv: List[str]) -> int:
    from .inject import cmd_inject as run

    return run(argv)


@tool("sendmail", "sendmail-compatible front end (-t -f -F -i -oi -bs -bp -bi -bv -q)")
def cmd_sendmail(argv: List[str]) -> int:
    from .inject import cmd_sendmail as run

    return run(argv)


@tool("mkusers", "create the eqmail and alias users (root)")
def cmd_mkusers(argv: List[str]) -> int:
    p = _parser("mkusers", "Create the service user `eqmail` (and its group) and qmail's "
                "`alias` user with useradd, or busybox adduser on OpenWrt, when they are "
                "missing. eqmaild started as root runs as `eqmail`; `alias` owns HOME/alias "
                "and receives the alias user's mail.")
    args = p.parse_args(argv)
    from .privsep import mkusers

    if os.geteuid() != 0:
        return _fatal("mkusers", EX_NOPERM, "must be run as root")
    try:
        made = mkusers(resolve_home(args.home))
    except (RuntimeError, OSError) as e:
        return _fatal("mkusers", EX_SOFTWARE, "%s: %s" % (_home_text(args.home), e))
    print("created: %s" % (", ".join(made) if made else "nothing (the users exist)"))
    return 0


@tool("chkpw", "checkpassword-compatible program over HOME/users/passwd (SMTP AUTH)")
def cmd_chkpw(argv: List[str]) -> int:
    from .chkpw import cmd_chkpw as run

    return run(argv)


@tool("passwd", "set, change or delete an SMTP AUTH user in HOME/users/passwd")
def cmd_passwd(argv: List[str]) -> int:
    from .chkpw import cmd_passwd as run

    return run(argv)


@tool("dkimsign", "DKIM-sign a message on stdin (a beforemote filter; needs eqmail[dkim])")
def cmd_dkimsign(argv: List[str]) -> int:
    from .dkimsign import cmd_dkimsign as run

    return run(argv)


# -- entry ------------------------------------------------------------------------------

def usage() -> str:
    lines = ["usage: eqmail TOOL [ARGS...]   (eqmail TOOL --help for each tool)",
             "", "eqmail %s: tools of the eqmail mail transfer agent" % __version__, "",
             "tools:"]
    for name, (_, summary) in TOOLS.items():
        lines.append("  %-13s %s" % (name, summary))
    lines += [""]
    for para in ("mailq is qread (`eqmail mailq`), as are the names below. The daemon is "
                 "`eqmaild` (eqmaild --help). Called as sendmail, mailq, newaliases, "
                 "qmail-inject, qmail-queue, qmail-qread, qmail-qstat, qmail-smtpd or "
                 "qmail-newu (a "
                 "symlink to eqmail), eqmail is that tool.",
                 HOME_RULE + " So tools run where `eqmaild --home ./eqmail-home` was "
                 "started reach that daemon. A tool that fails names the home it used.",
                 "Exit codes: sysexits (64 usage, 66 no such home, queue or file, 77 "
                 "permission denied, 78 bad control file ...); queue, inject and sendmail "
                 "keep qmail's."):
        lines += [textwrap.fill(para, 79, break_on_hyphens=False), ""]
    lines.pop()
    return "\n".join(lines) + "\n"


#: Names under which eqmail acts as one tool straight away (a symlink
#: /usr/sbin/sendmail -> eqmail makes it sendmail).
ALIASES = {"sendmail": "sendmail", "checkpassword": "chkpw", "mailq": "qread", "qmail-inject": "inject",
           "qmail-queue": "queue", "qmail-qread": "qread", "qmail-qstat": "qstat",
           "qmail-smtpd": "smtpd", "qmail-newu": "newu", "newaliases": "newaliases"}


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        called = os.path.basename(sys.argv[0])
        argv = sys.argv[1:]
        if called in ALIASES and ALIASES[called] in TOOLS:
            return TOOLS[ALIASES[called]][0](argv) or 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    if argv[0] == "--version":
        print("eqmail " + __version__)
        return 0
    entry = TOOLS.get(argv[0]) or TOOLS.get(ALIASES.get(argv[0], ""))
    if entry is None:
        sys.stderr.write("eqmail: usage: unknown tool %r (eqmail --help lists them)\n"
                         % argv[0])
        return EX_USAGE
    return entry[0](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
