"""queueadmin -- `eqmail queue list|show|delete|hold|release|requeue|flush`.

SUMMARY
    The queue operations of postqueue, postsuper and qmHandle, for root and
    eqmaild's own user (the queue is private to them):

    list [FILTER]            one block per message: ID, age, size, sender,
                             held/bouncing, then each recipient with its
                             state (pending or done, local or remote), the
                             next try and the last temporary failure (of
                             that recipient, or for a remote one of its
                             domain; eqmaild keeps the last 1,000 in memory)
    show ID [--body]         the envelope and the header (and the body)
    delete ID... | --all     remove messages for good (no bounce)
    hold ID... | --all       never try them until released
    release ID... | --all    undo hold; they are tried now
    requeue|flush ID... | --all
                             try them now, held ones excepted (flush
                             without IDs: the whole queue)

    FILTER (list, and the --all of the others): --sender TEXT, --recipient
    TEXT (parts of the address, case ignored), --older-than AGE,
    --newer-than AGE (AGE: seconds, or 30m, 2h, 3d), --state pending,
    deferred, held or bouncing.

SAFETY
    While eqmaild runs, every change is made by eqmaild itself, asked over
    its pickup socket (SO_PEERCRED: root or its user only): a message being
    delivered right now is not deleted ("busy", try again), and nothing is
    delivered twice or lost.  When eqmaild is not running (its socket
    refuses), the files are changed directly.

EXIT STATUS
    0 done; 64 bad usage; 66 no such home, queue or message; 77 permission
    denied; 75 some messages were busy.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import List, Optional

OPS = ("list", "show", "delete", "hold", "release", "requeue", "flush")

EX_USAGE, EX_NOINPUT, EX_TEMPFAIL, EX_NOPERM = 64, 66, 75, 77


def _age_seconds(text: str) -> float:
    m = re.match(r"^([0-9]+(?:\.[0-9]+)?)([smhd]?)$", text.strip())
    if not m:
        raise argparse.ArgumentTypeError("expected seconds or 30m, 2h, 3d, got %r" % text)
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _age_text(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def _parser():
    from .cli import _Parser
    from .paths import HOME_RULE

    p = _Parser(prog="eqmail queue", epilog=HOME_RULE,
                description=__doc__.split("SAFETY")[0].split("SUMMARY")[1].strip()
                .replace("\n    ", "\n"),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", metavar="DIR", help="the eqmail home")
    p.add_argument("op", choices=OPS)
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="every message the filters select")
    p.add_argument("--body", action="store_true", help="show: the body too")
    p.add_argument("--sender", metavar="TEXT")
    p.add_argument("--recipient", metavar="TEXT")
    p.add_argument("--older-than", metavar="AGE", type=_age_seconds)
    p.add_argument("--newer-than", metavar="AGE", type=_age_seconds)
    p.add_argument("--state", choices=("pending", "deferred", "held", "bouncing"))
    return p


def _next_try(store, item) -> float:
    """The next try eqmaild keeps in the queue file's mtime (0 unknown)."""
    try:
        return os.stat(store.message_path(item.id)).st_mtime
    except OSError:
        return 0.0


