"""privsep -- eqmaild started as root: bind, then run as an unprivileged user.

SUMMARY
    eqmail uses ONE service user, ``eqmail`` (qmail spreads the work over
    qmaild, qmailq, qmailr and qmails; one user is what a router can afford
    and what the code, one process, can honour), plus qmail's ``alias``
    user, who owns HOME/alias and receives the alias user's mail.

    Started as root, eqmaild binds its ports, gives the queue, run/, log/,
    users/passwd and control/servercert.pem to the service user, forks the
    privileged local-delivery helper (qmail-lspawn's role), and then drops
    to the service user: everything that reads the network runs unprivileged.

THE HELPER
    A small root process without gevent.  eqmaild sends it a request -- the
    queue ID, envelope sender and recipient's local part and domain -- with
    a fresh socket for the answer (SCM_RIGHTS).  For each request it forks:
    the child opens the queued message as root, works out the recipient's
    user itself (delivery.users, as qmail-lspawn asks qmail-getpw; it never
    takes a uid or a home from eqmaild), refuses uid 0, drops to that user
    and delivers (delivery.lspawn), and writes the JSON result on the
    answer socket.  When eqmaild goes away the helper removes the pidfile
    and exits.

SECURITY
    A compromised eqmaild can ask for deliveries of queued messages to any
    local address -- as it could by accepting mail -- but not choose a uid,
    a home or a file.  Queue IDs are checked (digits and dots only).

STANDARDS
    qmail-lspawn(8), qmail-start(8); INSTALL.ids of netqmail for the users.
"""
from __future__ import annotations

import array
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
from typing import List, Optional

SERVICE_USER = "eqmail"
ALIAS_USER = "alias"


# -- users ------------------------------------------------------------------------------

