"""benchmarks/kernel_ab.py, the side-by-side comparison docs/performance.md's kernel figures come from:
it checks both builds give the same counts and masks before timing them, and refuses a revision it
cannot read in one line."""

import os
import re
import subprocess
import sys

import pytest
from multirank.launch import ROOT

pytestmark = pytest.mark.benchmark


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/kernel_ab.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_against_head_it_checks_then_times_both_passes_and_ends_with_the_ratios():
    result = run("--base", "HEAD", "--shapes", "flat", "--size", "70001", "--rounds", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "0.1M entries in 1 tensors; base HEAD" in out and "thread CPU time" in out, out
    for phase in ("count", "mask"):
        for build in ("base", "new"):
            assert re.search(rf"^{phase} +{build} +[\d.]+ \[[\d.]+-[\d.]+\]$", out, re.M), out
    assert re.fullmatch(r"count_new_vs_base=\d+\.\d{3} mask_new_vs_base=\d+\.\d{3}", out.strip().splitlines()[-1])


def test_a_revision_git_cannot_show_is_refused_in_one_line():
    result = run("--base", "no-such-revision-xyz", "--rounds", "1")
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(r"kernel_ab: gmt_align/core/csrc/gmt_cpu\.cpp at 'no-such-revision-xyz': .+\n", result.stderr), \
        result.stderr