def _last_errors(home: str) -> dict:
    """eqmaild's last temporary failures ({} when it is not running)."""
    import json

    from .queue import pickup

    try:
        got = json.loads(pickup.request(home, "errors", timeout=30))
    except (pickup.SubmitError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def _selected(args, store, item, held: set, now: float) -> bool:
    if args.sender and args.sender.lower() not in item.sender.lower():
        return False
    if args.recipient and not any(args.recipient.lower() in r.lower()
                                  for r in item.recipients):
        return False
    age = now - item.birth
    if args.older_than is not None and age < args.older_than:
        return False
    if args.newer_than is not None and age > args.newer_than:
        return False
    if args.state == "held" and item.id not in held:
        return False
    if args.state == "bouncing" and not os.path.exists(os.path.join(store.bounce, item.id)):
        return False
    if args.state == "deferred" and not (item.pending() and _next_try(store, item) > now):
        return False
    if args.state == "pending" and not item.pending():
        return False
    return True


def main(argv: List[str]) -> int:
    from .cli import _fatal, _home_text, _open_store, _queue_failure, _survey
    from .paths import resolve_home

    args = _parser().parse_intermixed_args(argv)
    home = resolve_home(args.home)
    try:
        store = _open_store(home)
    except OSError as e:
        return _queue_failure("queue", args.home, e)
    op = args.op
    if op in ("list",) and args.ids:
        return _fatal("queue", EX_USAGE, "list takes no IDs (filters: --sender ...)")
    if op == "show":
        if len(args.ids) != 1:
            return _fatal("queue", EX_USAGE, "show takes one ID")
        return _show(store, args.ids[0], args.body)
    if op == "flush" and not args.ids and not args.all:
        args.all = True
    now = time.time()
    held = set(store.held_ids())
    if op == "list" or args.all:
        try:
            items, _ = _survey("queue", store)
        except OSError as e:
            return _queue_failure("queue", args.home, e)
        items = [i for i in items if _selected(args, store, i, held, now)]
        if op == "list":
            _list(store, items, held, now, _last_errors(home))
            return 0
        ids = [i.id for i in items]
    else:
        if not args.ids:
            return _fatal("queue", EX_USAGE, "%s needs IDs or --all" % op)
        ids = args.ids
    for msgid in ids:
        if not re.match(r"^[0-9]+\.[0-9]+\.[0-9]+$", msgid):
            return _fatal("queue", EX_USAGE, "not a queue ID: %r" % msgid)
    if not ids:
        print("queue: no message selected")
        return 0
    return _change(home, store, {"requeue": "retry", "flush": "retry"}.get(op, op), ids,
                   _home_text(args.home))


def _change(home: str, store, op: str, ids: List[str], where: str) -> int:
    """Ask eqmaild to make the change; change the files when it is not running."""
    from .queue import pickup

    busy = False
    missing = False
    for k in range(0, len(ids), 2000):
        chunk = ids[k:k + 2000]
        try:
            text = pickup.request(home, "queue %s %s" % (op, " ".join(chunk)), timeout=300)
        except pickup.SubmitError as e:
            if e.code == 77:
                sys.stderr.write("eqmail queue: fatal: %s: %s\n" % (where, e.text))
                return EX_NOPERM
            if e.code != 74:
                sys.stderr.write("eqmail queue: fatal: %s: %s\n" % (where, e.text))
                return EX_TEMPFAIL
            text = _offline(store, op, chunk)
        for part in text.split("; "):
            print(part)
            busy = busy or part.endswith("not deleted")
            missing = missing or part.endswith("no such message")
    return EX_TEMPFAIL if busy else (EX_NOINPUT if missing else 0)


def _offline(store, op: str, ids: List[str]) -> str:
    """The change made on the files: eqmaild is not running."""
    out = []
    for msgid in ids:
        if not os.path.exists(store.message_path(msgid)):
            out.append("%s: no such message" % msgid)
            continue
        try:
            if op == "delete":
                store.remove_id_now(msgid)
                store.drop_failures(msgid)
                out.append("%s: deleted (eqmaild is not running)" % msgid)
            elif op == "hold":
                store.set_held(msgid, True)
                out.append("%s: held (eqmaild is not running)" % msgid)
            elif op == "release":
                store.set_held(msgid, False)
                out.append("%s: released; tried when eqmaild starts" % msgid)
            else:
                out.append("%s: eqmaild is not running: tried when it starts" % msgid)
        except OSError as e:
            out.append("%s: unable to %s: %s" % (msgid, op, e))
    return "; ".join(out)


def _list(store, items, held: set, now: float, errors: dict) -> None:
    from .control import ConfigError, load
    from .delivery.route import error_key, route

    try:
        config = load(os.path.dirname(store.qdir))
    except (ConfigError, OSError):
        config = None
    for item in items:
        flags = []
        if item.id in held:
            flags.append("held")
        if os.path.exists(os.path.join(store.bounce, item.id)):
            flags.append("bouncing")
        print("%s  %s  %d  <%s>%s" % (item.id, _age_text(now - item.birth), max(item.size, 0),
                                       item.sender, "  " + " ".join(flags) if flags else ""))
        nxt = _next_try(store, item)
        for rcpt, done in zip(item.recipients, item.done):
            channel = route(config, rcpt).channel if config is not None else "?"
            line = "    %-7s %-6s <%s>" % ("done" if done else "pending", channel, rcpt)
            if not done:
                if nxt > now and item.id not in held:
                    line += "  next try in %s" % _age_text(nxt - now)
                last = errors.get(error_key(rcpt, channel))
                if last:
                    line += "  last: %s" % last
            print(line)


def _show(store, msgid: str, body: bool) -> int:
    from .cli import _fatal
    from .queue.store import open_message

    try:
        item = store.load(msgid)
    except (OSError, ValueError) as e:
        return _fatal("queue", EX_NOINPUT, "no message %s: %s" % (msgid, e))
    print("id: %s" % item.id)
    print("arrived: %s" % time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(item.birth)))
    print("size: %d" % max(item.size, 0))
    print("sender: <%s>" % item.sender)
    for rcpt, done in zip(item.recipients, item.done):
        print("recipient: <%s> %s" % (rcpt, "done" if done else "pending"))
    print()
    out = sys.stdout.buffer
    sys.stdout.flush()
    import io

    with io.BufferedReader(open_message(store.message_path(msgid))) as f:
        in_header = True
        for line in f:
            if in_header and line in (b"\n", b"\r\n"):
                in_header = False
                if not body:
                    break
            out.write(line)
    out.flush()
    return 0