def mkusers(home: str) -> List[str]:
    """Create the ``eqmail`` and ``alias`` users (and the ``eqmail``
    group) with the system's tools when missing.  Returns what was created.
    Raises RuntimeError when no tool works."""
    made = []
    nologin = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    for name, user_home in ((SERVICE_USER, home), (ALIAS_USER, os.path.join(home, "alias"))):
        try:
            pwd.getpwnam(name)
            continue
        except KeyError:
            pass
        if shutil.which("useradd"):
            cmd = ["useradd", "--system", "--home-dir", user_home, "--no-create-home",
                   "--shell", nologin]
            cmd += ["--user-group"] if name == SERVICE_USER else ["--gid", SERVICE_USER]
            cmd.append(name)
        elif shutil.which("adduser"):  # busybox (OpenWrt)
            if name == SERVICE_USER and shutil.which("addgroup"):
                subprocess.run(["addgroup", "-S", SERVICE_USER], capture_output=True)
            cmd = ["adduser", "-S", "-D", "-H", "-h", user_home, "-s", nologin,
                   "-G", SERVICE_USER, name]
        else:
            raise RuntimeError("neither useradd nor adduser is available")
        out = subprocess.run(cmd, capture_output=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError("%s failed: %s" % (cmd[0], out.stderr.decode(
                "utf-8", "replace").strip()))
        made.append(name)
    return made


def lookup(name: str) -> pwd.struct_passwd:
    """The passwd entry of `name`.  Raises KeyError."""
    return pwd.getpwnam(name)


# -- the home as root -----------------------------------------------------------------------

def _chown_tree(path: str, uid: int, gid: int) -> None:
    for top, dirs, files in os.walk(path):
        os.lchown(top, uid, gid)
        for n in files:
            os.lchown(os.path.join(top, n), uid, gid)


def prepare_home(home: str, user: pwd.struct_passwd, log) -> None:
    """Give the service user what it must write or read (as root)."""
    uid, gid = user.pw_uid, user.pw_gid
    for sub in ("queue", "run", "log"):
        path = os.path.join(home, sub)
        os.makedirs(path, mode=0o750 if sub != "run" else 0o755, exist_ok=True)
        _chown_tree(path, uid, gid)
    for secret in (os.path.join(home, "users", "passwd"),
                   os.path.join(home, "control", "servercert.pem")):
        if os.path.exists(secret):
            os.chown(secret, uid, gid)
    alias = os.path.join(home, "alias")
    try:
        st = os.stat(alias)
    except OSError:
        return
    if st.st_uid == 0:
        try:
            owner = pwd.getpwnam(ALIAS_USER)
        except KeyError:
            owner = user
        _chown_tree(alias, owner.pw_uid, owner.pw_gid)
        log("alias/ given to user %s (qmail never delivers as root)" % owner.pw_name)


def drop(user: pwd.struct_passwd) -> None:
    """Become `user` for good (its primary group only)."""
    os.setgroups([user.pw_gid])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    os.environ["HOME"] = user.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = user.pw_name


# -- the helper ----------------------------------------------------------------------------

def start_helper(home: str, pidfile: Optional[str]) -> socket.socket:
    """Fork the root helper.  Returns eqmaild's end of the request socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ours.close()
            _helper(home, theirs, pidfile)
        except BaseException:
            code = 111
        finally:
            os._exit(code)
    theirs.close()
    return ours


def _helper(home: str, sock: socket.socket, pidfile: Optional[str]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    for sig in (signal.SIGHUP, signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # eqmaild decides; EOF ends us
    while True:
        fds = array.array("i")
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_LEN(fds.itemsize))
        except InterruptedError:
            continue
        if not data:
            break
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not fds:
            continue
        answer = fds[0]
        for extra in fds[1:]:
            os.close(extra)
        if os.fork() == 0:
            code = 111
            try:
                sock.close()
                _deliver_request(home, data, answer)
                code = 0
            finally:
                os._exit(code)
        os.close(answer)
    if pidfile:
        try:
            os.unlink(pidfile)
        except OSError:
            pass


def _deliver_request(home: str, data: bytes, answer: int) -> None:
    from .control import load
    from .delivery import deferred
    from .delivery.local import LocalResult
    from .delivery.lspawn import _child
    from .delivery.users import UsersError, resolve
    from .queue.store import is_queue_id

    def reply(result: LocalResult) -> None:
        payload = json.dumps(result.to_dict()).encode("utf-8", "surrogateescape")
        view = memoryview(payload)
        while view:
            view = view[os.write(answer, view):]

    try:
        req = json.loads(data.decode("utf-8", "surrogateescape"))
        msgid, sender, local, domain = (req["msgid"], req["sender"], req["local"],
                                        req["domain"])
        if not is_queue_id(msgid) or not all(
                isinstance(x, str) for x in (sender, local, domain)):
            raise ValueError("bad request")
    except (ValueError, KeyError, TypeError):
        reply(LocalResult(deferred("Unable to deliver: bad request to the delivery "
                                   "helper. (#4.3.0)")))
        return
    config = load(home)
    try:
        target = resolve(config, local, system_users=True)
    except UsersError as e:
        reply(LocalResult(deferred("%s (#4.3.0)" % e)))
        return
    if target.uid == 0:
        reply(LocalResult(deferred("Not allowed to perform deliveries as root. (#4.3.0)")))
        return
    msgfd = os.open(os.path.join(home, "queue", "mess", msgid), os.O_RDONLY)
    _child(config, msgfd, answer, sender, local, domain, target)


def request(sock: socket.socket, msgid: str, sender: str, local: str, domain: str):
    """eqmaild's side: ask the helper for one delivery.  Returns the socket
    the answer (JSON, then EOF) will arrive on.  Raises OSError."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        payload = json.dumps({"msgid": msgid, "sender": sender, "local": local,
                              "domain": domain}).encode("utf-8", "surrogateescape")
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [theirs.fileno()]))])
    except OSError:
        mine.close()
        raise
    finally:
        theirs.close()
    return mine
