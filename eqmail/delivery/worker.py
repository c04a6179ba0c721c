"""delivery.worker -- the local-delivery worker process (started by eqmaild).

SUMMARY
    Under load eqmaild (eqmail.workers) moves its local deliveries to this
    process, so that its own hub only schedules (and serves the sessions
    the session workers leave it).  Each delivery here is exactly what
    eqmaild would run in its threadpool (delivery.lspawn.resolve_and_deliver:
    users/assign, the dot-qmail file, Maildir, mbox, programs, forwards),
    done by plain threads: no gevent, no hub to hand results back to, so a
    delivery costs no thread switch besides its own system calls.

    Only started when eqmaild is not root and has no privileged helper:
    deliveries as eqmaild's own user.  A target with another uid (or root)
    gets the same temporary failure eqmaild would give.

CHANNEL (SOCK_SEQPACKET on descriptor 3, one record per message)
    eqmaild -> worker
        ``l`` + JSON ``{"n": N, "id": queue ID, "sender": envelope sender,
        "local": local part, "domain": domain, "finish": bool}``.  With
        ``finish`` a success without forwards also removes the message
        from the queue (unlink mess/ID, fsync mess/): it was the message's
        last recipient.
    worker -> eqmaild
        ``r`` ready; the answer to request N: JSON ``{"result":
        LocalResult.to_dict(), "removed": bool}`` cut into records of at
        most `MAX_RECORD` bytes, ``p<N> `` + a part for all but the last,
        ``l<N> `` + the last part.
    End of file (eqmaild stops, or retires an idle worker) or SIGTERM: the
    deliveries in flight finish and are answered, then the worker exits 0.
    SIGHUP re-reads the control files (eqmaild passes its own on).

THREADS
    Every thread waits in recv() on the channel, which gives each record to
    one of them; a thread that takes a request starts another when all are
    busy, up to conf-spawn (120, the ceiling of concurrencylocal; eqmaild
    never has more local deliveries in flight than concurrencylocal).

STANDARDS
    qmail-lspawn(8), qmail-local(8); unix(7) for SOCK_SEQPACKET.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
from typing import List

from .. import log

#: Largest record on the channel, in bytes (as eqmail.workers).
MAX_RECORD = 65536
#: The descriptor of the channel.
CHANNEL_FD = 3


def answer_records(n: int, answer: bytes) -> List[bytes]:
    """Cut the JSON `answer` to request `n` into channel records."""
    head = b"%d " % n
    room = MAX_RECORD - len(head) - 1
    parts = [answer[i:i + room] for i in range(0, len(answer), room)] or [b""]
    return [b"p" + head + part for part in parts[:-1]] + [b"l" + head + parts[-1]]


def deliver_request(holder, store, req: dict) -> dict:
    """Run the delivery that request `req` asks for (blocking).  Returns
    the answer: ``{"result": LocalResult dict, "removed": bool}``.  Never
    raises: a bad request or a bug in delivery code is a temporary failure."""
    from . import deferred
    from .local import LocalResult
    from .lspawn import refusal, resolve_and_deliver
    from ..queue.store import is_queue_id

    removed = []
    try:
        msgid, sender, local, domain = req["id"], req["sender"], req["local"], req["domain"]
        finish = req.get("finish") is True
        if not is_queue_id(msgid) or not all(
                isinstance(x, str) for x in (sender, local, domain)):
            raise ValueError("bad request")
    except (KeyError, TypeError, ValueError):
        lr = LocalResult(deferred("Unable to deliver: bad request to the local delivery "
                                  "worker. (#4.3.0)"))
        return {"result": lr.to_dict(), "removed": False}

    def then() -> None:
        try:
            store.remove_id_now(msgid)
            removed.append(True)
        except OSError as e:  # eqmaild removes it after all
            log.alert("unable to remove msg %s: %s" % (msgid, e))

    try:
        got = resolve_and_deliver(holder.current, store.message_path(msgid), sender, local,
                                  domain, then if finish else None)
        lr = got if isinstance(got, LocalResult) else refusal(got)
    except Exception as e:  # a bug in delivery code defers, never loses
        log.alert("local delivery worker: internal error: %s: %s" % (type(e).__name__, e))
        lr = LocalResult(deferred("internal error in delivery (#4.3.0)"))
    return {"result": lr.to_dict(), "removed": bool(removed)}


def main(home: str) -> int:
    """The worker's body; the channel is on descriptor 3.  Returns the exit
    code: 0 after a clean stop, 78 when the control files cannot be read."""
    from ..control import CONF_SPAWN, ConfigError, ConfigHolder
    from ..queue.store import Store

    try:
        holder = ConfigHolder(home)
    except (ConfigError, OSError) as e:
        log.alert("local delivery worker: unable to start: %s" % e)
        return 78
    store = Store(os.path.join(home, "queue"))
    chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=CHANNEL_FD)
    send_lock = threading.Lock()
    lock = threading.Lock()
    state = {"threads": 0, "busy": 0}
    threads: List[threading.Thread] = []

    def send(records: List[bytes]) -> None:
        with send_lock:  # the parts of one answer stay together
            for record in records:
                chan.send(record)

    def serve() -> None:
        while True:
            try:
                data = chan.recv(MAX_RECORD)
            except OSError:
                return
            if not data:
                return
            if data[:1] != b"l":
                continue
            with lock:
                state["busy"] += 1
                if state["busy"] == state["threads"] and state["threads"] < CONF_SPAWN:
                    start()
            try:
                try:
                    req = json.loads(data[1:])
                    n = int(req["n"])
                except (ValueError, KeyError, TypeError):
                    continue
                if not isinstance(req, dict):
                    continue
                answer = json.dumps(deliver_request(holder, store, req)).encode(
                    "utf-8", "surrogateescape")
                try:
                    send(answer_records(n, answer))
                except OSError:
                    return  # eqmaild is gone: its next start delivers again
            finally:
                with lock:
                    state["busy"] -= 1

    def start() -> None:  # with `lock` held
        t = threading.Thread(target=serve, name="delivery", daemon=True)
        state["threads"] += 1
        threads.append(t)
        t.start()

    def on_term(signum, frame) -> None:
        try:
            chan.shutdown(socket.SHUT_RD)  # every recv() returns end of file
        except OSError:
            pass

    signal.signal(signal.SIGHUP, lambda signum, frame: holder.reload())
    signal.signal(signal.SIGTERM, on_term)
    threading.stack_size(1 << 20)
    try:
        chan.send(b"r")
    except OSError:
        return 0
    with lock:
        start()
    while True:  # the main thread only waits, so that signals are handled
        with lock:
            left = [t for t in threads if t.is_alive()]
        if not left:
            break
        left[0].join(1.0)
    log.flush()
    return 0
