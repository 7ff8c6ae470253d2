"""A GRPO miniature sized by its own noise: does GMT keep GRPO's gain at high mask ratios, and does
magnitude selection beat random masks there? (issue 32; docs/results.md holds the results.)

    .venv/bin/python benchmarks/grpo_study.py [--out benchmarks/study_results/grpo] [--seeds 1 2 3]
                                              [--arms ARM ...] [--jobs 1] [--plan] [--report_only]

Regime (:data:`REGIME`, recorded in ``OUT/study.json``; a folder holding another regime is refused):
``gmt-align grpo`` on the quickstart GRPO recipe (SmolLM2-135M-Instruct, the ``arithmetic_accuracy``
reward) with the first ``train_n`` prompts of the quickstart GRPO set, ``steps`` optimizer steps of
``prompts_per_step`` prompts x ``generations`` samples, constant learning rate ``lr``, fp32, one
thread. The seed (the recipe's ``seed``: prompt order, sampling, random masks) is the only thing that
changes between repeats, so arms are compared paired by seed.

Arms (:data:`ARMS`): ``base`` (untrained, once), vanilla GRPO (``grpo``), GMT (magnitude, tensor
granularity, gradient mode) at mask ratios 0.9, 0.95, 0.99, and random masks at the same ratios.

Metric, on held-out problems (``EVAL_SEED``, every training prompt removed; the same problems and the
same sampling seed for every model): the held-out reward, i.e. the accuracy of ``samples`` answers
sampled per problem at the training temperature (``eval_n`` problems per task of basic_arithmetic and
chain_sum), and the greedy accuracy. Each run writes ``OUT/runs/ARM-sSEED.json`` (commit them) and
deletes its weights; a run whose file exists is skipped. The report (``OUT/results.md``,
``OUT/results.json``) pairs each trained arm with the base model (one model: its one run serves every
seed) and with vanilla GRPO, and each GMT arm with its random twin, by seed. ``--jobs N`` runs N
children of one thread each side by side, seed after seed (:func:`study_stats.drive`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from study_stats import MIN_SEEDS, drive, interval, paired, seeds_for, write_run  # noqa: E402

MODEL = ".cache/quickstart/SmolLM2-135M-Instruct"
TASKS = ("basic_arithmetic", "chain_sum")
# Answers of up to 32 tokens: the base model's greedy accuracy is 0.175 there (docs/results.md), so that
# GRPO's groups see rewards of both kinds; at the quickstart recipe's 16 most answers are cut off.
# The learning rate: a one-seed pilot (30 steps) moved the held-out reward from the base model's 0.095 to 0.145
# at 1e-5 and to 0.025 at 5e-5 (docs/results.md).
REGIME = {"train_n": 256, "steps": 30, "prompts_per_step": 2, "generations": 4, "max_completion_length": 32,
          "temperature": 1.0, "lr": 1e-5, "eval_n": 50, "samples": 4, "eval_sampling_seed": 0}
TARGET = 0.02  # the half-width we want for a paired difference of held-out reward
RATIOS = ("0.9", "0.95", "0.99")
ARMS: dict[str, list[str]] = {"base": [], "grpo": ["--gmt_mask_ratio", "0"]}
for _ratio in RATIOS:
    ARMS[f"gmt-{_ratio}"] = ["--gmt_mask_ratio", _ratio, "--gmt_selection", "magnitude"]
    ARMS[f"random-{_ratio}"] = ["--gmt_mask_ratio", _ratio, "--gmt_selection", "random"]


def recipe(out: Path) -> Path:
    """The quickstart GRPO recipe on the first ``train_n`` prompts (a recipe file: what a user runs)."""
    import yaml

    data = out / "data" / f"grpo_train_{REGIME['train_n']}.jsonl"
    path = out / "data" / "grpo.yaml"
    if not path.is_file():
        rows = (ROOT / ".cache" / "quickstart" / "data" / "grpo_train.jsonl").read_text().splitlines()
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("\n".join(rows[:REGIME["train_n"]]) + "\n")
        fields = yaml.safe_load((ROOT / "recipes" / "quickstart" / "grpo.yaml").read_text())
        fields["datasets"] = [{"path": "json", "data_files": shown(data)}]
        path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def shown(path: Path) -> str:
    """``path`` relative to the repository's root where it lies inside it (the runs start there), so
    that the committed recipe and run files name no machine's folders."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def train_command(arm: str, seed: int, model_dir: Path, out: Path) -> list[str]:
    r = REGIME
    return ["gmt-align", "grpo", "--config", shown(recipe(out)), "--max_steps", str(r["steps"]),
            "--per_device_train_batch_size", str(r["prompts_per_step"] * r["generations"]),
            "--gradient_accumulation_steps", "1", "--num_generations", str(r["generations"]),
            "--max_completion_length", str(r["max_completion_length"]), "--temperature", str(r["temperature"]),
            "--learning_rate", f"{r['lr']:g}", "--lr_scheduler_type", "constant", "--output_dir", shown(model_dir),
            "--seed", str(seed), "--save_strategy", "no", "--logging_steps", "10", "--report_to", "none",
            "--disable_tqdm", "true", *ARMS[arm]]


