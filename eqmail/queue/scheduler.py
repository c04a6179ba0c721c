"""queue.scheduler -- deliveries, retries and lifetimes (qmail-send's role).

SUMMARY
    The `Scheduler` keeps the committed messages that are due or in flight
    in memory (their envelopes, not their data; at most ACTIVE_MAX, as
    Postfix's active queue), and of every other message only its next try
    and its ID, packed in one int: a queue that piles up while a relay is
    down grows on disk, not in RAM.  It starts one delivery per recipient, at most
    concurrencylocal local and concurrencyremote remote deliveries at a
    time, records each finished recipient durably, retries deferrals on
    qmail's schedule and removes finished messages.

STANDARDS
    qmail-send(8), qmail-log(5), behaviour reference sections 5.2-5.4.

SCHEDULE
    A delivery that starts at `now` for a message born at `birth` sets the
    recipient's next try to ``birth + (isqrt(now - birth) + c)**2`` with
    c = 10 for local and 20 for remote deliveries: local retries come at
    about 0, 100, 400, 900, 1600 s, remote ones at 0, 400, 1600, 3600 s ...
    The message's next try is kept in its queue file's mtime (qmail-send
    keeps it in its files' mtimes), so a restart keeps the schedule.
    When an attempt starts after ``birth + queuelifetime``, a temporary
    failure becomes permanent ("I'm not going to try again; this message
    has been in the queue too long.").

SIGNALS (wired by the daemon)
    `retry_now()` (SIGALRM) makes every pending recipient due at once;
    `stop()` (SIGTERM) starts nothing new and waits for the deliveries in
    flight, up to a bound.

BOUNCES
    A permanent failure -- and a success whose recipient asked for one
    with NOTIFY=SUCCESS (RFC 3461) -- is recorded durably
    (store.add_failure, `dsn_report`) before its recipient is marked done.
    When no delivery of the message is in flight, the records go out as
    one report (an RFC 3464 report, queue.bounce) to the envelope sender,
    even while other recipients still wait for a retry; a failed bounce
    (sender "") becomes a double bounce to doublebounceto; a failed double
    bounce is discarded ("triple bounce").  NOTIFY without FAILURE keeps a
    failure out of the report.  With control/delaywarningtime, a message
    that has waited that long gets one delay notice (queue/warned/ID).

CHANNELS
    Local deliveries are one per recipient (delivery.lspawn); remote ones
    one per domain and message, after the beforemote filters
    (delivery.remote, delivery.beforemote).  qmail-send's log keeps one
    delivery number per recipient.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import math
import os
import time
from dataclasses import replace
from typing import Dict, List, Optional, Set, Tuple

import gevent
import gevent.event

from .. import address, heap, log
from ..control import ConfigHolder
from ..delivery import DEFERRAL, FAILURE, SUCCESS, Result, deferred
from ..delivery import lspawn
from ..delivery.route import LOCAL, REMOTE, error_key, route
from .parked import WIDTH, Parked
from .store import Item, QueueError, Store, id_order, id_time
from ..threads import run

#: The `c` of qmail-send's retry schedule, per channel.
RETRY_C = {LOCAL: 10, REMOTE: 20}

#: The todo/ directory is re-scanned at least this often (seconds), besides
#: the trigger; qmail-send uses 1500.
SCAN_INTERVAL = 60

TOO_LONG = " I'm not going to try again; this message has been in the queue too long."

#: Messages held in memory at most (Postfix's active queue): beyond it, and
#: for every message whose next try is more than PARK_AFTER seconds away,
#: only the next try and the ID stay in memory, packed in one key
#: (queue.parked: 17 bytes in a sorted run, an int of about 56 bytes for
#: the few parked since the last merge); the envelope is read from disk
#: again when the message is due.
ACTIVE_MAX = 2000
#: Most local recipients of one message that one delivery job takes in a
#: fan-out (see Scheduler._jobs).
LOCAL_BATCH = 50
PARK_AFTER = 5.0
#: Parked messages read back at once (at least, when the active ones allow).
UNPARK_BATCH = 200
#: A queue that held this many messages gives its memory back when empty.
TRIM_AFTER = 500

_ID_MASK = (1 << 96) - 1
#: A parked key's bit 96: this process knows the message has no failure
#: record (no bounce/ID to look for when it finishes).  The due time is
#: above it: ``due << _DUE | clean << 96 | packed ID``.
_CLEAN = 1 << 96
_KEY_MASK = (1 << 97) - 1
_DUE = 97


def pack_id(msgid: str) -> Optional[int]:
    """A queue ID ``time.pid.seq`` as one int (each field below 2**32,
    written without leading zeros), or None when it does not fit."""
    parts = msgid.split(".")
    if len(parts) != 3:
        return None
    out = 0
    for p in parts:
        if not p.isdigit() or (len(p) > 1 and p[0] == "0") or len(p) > 10:
            return None
        n = int(p)
        if n >= 1 << 32:
            return None
        out = (out << 32) | n
    return out


def unpack_id(packed: int) -> str:
    """The queue ID `pack_id` packed."""
    return "%d.%d.%d" % (packed >> 64, (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF)


#: Last temporary failures remembered at most (eqmail queue list).
LAST_ERRORS = 1000


def next_retry(birth: float, now: float, channel: str) -> float:
    """qmail-send's retry time for a delivery that starts at `now`."""
    age = max(0, int(now - birth))
    return birth + (math.isqrt(age) + RETRY_C[channel]) ** 2


