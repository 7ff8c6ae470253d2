"""benchmarks/gpu_check.sh, the GPU check docs/performance.md names: its CPU mode runs every part (the
kernel comparison, mask_overhead, the step comparison) small, and without a GPU the GPU line stops in
one line."""

import os
import re
import subprocess

import pytest
from multirank.launch import ROOT

pytestmark = pytest.mark.benchmark


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_cpu_mode_runs_every_part_and_ends_with_the_summary_line():
    result = run("--cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^kernels: \d+ cases, 0 failures", out, re.M), out[-3000:]
    assert re.search(r"^step: gmt +median", out, re.M) and re.search(r"^step: update +median", out, re.M)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"gpu_check device=cpu kernels=ok mask_vs_adamw=\S+ .*step_gmt_vs_vanilla=[\d.]+ "
                        r"step_update_vs_vanilla=[\d.]+", last), last


def test_without_a_gpu_the_gpu_line_stops_in_one_line():
    result = run()
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(r"gpu_check: torch \(\S+\) sees no CUDA device; use --cpu for the CPU mode\n", result.stderr), \
        result.stderr
