"""The same SMTP dialogue to eQmail 1.09's qmail-smtpd and to `eqmail
smtpd`, on pipes, with the same control files and environment: replies,
envelopes, Received lines and queued messages must agree, or the case is
listed in known.KNOWN_DIFFERENCES (asserted as that exact difference) or
known.EXPECTED_FAILURES (an eqmail bug: strict xfail)."""
from __future__ import annotations

import os

import pytest

import eqdiff
from cases_smtp import CASES
from known import AS_IF, KNOWN_DIFFERENCES, judge, params


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", params(CASES))
def test_smtp(peer, workdir, case):
    eq = eqdiff.run_smtp("eQmail", peer, case, workdir)
    py = eqdiff.run_smtp("eqmail", peer, case, workdir)
    shown = case.input().decode("utf-8", "backslashreplace")[:600]
    diffs = eqdiff.diff_fields(eq.fields(), py.fields())
    known = KNOWN_DIFFERENCES.get(case.id)
    if known is not None and known.as_if is not None:
        # the difference is exactly the rewrite: eQmail on the case agrees
        # with eqmail on the rewritten case
        assert diffs, "%s is listed in KNOWN_DIFFERENCES but now agrees" % case.id
        os.mkdir(os.path.join(workdir, "as-if"))
        py2 = eqdiff.run_smtp("eqmail", peer, AS_IF[known.as_if](case),
                              os.path.join(workdir, "as-if"))
        eqdiff.raise_for(case.id + " (eqmail " + known.as_if + ")",
                         eqdiff.diff_fields(eq.fields(), py2.fields()), shown)
        return
    judge(case.id, diffs, shown)
