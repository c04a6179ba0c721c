"""eqmail.workers pieces that need no process: the commit record and the
log destination a worker inherits."""
import json
import os

from eqmail import log
from eqmail.queue.store import Item
from eqmail.workers import MAX_RECORD, _item_record


def item(recipients):
    return Item("1795314806.1481.1", 1795314806, "s\udcff@example.com", recipients,
                [False] * len(recipients), list(range(len(recipients))), size=412,
                uid=993, pid=1481)


def test_commit_record_round_trips_every_field():
    one = item(["a@example.org", "b\udce9@example.org"])
    rec = _item_record(one)
    assert rec[:1] == b"c"
    back = Item(**json.loads(rec[1:]))
    assert back == one  # surrogate-escaped bytes survive the JSON


def test_a_commit_too_large_for_one_record_sends_only_the_id():
    big = item(["user%05d@example.org" % i for i in range(5000)])
    rec = _item_record(big)
    assert rec == b"C1795314806.1481.1"
    assert len(_item_record(item(["x@example.org"]))) < MAX_RECORD


def test_log_destination_follows_the_last_choice(tmp_path):
    path = str(tmp_path / "log")
    try:
        log.to_file(path)
        kind, fd = log.destination()
        assert kind == "fd" and os.fstat(fd).st_ino == os.stat(path).st_ino
        log.status("through the descriptor")
        log.to_null()
        assert log.destination() == ("null", None)
    finally:
        log.to_stderr()
    assert log.destination() == ("stderr", None)
    with open(path) as f:
        assert "status: through the descriptor" in f.read()


# -- the local-delivery worker's answers ----------------------------------------------------

def _pool_and_worker():
    import gevent.event

    from eqmail.workers import Pool, _Worker

    pool = Pool("/nonexistent", None, None, 1, 0.5, None)
    w = _Worker(4242, "local", None)
    got = gevent.event.AsyncResult()
    w.waiting[7] = got
    return pool, w, got


def test_a_large_answer_is_cut_into_records_and_put_back_together():
    from eqmail.delivery.worker import answer_records

    forwards = ["user%05d@example.org" % i for i in range(8000)]  # ~170 KB of JSON
    answer = json.dumps({"result": {"kind": "success", "status": "2.0.0", "text": "ok",
                                    "forwards": forwards, "newsender": "s@example.org"},
                         "removed": False}).encode()
    records = answer_records(7, answer)
    assert len(records) > 2
    assert all(len(r) <= MAX_RECORD for r in records)
    assert [r[:1] for r in records] == [b"p"] * (len(records) - 1) + [b"l"]
    pool, w, got = _pool_and_worker()
    for r in records:
        assert not got.ready()
        pool._answer(w, r[:1], r[1:])
    assert got.get(timeout=1)["result"]["forwards"] == forwards
    assert w.parts == {} and w.waiting == {}


def test_a_short_answer_is_one_record():
    from eqmail.delivery.worker import answer_records

    assert answer_records(12, b'{"a": 1}') == [b'l12 {"a": 1}']


def test_an_answer_over_the_limit_or_not_json_counts_as_none():
    from eqmail import workers

    pool, w, got = _pool_and_worker()
    part = b"7 " + b"x" * (MAX_RECORD - 10)
    for _ in range(workers.MAX_ANSWER // len(part) + 1):
        pool._answer(w, b"p", part)
    assert got.ready() and got.get() is None
    pool, w, got = _pool_and_worker()
    pool._answer(w, b"l", b"7 {not json")
    assert got.ready() and got.get() is None


def test_the_worker_answers_a_bad_request_with_a_deferral():
    from eqmail.delivery.worker import deliver_request

    for req in ({"n": 1}, {"n": 1, "id": "../../etc/passwd", "sender": "", "local": "a",
                           "domain": "b"}, {"n": 1, "id": "1.2.3\n", "sender": "", "local": "a",
                                            "domain": "b"},
                {"n": 1, "id": "1.2.3", "sender": 5, "local": "a", "domain": "b"}):
        answer = deliver_request(None, None, req)
        assert answer["removed"] is False
        assert answer["result"]["kind"] == "deferral"
        assert "bad request" in answer["result"]["text"]
