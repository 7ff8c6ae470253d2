"""A study sized by its own noise: does GMT beat vanilla SFT on SmolLM2-135M-Instruct, and does
magnitude selection beat random selection? (issue 18; docs/results.md holds the results.)

    .venv/bin/python benchmarks/study.py [--out benchmarks/study_results/sft-e3] [--seeds 1 2 3 4 5]
                                         [--arms ARM ...] [--jobs 1] [--report_only]
                                         [--dpo_lr 5e-6] [--dpo_train_n 128] [--dpo_epochs 3]

Regime (one for every SFT arm): the first ``TRAIN_N`` problems of the quickstart SFT set (a small,
fixed training set), ``EPOCHS`` epochs, batch 4 x 2 accumulation, AdamW, peak learning rate
``LR`` with 10 % linear warm-up and cosine decay, fp32, whole-chat loss (TRL's default), one thread.
The seed (``--seed`` of the recipe) sets the data order and the random masks; it is the only
thing that changes between repeats, so arms are compared paired by seed.

Arms (:data:`ARMS`): ``base`` (untrained, once); vanilla SFT at the learning rate x1, x0.5, x0.25
(``sft``, ``sft-lr0.5``, ``sft-lr0.25``; under AdamW in ``gradient`` mode a masked entry still moves
through its momentum, so masking also shrinks the step, and GMT counts only where it beats vanilla
at vanilla's best rate); GMT (magnitude, tensor granularity, gradient mode) at mask ratios 0.1 ...
0.9; random masks at 0.5 and 0.9; ``update`` mode (masked entries frozen) at 0.5 and 0.9 for
magnitude and random; vanilla DPO and GMT-DPO 0.5 (not in the default list: ``--arms dpo gmt-dpo-0.5``
with its own ``--out``; ``--dpo_lr``, ``--dpo_train_n`` (the first N quickstart preference pairs) and
``--dpo_epochs`` set the DPO regime, ``dpo_beta`` 0.1: see docs/results.md).

Metrics, on held-out problems (``EVAL_SEED``, every training prompt removed; the same problems for
every model): the mean per-token NLL of the reference answers, teacher-forced
(``gmt-align eval --metric nll``), ``EVAL_N`` per task of basic_arithmetic and chain_sum; greedy
accuracy on the first ``ACCURACY_N`` of them; for DPO arms the preference accuracy and reward
margin against the base model (``--metric preference``).

Each run is a child process (``--jobs`` at a time) that trains, evaluates, deletes the weights and
writes ``OUT/runs/ARM-sSEED.json`` (a few hundred bytes: commit them). A run whose file exists is
skipped, so a stopped study continues where it stopped. ``OUT/study.json`` records the regime; a
run with other settings is refused. The report (``OUT/results.md``, ``OUT/results.json``,
``OUT/nll_vs_ratio.png``) pairs each arm with vanilla by seed. Weights go to ``outputs/study-scratch``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from study_stats import drive, report, write_run  # noqa: E402

MODEL = ".cache/quickstart/SmolLM2-135M-Instruct"
TASKS = ("basic_arithmetic", "chain_sum")
REGIME = {"train_n": 128, "epochs": 3, "lr": 1e-4, "warmup": 0.1, "batch": 4, "accumulation": 2,
          "eval_n": 300, "accuracy_n": 100, "dpo_lr": 5e-6, "dpo_beta": 0.1, "dpo_train_n": 128, "dpo_epochs": 3}
# options that change the DPO regime (a DPO study with other values needs its own --out)
DPO_OPTIONS = ("dpo_lr", "dpo_train_n", "dpo_epochs")
# keys added to REGIME after a study.json was written: such a study ran with these values
LEGACY = {"dpo_train_n": 128, "dpo_epochs": 3}


def _gmt(ratio: str, selection: str = "magnitude", mode: str = "gradient") -> list[str]:
    return ["--gmt_mask_ratio", ratio, "--gmt_selection", selection, "--gmt_mode", mode]


# name -> (method, learning-rate factor, overrides). Ordered as the study runs them by default: the
# most informative comparisons first.
ARMS: dict[str, tuple[str, float, list[str]]] = {
    "sft": ("sft", 1.0, _gmt("0")),
    "gmt-0.5": ("sft", 1.0, _gmt("0.5")),
    "random-0.5": ("sft", 1.0, _gmt("0.5", "random")),
    "sft-lr0.5": ("sft", 0.5, _gmt("0")),
    "gmt-0.9": ("sft", 1.0, _gmt("0.9")),
    "random-0.9": ("sft", 1.0, _gmt("0.9", "random")),
    "sft-lr0.25": ("sft", 0.25, _gmt("0")),
    "gmt-0.1": ("sft", 1.0, _gmt("0.1")),
    "gmt-0.3": ("sft", 1.0, _gmt("0.3")),
    "gmt-0.7": ("sft", 1.0, _gmt("0.7")),
    "gmt-update-0.5": ("sft", 1.0, _gmt("0.5", mode="update")),
    "random-update-0.5": ("sft", 1.0, _gmt("0.5", "random", "update")),
    "gmt-update-0.9": ("sft", 1.0, _gmt("0.9", mode="update")),
    "random-update-0.9": ("sft", 1.0, _gmt("0.9", "random", "update")),
    "base": ("none", 1.0, []),
    "dpo": ("dpo", 1.0, _gmt("0")),
    "gmt-dpo-0.5": ("dpo", 1.0, _gmt("0.5")),
}


def train_data(method: str, out: Path) -> Path:
    """The fixed training set: the first ``train_n`` (DPO: ``dpo_train_n``) rows of the quickstart data."""
    count = REGIME["dpo_train_n" if method == "dpo" else "train_n"]
    path = out / "data" / f"{method}_train_{count}.jsonl"
    if not path.is_file():
        source = ROOT / ".cache" / "quickstart" / "data" / f"{method}_train.jsonl"
        rows = source.read_text().splitlines()[:count]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
    return path


def train_command(arm: str, seed: int, model_dir: Path, data: Path) -> list[str]:
    method, lr_factor, overrides = ARMS[arm]
    lr = (REGIME["dpo_lr"] if method == "dpo" else REGIME["lr"]) * lr_factor
    return ["gmt-align", method, "--config", f"recipes/quickstart/{method}.yaml",
            "--dataset_name", str(data), "--max_steps", "-1",
            "--num_train_epochs", str(REGIME["dpo_epochs" if method == "dpo" else "epochs"]),
            "--per_device_train_batch_size", str(REGIME["batch"]),
            "--gradient_accumulation_steps", str(REGIME["accumulation"]),
            "--learning_rate", f"{lr:g}", "--lr_scheduler_type", "cosine", "--warmup_steps", str(REGIME["warmup"]),
            *(["--beta", str(REGIME["dpo_beta"])] if method == "dpo" else []),
            "--output_dir", str(model_dir), "--seed", str(seed), "--save_strategy", "no", "--logging_steps", "8",
            "--report_to", "none", "--disable_tqdm", "true", *overrides]


def run_one(arm: str, seed: int, out: Path) -> None:
    """Train (unless ``base``), evaluate and write ``OUT/runs/ARM-sSEED.json`` last."""
    sys.path.insert(0, str(ROOT))
    from gmt_align.cli import main as cli
    from gmt_align.evaluation.evaluate import evaluate
    from gmt_align.evaluation.likelihood import evaluate_teacher_forced

    method = ARMS[arm][0]
    scratch = ROOT / "outputs" / "study-scratch" / f"{out.name}-{arm}-s{seed}"
    result: dict = {"arm": arm, "seed": seed, "method": method}
    model_dir = Path(MODEL)
    if method != "none":
        model_dir = scratch / "model"
        command = train_command(arm, seed, model_dir, train_data(method, out))
        result["command"] = " ".join(command)
        t0 = time.perf_counter()
        if cli(command[1:]) != 0:
            raise SystemExit(f"{arm} seed {seed}: training failed")
        result["train_s"] = round(time.perf_counter() - t0, 1)
        state = model_dir / "trainer_state.json"
        if state.is_file():
            history = json.loads(state.read_text())["log_history"]
            result["train_loss"] = [round(h["loss"], 4) for h in history if "loss" in h]
            result["steps"] = json.loads(state.read_text())["global_step"]
    t0 = time.perf_counter()
    say = lambda line: print(line, flush=True)  # noqa: E731
    for task in TASKS:
        nll = evaluate_teacher_forced(model_dir, task, "nll", n=REGIME["eval_n"], batch_size=16, log=say)
        result.setdefault("nll", {})[task] = {k: nll[k] for k in ("n", "nll", "nll_ci95", "nll_tokens")}
        # per problem (4 decimals, a few KB): how much of a paired difference is the choice of problems
        result["nll"][task]["per_example"] = [round(v, 4) for v in nll["per_example"]]
        if REGIME["accuracy_n"]:
            acc = evaluate(model_dir, task, n=REGIME["accuracy_n"], batch_size=16, log=say)
            result.setdefault("accuracy", {})[task] = {k: acc[k] for k in ("n", "correct", "accuracy")}
        if method == "dpo":
            pref = evaluate_teacher_forced(model_dir, task, "preference", n=REGIME["eval_n"], batch_size=16,
                                           ref_model=MODEL, beta=REGIME["dpo_beta"], log=say)
            result.setdefault("preference", {})[task] = {
                k: pref[k] for k in ("n", "preferred", "preference_accuracy", "reward_margin", "ranking_accuracy",
                                     "reference_ranking_accuracy")}
    result["eval_s"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(scratch, ignore_errors=True)
    write_run(out, arm, seed, result)


def check_settings(out: Path, record: bool = True) -> None:
    """Refuse to mix runs of another regime into ``out``; record the regime on first use (``record``)."""
    path = out / "study.json"
    if path.is_file():
        before = {**LEGACY, **json.loads(path.read_text())}
        if before != REGIME:
            raise SystemExit(f"study: {out} holds runs made with {before}, not {REGIME}; choose another --out")
        return
    if not record:
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(REGIME) + "\n")


def runs_to_do(args) -> list[tuple[str, int]]:
    """Arm-major in ``--arms`` order (``base`` once): the (arm, seed) pairs without a result file in ``--out``."""
    return [(a, s) for a in args.arms for s in (args.seeds[:1] if a == "base" else args.seeds)
            if not (args.out / "runs" / f"{a}-s{s}.json").is_file()]


def make_parser() -> argparse.ArgumentParser:
    """The command line of this script (the tests parse documented lines with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "study_results" / "sft-e3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--arms", nargs="+", default=[a for a in ARMS if ARMS[a][0] != "dpo"], choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--plan", action="store_true",
                        help="print the runs this command would do (those without a result file in --out) and exit")
    parser.add_argument("--dpo_lr", type=float, default=REGIME["dpo_lr"], help="DPO's peak learning rate")
    parser.add_argument("--dpo_train_n", type=int, default=REGIME["dpo_train_n"],
                        help="the first N quickstart preference pairs (at most 1000)")
    parser.add_argument("--dpo_epochs", type=int, default=REGIME["dpo_epochs"])
    parser.add_argument("--_run", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if not (args.dpo_lr > 0 and 1 <= args.dpo_train_n <= 1000 and args.dpo_epochs >= 1):
        parser.error("--dpo_lr must be > 0, --dpo_train_n 1..1000, --dpo_epochs >= 1")
    args.out = args.out.resolve()
    os.chdir(ROOT)
    if args._run:  # a child: the regime its driver recorded
        REGIME.update({**LEGACY, **json.loads((args.out / "study.json").read_text())})
        run_one(args._run[0], int(args._run[1]), args.out)
        return
    REGIME.update({k: getattr(args, k) for k in DPO_OPTIONS})
    if not (ROOT / MODEL / "config.json").is_file():
        parser.error(f"{MODEL} missing: run `python -m gmt_align.quickstart` (or `make quickstart`) first")
    if args.plan:  # nothing is written: a regime other than the folder's is refused all the same
        check_settings(args.out, record=False)
        todo = runs_to_do(args)
        print(f"study: {len(todo)} runs to do in {args.out}: " + (", ".join(f"{a}-s{s}" for a, s in todo) or "none"))
        return
    if not args.report_only:
        check_settings(args.out)
        drive(__file__, args.out, runs_to_do(args), args.jobs)
    report(args.out, ARMS, TASKS)


if __name__ == "__main__":
    main()
