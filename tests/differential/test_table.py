"""The README's table of differences is the one known.py generates, and
KNOWN_DIFFERENCES / EXPECTED_FAILURES name only cases that exist."""
from __future__ import annotations

import cases_local
import cases_smtp
from known import EXPECTED_FAILURES, KNOWN_DIFFERENCES, README, readme_block, table


def test_readme_table_matches_known_differences():
    with open(README) as f:
        text = f.read()
    assert readme_block(text) == table(), (
        "the README's table of differences is out of date: run "
        "python3 tests/differential/known.py --readme")


def test_listed_cases_exist():
    ids = [c.id for c in cases_smtp.CASES] + [c.id for c in cases_local.CASES]
    assert len(ids) == len(set(ids))
    assert set(KNOWN_DIFFERENCES) <= set(ids), set(KNOWN_DIFFERENCES) - set(ids)
    assert set(EXPECTED_FAILURES) <= set(ids), set(EXPECTED_FAILURES) - set(ids)
    assert not set(KNOWN_DIFFERENCES) & set(EXPECTED_FAILURES)


def test_enough_cases():
    assert len(cases_smtp.CASES) + len(cases_local.CASES) >= 120
