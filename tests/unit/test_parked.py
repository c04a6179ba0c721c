"""queue.parked: the parked keys behave as one heapq min-heap of ints."""
from __future__ import annotations

import heapq

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqmail.queue import parked as parked_mod
from eqmail.queue.parked import WIDTH, Parked

KEY = st.integers(min_value=0, max_value=(1 << (8 * WIDTH)) - 1)
#: an operation: ("push", key) or ("pop", None)
OPS = st.lists(st.one_of(st.tuples(st.just("push"), KEY), st.tuples(st.just("pop"), st.none())),
               max_size=200)


def records(keys):
    return bytearray(b"".join(k.to_bytes(WIDTH, "big") for k in keys))


@pytest.fixture(params=[4096, 3], ids=["merge-at-4096", "merge-at-3"])
def merge_at(request, monkeypatch):
    """Parked as eqmail uses it, and with its list merged into the run
    after three keys (so that the merges happen in every example)."""
    monkeypatch.setattr(parked_mod, "MERGE_AT", request.param)
    return request.param


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(loaded=st.lists(KEY, max_size=200), ops=OPS)
def test_the_same_order_as_heapq(merge_at, loaded, ops):
    p = Parked()
    p.load(records(loaded))
    ref = list(loaded)
    heapq.heapify(ref)
    for op, key in ops:
        if op == "push":
            p.push(key)
            heapq.heappush(ref, key)
        elif ref:
            assert p.first() == ref[0]
            assert p.pop() == heapq.heappop(ref)
        else:
            assert p.first() is None
            with pytest.raises(IndexError):
                p.pop()
        assert len(p) == len(ref)
        assert bool(p) == bool(ref)
        assert sorted(p) == sorted(ref)
    assert [p.pop() for _ in range(len(p))] == [heapq.heappop(ref) for _ in range(len(ref))]
    assert not p and p.first() is None


@given(st.lists(KEY, max_size=100), st.lists(KEY, max_size=100))
def test_replace_holds_exactly_the_given_keys(before, keys):
    p = Parked()
    p.load(records(before))
    for k in before:
        p.push(k)
    p.replace(keys)
    assert sorted(p) == sorted(keys)
    assert [p.pop() for _ in range(len(keys))] == sorted(keys)


def test_a_long_run_gives_its_consumed_part_back():
    n = 20000
    p = Parked()
    p.load(records(range(n)))
    assert len(p._run) == n * WIDTH  # 17 bytes a key, not an int each
    for i in range(n // 2 + 1):
        assert p.pop() == i
    assert len(p._run) < n * WIDTH // 2 + WIDTH
    assert len(p) == n - (n // 2 + 1)
    assert p.first() == n // 2 + 1


def test_keys_parked_while_running_end_up_in_the_run():
    p = Parked()
    n = parked_mod.MERGE_AT * 3
    for k in range(n, 0, -1):
        p.push(k)
    assert len(p) == n
    assert len(p._heap) < parked_mod.MERGE_AT  # merged: 17 bytes a key
    assert len(p._run) >= (n - parked_mod.MERGE_AT) * WIDTH
    assert [p.pop() for _ in range(n)] == list(range(1, n + 1))
