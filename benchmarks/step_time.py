"""End-to-end training-step time of GMT-SFT vs vanilla SFT on the quickstart model.

    .venv/bin/python benchmarks/step_time.py [--rounds 3] [--steps 4] [--ratio 0.2] [--granularity tensor]

Runs the quickstart recipe (SmolLM2-135M-Instruct, fp32, per-device batch 4) with
``gradient_accumulation_steps 4`` and the same seed in both arms; ``vanilla`` is the same recipe
with ``gmt_mask_ratio 0`` (the parent trainer, bit for bit). Each run is a fresh process that
trains ``1 + --steps`` optimizer steps; the first (which also compiles GMT's kernels) is not
timed. Runs alternate GMT / vanilla for ``--rounds`` rounds, so load on the machine hits both
alike. A step is timed from the Trainer's ``on_step_begin`` to ``on_step_end`` (forward, backward
and optimizer step of one accumulation window). Prints per-run medians and ends with one line

    gmt_vs_vanilla=<median GMT step / median vanilla step>

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

    from gmt_align.data import load_train_dataset
    from gmt_align.recipe import parse_recipe
    from gmt_align.trainers import GMTSFTTrainer

    durations: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            durations.append(time.perf_counter() - self.start)

    script, training, model = parse_recipe("sft", [
        "--config", "recipes/quickstart/sft.yaml", "--output_dir", args.output_dir,
        "--max_steps", str(args.steps + 1), "--gradient_accumulation_steps", "4", "--logging_steps", "1000",
        "--gmt_mask_ratio", str(args.ratio), "--gmt_granularity", args.granularity, "--disable_tqdm", "true",
    ])
    training.model_init_kwargs = {"dtype": model.dtype}
    trainer = GMTSFTTrainer(model=model.model_name_or_path, args=training,
                            train_dataset=load_train_dataset(script), callbacks=[StepTimer()])
    trainer.train()
    Path(args.out).write_text(json.dumps({"ratio": args.ratio, "durations": durations}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after one untimed)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--granularity", default="tensor", choices=["tensor", "global"])
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
            for arm, ratio in (("gmt", args.ratio), ("vanilla", 0.0)):
                out = Path(tmp) / f"{arm}{round_index}.json"
                command = [sys.executable, __file__, "--worker", "--out", str(out), "--output_dir", str(Path(tmp) / arm),
                           "--steps", str(args.steps), "--ratio", str(ratio), "--granularity", args.granularity]
                result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
                if result.returncode:
                    sys.exit(f"{arm} run failed:\n{result.stderr[-3000:]}")
                timed = json.loads(out.read_text())["durations"][1:]
                steps[arm] += timed
                print(f"round {round_index} {arm:<8} median step {statistics.median(timed):.3f} s "
                      f"({', '.join(f'{d:.2f}' for d in timed)})", flush=True)
    gmt, vanilla = statistics.median(steps["gmt"]), statistics.median(steps["vanilla"])
    print(f"# {len(steps['gmt'])} GMT steps (ratio {args.ratio}, {args.granularity}) and {len(steps['vanilla'])} vanilla "
          f"steps, gradient_accumulation_steps 4, per-device batch 4: median {gmt:.3f} s vs {vanilla:.3f} s")
    print(f"gmt_vs_vanilla={gmt / vanilla:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
