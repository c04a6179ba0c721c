"""The same SMTP dialogue to eQmail 1.09's qmail-smtpd and to `eqmail
smtpd`, on pipes, with the same control files and environment: replies,
envelopes, Received lines and queued messages must agree, or the case is
listed in known.KNOWN_DIFFERENCES (asserted as that exact difference) or
known.EXPECTED_FAILURES (an eqmail bug: strict xfail)."""
from __future__ import annotations

import pytest

import eqdiff
from cases_smtp import CASES
from known import judge, params


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", params(CASES))
def test_smtp(peer, workdir, case):
    eq = eqdiff.run_smtp("eQmail", peer, case, workdir)
    py = eqdiff.run_smtp("eqmail", peer, case, workdir)
    shown = case.input().decode("utf-8", "backslashreplace")[:600]
    judge(case.id, eqdiff.diff_fields(eq.fields(), py.fields()), shown)
