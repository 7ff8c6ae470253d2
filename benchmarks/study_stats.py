"""The statistics, table and plot of benchmarks/study.py: each arm paired by seed with vanilla.

A paired difference is (arm − reference) on the same seed (same data order), averaged over the
seeds both ran; its 95 % interval is the Student t interval over those seeds. A difference is
*resolved* when that interval excludes 0 and at least :data:`MIN_SEEDS` seeds hold it (two seeds whose
differences happen to be equal — accuracy moves in steps of 1/200 — give a zero-width interval that
says nothing). ``seeds_for(h)`` is the number of seeds whose t interval
would have half-width ``h`` at the observed spread of the differences.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import t as student_t

VANILLA = ("sft", "sft-lr0.5", "sft-lr0.25")
MIN_SEEDS = 3
TARGET_NLL = 0.02  # the half-width we want for a paired NLL difference
PREFERENCE = ("preference_accuracy", "reward_margin", "ranking_accuracy")  # DPO arms (vs the base model)


def write_run(out: Path, arm: str, seed: int, result: dict) -> Path:
    """``OUT/runs/ARM-sSEED.json``, written whole (a temporary file renamed into place): a run whose
    file exists is done, so a killed study never leaves half a result."""
    path = out / "runs" / f"{arm}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def drive(script: str, out: Path, todo: list[tuple[str, int]], jobs: int, child_args: list[str] = ()) -> None:
    """Run ``script --_run ARM SEED --out OUT *child_args`` for each (arm, seed) in ``todo``, ``jobs``
    child processes of one thread each at a time; each child's output goes to
    ``outputs/study-scratch/logs/OUT-ARM-sSEED.txt``. Exits naming the runs that failed."""
    root = Path(script).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(root)}
    name = Path(script).stem
    todo = list(todo)
    print(f"{name}: {len(todo)} runs to do in {out} ({jobs} at a time)", flush=True)
    logs = root / "outputs" / "study-scratch" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: list = []
    failed = []
    t_start = time.perf_counter()
    while todo or running:
        while todo and len(running) < jobs:
            arm, seed = todo.pop(0)
            cmd = [sys.executable, script, "--_run", arm, str(seed), "--out", str(out), *child_args]
            with open(logs / f"{out.name}-{arm}-s{seed}.txt", "w") as log:
                proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((arm, seed, proc, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            arm, seed, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {logs})"
            if proc.returncode:
                failed.append(f"{arm}-s{seed}")
            print(f"[{(time.perf_counter() - t_start) / 60:6.1f} min] {arm} seed {seed}: {status} "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"{name}: {len(failed)} runs failed: {', '.join(failed)}")


def t95(df: int) -> float:
    """The two-sided 95 % Student t quantile with ``df`` degrees of freedom."""
    return float(student_t.ppf(0.975, df))


def interval(values: list[float]) -> dict:
    """Mean, sd and the 95 % t half-width over seeds (None for one value)."""
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else None
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else None
    return {"mean": statistics.fmean(values), "sd": sd, "ci95_half": half, "n": n}


def seeds_for(sd: float | None, half: float) -> int | None:
    """Seeds needed for a t interval of half-width ``half`` at spread ``sd`` (fixed-point on df)."""
    if sd is None:
        return None
    n = 2
    while n < 1000 and t95(n - 1) * sd / math.sqrt(n) > half:
        n += 1
    return n


def run_metrics(run: dict) -> dict:
    """One run's figures: NLL per task and both (equal n: the mean of the two), accuracy."""
    m = {f"nll_{t}": v["nll"] for t, v in run["nll"].items()}
    m["nll"] = statistics.fmean(v["nll"] for v in run["nll"].values())
    if all("per_example" in v for v in run["nll"].values()):  # both tasks, equal n: their mean is m["nll"]
        m["per_example"] = [x for v in run["nll"].values() for x in v["per_example"]]
    if "accuracy" in run:
        m["accuracy"] = sum(v["correct"] for v in run["accuracy"].values()) / sum(
            v["n"] for v in run["accuracy"].values())
    if "preference" in run:  # DPO: against the base model (its own figures: ranking accuracy)
        for key in ("preference_accuracy", "reward_margin", "ranking_accuracy", "reference_ranking_accuracy"):
            if all(key in v for v in run["preference"].values()):
                m[key] = statistics.fmean(v[key] for v in run["preference"].values())
    return m