def notify_of(item: Item, i: int) -> Optional[Set[str]]:
    """Recipient `i`'s NOTIFY words (RFC 3461 section 4.1), None without."""
    value = (item.params or {}).get("notify.%d" % i) if item.params else None
    return set(value.split(",")) if value else None


def notify_has(item: Item, i: int, word: str) -> bool:
    notify = notify_of(item, i)
    return notify is not None and word in notify


def dsn_report(item: Item, i: int, result: Result, channel: str) -> Optional[dict]:
    """What the sender is told of recipient `i`'s `result`, as a record
    for bounce/ID, or None: a failure unless NOTIFY leaves FAILURE out
    (NEVER included), a success only under NOTIFY=SUCCESS -- "delivered"
    here, "relayed" to a server that did not take the DSN request on
    (RFC 3461 section 5.2)."""
    notify = notify_of(item, i)
    if result.kind == FAILURE:
        if notify is not None and "FAILURE" not in notify:
            return None
        action = "failed"
    elif result.kind == SUCCESS:
        if notify is None or "SUCCESS" not in notify or result.dsn_passed:
            return None
        action = "delivered" if channel == LOCAL else "relayed"
    else:
        return None
    return report_record(item, i, result, action)


def report_record(item: Item, i: int, result: Result, action: str) -> dict:
    """The bounce/ID record (queue.bounce.Failure's fields) telling the
    sender `action` for recipient `i`."""
    record = {"recipient": item.recipients[i], "status": result.status,
              "text": result.text, "action": action}
    if result.remote_mta:
        record["remote_mta"] = result.remote_mta
    if result.diagnostic:
        record["diagnostic"] = result.diagnostic
    orcpt = (item.params or {}).get("orcpt.%d" % i)
    if orcpt:
        record["orcpt"] = orcpt
    return record


class _Entry:
    __slots__ = ("item", "next", "inflight", "channel", "finishing", "failures",
                 "removed")

    def __init__(self, item: Item, channels: List[str]):
        self.item = item
        self.next = [0.0] * len(item.recipients)
        self.inflight = [False] * len(item.recipients)
        self.channel = channels
        self.finishing = False
        #: None: unknown (loaded from disk, bounce/ID may exist); else whether
        #: this process recorded a permanent failure for it
        self.failures = None
        #: the queue file is gone already (removed by the finishing delivery)
        self.removed = False


