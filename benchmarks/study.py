"""A miniature of the paper's study: does GMT beat vanilla SFT / DPO on SmolLM2-135M-Instruct?

    .venv/bin/python benchmarks/study.py [--out outputs/study] [--seeds 1 2 3] [--jobs 2]
                                         [--arms ARM ...] [--sft_steps 60] [--dpo_steps 30]
                                         [--eval_n 200] [--keep_models] [--report_only]

Arms (same data, steps, learning rate and batch within SFT and within DPO):

* ``base``: the model as converted, not trained (evaluated once: greedy decoding is deterministic);
* ``sft``: vanilla SFT (``gmt_mask_ratio 0``, the parent trainer bit for bit);
* ``gmt-0.1`` ... ``gmt-0.6``: GMT-SFT, magnitude selection, at mask ratios 0.1, 0.2, 0.4, 0.6;
* ``random-0.2``, ``random-0.4``: the same number of entries masked, chosen at random;
* ``dpo``, ``gmt-dpo-0.2``: vanilla DPO and GMT-DPO from the base model on the quickstart pairs.

SFT runs ``recipes/quickstart/sft.yaml`` (the quickstart's mix of basic_arithmetic and chain_sum,
batch 4 x 2 accumulation, constant lr raised to 1e-4) for ``--sft_steps`` steps; DPO runs
``recipes/quickstart/dpo.yaml`` with batch 4 x 2 and lr 1e-5 for ``--dpo_steps`` steps. The seed
(``--seed`` of the recipe: data order, and the random masks) is the only thing that changes between
repeats. Every model is evaluated greedily by ``gmt-align eval`` on the same held-out problems
(``EVAL_SEED``, training prompts removed): basic_arithmetic and chain_sum, ``--eval_n`` each.

Each run is one child process (``--jobs`` at a time, one thread each), which writes
``OUT/runs/ARM-sSEED/result.json`` last; a run whose result exists is skipped, so an interrupted
study resumes where it stopped. Model weights are deleted after evaluation unless ``--keep_models``.
At the end (or with ``--report_only``) the results are collected into ``OUT/results.json``,
``OUT/results.md`` (the table) and ``OUT/accuracy_vs_ratio.png``.

Needs the quickstart model and data (``make quickstart`` or ``python -m gmt_align.quickstart``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ".cache/quickstart/SmolLM2-135M-Instruct"
TASKS = ("basic_arithmetic", "chain_sum")
# name -> (method, overrides); every SFT arm shares the recipe and differs only in the GMT fields.
ARMS: dict[str, tuple[str, list[str]]] = {
    "base": ("none", []),
    "sft": ("sft", ["--gmt_mask_ratio", "0"]),
    **{f"gmt-{r}": ("sft", ["--gmt_mask_ratio", r]) for r in ("0.1", "0.2", "0.4", "0.6")},
    **{f"random-{r}": ("sft", ["--gmt_mask_ratio", r, "--gmt_selection", "random"]) for r in ("0.2", "0.4")},
    "dpo": ("dpo", ["--gmt_mask_ratio", "0"]),
    "gmt-dpo-0.2": ("dpo", ["--gmt_mask_ratio", "0.2"]),
}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, two-sided 95 %


def train_command(arm: str, seed: int, out_dir: Path, args) -> list[str]:
    method, overrides = ARMS[arm]
    common = ["--output_dir", str(out_dir), "--seed", str(seed), "--save_strategy", "no",
              "--logging_steps", "10", "--report_to", "none", "--disable_tqdm", "true"]
    if method == "sft":
        recipe = ["--config", "recipes/quickstart/sft.yaml", "--max_steps", str(args.sft_steps),
                  "--learning_rate", "1e-4"]
    else:
        recipe = ["--config", "recipes/quickstart/dpo.yaml", "--max_steps", str(args.dpo_steps),
                  "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                  "--learning_rate", "1e-5"]
    return ["gmt-align", method, *recipe, *common, *overrides]


def run_one(arm: str, seed: int, run_dir: Path, args) -> None:
    """Train (unless ``base``) and evaluate one arm in this process; write ``result.json`` last."""
    sys.path.insert(0, str(ROOT))
    from gmt_align.cli import main as cli
    from gmt_align.evaluate import evaluate

    run_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"arm": arm, "seed": seed, "method": ARMS[arm][0]}
    model_dir = Path(MODEL)
    if ARMS[arm][0] != "none":
        model_dir = run_dir / "model"
        command = train_command(arm, seed, model_dir, args)
        result["command"] = " ".join(command)
        t0 = time.perf_counter()
        if cli(command[1:]) != 0:
            raise SystemExit(f"{arm} seed {seed}: training failed")
        result["train_s"] = round(time.perf_counter() - t0, 1)
        log = model_dir / "gmt_stats.jsonl"
        if log.is_file():
            shutil.copy(log, run_dir / "gmt_stats.jsonl")
    t0 = time.perf_counter()
    result["eval"] = {}
    for task in TASKS:
        summary = evaluate(model_dir, task, n=args.eval_n, output=run_dir / f"eval_{task}.jsonl",
                           log=lambda line: print(line, flush=True))
        result["eval"][task] = {k: summary[k] for k in ("n", "correct", "accuracy", "ci95")}
    result["eval_s"] = round(time.perf_counter() - t0, 1)
    if model_dir != Path(MODEL) and not args.keep_models:
        shutil.rmtree(model_dir)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, run_dir / "result.json")


def schedule(args) -> list[tuple[str, int]]:
    """Seed-major order, so a stopped study holds whole seeds; ``base`` once."""
    todo = []
    for i, seed in enumerate(args.seeds):
        for arm in args.arms:
            if arm == "base" and i > 0:
                continue
            todo.append((arm, seed))
    return todo


def check_settings(args) -> None:
    """Refuse to mix results of other settings into ``OUT``; record the settings on first use."""
    settings = {"sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps, "eval_n": args.eval_n}
    path = args.out / "study.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            raise SystemExit(f"study: {args.out} holds runs made with {before}, not {settings}; "
                             "choose another --out")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings) + "\n")


def drive(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "torchinductor"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    todo = [(a, s) for a, s in schedule(args) if not (args.out / "runs" / f"{a}-s{s}" / "result.json").is_file()]
    print(f"study: {len(todo)} runs to do in {args.out} ({args.jobs} at a time)", flush=True)
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failed = []
    t_start = time.perf_counter()
    while todo or running:
        while todo and len(running) < args.jobs:
            arm, seed = todo.pop(0)
            run_dir = args.out / "runs" / f"{arm}-s{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--_run", arm, str(seed), "--out", str(args.out),
                   "--sft_steps", str(args.sft_steps), "--dpo_steps", str(args.dpo_steps),
                   "--eval_n", str(args.eval_n), *(["--keep_models"] if args.keep_models else [])]
            with open(run_dir / "log.txt", "w") as log:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((arm, seed, proc, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            arm, seed, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see log.txt)"
            if proc.returncode:
                failed.append(f"{arm}-s{seed}")
            print(f"[{(time.perf_counter() - t_start) / 60:6.1f} min] {arm} seed {seed}: {status} "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"study: {len(failed)} runs failed: {', '.join(failed)}")


# ------------------------------------------------------------------------------ report


def collect(out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from gmt_align.evaluate import wilson_interval
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    arms = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        row: dict = {"arm": arm, "seeds": sorted(r["seed"] for r in mine), "tasks": {}}
        for task in (*TASKS, "both"):
            accs, k, n = [], 0, 0
            for r in mine:
                parts = TASKS if task == "both" else (task,)
                kk = sum(r["eval"][t]["correct"] for t in parts)
                nn = sum(r["eval"][t]["n"] for t in parts)
                accs.append(kk / nn)
                k, n = k + kk, n + nn
            mean = statistics.fmean(accs)
            half = T95[len(accs) - 1] * statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else None
            row["tasks"][task] = {"mean": mean, "per_seed": accs, "seed_ci95_half": half,
                                  "pooled": [k, n], "pooled_wilson95": list(wilson_interval(k, n))}
        row["per_seed_both"] = {r["seed"]: sum(r["eval"][t]["correct"] for t in TASKS)
                                / sum(r["eval"][t]["n"] for t in TASKS) for r in mine}
        for key in ("train_s", "eval_s"):
            values = [r[key] for r in mine if key in r]
            row[key] = statistics.fmean(values) if values else None
        arms[arm] = row
    for arm, row in arms.items():  # paired by seed against the vanilla arm of the same method
        ref = arms.get("dpo" if arm.startswith("gmt-dpo") else "sft")
        if ref is None or arm in ("base", "sft", "dpo"):
            continue
        diffs = [acc - ref["per_seed_both"][seed] for seed, acc in row["per_seed_both"].items()
                 if seed in ref["per_seed_both"]]
        if diffs:
            half = T95[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
            row["vs_vanilla"] = {"against": ref["arm"], "mean": statistics.fmean(diffs), "ci95_half": half,
                                 "n": len(diffs)}
    return arms


def report(args) -> None:
    arms = collect(args.out)
    (args.out / "results.json").write_text(json.dumps(arms, indent=1) + "\n")

    def cell(t: dict) -> str:
        half = "" if t["seed_ci95_half"] is None else f" ± {t['seed_ci95_half']:.3f}"
        lo, hi = t["pooled_wilson95"]
        return f"{t['mean']:.3f}{half} [{lo:.3f}, {hi:.3f}]"

    lines = ["| arm | seeds | " + " | ".join(TASKS) + " | both | per-seed (both) | vs vanilla (both, paired) "
             "| train s | eval s |",
             "|---|---|" + "---|" * (len(TASKS) + 5)]
    for arm, row in arms.items():
        per_seed = ", ".join(f"{a:.3f}" for a in row["tasks"]["both"]["per_seed"])
        timing = [f"{row[k]:.0f}" if row[k] is not None else "–" for k in ("train_s", "eval_s")]
        vs = row.get("vs_vanilla")
        delta = "–" if vs is None else f"{vs['mean']:+.3f}" + (
            "" if vs["ci95_half"] is None else f" ± {vs['ci95_half']:.3f}") + f" ({vs['against']})"
        lines.append(f"| {arm} | {len(row['seeds'])} | " + " | ".join(cell(row["tasks"][t]) for t in TASKS)
                     + f" | {cell(row['tasks']['both'])} | {per_seed} | {delta} | {timing[0]} | {timing[1]} |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(
        "Accuracy: mean over seeds ± t-interval half-width over seeds (95 %), "
        "[pooled 95 % Wilson interval over all seeds' problems]. vs vanilla: the mean over seeds of "
        "(arm − vanilla of the same method and seed) ± its t-interval half-width (95 %).\n\n" + table + "\n")
    print(table)
    plot(arms, args.out / "accuracy_vs_ratio.png")


def plot(arms: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, label, marker in (("gmt", "GMT (largest |g| kept)", "o"), ("random", "random mask", "s")):
        pts = [(0.0, arms["sft"])] if "sft" in arms else []
        pts += [(float(a.split("-")[1]), row) for a, row in arms.items()
                if a.startswith(prefix + "-") and "dpo" not in a]
        if len(pts) < 2:
            continue
        pts.sort(key=lambda p: p[0])
        xs = [x for x, _ in pts]
        ys = [row["tasks"]["both"]["mean"] for _, row in pts]
        errs = [row["tasks"]["both"]["seed_ci95_half"] or 0.0 for _, row in pts]
        ax.errorbar(xs, ys, yerr=errs, marker=marker, capsize=3, label=label + " (mean ± 95 % t)")
        for x, row in pts:  # every seed, so that two-seed intervals do not hide the data
            seeds = row["tasks"]["both"]["per_seed"]
            ax.scatter([x] * len(seeds), seeds, marker=marker, s=12, alpha=0.5,
                       color=ax.lines[-1].get_color() if ax.lines else None)
    if "base" in arms:
        ax.axhline(arms["base"]["tasks"]["both"]["mean"], color="grey", ls="--", label="base model")
    ax.set_ylim(0.0, 0.5)
    ax.set_xlabel("mask ratio (0 = vanilla SFT)")
    ax.set_ylabel("accuracy, basic_arithmetic + chain_sum")
    ax.set_title("SmolLM2-135M-Instruct, 60 SFT steps; dots: single seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--sft_steps", type=int, default=60)
    parser.add_argument("--dpo_steps", type=int, default=30)
    parser.add_argument("--eval_n", type=int, default=200)
    parser.add_argument("--keep_models", action="store_true")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--_run", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.sft_steps < 1 or args.dpo_steps < 1 or args.eval_n < 1:
        parser.error("--jobs, --sft_steps, --dpo_steps and --eval_n must be >= 1")
    args.out = args.out.resolve()
    os.chdir(ROOT)
    if args._run:
        arm, seed = args._run
        run_one(arm, int(seed), args.out / "runs" / f"{arm}-s{seed}", args)
        return
    if not (ROOT / MODEL / "config.json").is_file():
        parser.error(f"{MODEL} missing: run `python -m gmt_align.quickstart` (or `make quickstart`) first")
    if not args.report_only:
        check_settings(args)
        drive(args)
    report(args)


if __name__ == "__main__":
    main()