def problem_half(a: list[float] | None, b: list[float] | None) -> float | None:
    """95 % normal half-width, over held-out problems, of one seed's paired NLL difference: how much of
    it the choice of problems could make (None without per-problem figures)."""
    if not a or not b:
        return None
    diffs = [x - y for x, y in zip(a, b)]
    return 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def paired(a: dict, b: dict, metric: str) -> dict | None:
    """(a − b) by seed over the seeds both hold."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s][metric] - b[s][metric] for s in seeds if metric in a[s] and metric in b[s]]
    if not diffs:
        return None
    out = interval(diffs)
    half = out["ci95_half"]
    out.update(seeds=seeds, diffs=diffs, resolved=len(diffs) >= MIN_SEEDS and abs(out["mean"]) > half)
    if metric == "nll":
        halves = [h for h in (problem_half(a[s].get("per_example"), b[s].get("per_example")) for s in seeds)
                  if h is not None]
        out["problem_half"] = statistics.fmean(halves) if halves else None
    return out


def collect(out: Path, arms: dict) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    by_arm: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = {**run_metrics(r), "train_s": r.get("train_s"),
                                                      "eval_s": r.get("eval_s")}
    table = {}
    vanilla = {a: by_arm[a] for a in VANILLA if a in by_arm}
    best = min(vanilla, key=lambda a: statistics.fmean(v["nll"] for v in vanilla[a].values())) if vanilla else None
    for arm in arms:
        if arm not in by_arm:
            continue
        seeds = by_arm[arm]
        row = {"seeds": sorted(seeds), "per_seed": seeds}
        for metric in ("nll", "accuracy", *PREFERENCE):
            values = [v[metric] for v in seeds.values() if metric in v]
            if values:
                row[metric] = interval(values)
        if arm not in ("base", "sft", "dpo"):
            ref = "dpo" if "dpo" in arm else "sft"
            if ref in by_arm:
                row["vs_vanilla"] = {m: paired(seeds, by_arm[ref], m) for m in ("nll", "accuracy", *PREFERENCE)}
        if best and best != "sft" and arms[arm][0] == "sft" and arm not in VANILLA:
            row["vs_best_vanilla"] = {"against": best, "nll": paired(seeds, by_arm[best], "nll")}
        if arm.startswith("gmt-") and "dpo" not in arm:
            twin = "random-" + arm[len("gmt-"):]
            if twin in by_arm:
                row["vs_random"] = {"against": twin, **{m: paired(seeds, by_arm[twin], m) for m in ("nll", "accuracy")}}
        times = [v["train_s"] for v in seeds.values() if v.get("train_s")]
        row["train_s"] = statistics.fmean(times) if times else None
        table[arm] = row
    return {"arms": table, "best_vanilla": best}


def _diff(d: dict | None, digits: int = 3) -> str:
    if d is None:
        return "–"
    half = "" if d["ci95_half"] is None else f" ± {d['ci95_half']:.{digits}f}"
    return f"{d['mean']:+.{digits}f}{half}{' **resolved**' if d['resolved'] else ''} (n={d['n']})"


def report(out: Path, arms: dict, tasks) -> dict:
    data = collect(out, arms)
    def lean(x):  # results.json without the per-problem lists (they stay in the run files)
        if isinstance(x, dict):
            return {k: lean(v) for k, v in x.items() if k != "per_example"}
        return [lean(v) for v in x] if isinstance(x, list) else x

    (out / "results.json").write_text(json.dumps(lean(data), indent=1, default=str) + "\n")
    lines = ["| arm | seeds | NLL (mean ± 95 % t) | NLL sd | per-seed NLL | NLL vs vanilla (paired) | NLL vs random "
             "(paired) | accuracy | accuracy vs vanilla | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, row in data["arms"].items():
        nll = row.get("nll")
        cell = "–" if nll is None else f"{nll['mean']:.4f}" + (
            "" if nll["ci95_half"] is None else f" ± {nll['ci95_half']:.4f}")
        sd = "–" if not nll or nll["sd"] is None else f"{nll['sd']:.4f}"
        per = ", ".join(f"{row['per_seed'][s]['nll']:.3f}" for s in row["seeds"])
        acc = row.get("accuracy")
        acc_cell = "–" if acc is None else f"{acc['mean']:.3f}"
        vs = row.get("vs_vanilla", {})
        vr = row.get("vs_random", {})
        ts = "–" if row["train_s"] is None else f"{row['train_s']:.0f}"
        lines.append(f"| {arm} | {len(row['seeds'])} | {cell} | {sd} | {per} | {_diff(vs.get('nll'), 4)} | "
                     f"{_diff(vr.get('nll'), 4)} | {acc_cell} | {_diff(vs.get('accuracy'))} | {ts} |")
    dpo = {arm: row for arm, row in data["arms"].items() if "preference_accuracy" in row}
    if dpo:  # DPO arms: held-out preference figures against the base model, and the base's own ranking
        lines += ["", "| DPO arm | seeds | preference accuracy vs base | reward margin | ranking accuracy "
                  "(the base's) | ranking vs vanilla DPO (paired) |", "|---|---|---|---|---|---|"]
        for arm, row in dpo.items():
            base_rank = [row["per_seed"][s].get("reference_ranking_accuracy") for s in row["seeds"]]
            rank = row.get("ranking_accuracy")
            lines.append(f"| {arm} | {len(row['seeds'])} | {row['preference_accuracy']['mean']:.3f} | "
                         f"{row['reward_margin']['mean']:+.4f} | "
                         + ("–" if rank is None else f"{rank['mean']:.3f} ({base_rank[0]:.3f})")
                         + f" | {_diff(row.get('vs_vanilla', {}).get('ranking_accuracy'))} |")
    table = "\n".join(lines)
    notes = [f"Best vanilla learning rate by mean NLL: {data['best_vanilla']}."]
    for arm, row in data["arms"].items():
        d = row.get("vs_vanilla", {}).get("nll")
        if d and d["sd"] is not None:
            notes.append(f"{arm}: sd of the paired NLL difference {d['sd']:.4f} -> "
                         f"{seeds_for(d['sd'], TARGET_NLL)} seeds for ±{TARGET_NLL}")
        b = row.get("vs_best_vanilla")
        if b and b["nll"]:
            notes.append(f"{arm} vs {b['against']} (best vanilla): NLL {_diff(b['nll'], 4)}")
    for arm, row in data["arms"].items():
        d = row.get("vs_vanilla", {}).get("nll")
        if d and d.get("problem_half") is not None:
            notes.append(f"{arm}: the problems' share of one seed's paired NLL difference: ± {d['problem_half']:.4f} "
                         "(95 %, over held-out problems, mean over seeds)")
    sft_runs = data["arms"].get("sft", {}).get("per_seed", {})
    with_problems = [s for s in sorted(sft_runs) if "per_example" in sft_runs[s]]
    halves = [problem_half(sft_runs[a]["per_example"], sft_runs[b]["per_example"])
              for i, a in enumerate(with_problems) for b in with_problems[i + 1:]]
    if halves:
        notes.append(f"vanilla seed vs vanilla seed ({len(halves)} pairs): the problems' share of an NLL difference "
                     f"± {statistics.fmean(halves):.4f} (95 %, over held-out problems)")
    sft = data["arms"].get("sft", {}).get("nll")
    if sft and sft["sd"] is not None:
        notes.append(f"vanilla (sft) seed sd {sft['sd']:.4f}: an uncorrelated pair has sd ≈ {sft['sd'] * 2 ** 0.5:.4f}"
                     f" -> {seeds_for(sft['sd'] * 2 ** 0.5, TARGET_NLL)} seeds for ±{TARGET_NLL}")
    (out / "results.md").write_text(
        "NLL: mean per-token NLL of the reference answers, both tasks. ± is the 95 % t half-width over seeds; "
        "'paired' is the mean over seeds of (arm − other arm, same seed).\n\n" + table + "\n\n"
        + "\n".join(f"- {n}" for n in notes) + "\n")
    print(table)
    print("\n".join(notes))
    plot(data, out / "nll_vs_ratio.png")
    return data


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = data["arms"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = (("gmt-", "magnitude, gradient mode", "o", "C0", -0.008), ("random-", "random, gradient mode", "s", "C1", 0.008),
              ("gmt-update-", "magnitude, update mode", "^", "C2", -0.016),
              ("random-update-", "random, update mode", "v", "C3", 0.016))
    for prefix, label, marker, color, dx in series:
        pts = []
        for arm, row in arms.items():
            rest = arm[len(prefix):]
            if arm.startswith(prefix) and rest.replace(".", "", 1).isdigit() and "nll" in row:
                pts.append((float(rest), row))
        if not pts:
            continue
        pts.sort(key=lambda p: p[0])
        ax.plot([x + dx for x, _ in pts], [r["nll"]["mean"] for _, r in pts], marker=marker, color=color,
                label=label + " (mean)")
        for x, row in pts:  # every seed
            ys = [row["per_seed"][s]["nll"] for s in row["seeds"]]
            ax.scatter([x + dx] * len(ys), ys, marker=marker, s=14, alpha=0.45, color=color)
    for arm, color, ls in (("sft", "k", "-"), ("sft-lr0.5", "grey", "--"), ("sft-lr0.25", "grey", ":")):
        if arm in arms:
            ys = [arms[arm]["per_seed"][s]["nll"] for s in arms[arm]["seeds"]]
            ax.axhline(arms[arm]["nll"]["mean"], color=color, ls=ls, lw=1, label=f"vanilla {arm} (mean)")
            ax.scatter([0.0] * len(ys), ys, color=color, s=14, alpha=0.6)
    ax.set_xlim(-0.05, 0.95)  # the ratios the study can run, even before they have
    ax.set_xlabel("mask ratio (dots at 0: vanilla seeds)")
    ax.set_ylabel("held-out NLL per answer token (lower is better)")
    ax.set_title("SmolLM2-135M-Instruct, SFT; every dot one seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