class Scheduler:
    """The delivery scheduler for one queue.  Runs in gevent greenlets."""

    def __init__(self, holder: ConfigHolder, store: Store,
                 local_runner: Optional[lspawn.LocalRunner] = None):
        self.holder = holder
        self.store = store
        #: qmail-lspawn: runs every local delivery (chosen by the daemon)
        self.local_runner = local_runner or lspawn.LocalRunner()
        self.entries: Dict[str, _Entry] = {}
        self._heap: list = []
        self._tie = itertools.count()
        #: Jobs due but waiting for a free slot, first come first served,
        #: one queue per channel (starting them is O(started), not O(waiting)).
        self._ready: Dict[str, collections.deque] = {LOCAL: collections.deque(),
                                                      REMOTE: collections.deque()}
        self._wake = gevent.event.Event()
        self._idle = gevent.event.Event()
        self._idle.set()
        self.inflight = {LOCAL: 0, REMOTE: 0}
        self._numbers = itertools.count(1)
        self.stopping = False
        self._greenlets: list = []
        #: Parked messages (see ACTIVE_MAX): a queue.parked.Parked of keys
        #: ``due << 97 | clean << 96 | packed ID`` (see _CLEAN), 17 bytes a
        #: message in its sorted run, an int (about 56 bytes with its slot)
        #: for one parked since its last merge.  Nothing else knows them: `scan` tells them
        #: by the next try in their file's mtime, and one read back twice is
        #: skipped (`_unpark_due`).
        self._parked = Parked()
        #: The most messages known at once since the queue was last empty.
        self._busiest = 0
        #: Messages the admin held (queue/hold/): never started until released.
        self.held: set = set()
        #: The last temporary failure of local recipients and remote domains
        #: (`error_key`), oldest first, at most LAST_ERRORS.
        self.last_errors: Dict[str, str] = {}

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Recover the queue, load every committed message, start the loops."""
        from ..threads import run

        self.store.recover(at_start=True)
        self.held = set(self.store.held_ids())
        # reading every file to check its commit mark: off the hub (and no
        # threadpool, 0.5 MB of RSS, for an empty queue)
        if self.store.any_ids():
            def load():
                # only what is due soon is read and kept in memory; a file
                # whose mtime holds a next try ahead (`_remember_next`: a
                # committed message, deferred) is parked unread, as its
                # key, and read (and its mark checked) when due.  The
                # directory is walked, not listed and sorted, and the parked
                # keys go into one bytearray (Parked's records): 20,000
                # names, sort keys and records alive at once took four
                # more 1 MB arenas of Python's allocator, which the few
                # objects made meanwhile then kept (RSS after a restart,
                # 270 bytes a waiting message)
                keep, parked, due, now = [], bytearray(), [], time.time()
                with os.scandir(self.store.mess) as entries:
                    for entry in entries:
                        msgid = entry.name
                        if msgid.startswith("."):
                            continue
                        packed = pack_id(msgid)
                        if packed is not None:
                            try:
                                mtime = entry.stat(follow_symlinks=False).st_mtime
                            except OSError:
                                continue
                            if mtime > now + PARK_AFTER:
                                when = min(mtime, next_retry(id_time(msgid), now, REMOTE))
                                parked += ((math.ceil(when) << _DUE) | packed).to_bytes(
                                    WIDTH, "big")
                                continue
                        due.append(msgid)
                due.sort(key=id_order)  # the oldest are kept in memory first
                for msgid in due:
                    packed = pack_id(msgid)
                    item = self.store.load_committed(msgid, True, True)
                    if item is None:
                        continue
                    when = self._due(item)
                    if packed is not None and len(keep) >= ACTIVE_MAX:
                        parked += ((max(0, math.ceil(when)) << _DUE) | packed).to_bytes(
                            WIDTH, "big")
                    else:
                        keep.append((item, when))
                del due
                found = Parked()
                found.load(parked)
                return keep, found

            keep, found = run(load)
            for key in self._parked:  # parked meanwhile, if anything was
                found.push(key)
            self._parked = found
            for item, when in keep:
                self._add(item, when)
            del keep
            if len(self._parked) >= TRIM_AFTER:
                self._trim()  # what reading them all took goes back
        self.store.on_commit = self.add
        self._greenlets = [gevent.spawn(self._loop), gevent.spawn(self._watch_trigger)]

    def add(self, item: Item) -> None:
        """Take a message just committed (in this process or by one of its
        session workers), log it and deliver it now."""
        if item.id in self.entries:
            return  # a scan() found it first
        log.new_msg(item.id)
        log.info_msg(item.id, item.size, item.sender, item.pid, item.uid)
        packed = pack_id(item.id) if len(self.entries) >= ACTIVE_MAX else None
        if packed is not None:
            self._park(packed, time.time(), True)  # read again when there is room
            self._wake.set()
            return
        self._add(item)
        entry = self.entries.get(item.id)
        if entry is not None:
            entry.failures = False  # new: no bounce/ID can exist yet
        self._wake.set()

    def _not_parked(self, ids: List[str]) -> List[str]:
        """The IDs whose next try is not ahead: a parked message's is, in
        its file's mtime (`_remember_next`).  Blocking (a stat each)."""
        now = time.time() + 1
        out = []
        for msgid in ids:
            try:
                if os.stat(self.store.message_path(msgid)).st_mtime <= now:
                    out.append(msgid)
            except OSError:
                pass
        return out

    def _load(self, msgid: str):
        """(the committed message `msgid` or None, its `_due` time).
        Blocking: run it in the threadpool."""
        item = self.store.load_committed(msgid, True)
        return (None, 0.0) if item is None else (item, self._due(item))

    def _due(self, item: Item) -> float:
        """When a message loaded from disk is next tried: the retry time
        `_remember_next` kept in its file's mtime when that lies ahead, but
        never later than a try starting now would schedule; else 0 (now).
        Blocking (a stat)."""
        try:
            mtime = os.stat(self.store.message_path(item.id)).st_mtime
        except OSError:
            return 0.0
        now = time.time()
        if mtime <= now:
            return 0.0
        return min(mtime, next_retry(item.birth, now, REMOTE))

    def _maybe_give_back(self) -> None:
        """After a busy spell (TRIM_AFTER messages known at once), once no
        message is held in memory (all finished, or parked on disk): hand
        the freed heap back to the system, a second later."""
        if not self.entries and self._busiest >= TRIM_AFTER:
            self._busiest = 0
            gevent.spawn_later(1, self._give_back)

    def _give_back(self) -> None:
        """Hand the freed heap back to the system (glibc's malloc_trim), so
        that RSS falls back towards idle.  Nothing happens where there is
        no glibc."""
        if not self.entries:
            self._trim()

    @staticmethod
    def _trim() -> None:
        heap.give_back()

    def _add(self, item: Item, when: float = 0.0) -> None:
        if item.id in self.entries:
            return
        config = self.holder.current
        channels = [route(config, r).channel for r in item.recipients]
        entry = _Entry(item, channels)
        entry.next = [when] * len(item.recipients)
        self.entries[item.id] = entry
        self._busiest = max(self._busiest, len(self.entries) + len(self._parked))
        self._push(item.id, when)

    def _push(self, msgid: str, when: float) -> None:
        heapq.heappush(self._heap, (when, next(self._tie), msgid))

    def _park(self, packed: int, when: float, clean: bool = False) -> None:
        """Keep only the next try (`when`) and the packed ID of a message;
        `clean`: it is known to have no failure record."""
        self._parked.push((max(0, math.ceil(when)) << _DUE) | (_CLEAN if clean else 0) | packed)

    def parked(self) -> int:
        """How many messages wait on disk only."""
        return len(self._parked)

    def _room_to_unpark(self) -> bool:
        """Room for a batch of parked messages (or none is held at all).
        Without it the next finished delivery wakes the loop (never a
        timeout of 0 while the active ones run)."""
        return (not self.entries
                or ACTIVE_MAX - len(self.entries) >= min(UNPARK_BATCH, ACTIVE_MAX))

    def _unpark_due(self, now: float) -> None:
        """Read the parked messages that are due back into memory, while
        there is room (ACTIVE_MAX).  The reading runs in the threadpool."""
        if not self._room_to_unpark():
            return  # read in batches: one trip to the threadpool for many
        parked, due = self._parked, []
        room = ACTIVE_MAX - len(self.entries)
        while parked and (parked.first() >> _DUE) <= now and len(due) < room:
            key = parked.pop()
            due.append((unpack_id(key & _ID_MASK), bool(key & _CLEAN)))
        if not due:
            return
        loaded = run(lambda: [(self.store.load_committed(msgid, True), clean)
                              for msgid, clean in due])
        for item, clean in loaded:
            if item is not None and item.id not in self.entries:
                self._add(item, 0.0)
                if clean:
                    self.entries[item.id].failures = False

    def wake(self) -> None:
        """Look at the queue again now (after a reload changed concurrency)."""
        self._wake.set()

    def retry_now(self) -> None:
        """SIGALRM: every pending recipient is due now."""
        log.status("retrying every queued message now")
        self._heap = []
        for msgid, entry in self.entries.items():
            entry.next = [0.0] * len(entry.next)
            self._push(msgid, 0.0)
        self._parked.replace([key & _KEY_MASK for key in self._parked])  # due at 0: now
        self._wake.set()

    def stop(self, grace: float) -> bool:
        """Start no new delivery and wait up to `grace` seconds for those in
        flight.  True when none is left running."""
        self.stopping = True
        self._wake.set()
        for g in self._greenlets:
            g.kill(block=False)
        return self._idle.wait(grace)

    def scan(self) -> int:
        """Pick up messages committed by other processes.  Returns the count.
        A file still being written is skipped: its writer pokes the trigger
        when it is committed."""
        from ..threads import run

        added = 0
        try:
            ids = self.store.ids()
        except OSError as e:
            log.alert("unable to scan the queue: %s" % e)
            return 0
        ids = [i for i in ids if i not in self.entries and i not in self.store.open_drafts]
        if ids and self._parked:
            ids = run(self._not_parked, ids)
        for msgid in ids:
            if msgid in self.entries or msgid in self.store.open_drafts:
                continue
            if self._parked and len(self.entries) >= ACTIVE_MAX:
                break  # no room: a later scan, or the parked ones' turn
            item, when = run(self._load, msgid)
            if item is None or msgid in self.entries:
                continue
            log.new_msg(msgid)
            log.info_msg(msgid, item.size, item.sender, item.pid, item.uid)
            self._add(item, when)
            added += 1
        if added:
            self._wake.set()
        return added

    # -- loops --------------------------------------------------------------------

    def _watch_trigger(self) -> None:
        """Wake on a byte in lock/trigger, and scan every SCAN_INTERVAL s."""
        from gevent.socket import wait_read

        fd = None
        try:
            fd = os.open(self.store.trigger, os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            log.warning("no trigger FIFO (%s); scanning every %d s" % (e, SCAN_INTERVAL))
        while not self.stopping:
            if fd is None:
                gevent.sleep(SCAN_INTERVAL)
            else:
                try:
                    wait_read(fd, timeout=SCAN_INTERVAL)
                    os.read(fd, 4096)
                except (gevent.socket.timeout, BlockingIOError, OSError):
                    pass
            try:
                self.scan()
            except Exception as e:
                log.alert("scheduler: scan failed: %s: %s" % (type(e).__name__, e))

    def _loop(self) -> None:
        while not self.stopping:
            try:
                self._step()
            except Exception as e:  # keep scheduling whatever one step did
                log.alert("scheduler: internal error: %s: %s" % (type(e).__name__, e))
                gevent.sleep(1)

    def _step(self) -> None:
        """Start what is due, then sleep until the next due time or a wake-up."""
        now = time.time()
        if self._parked and (self._parked.first() >> _DUE) <= now:
            self._unpark_due(now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, msgid = heapq.heappop(heap)
            entry = self.entries.get(msgid)
            if entry is None or msgid in self.held:
                continue  # gone, or held (release() makes it due again)
            if not entry.item.pending() and not any(entry.inflight):
                gevent.spawn(self._finish, entry)  # done before a restart
                continue
            for job in self._jobs(entry, now):
                self._ready[job[0].channel[job[1][0]]].append(job)
        self._start_ready()
        timeout = SCAN_INTERVAL
        if heap:
            timeout = max(0.0, min(timeout, heap[0][0] - time.time()))
        if self._parked and self._room_to_unpark():
            timeout = max(0.0, min(timeout, (self._parked.first() >> _DUE) - time.time()))
        self._wake.clear()
        self._wake.wait(timeout)

    def _jobs(self, entry: _Entry, now: float) -> List[tuple]:
        """The deliveries due now for `entry`: one per domain for the remote
        recipients (one SMTP transaction each); for the local ones, one per
        recipient, or for a fan-out (more than concurrencylocal of them)
        batches that fill the concurrencylocal slots, each delivering its
        recipients one after the other in one thread call (at most
        LOCAL_BATCH; one at a time with a local-delivery worker)."""
        jobs = []
        local: List[int] = []
        by_domain: Dict[str, List[int]] = {}
        for i in entry.item.pending():
            if entry.inflight[i] or entry.next[i] > now:
                continue
            entry.inflight[i] = True
            if entry.channel[i] == LOCAL:
                local.append(i)
            else:
                domain = entry.item.recipients[i].rpartition("@")[2].lower()
                by_domain.setdefault(domain, []).append(i)
        size = 1
        slots = max(1, self.holder.current.concurrencylocal)
        if len(local) > slots and self.local_runner.offload is None:
            size = min(LOCAL_BATCH, -(-len(local) // slots))
        jobs += [(entry, local[k:k + size]) for k in range(0, len(local), size)]
        jobs += [(entry, idxs) for idxs in by_domain.values()]
        return jobs

    def _start_ready(self) -> None:
        if self.stopping:
            return
        config = self.holder.current
        for channel, limit in ((LOCAL, config.concurrencylocal),
                               (REMOTE, config.concurrencyremote)):
            waiting = self._ready[channel]
            while waiting and self.inflight[channel] < limit:
                entry, idxs = waiting.popleft()
                self.inflight[channel] += 1
                self._idle.clear()
                gevent.spawn(self._deliver, entry, idxs)

    # -- one delivery -----------------------------------------------------------------

    def _deliver(self, entry: _Entry, idxs: List[int]) -> None:
        """One delivery job: a local recipient, or the remote recipients of
        one domain.  Logs one qmail-send delivery number per recipient."""
        item = entry.item
        channel = entry.channel[idxs[0]]
        config = self.holder.current
        now = time.time()
        nums = []
        for i in idxs:
            nums.append(next(self._numbers))
            log.starting_delivery(nums[-1], item.id, channel, item.recipients[i])
            entry.next[i] = next_retry(item.birth, now, channel)
        expired = now > item.birth + config.queuelifetime
        try:
            try:
                if channel == LOCAL and len(idxs) > 1:
                    results = self._local_many(config, entry, idxs)
                elif channel == LOCAL:
                    # the only recipient left, no failures: the delivery's
                    # thread removes the message when it succeeds
                    solo = entry.failures is False and not any(
                        entry.inflight[j] or not item.done[j]
                        for j in range(len(item.recipients)) if j != idxs[0]) \
                        and not notify_has(item, idxs[0], "SUCCESS")
                    results = [self._local(config, entry, item.recipients[idxs[0]], solo)]
                else:
                    results = self._remote(config, item, idxs)
            except Exception as e:  # a bug in delivery code defers, never loses
                log.alert("delivery %d: internal error: %s: %s"
                          % (nums[0], type(e).__name__, e))
                results = [deferred("internal error in delivery (#4.3.0)")] * len(idxs)
            final = []
            for num, i, result in zip(nums, idxs, results):
                if result.kind == DEFERRAL and expired:
                    result = replace(result, kind=FAILURE, status="5.4.7",
                                     text=result.text + TOO_LONG)
                log.delivery(num, result.kind, result.text)
                final.append(result)
            # When these results finish the message, the done marks are not
            # written: removing the envelope (store.remove, on disk within
            # half a second) records the same, with one fsync less per recipient.
            others = set(idxs)
            last = all(r.kind != DEFERRAL for r in final) and not any(
                entry.inflight[j] or not item.done[j]
                for j in range(len(item.recipients)) if j not in others)
            batch = len(idxs) > 1 and channel == LOCAL and not last
            for i, result in zip(idxs, final):
                report = dsn_report(item, i, result, channel)
                if report is not None:
                    entry.failures = True
                if not (batch and result.kind == SUCCESS and report is None):
                    self._record(item, i, result, mark=not last, report=report)
            if config.delaywarningtime > 0 and not expired and \
                    now - item.birth >= config.delaywarningtime:
                self._warn_delay(config, item, [(i, r) for i, r in zip(idxs, final)
                                                 if r.kind == DEFERRAL])
            texts = [(i, r.text) for i, r in zip(idxs, final) if r.kind == DEFERRAL]
            if texts:
                self._note_deferrals(entry, texts)
            if batch:  # the successes' done marks in one thread call
                done = [i for i, r in zip(idxs, final) if r.kind == SUCCESS]
                try:
                    if done:
                        self.store.mark_done_many(item, done)
                except OSError as e:
                    log.alert("unable to record the results for msg %s: %s" % (item.id, e))
                    for i in done:
                        item.done[i] = True  # in memory; a restart delivers them again
        finally:
            for i in idxs:
                entry.inflight[i] = False
            self.inflight[channel] -= 1
            self._after(entry)

    def _record(self, item: Item, i: int, result: Result, mark: bool = True,
                report: Optional[dict] = None) -> None:
        """Make one recipient's result durable: its `report` for the sender
        (dsn_report: a failure, or a success the sender asked to hear of)
        first, then the done mark (skipped with `mark` False: the message
        is about to be removed, which says the same)."""
        try:
            if report is not None:
                self.store.add_failure(item.id, report)
            if result.kind in (SUCCESS, FAILURE):
                if mark:
                    self.store.mark_done(item, i)
                else:
                    item.done[i] = True
        except OSError as e:
            log.alert("unable to record the result for msg %s: %s" % (item.id, e))
            if result.kind == SUCCESS:
                item.done[i] = True  # in memory; a restart delivers it again

    def _remote(self, config, item: Item, idxs: List[int]) -> List[Result]:
        """beforemote filters, then one SMTP transaction for these recipients."""
        from ..delivery import beforemote, remote  # loaded with the first remote delivery

        recipients = [item.recipients[i] for i in idxs]
        sender = item.sender
        if sender.endswith("-@[]"):  # VERP: a sender of its own for each recipient
            if len(idxs) > 1:
                return [r for i in idxs for r in self._remote(config, item, [i])]
            sender = address.verp_sender(sender, recipients[0])
        domain = recipients[0].rpartition("@")[2]
        msgpath = self.store.message_path(item.id)
        made: List[str] = []
        queued = True
        try:
            if config.beforemote:  # filters read and write plain files of data
                try:
                    plain = run(self.store.plain_copy, item.id)
                except (OSError, ValueError) as e:
                    return [deferred("Unable to read the queued message: %s. (#4.3.0)"
                                     % (getattr(e, "strerror", None) or e))] * len(idxs)
                made.append(plain)
                msgpath, more = run(beforemote.run_filters, config.beforemote, plain,
                                    self.store.tmp, config.home, sender, recipients,
                                    domain, log.warning, config.timeoutbeforemote)
                made += more
                queued = False
            params = item.params or {}
            dsn = None
            if any(k in params for k in ("ret", "envid")) or any(
                    "notify.%d" % i in params or "orcpt.%d" % i in params for i in idxs):
                dsn = {"ret": params.get("ret"), "envid": params.get("envid"),
                       "notify": [params.get("notify.%d" % i) for i in idxs],
                       "orcpt": [params.get("orcpt.%d" % i) for i in idxs]}
            return remote.deliver(config, msgpath, sender, recipients, domain, queued,
                                  utf8=bool(params.get("utf8")), dsn=dsn)
        finally:
            for path in made:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _local_many(self, config, entry: _Entry, idxs: List[int]) -> List[Result]:
        """Local recipients `idxs` of one message, one after the other in
        one thread call (LocalRunner.deliver_many); queues their forwards."""
        item = entry.item
        msgpath = self.store.message_path(item.id)
        routes = [route(config, item.recipients[i]) for i in idxs]
        jobs = [(address.verp_sender(item.sender, item.recipients[i]), rt.local, rt.domain)
                for i, rt in zip(idxs, routes)]
        lrs = self.local_runner.deliver_many(config, item.id, msgpath, jobs)
        return [self._forward(rt, msgpath, lr) for rt, lr in zip(routes, lrs)]

    def _forward(self, rt, msgpath: str, lr) -> Result:
        """The Result of a local delivery, after queueing its forwards."""
        if lr.result.kind != SUCCESS or not lr.forwards:
            return lr.result
        dtline = ("Delivered-To: %s@%s\n" % (rt.local, rt.domain)).encode(
            "utf-8", "surrogateescape")
        try:
            fwd = self.store.commit_from(dtline, msgpath, lr.newsender, lr.forwards)
        except QueueError as e:
            return deferred("Unable to forward message: %s" % e.text)
        return Result(SUCCESS, lr.result.status,
                      "%s/forwarded as msg %s" % (lr.result.text, fwd.id))

    def _local(self, config, entry: _Entry, recipient: str, finish: bool = False) -> Result:
        """qmail-lspawn + qmail-local for one recipient; queues its forwards.
        `finish`: a success finishes the message, so its queue file is
        removed in the delivery's own thread call (entry.removed)."""
        item = entry.item
        rt = route(config, recipient)
        msgpath = self.store.message_path(item.id)
        sender = address.verp_sender(item.sender, recipient)

        def remove_now() -> bool:  # blocking: in the delivery's thread call
            try:
                self.store.remove_now(item)
                return True
            except OSError as e:  # _finish tries again
                log.alert("unable to remove msg %s: %s" % (item.id, e))
                return False

        lr, removed = self.local_runner.deliver(config, item.id, msgpath, sender, rt.local,
                                                rt.domain, remove_now if finish else None)
        if removed:
            entry.removed = True
        return self._forward(rt, msgpath, lr)

    def _after(self, entry: _Entry) -> None:
        item = entry.item
        if not any(entry.inflight):
            pending = item.pending()
            if not pending:
                self._finish(entry)
            else:
                if entry.failures and not entry.finishing:
                    # some recipients failed (or were delivered, and the
                    # sender asked to hear of it) while others wait: the
                    # report goes now, not when the last one is done
                    if self._bounce(item):
                        entry.failures = False
                when = min(entry.next[i] for i in pending)
                self._remember_next(item, when)
                packed = pack_id(item.id) if when > time.time() + PARK_AFTER else None
                if packed is not None and not entry.finishing:
                    # waits on disk: the next try is in the file's mtime
                    del self.entries[item.id]
                    self._park(packed, when, entry.failures is False)
                    self._maybe_give_back()
                else:
                    self._push(item.id, when)
        if not any(self.inflight.values()):
            self._idle.set()
        self._wake.set()

    def _note_deferrals(self, entry: _Entry, texts: List[tuple]) -> None:
        """Remember the last temporary failure of each local recipient and
        each remote domain (for eqmail queue list), in memory only and at
        most LAST_ERRORS of them: nothing is written, so a relay that stays
        down costs no disk writes per message."""
        errors = self.last_errors
        for i, text in texts:  # (recipient index, text)
            key = error_key(entry.item.recipients[i], entry.channel[i])
            errors.pop(key, None)
            if len(errors) >= LAST_ERRORS:
                errors.pop(next(iter(errors)))
            errors[key] = text

    # -- the admin's operations (eqmail queue, through the pickup socket) ------------

    def admin(self, op: str, ids: List[str], uid: int) -> str:
        """`op` (delete, hold, release, retry) on the queue IDs `ids`, for
        the user `uid` (checked by the caller).  A message being delivered
        right now is not deleted ("busy"; the caller may ask again).
        Returns one line: what was done to each ID."""
        out = []
        for msgid in ids:
            entry = self.entries.get(msgid)
            exists = entry is not None or os.path.exists(self.store.message_path(msgid))
            if not exists:
                out.append("%s: no such message" % msgid)
                continue
            if op == "delete":
                if entry is not None and (any(entry.inflight) or entry.finishing):
                    out.append("%s: busy (being delivered), not deleted" % msgid)
                    continue
                self.entries.pop(msgid, None)
                self.held.discard(msgid)
                try:
                    run(self.store.remove_id_now, msgid)
                    run(self.store.drop_failures, msgid)
                except OSError as e:
                    out.append("%s: unable to delete: %s" % (msgid, e))
                    continue
                log.line("msg %s deleted by uid %d (eqmail queue delete)" % (msgid, uid))
                log.end_msg(msgid)
                out.append("%s: deleted" % msgid)
            elif op in ("hold", "release"):
                hold = op == "hold"
                try:
                    run(self.store.set_held, msgid, hold)
                except OSError as e:
                    out.append("%s: unable to %s: %s" % (msgid, op, e))
                    continue
                if hold:
                    self.held.add(msgid)
                else:
                    self.held.discard(msgid)
                    self._due_now(msgid)
                log.line("msg %s %s by uid %d" % (msgid, "held" if hold else "released", uid))
                out.append("%s: %s" % (msgid, "held" if hold else "released"))
            elif op == "retry":
                if msgid in self.held:
                    out.append("%s: held, not tried (release it)" % msgid)
                else:
                    self._due_now(msgid)
                    out.append("%s: due now" % msgid)
            else:
                out.append("%s: unknown operation %s" % (msgid, op))
        self._wake.set()
        return "; ".join(out)

    def summary(self) -> dict:
        """Queue figures for eqmail status: messages (in memory and parked
        on disk), held, waiting for their bounce, the oldest one's birth
        (Unix time, None when empty) and deliveries running.  O(messages)
        over the in-memory keys; no file is read."""
        from .store import id_time

        births = [e.item.birth for e in self.entries.values()]
        births += [id_time(unpack_id(k & _ID_MASK)) for k in self._parked]
        return {"messages": len(self.entries) + len(self._parked),
                "in_memory": len(self.entries), "parked": len(self._parked),
                "held": len(self.held),
                "bouncing": sum(1 for e in self.entries.values() if e.failures),
                "oldest": min(births) if births else None,
                "delivering": dict(self.inflight)}

    def _due_now(self, msgid: str) -> None:
        """Every pending recipient of `msgid` is due now (read back from
        disk when it is parked)."""
        entry = self.entries.get(msgid)
        if entry is None:
            item = run(self.store.load_committed, msgid)
            if item is None:
                return
            self._add(item, 0.0)
            entry = self.entries.get(msgid)
            if entry is None:
                return
        entry.next = [0.0] * len(entry.next)
        self._push(msgid, 0.0)

    def _remember_next(self, item: Item, when: float) -> None:
        """Keep the message's next try in its queue file's modification time,
        as qmail-send keeps it in the mtime of info/local/remote files
        (utime): a restart takes the retry schedule up from there (`scan`).
        No fsync: a time lost in a crash means an early retry, no more."""
        try:
            run(os.utime, self.store.message_path(item.id), (when, when))
        except OSError:
            pass  # tried too soon after a restart, as qmail's warning says

    def _finish(self, entry: _Entry) -> None:
        if entry.finishing:
            return
        entry.finishing = True  # until the entry is gone, or the bounce must wait
        item = entry.item
        bounced = False
        try:
            bounced = entry.failures is False or self._bounce(item)
        finally:
            if not bounced:
                entry.finishing = False
                self._push(item.id, time.time() + 60)  # try the bounce again later
        if not bounced:
            return
        try:
            if not entry.removed:
                self.store.remove(item)
        except OSError as e:
            log.alert("unable to remove msg %s: %s" % (item.id, e))
        self.entries.pop(item.id, None)
        log.end_msg(item.id)
        self._maybe_give_back()

    def _bounce(self, item: Item) -> bool:
        """Queue the bounce (and the DSN success notices) for the records
        of `item` in bounce/ID.  True when there is nothing (more) to do,
        False to try again later."""
        failures = run(self.store.failures, item.id)
        if not failures:
            return True
        if not self._report(item, failures):
            return False
        run(self.store.drop_failures, item.id)
        return True

    def _report(self, item: Item, records: List[dict],
                retry_until: Optional[float] = None) -> bool:
        """Queue one report (queue.bounce) of `records` to the sender of
        `item`.  True when done (or nothing to send), False on trouble."""
        from . import bounce  # the email package, only when there is a bounce
        config = self.holder.current
        sender = address.verp_bounce_sender(item.sender)
        reports = [bounce.Failure(f["recipient"], str(f.get("status") or "5.0.0"),
                                  str(f.get("text") or ""), f.get("remote_mta"),
                                  f.get("diagnostic"), str(f.get("action") or "failed"),
                                  f.get("orcpt"))
                   for f in records]
        failed = any(r.action == "failed" for r in reports)
        if not failed and sender in ("", bounce.DOUBLE_BOUNCE_SENDER):
            return True  # notices of success or delay never go to a bounce
        envelope = bounce.bounce_envelope(config, sender)
        if envelope is None:
            log.line("triple bounce: discarding bounce/%s" % item.id)
            return True
        params = item.params or {}
        try:
            data = run(bounce.build_bounce, config, sender, item.id, item.birth, reports,
                       self.store.message_path(item.id), None, params.get("ret"),
                       params.get("envid"), retry_until)
            b = self.store.commit_bytes(data, envelope[0], envelope[1])
        except (QueueError, OSError, ValueError) as e:
            log.alert("unable to queue the bounce for msg %s: %s" % (item.id, e))
            return False
        log.line("%s msg %s qp %s" % ("bounce" if failed else "notice", item.id, b.id))
        return True

    def _warn_delay(self, config, item: Item, deferred_now: List[Tuple[int, Result]]) -> None:
        """The delay notice (control/delaywarningtime, Postfix's
        delay_warning_time): once per message, for the recipients deferred
        now whose NOTIFY allows DELAY (no NOTIFY allows it)."""
        records = [report_record(item, i, r, "delayed") for i, r in deferred_now
                   if notify_of(item, i) is None or "DELAY" in notify_of(item, i)]
        if not records or run(self.store.was_warned, item.id):
            return
        if self._report(item, records, item.birth + config.queuelifetime):
            try:
                run(self.store.set_warned, item.id)
            except OSError as e:
                log.alert("unable to note the delay notice of msg %s: %s" % (item.id, e))