def held_out_reward(model_dir: Path) -> dict:
    """Per task: the reward of ``samples`` sampled answers and the greedy answer to each held-out problem."""
    import torch

    from gmt_align.evaluation.evaluate import generate, load, reasoning_gym_set, render
    from gmt_align.evaluation.problems import EVAL_SEED
    from gmt_align.evaluation.rewards import arithmetic_accuracy

    model, tokenizer = load(model_dir)
    result = {}
    for task in TASKS:
        examples = reasoning_gym_set(task, REGIME["eval_n"], EVAL_SEED).examples
        texts = [render(tokenizer, e) for e in examples]
        greedy = generate(model, tokenizer, texts, batch_size=16, max_new_tokens=REGIME["max_completion_length"],
                          desc=f"{task} greedy")
        torch.manual_seed(REGIME["eval_sampling_seed"])  # the same draws for every model
        sampled = []
        with torch.inference_mode():
            for start in range(0, len(texts), 16):
                batch = tokenizer(texts[start:start + 16], return_tensors="pt", padding=True, add_special_tokens=False)
                tokens = model.generate(**batch, do_sample=True, temperature=REGIME["temperature"], top_k=0, top_p=1.0,
                                        max_new_tokens=REGIME["max_completion_length"],
                                        num_return_sequences=REGIME["samples"], pad_token_id=tokenizer.pad_token_id)
                sampled += tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        k = REGIME["samples"]
        per_sample = arithmetic_accuracy(sampled, answer=[e.expected for e in examples for _ in range(k)],
                                         task=[task] * len(sampled))
        per_problem = [statistics.fmean(per_sample[i * k:(i + 1) * k]) for i in range(len(examples))]
        greedy_scores = arithmetic_accuracy(greedy, answer=[e.expected for e in examples], task=[task] * len(greedy))
        result[task] = {"n": len(examples), "reward": statistics.fmean(per_problem),
                        "greedy_accuracy": statistics.fmean(greedy_scores), "per_problem": per_problem}
    return result


