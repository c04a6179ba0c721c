"""queue.parked -- the keys of the messages waiting on disk only, compactly.

SUMMARY
    The scheduler keeps, for each parked message (eqmail.queue.scheduler:
    not in memory, next try ahead), one int key: ``due << 97 | flags | ID``.
    `Parked` is a min-priority queue of such keys in two parts: a sorted
    run of fixed-width big-endian records in one bytes object (what the
    queue held when eqmaild started: 17 bytes a message), and a heapq list
    of ints for what is parked while it runs (about 56 bytes a message: an
    int and its list slot).  `first`/`pop` take the smaller head of the two.
    Once the list holds MERGE_AT keys and a quarter of all, it is merged
    into the run (its keys placed by binary search, the run copied around
    them), so a queue that piles up while eqmaild runs costs about 17
    bytes a key too.

    A queue of 20,000 parked messages loaded at start is 340 KB in the run
    instead of 1.1 MB of ints, which also cannot pin the pools of the
    load's garbage (each int made among it kept a pool of it in RSS: 213
    bytes a message after a restart, measured).

STANDARDS
    None: an in-memory index of eqmail's own queue (ARCHITECTURE.md, the
    queue); Postfix's active/deferred split is the model (qmgr(8)).
"""
from __future__ import annotations

import heapq
from typing import Iterable, Iterator, List, Optional

#: Bytes of a key in the run (the due time below 2**39 seconds).
WIDTH = 17
#: The heapq list is merged into the run from this many keys on, when it
#: holds a quarter of all the keys or more.
MERGE_AT = 4096


class Parked:
    """Min-priority queue of non-negative int keys below 2**(8*WIDTH)."""

    __slots__ = ("_run", "_at", "_heap")

    def __init__(self) -> None:
        self._run = b""       # bytes, or the bytearray a merge made
        self._at = 0          # the run's next record starts here
        self._heap: List[int] = []

    def load(self, records) -> None:
        """Hold exactly the keys in `records`, bytes-like: ``key.to_bytes(
        WIDTH, "big")`` one after the other, in any order; all go into the
        run.  Raises ValueError when its length is not a multiple of
        WIDTH."""
        if len(records) % WIDTH:
            raise ValueError("records of %d bytes expected" % WIDTH)
        view = memoryview(records)
        keys = [bytes(view[i:i + WIDTH]) for i in range(0, len(view), WIDTH)]
        view.release()
        keys.sort()
        self._run = b"".join(keys)
        self._at = 0
        self._heap = []

    def replace(self, keys: Iterable[int]) -> None:
        """Hold exactly `keys` (any order), all of them in the run."""
        self.load(b"".join(k.to_bytes(WIDTH, "big") for k in keys))

    def __len__(self) -> int:
        return (len(self._run) - self._at) // WIDTH + len(self._heap)

    def __bool__(self) -> bool:
        return self._at < len(self._run) or bool(self._heap)

    def _run_head(self) -> Optional[int]:
        if self._at < len(self._run):
            return int.from_bytes(self._run[self._at:self._at + WIDTH], "big")
        return None

    def first(self) -> Optional[int]:
        """The smallest key, or None when empty."""
        head = self._run_head()
        if self._heap and (head is None or self._heap[0] < head):
            return self._heap[0]
        return head

    def pop(self) -> int:
        """Remove and return the smallest key.  Raises IndexError when empty."""
        head = self._run_head()
        if self._heap and (head is None or self._heap[0] < head):
            return heapq.heappop(self._heap)
        if head is None:
            raise IndexError("pop from an empty Parked")
        self._at += WIDTH
        if self._at >= len(self._run):
            self._run, self._at = b"", 0
        elif self._at > 65536 and self._at * 2 > len(self._run):
            self._run, self._at = self._run[self._at:], 0  # give the consumed half back
        return head

    def push(self, key: int) -> None:
        """Add `key`."""
        heapq.heappush(self._heap, key)
        if len(self._heap) >= MERGE_AT and len(self._heap) * 4 >= len(self):
            self._merge()

    def _merge(self) -> None:
        """Every key into the run; the heapq list empty.  The list's keys,
        sorted, are placed by binary search and the run copied around them
        in slices: no object a key, so a merge of 100,000 keys needs only
        the new run (1.7 MB) beside the old one."""
        run, start = self._run, self._at
        count = (len(run) - start) // WIDTH
        out = bytearray()
        done = 0  # records of the run (from start) copied so far
        for key in sorted(self._heap):
            record = key.to_bytes(WIDTH, "big")
            low, high = done, count
            while low < high:
                mid = (low + high) // 2
                at = start + mid * WIDTH
                if run[at:at + WIDTH] <= record:
                    low = mid + 1
                else:
                    high = mid
            out += run[start + done * WIDTH:start + low * WIDTH]
            out += record
            done = low
        out += run[start + done * WIDTH:]
        self._heap = []
        self._run, self._at = out, 0

    def __iter__(self) -> Iterator[int]:
        """Every key, in no particular order."""
        run, at = self._run, self._at
        for i in range(at, len(run), WIDTH):
            yield int.from_bytes(run[i:i + WIDTH], "big")
        yield from list(self._heap)
