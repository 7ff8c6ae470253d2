"""End-to-end training-step time of GMT-SFT vs vanilla SFT on the quickstart model.

    .venv/bin/python benchmarks/step_time.py [--rounds 3] [--steps 4] [--ratio 0.2] [--granularity tensor]
                                             [--zero 2|3]

Runs the quickstart recipe (SmolLM2-135M-Instruct, fp32, per-device batch 4) with
``gradient_accumulation_steps 4`` and the same seed in both arms; ``vanilla`` is the same recipe
with ``gmt_mask_ratio 0`` (the parent trainer, bit for bit). Each run is a fresh process that
trains ``1 + --steps`` optimizer steps; the first (which also compiles GMT's kernels) is not
timed. Runs alternate GMT / vanilla (which goes first alternates too) for ``--rounds`` rounds, so
load on the machine hits both alike. A step is timed from the Trainer's ``on_step_begin`` to ``on_step_end`` (forward, backward
and optimizer step of one accumulation window). Prints per-run medians and ends with one line

    gmt_vs_vanilla=<median GMT step / median vanilla step>

``--zero 2`` (or ``3``) runs every arm as 2 CPU ranks (gloo, ``DS_ACCELERATOR=cpu``, one thread per
rank, ``--use_cpu true``) under ``ds_configs/zero2.json`` (``zero3.json``), per-device batch 2 (the same
global batch of 4); rank 0's steps are timed. Each run then prints the median of GMT's selection and
masking per step too (``MaskEngine.apply``, summed over the groups or sub-groups of the step).

Needs the quickstart model and data (``make quickstart`` or ``python -m gmt_align.quickstart``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One training run in this process; writes the step durations to ``args.out``."""
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from transformers import TrainerCallback

    from gmt_align.cli.data import load_train_dataset
    from gmt_align.cli.recipe import parse_recipe
    from gmt_align.training.trainers import GMTSFTTrainer

    durations: list[float] = []
    applies: list[float] = []

    owner: list = []  # the trainer, once made

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            hooks = owner[0].mask_hooks
            if hooks is not None and not hasattr(hooks.engine, "timed"):  # attached at train begin
                engine, apply = hooks.engine, hooks.engine.apply
                engine.timed = True

                def timed_apply(*a, **k):
                    start = time.perf_counter()
                    try:
                        return apply(*a, **k)
                    finally:
                        self.selection += time.perf_counter() - start

                engine.apply = timed_apply
            self.selection = 0.0
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            durations.append(time.perf_counter() - self.start)
            applies.append(self.selection)

    zero = ["--deepspeed", f"ds_configs/zero{args.zero}.json", "--use_cpu", "true",
            "--per_device_train_batch_size", "2"] if args.zero else []
    script, training, model = parse_recipe("sft", [
        "--config", "recipes/quickstart/sft.yaml", "--output_dir", args.output_dir,
        "--max_steps", str(args.steps + 1), "--gradient_accumulation_steps", "4", "--logging_steps", "1000",
        "--gmt_mask_ratio", str(args.ratio), "--gmt_granularity", args.granularity, "--disable_tqdm", "true", *zero,
    ])
    training.model_init_kwargs = {"dtype": model.dtype}
    if args.zero:  # as `gmt-align sft` does: ZeRO-3 builds the model inside zero.Init, which must see both ranks
        from gmt_align.core.distributed import ensure_deepspeed_comm

        ensure_deepspeed_comm(training)
    trainer = GMTSFTTrainer(model=model.model_name_or_path, args=training,
                            train_dataset=load_train_dataset(script), callbacks=[StepTimer()])
    owner.append(trainer)
    trainer.train()
    if os.environ.get("RANK", "0") == "0":
        Path(args.out).write_text(json.dumps({"ratio": args.ratio, "durations": durations, "applies": applies}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after one untimed)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--granularity", default="tensor", choices=["tensor", "global"])
    parser.add_argument("--zero", type=int, choices=[2, 3], help="run each arm as 2 CPU ranks under this ZeRO stage")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not (ROOT / ".cache/quickstart/SmolLM2-135M-Instruct").exists():
        parser.error("quickstart model missing: run `make quickstart` or `python -m gmt_align.quickstart` first")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    steps: dict[str, list[float]] = {"gmt": [], "vanilla": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            arms = (("gmt", args.ratio), ("vanilla", 0.0))
            for arm, ratio in arms if round_index % 2 == 0 else arms[::-1]:  # who goes first alternates
                out = Path(tmp) / f"{arm}{round_index}.json"
                command = [__file__, "--worker", "--out", str(out), "--output_dir", str(Path(tmp) / arm),
                           "--steps", str(args.steps), "--ratio", str(ratio), "--granularity", args.granularity]
                if args.zero:
                                        from gmt_align.testing import run_ranks

                    ranks = run_ranks([*command, "--zero", str(args.zero)], world=2, timeout=3000)
                    failed = next((rank.stdout for rank in ranks if rank.returncode), None)
                else:
                    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True,
                                            text=True)
                    failed = result.stderr if result.returncode else None
                if failed is not None:
                    sys.exit(f"{arm} run failed:\n{failed[-3000:]}")
                record = json.loads(out.read_text())
                timed = record["durations"][1:]
                steps[arm] += timed
                selection = f"; GMT selection {statistics.median(record['applies'][1:]):.3f} s" if ratio else ""
                print(f"round {round_index} {arm:<8} median step {statistics.median(timed):.3f} s "
                      f"({', '.join(f'{d:.2f}' for d in timed)}){selection}", flush=True)
    gmt, vanilla = statistics.median(steps["gmt"]), statistics.median(steps["vanilla"])
    where = (f"ZeRO-{args.zero} on 2 CPU ranks, per-device batch 2" if args.zero
             else "1 process, per-device batch 4")
    print(f"# {len(steps['gmt'])} GMT steps (ratio {args.ratio}, {args.granularity}) and {len(steps['vanilla'])} vanilla "
          f"steps, gradient_accumulation_steps 4, {where}: median {gmt:.3f} s vs {vanilla:.3f} s "
          f"(GMT {min(steps['gmt']):.3f}-{max(steps['gmt']):.3f}, vanilla {min(steps['vanilla']):.3f}-"
          f"{max(steps['vanilla']):.3f})")
    print(f"gmt_vs_vanilla={gmt / vanilla:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
