"""How many session workers eqmaild allows by default: the cores it may
run on (a cpuset or taskset, as on a router given one core), not all."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def count_on(cores: str) -> int:
    out = subprocess.run(["taskset", "-c", cores, sys.executable, "-c",
                          "from eqmail.workers import default_count; print(default_count())"],
                         capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out
    return int(out.stdout)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="no taskset (util-linux)")
def test_one_allowed_core_means_no_worker():
    assert count_on("0") == 0


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2,
                    reason="needs taskset and two cores")
def test_two_allowed_cores_allow_one_worker():
    assert count_on("0,1") == 1
