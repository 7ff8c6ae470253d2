"""benchmarks/study.py, the miniature of the paper's study (docs/results.md): its paired statistics by
hand, its arms as valid commands, and docs/results.md's study lines as written (reports rebuilt from the
committed runs; training lines with --plan, which trains nothing)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.benchmark


@pytest.fixture()
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study as study_module

    return study_module


def _run_file(out: Path, arm: str, seed: int, nll: tuple[float, float], correct: int = 50) -> None:
    run = {"arm": arm, "seed": seed, "method": "sft", "train_s": 100.0,
           "nll": {t: {"n": 300, "nll": v} for t, v in zip(("basic_arithmetic", "chain_sum"), nll)},
           "accuracy": {t: {"n": 100, "correct": correct, "accuracy": correct / 100}
                        for t in ("basic_arithmetic", "chain_sum")}}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{arm}-s{seed}.json").write_text(json.dumps(run))


def test_study_pairs_by_seed_by_hand(study, tmp_path):
    import study_stats

    # vanilla NLL (mean of the two tasks) 1.0, 1.2, 1.4; GMT 0.9, 1.15, 1.25: differences -0.1, -0.05, -0.15
    for seed, v, g, r in ((1, 1.0, 0.9, 1.0), (2, 1.2, 1.15, 1.2), (3, 1.4, 1.25, 1.4)):
        _run_file(tmp_path, "sft", seed, (v - 0.1, v + 0.1))
        _run_file(tmp_path, "gmt-0.5", seed, (g, g))
        _run_file(tmp_path, "random-0.5", seed, (r, r), correct=60)
    data = study_stats.report(tmp_path, study.ARMS, study.TASKS)
    d = data["arms"]["gmt-0.5"]["vs_vanilla"]["nll"]
    # mean -0.1, sd 0.05, half-width t(2) 4.302653 * 0.05 / sqrt(3) = 0.12421: contains 0, not resolved
    assert d["mean"] == pytest.approx(-0.1) and d["sd"] == pytest.approx(0.05)
    assert d["ci95_half"] == pytest.approx(4.302653 * 0.05 / 3 ** 0.5) and d["resolved"] is False
    rnd = data["arms"]["gmt-0.5"]["vs_random"]
    assert rnd["against"] == "random-0.5" and rnd["nll"]["diffs"] == pytest.approx([-0.1, -0.05, -0.15])
    assert data["arms"]["random-0.5"]["vs_vanilla"]["accuracy"]["mean"] == pytest.approx(0.1)
    assert data["arms"]["random-0.5"]["vs_vanilla"]["accuracy"]["resolved"] is True  # +0.1 on every seed
    two_equal = study_stats.paired({1: {"accuracy": 0.2}, 2: {"accuracy": 0.3}}, {1: {"accuracy": 0.1}, 2: {"accuracy": 0.2}},
                                   "accuracy")
    assert two_equal["ci95_half"] == pytest.approx(0, abs=1e-12) and two_equal["resolved"] is False  # a zero-width interval from 2 seeds
    assert study_stats.seeds_for(0.05, 0.02) == 27  # 2.056 * 0.05 / sqrt(27) = 0.0198
    # per-problem differences 0, 1, 2: sd 1, half-width 1.96 / sqrt(3)
    assert study_stats.problem_half([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == pytest.approx(1.96 / 3 ** 0.5)
    assert (tmp_path / "nll_vs_ratio.png").stat().st_size > 10_000 and "gmt-0.5" in (tmp_path / "results.md").read_text()


def test_study_reports_dpo_against_the_base_by_hand(study, tmp_path):
    import study_stats

    # ranking accuracy (per task) vanilla DPO 0.6/0.7 and 0.5/0.6, GMT-DPO 0.7/0.7 and 0.6/0.7; the base's 0.55
    for seed, d, g in ((1, (0.6, 0.7), (0.7, 0.7)), (2, (0.5, 0.6), (0.6, 0.7))):
        for arm, rank in (("dpo", d), ("gmt-dpo-0.5", g)):
            _run_file(tmp_path, arm, seed, (1.0, 1.0))
            path = tmp_path / "runs" / f"{arm}-s{seed}.json"
            run = json.loads(path.read_text())
            run["preference"] = {t: {"n": 300, "preferred": 180, "preference_accuracy": 0.6, "reward_margin": 0.5,
                                     "ranking_accuracy": r, "reference_ranking_accuracy": 0.55}
                                 for t, r in zip(("basic_arithmetic", "chain_sum"), rank)}
            path.write_text(json.dumps(run))
    data = study_stats.report(tmp_path, study.ARMS, study.TASKS)
    assert data["arms"]["dpo"]["ranking_accuracy"]["mean"] == pytest.approx(0.6)
    d = data["arms"]["gmt-dpo-0.5"]["vs_vanilla"]["ranking_accuracy"]  # paired with dpo: +0.05, +0.1
    assert d["diffs"] == pytest.approx([0.05, 0.1]) and d["resolved"] is False  # 12.706 * 0.0354 / sqrt(2) = 0.32
    assert "| dpo | 2 | 0.600 | +0.5000 | 0.600 (0.550) |" in (tmp_path / "results.md").read_text()


def test_study_arms_are_valid_commands(study, tmp_path):
    """Every arm's training command passes `gmt-align validate` (no model is loaded)."""
    from gmt_align.cli import main

    for arm, (method, _, _) in study.ARMS.items():
        if method == "none":
            continue
        command = study.train_command(arm, 1, tmp_path / "model", ROOT / ".cache" / "quickstart" / "data"
                                      / f"{method}_train.jsonl")
        assert command[:3] == ["gmt-align", method, "--config"]
        assert main(["validate", command[3], "--method", method, *command[4:]]) == 0, arm