def run_one(arm: str, seed: int, out: Path) -> None:
    """Train (unless ``base``), evaluate and write ``OUT/runs/ARM-sSEED.json`` last."""
    sys.path.insert(0, str(ROOT))
    from gmt_align.cli import main as cli

    scratch = ROOT / "outputs" / "study-scratch" / f"{out.name}-{arm}-s{seed}"
    run: dict = {"arm": arm, "seed": seed}
    model_dir = Path(MODEL)
    if arm != "base":
        model_dir = scratch / "model"
        command = train_command(arm, seed, model_dir, out)
        run["command"] = " ".join(command)
        t0 = time.perf_counter()
        if cli(command[1:]) != 0:
            raise SystemExit(f"{arm} seed {seed}: training failed")
        run["train_s"] = round(time.perf_counter() - t0, 1)
        stats_file = model_dir / "gmt_stats.jsonl"  # absent when no step was logged
        stats = [json.loads(line) for line in stats_file.read_text().splitlines()] if stats_file.is_file() else []
        run["kept_fraction"] = [round(s["gmt/kept_fraction"], 4) for s in stats if "gmt/kept_fraction" in s]
    t0 = time.perf_counter()
    run["held_out"] = held_out_reward(model_dir)
    run["eval_s"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(scratch, ignore_errors=True)
    write_run(out, arm, seed, run)


def metrics(run: dict) -> dict:
    held = run["held_out"].values()
    return {"reward": statistics.fmean(t["reward"] for t in held),
            "greedy_accuracy": statistics.fmean(t["greedy_accuracy"] for t in held)}


def show(d: dict | None) -> str:
    """A paired difference as the tables print it: mean ± 95 % half-width, 'resolved', (n=seeds)."""
    if d is None:
        return "–"
    half = "" if d["ci95_half"] is None else f" ± {d['ci95_half']:.3f}"
    return f"{d['mean']:+.3f}{half}{' resolved' if d['resolved'] else ''} (n={d['n']})"


def report(out: Path) -> dict:
    """The table: each trained arm against the base model, against vanilla GRPO and (GMT) against its
    random twin, paired by seed. The base model is one model, evaluated with the same problems and
    sampling seed whatever the seed, so its one run is every seed's reference."""
    if not any((out / "runs").glob("*.json")):
        raise SystemExit(f"grpo_study: no runs in {out / 'runs'} to report")
    by_arm: dict[str, dict[int, dict]] = {}
    for path in sorted((out / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        by_arm.setdefault(run["arm"], {})[run["seed"]] = {**metrics(run), "kept": run.get("kept_fraction")}
    base = next(iter(by_arm["base"].values())) if "base" in by_arm else None
    rows, lines = {}, ["| arm | seeds | held-out reward | greedy accuracy | reward vs base | reward vs grpo | "
                       "reward vs random twin | greedy vs base | greedy vs grpo | seeds for ±0.02 |",
                       "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        if arm not in by_arm:
            continue
        seeds = by_arm[arm]
        row = {m: interval([v[m] for v in seeds.values()]) for m in ("reward", "greedy_accuracy")}
        row["seeds"] = sorted(seeds)
        row["per_seed"] = {str(s): seeds[s] for s in sorted(seeds)}
        if arm != "base" and base is not None:
            base_by_seed = {s: base for s in seeds}
            row["vs_base"] = paired(seeds, base_by_seed, "reward")
            row["greedy_vs_base"] = paired(seeds, base_by_seed, "greedy_accuracy")
        if arm not in ("base", "grpo") and "grpo" in by_arm:
            row["vs_grpo"] = paired(seeds, by_arm["grpo"], "reward")
            row["greedy_vs_grpo"] = paired(seeds, by_arm["grpo"], "greedy_accuracy")
        twin = arm.replace("gmt-", "random-") if arm.startswith("gmt-") else None
        if twin in by_arm:
            row["vs_random"] = paired(seeds, by_arm[twin], "reward")
        rows[arm] = row
        vs = row.get("vs_grpo") or row.get("vs_base")
        need = seeds_for(vs["sd"], TARGET) if vs else None
        lines.append(f"| {arm} | {len(seeds)} | {row['reward']['mean']:.3f} | {row['greedy_accuracy']['mean']:.3f} | "
                     f"{show(row.get('vs_base'))} | {show(row.get('vs_grpo'))} | {show(row.get('vs_random'))} | "
                     f"{show(row.get('greedy_vs_base'))} | {show(row.get('greedy_vs_grpo'))} | {need or '–'} |")
    note = (f"Held-out reward: the accuracy of {REGIME['samples']} sampled answers per problem; paired by seed; 95 % "
            f"t intervals over seeds; 'resolved' needs the interval to exclude 0 and at least {MIN_SEEDS} seeds; "
            f"seeds for ±{TARGET}: the reward against grpo (grpo: against base). Regime: {json.dumps(REGIME)}.")
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    (out / "results.json").write_text(json.dumps({"regime": REGIME, "arms": rows}, indent=1) + "\n")
    print("\n".join(lines) + "\n\n" + note)
    return rows


def check_settings(out: Path, record: bool = True) -> None:
    path = out / "study.json"
    if path.is_file():
        if json.loads(path.read_text()) != REGIME:
            raise SystemExit(f"grpo_study: {out} holds runs of another regime; choose another --out")
    elif record:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(REGIME) + "\n")


def runs_to_do(args) -> list[tuple[str, int]]:
    """Seed-major (``base`` once, at the first seed): a study stopped early has every arm at the same seeds."""
    return [(a, s) for s in args.seeds for a in args.arms if not (a == "base" and s != args.seeds[0])
            and not (args.out / "runs" / f"{a}-s{s}.json").is_file()]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "study_results" / "grpo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=1, help="child processes (one thread each) at a time")
    parser.add_argument("--plan", action="store_true", help="print the runs still to do and exit")
    parser.add_argument("--report_only", action="store_true")
    for key in ("steps", "train_n", "eval_n", "samples"):
        parser.add_argument(f"--{key}", type=int, default=REGIME[key])
    parser.add_argument("--lr", type=float, default=REGIME["lr"])
    parser.add_argument("--_run", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    REGIME.update({key: getattr(args, key) for key in ("steps", "train_n", "eval_n", "samples", "lr")})
    args.out = args.out.resolve()
    os.chdir(ROOT)
    if args._run:
        run_one(args._run[0], int(args._run[1]), args.out)
        return
    if args.plan:
        check_settings(args.out, record=False)
        todo = runs_to_do(args)
        print(f"grpo_study: {len(todo)} runs to do in {args.out}: " + (", ".join(f"{a}-s{s}" for a, s in todo) or "none"))
        return
    if not args.report_only:
        check_settings(args.out)
        drive(__file__, args.out, runs_to_do(args), args.jobs,
              [f"--{k}={getattr(args, k)}" for k in ("steps", "train_n", "eval_n", "samples", "lr")])
    report(args.out)


if __name__ == "__main__":
    main()
