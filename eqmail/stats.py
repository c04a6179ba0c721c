"""stats -- what `eqmail status` reports of a running eqmaild.

Counts of deliveries (success, deferral, failure) per minute for the last
day, in a ring of at most 1440 buckets, and the last ALERTS alert lines:
bounded, whatever the load.  eqmail.log feeds both.
"""
from __future__ import annotations

import collections
import time
from typing import Dict, Optional

ALERTS = 5
_MINUTES = 1440

#: (minute, successes, deferrals, failures), oldest first
_buckets: collections.deque = collections.deque(maxlen=_MINUTES)
alerts: collections.deque = collections.deque(maxlen=ALERTS)
_KIND = {"success": 1, "deferral": 2, "failure": 3}


def count(kind: str, n: int = 1) -> None:
    """One delivery result of `kind` (success, deferral, failure)."""
    k = _KIND.get(kind)
    if k is None:
        return
    minute = int(time.time() // 60)
    if not _buckets or _buckets[-1][0] != minute:
        _buckets.append([minute, 0, 0, 0])
    _buckets[-1][k] += n


def alert(text: str) -> None:
    alerts.append((time.time(), text))


def totals(seconds: float, now: Optional[float] = None) -> Dict[str, int]:
    """Deliveries, deferrals and failures of the last `seconds` (at most a day)."""
    since = int(((now or time.time()) - seconds) // 60)
    out = {"success": 0, "deferral": 0, "failure": 0}
    for minute, s, d, f in _buckets:
        if minute > since:
            out["success"] += s
            out["deferral"] += d
            out["failure"] += f
    return out
