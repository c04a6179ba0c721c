"""status -- `eqmail status`: one screen on the state of eqmail.

SUMMARY
    Asks the running eqmaild (the ``!status`` request on its pickup socket,
    open to every local user) for its pid, version, uptime, listeners, queue
    figures (messages, in memory and parked, held, bouncing, the oldest
    one's age), deliveries, deferrals and failures of the last hour and
    day, session workers, the server certificate's expiry and its last
    alerts; adds the memory (RSS) of its whole process tree from /proc.
    ``--json`` prints the same as one JSON object for scripts.

EXIT STATUS (for monitoring)
    0 all is well; 1 something needs the admin (an alert in the last hour,
    a message older than a day, the certificate expired or expiring within
    CERT_WARN_DAYS days); 3 eqmaild is not running (LSB's "not running").
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

CERT_WARN_DAYS = 14
OLD_MESSAGE = 86400


def _tree(pid: int) -> List[int]:
    """`pid` and its descendants (from /proc/*/stat)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _rss_kb(pids: List[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def _age(seconds: float) -> str:
    from .queueadmin import _age_text

    return _age_text(seconds)


def problems(st: dict) -> List[str]:
    """What needs the admin, one short line each."""
    out = []
    now = st.get("now") or time.time()
    recent = [a for a in st.get("alerts", []) if now - a[0] < 3600]
    if recent:
        out.append("%d alert(s) in the last hour" % len(recent))
    oldest = (st.get("queue") or {}).get("oldest")
    if oldest and now - oldest > OLD_MESSAGE:
        out.append("a message has waited %s" % _age(now - oldest))
    cert = st.get("certificate")
    if cert and cert.get("error"):
        out.append("the server certificate cannot be read: %s" % cert["error"])
    elif cert and cert.get("not_after") is not None:
        left = (cert["not_after"] - now) / 86400
        if left < 0:
            out.append("the server certificate expired %d days ago" % -left)
        elif left < CERT_WARN_DAYS:
            out.append("the server certificate expires in %d days" % left)
    return out


def render(st: dict) -> str:
    now = st["now"]
    q = st["queue"]
    lines = ["eqmaild %s: running, pid %d, up %s, home %s"
             % (st["version"], st["pid"], _age(now - st["started"]), st["home"])]
    lines.append("listening: " + (", ".join("%s %s" % (k, a) for k, a in st["listeners"])
                                  or "nothing"))
    oldest = ("oldest %s" % _age(now - q["oldest"])) if q.get("oldest") else "empty"
    lines.append("queue: %d message(s) (%d in memory, %d waiting on disk), %d held, "
                 "%d bouncing, %s; delivering %d local, %d remote"
                 % (q["messages"], q["in_memory"], q["parked"], q["held"], q["bouncing"],
                    oldest, q["delivering"].get("local", 0), q["delivering"].get("remote", 0)))
    for label, key in (("last hour", "last_hour"), ("last day", "last_day")):
        t = st[key]
        lines.append("%s: %d delivered, %d deferred, %d failed"
                     % (label, t["success"], t["deferral"], t["failure"]))
    lines.append("memory: %.1f MB RSS in %d process(es); session workers: %d"
                 % (st["tree_rss_kb"] / 1024.0, st["processes"], len(st["workers"])))
    cert = st.get("certificate")
    if cert is None:
        lines.append("certificate: none (no STARTTLS; eqmail mkservercert makes one)")
    elif cert.get("error"):
        lines.append("certificate: %s: unreadable: %s" % (cert["path"], cert["error"]))
    else:
        lines.append("certificate: %s, expires %s (in %d days)" % (
            cert["path"], time.strftime("%Y-%m-%d", time.gmtime(cert["not_after"])),
            (cert["not_after"] - now) // 86400))
    if st["alerts"]:
        lines.append("last alerts:")
        for when, text in st["alerts"]:
            lines.append("  %s %s" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)),
                                      text))
    for p in problems(st):
        lines.append("NEEDS ATTENTION: " + p)
    return "\n".join(lines) + "\n"


def main(home: str, as_json: bool, where: str) -> int:
    from .queue import pickup

    try:
        text = pickup.request(home, "status", timeout=30)
        st = json.loads(text)
    except pickup.SubmitError as e:
        if as_json:
            print(json.dumps({"running": False, "home": home, "error": e.text}))
        else:
            print("eqmaild: not running (%s: %s)" % (where, e.text))
        return 3
    except ValueError:
        print("eqmaild: an unreadable status answer")
        return 1
    pids = _tree(st["pid"])
    st["tree_rss_kb"] = _rss_kb(pids)
    st["processes"] = len(pids)
    st["running"] = True
    st["problems"] = problems(st)
    if as_json:
        print(json.dumps(st, sort_keys=True))
    else:
        sys.stdout.write(render(st))
    return 1 if st["problems"] else 0
