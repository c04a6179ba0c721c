"""Fixtures of the differential suite: `peer`, the built eQmail 1.09
(session-scoped; skips when not root or no C compiler), and `workdir`, a
scratch directory per test."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import eqdiff  # noqa: E402


@pytest.fixture(scope="session")
def peer():
    if os.geteuid() != 0:
        pytest.skip("the differential suite needs root (it creates the qmail users that "
                    "eQmail's build compiles in); tests/run runs it as root")
    if not shutil.which("cc") or not shutil.which("make"):
        pytest.skip("the differential suite needs a C compiler and make to build eQmail "
                    "1.09 (tests/run installs gcc, make, libc6-dev as root)")
    p = eqdiff.build()
    yield p
    p.release()


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="eqmail-diff-")
    yield d
    shutil.rmtree(d, ignore_errors=True)
