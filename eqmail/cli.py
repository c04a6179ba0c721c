"""cli -- `eqmail TOOL ...`, the multi-call entry point for eqmail's tools.

TOOLS
    smtpd        one SMTP session on stdin/stdout (for xinetd or tcpserver)
    config-fast  write the basic control files for a host name
    maildirmake  create a Maildir
    qstat        count the messages in the queue
    qread        list the messages in the queue with their recipients

Every tool finds the home the same way as eqmaild: ``--home DIR``, else
``$EQMAIL_HOME``, else /var/qmail (root, or when /var/qmail/control
exists), else ~/eqmail-home.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from . import __version__
from .paths import resolve_home

TOOLS = {}


def tool(name: str, summary: str):
    def register(func):
        TOOLS[name] = (func, summary)
        return func
    return register


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqmail " + name, description=description)
    p.add_argument("--home", metavar="DIR", help="the eqmail home (default: see `eqmail --help`)")
    return p


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
                "reads them. STARTTLS is offered when stdin is a socket and "
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
        log.alert("unable to read controls or queue in %s: %s" % (home, e))
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

    home = resolve_home(args.home)
    name = args.name or read_line(os.path.join(home, "control", "me"), None)
    if not name:
        sys.stderr.write("eqmail mkservercert: fatal: no NAME and no control/me\n")
        return 100
    try:
        path = make_self_signed(home, name, args.days)
    except (OSError, RuntimeError) as e:
        sys.stderr.write("eqmail mkservercert: fatal: %s\n" % e)
        return 111
    print("%s: %s" % (path, describe(path) or "written"))
    return 0


# -- config-fast ------------------------------------------------------------------------

@tool("config-fast", "write the basic control files for FQDN (eQmail's config-fast)")
def cmd_config_fast(argv: List[str]) -> int:
    p = _parser("config-fast", "Write control/me and control/defaultdomain for FQDN, and "
                "plusdomain, locals, rcpthosts and an empty smtpplugins when missing "
                "(eQmail's config-fast).")
    p.add_argument("fqdn", nargs="?", help="this host's FQDN (default: hostname -f)")
    args = p.parse_args(argv)
    from .control import config_fast, host_fqdn

    home = resolve_home(args.home)
    config_fast(home, args.fqdn or host_fqdn())
    return 0


# -- maildirmake ------------------------------------------------------------------------

@tool("maildirmake", "create a Maildir (tmp/, new/, cur/)")
def cmd_maildirmake(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="eqmail maildirmake",
                                description="Create the Maildir DIR with tmp/, new/ and cur/, mode 0700.")
    p.add_argument("dir")
    args = p.parse_args(argv)
    from .delivery.local import maildirmake

    try:
        maildirmake(args.dir)
    except OSError as e:
        sys.stderr.write("eqmail maildirmake: fatal: %s\n" % e)
        return 111
    return 0


# -- qstat / qread ------------------------------------------------------------------------

def _open_store(home: str):
    from .queue.store import Store

    return Store.open(home, create=False)


@tool("qstat", "count the messages in the queue (qmail-qstat)")
def cmd_qstat(argv: List[str]) -> int:
    p = _parser("qstat", "Print the number of messages in the queue, as qmail-qstat does.")
    args = p.parse_args(argv)
    try:
        store = _open_store(resolve_home(args.home))
        count = len(store.ids())
    except OSError as e:
        sys.stderr.write("eqmail qstat: fatal: unable to read the queue: %s\n" % e)
        return 111
    print("messages in queue: %d" % count)
    print("messages in queue but not yet preprocessed: 0")
    return 0


@tool("qread", "list queued messages and their recipients (qmail-qread)")
def cmd_qread(argv: List[str]) -> int:
    p = _parser("qread", "List each queued message: date, #id, size, <sender>, then one "
                "line per recipient, local or remote, `done` when finished; ` bouncing` "
                "when failures wait for the bounce "
                "(qmail-qread's format; dates in UTC).")
    args = p.parse_args(argv)
    home = resolve_home(args.home)
    from .control import ConfigError, load
    from .delivery.route import route

    try:
        store = _open_store(home)
        config = load(home)
    except (OSError, ConfigError) as e:
        sys.stderr.write("eqmail qread: fatal: %s\n" % e)
        return 111
    for item in store.items():
        date = time.strftime("%d %b %Y %H:%M:%S", time.gmtime(item.birth))
        bouncing = os.path.exists(os.path.join(store.bounce, item.id))
        print("%s GMT  #%s  %d  <%s> %s" % (date, item.id, max(item.size, 0), item.sender,
                                            " bouncing" if bouncing else ""))
        for rcpt, done in zip(item.recipients, item.done):
            channel = route(config, rcpt).channel
            print("%s\t%s\t<%s>" % ("  done" if done else "", channel, rcpt))
    return 0


# -- queue / newu -------------------------------------------------------------------------

@tool("queue", "qmail-queue: queue the message on fd 0 with the envelope on fd 1")
def cmd_queue(argv: List[str]) -> int:
    p = _parser("queue", "qmail-queue compatible: read the message on fd 0 and the envelope "
                "(F<sender>\\0T<rcpt>\\0...\\0) on fd 1, queue them, print nothing, and "
                "exit 0, or with qmail-queue's codes (11-40 permanent, others temporary). "
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
    except (ConfigError, OSError) as e:
        sys.stderr.write("eqmail newu: fatal: %s\n" % e)
        return 111
    print("users/cdb: %d assignments" % count)
    return 0


@tool("inject", "qmail-inject: complete a message's header and queue it")
def cmd_inject(argv: List[str]) -> int:
    from .inject import cmd_inject as run

    return run(argv)


@tool("sendmail", "sendmail-compatible front end (-t -f -F -i -oi -bs -bp)")
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
        sys.stderr.write("eqmail mkusers: fatal: must be run as root\n")
        return 100
    try:
        made = mkusers(resolve_home(args.home))
    except RuntimeError as e:
        sys.stderr.write("eqmail mkusers: fatal: %s\n" % e)
        return 111
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
    lines += ["", "The daemon is `eqmaild` (eqmaild --help).",
              "Called as sendmail, mailq, qmail-inject, qmail-queue, qmail-qread, "
              "qmail-qstat, qmail-smtpd or qmail-newu (a symlink to eqmail), it is that tool.",
              "Home: --home DIR, else $EQMAIL_HOME, else /var/qmail (as root, or when "
              "/var/qmail/control exists), else ~/eqmail-home."]
    return "\n".join(lines) + "\n"


#: Names under which eqmail acts as one tool straight away (a symlink
#: /usr/sbin/sendmail -> eqmail makes it sendmail).
ALIASES = {"sendmail": "sendmail", "checkpassword": "chkpw", "mailq": "qread", "qmail-inject": "inject",
           "qmail-queue": "queue", "qmail-qread": "qread", "qmail-qstat": "qstat",
           "qmail-smtpd": "smtpd", "qmail-newu": "newu"}


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
    entry = TOOLS.get(argv[0])
    if entry is None:
        sys.stderr.write("eqmail: unknown tool %r\n\n%s" % (argv[0], usage()))
        return 64
    return entry[0](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
