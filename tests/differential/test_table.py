"""DIFFERENCES.md is the table known.py generates, and KNOWN_DIFFERENCES /
EXPECTED_FAILURES name only cases that exist."""
from __future__ import annotations

import os

import cases_local
import cases_smtp
from known import EXPECTED_FAILURES, KNOWN_DIFFERENCES, table

HERE = os.path.dirname(os.path.abspath(__file__))


def test_differences_md_matches_known_differences():
    with open(os.path.join(HERE, "DIFFERENCES.md")) as f:
        text = f.read()
    assert text == table(), ("DIFFERENCES.md is out of date: run "
                             "python tests/differential/known.py > tests/differential/DIFFERENCES.md")


def test_listed_cases_exist():
    ids = [c.id for c in cases_smtp.CASES] + [c.id for c in cases_local.CASES]
    assert len(ids) == len(set(ids))
    assert set(KNOWN_DIFFERENCES) <= set(ids), set(KNOWN_DIFFERENCES) - set(ids)
    assert set(EXPECTED_FAILURES) <= set(ids), set(EXPECTED_FAILURES) - set(ids)
    assert not set(KNOWN_DIFFERENCES) & set(EXPECTED_FAILURES)


def test_enough_cases():
    assert len(cases_smtp.CASES) + len(cases_local.CASES) >= 120
