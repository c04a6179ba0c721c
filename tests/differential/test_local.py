"""The same message and dot-qmail files to eQmail 1.09's qmail-local and to
eqmail's local delivery (delivery.local.deliver() through eqlocal.py, with
qmail-local's arguments): exit code, report, "did" counts, forwards and the
files written must agree, or the case is listed in known.py."""
from __future__ import annotations

import pytest

import eqdiff
from cases_local import CASES
from known import judge, params


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", params(CASES))
def test_local(peer, workdir, case):
    eq = eqdiff.run_local("eQmail", peer, case, workdir)
    py = eqdiff.run_local("eqmail", peer, case, workdir)
    shown = "ext %r, files %r" % (case.ext, case.files)
    judge(case.id, eqdiff.diff_fields(eq.fields(), py.fields()), shown)