def test_documented_report_lines_rebuild_the_reports_from_the_committed_runs(smollm2_dir, tmp_path):
    """docs/results.md's --report_only lines (the SFT and the DPO study), as written, on a copy of the
    committed runs (then --out COPY): every committed run is in the rebuilt table and results.json."""
    import shutil

    text = (ROOT / "docs" / "results.md").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if "benchmarks/study.py" in line and "--report_only" in line]
    assert lines
    for i, line in enumerate(lines):
        argv = shlex.split(line, comments=True)
        committed = ROOT / argv[argv.index("--out") + 1]
        copy = tmp_path / f"copy{i}"
        shutil.copytree(committed, copy)
        run = subprocess.run([*argv, "--out", str(copy)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        runs = [json.loads(f.read_text()) for f in sorted((committed / "runs").glob("*.json"))]
        assert runs, f"no committed runs in {committed}"
        table = (copy / "results.md").read_text()
        arms = json.loads((copy / "results.json").read_text())["arms"]
        for r in runs:  # every committed run is in the rebuilt report, with its own figure
            assert f"| {r['arm']} |" in table
            nll = (r["nll"]["basic_arithmetic"]["nll"] + r["nll"]["chain_sum"]["nll"]) / 2
            assert arms[r["arm"]]["per_seed"][str(r["seed"])]["nll"] == pytest.approx(nll)
            if "preference" in r:
                rank = (r["preference"]["basic_arithmetic"]["ranking_accuracy"]
                        + r["preference"]["chain_sum"]["ranking_accuracy"]) / 2
                assert arms[r["arm"]]["per_seed"][str(r["seed"])]["ranking_accuracy"] == pytest.approx(rank)
        assert (copy / "nll_vs_ratio.png").stat().st_size > 10_000


def _documented_study_runs() -> list[str]:
    """docs/results.md's benchmarks/study.py lines that train (code blocks and inline code), as written."""
    import re

    text = (ROOT / "docs" / "results.md").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(".venv/bin/python benchmarks/study.py")]
    lines += re.findall(r"`(\.venv/bin/python benchmarks/study\.py[^`]*)`", text)
    return [line for line in lines if "--report_only" not in line]


def test_documented_study_runs_plan_the_runs_they_say(study, smollm2_dir, tmp_path):
    """Each documented training line of the study, as written plus --plan (which trains nothing):
    it parses, its folder's recorded regime is the one the line asks for, and it plans exactly the
    named runs that have no committed result file. --plan writes nothing, and refuses a regime
    other than the folder's, as a run would."""
    lines = _documented_study_runs()
    assert len(lines) >= 3, lines  # the whole study, the DPO study, a seed at a time
    for line in lines:
        argv = shlex.split(line, comments=True)
        run = subprocess.run([*argv, "--plan"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (line, run.stderr[-2000:])
        planned = run.stdout.strip().rsplit(": ", 1)[1].split(", ")
        args = study.make_parser().parse_args(argv[2:])  # what the line asks for: its arms and seeds
        out = ROOT / args.out  # as the line runs: from the repository's root
        for name in (f.stem for f in (out / "runs").glob("*.json")):
            assert name not in planned, (line, name)  # a committed run is never run again
        named = [f"{a}-s{s}" for a in args.arms for s in (args.seeds[:1] if a == "base" else args.seeds)]
        assert [n for n in named if not (out / "runs" / f"{n}.json").is_file()] == \
            [p for p in planned if p != "none"], line
    fresh = tmp_path / "fresh"
    plan = [sys.executable, "benchmarks/study.py", "--arms", "sft", "--seeds", "1", "--out", str(fresh), "--plan"]
    run = subprocess.run(plan, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith(": sft-s1") and not fresh.exists()
    other = [*plan[:-3], "--out", "benchmarks/study_results/dpo-e3", "--dpo_lr", "1.0", "--plan"]
    run = subprocess.run(other, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "holds runs made with" in run.stderr and "choose another --out" in run.stderr


def test_drive_runs_each_child_at_most_jobs_at_a_time_and_names_the_failed(tmp_path, capsys, monkeypatch):
    """study_stats.drive, which both studies use: every (arm, seed) runs once as ``--_run ARM SEED
    --out OUT *child_args``, never more than ``jobs`` at a time; each child's output is in its log
    and a failed run is named in the exit message after the others have run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study_stats

    script = tmp_path / "bench" / "child.py"
    script.parent.mkdir()
    script.write_text(
        "import sys, time, pathlib\n"
        "arm, seed, out, extra = sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[5]), sys.argv[6:]\n"
        "(out / f'{arm}-s{seed}.start').write_text(str(time.time()))\n"
        "time.sleep(1.5)\n"
        "(out / f'{arm}-s{seed}.end').write_text(str(time.time()))\n"
        "print('child', arm, seed, *extra)\n"
        "sys.exit(3 if arm == 'bad' else 0)\n")
    out = tmp_path / "out"
    out.mkdir()
    todo = [("a", 1), ("a", 2), ("bad", 1), ("b", 1)]
    with pytest.raises(SystemExit, match=r"1 runs failed: bad-s1$"):
        study_stats.drive(str(script), out, todo, 2, ["--lr=0.5"])
    spans = [(float((out / f"{a}-s{s}.start").read_text()), float((out / f"{a}-s{s}.end").read_text()))
             for a, s in todo]
    for start, _ in spans:  # at each start, the runs then going on (itself included)
        assert sum(s <= start < e for s, e in spans) <= 2
    assert max(s for s, _ in spans) < min(e for _, e in spans) + 3  # two at a time, not one
    log = tmp_path / "outputs" / "study-scratch" / "logs" / "out-a-s2.txt"
    assert log.read_text().strip() == "child a 2 --lr=0.5"
    printed = capsys.readouterr().out
    assert "4 runs to do" in printed and "bad seed 1: FAILED (exit 3" in printed and printed.count(": done in") == 3
