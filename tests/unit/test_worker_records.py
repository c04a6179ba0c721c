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
