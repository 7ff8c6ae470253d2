"""What the mask telemetry adds to a training step: quickstart SFT, ``gmt_telemetry`` on vs off.

```bash
HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/telemetry_overhead.py --rounds 8 --steps 11
```

Each run is a fresh process that trains ``--steps`` optimizer steps of
``recipes/quickstart/sft.yaml`` (logging_steps 10); its step time is the wall time between the
first and the last ``on_step_end`` divided by the steps between them (the logging step's
collective figures included). A round is one run off and one on, in alternating order, so that
drift of a shared machine hits both alike; the effect is the median over rounds of the paired
difference (on - off) / off, and its spread the interquartile range of those differences. It also
times the per-step telemetry pass alone (``MaskTelemetry.before_mask`` + ``observe`` over a
gradient the size of the quickstart model's), a figure that no noise hides, and divides it by the
median "off" step. The last line is ``telemetry_overhead=<median paired difference>``.
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

import torch
from transformers import TrainerCallback


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def step_time(telemetry: bool, steps: int, output_dir: str) -> float:
    """Seconds per optimizer step of one quickstart run in this process."""
    from gmt_align.cli.data import load_train_dataset
    from gmt_align.cli.recipe import parse_recipe
    from gmt_align.training.trainers import GMTSFTTrainer

    script, args, model_args = parse_recipe("sft", [
        "--config", "recipes/quickstart/sft.yaml", "--output_dir", output_dir, "--max_steps", str(steps),
        "--logging_steps", "10", "--report_to", "none", "--disable_tqdm", "true",
        "--gmt_telemetry", str(telemetry).lower(),
    ])
    args.model_init_kwargs = {"dtype": model_args.dtype}
    trainer = GMTSFTTrainer(model=model_args.model_name_or_path, args=args, train_dataset=load_train_dataset(script))
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    return (clock.ends[-1] - clock.ends[0]) / (len(clock.ends) - 1)


def pass_time(repeats: int = 5) -> tuple[float, int]:
    """Seconds per telemetry pass (energy before masking, then energy kept and the bit sets after)
    over a gradient the size of the quickstart model's (magnitude masks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gmt_align.backends.hooks import tensor_table
    from gmt_align.core.engine import Fragment, MaskEngine, MaskOptions
    from gmt_align.training.telemetry import MaskTelemetry

    config = AutoConfig.from_pretrained(".cache/quickstart/SmolLM2-135M-Instruct")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, tensors = tensor_table(model)
    telemetry = MaskTelemetry(MaskEngine(MaskOptions(0.2), tensors))
    grads = [torch.randn(t.numel) * (torch.rand(t.numel) > 0.2) for t in tensors]
    fragments = [Fragment(i, 0, g, g) for i, g in enumerate(grads)]
    best = float("inf")
    for step in range(repeats + 1):
        start = time.perf_counter()
        telemetry.before_mask(fragments, step)
        telemetry.observe(fragments, step)
        if step:  # the first pass builds the layout
            best = min(best, time.perf_counter() - start)
    return best, sum(t.numel for t in tensors)


def in_fresh_process(telemetry: bool, steps: int, output_dir: str) -> float:
    command = [sys.executable, __file__, "--one", "on" if telemetry else "off", "--steps", str(steps),
               "--output_dir", output_dir]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(result.stdout.strip().splitlines()[-1])["step_time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="off/on pairs, each run a fresh process")
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps per run (logging at 10)")
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a single run (internal)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps({"step_time": step_time(options.one == "on", options.steps, options.output_dir)}))
        return
    alone, entries = pass_time()
    print(f"telemetry pass alone: {alone * 1e3:.1f} ms per step over {entries / 1e6:.1f} M entries", flush=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    differences = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(options.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for telemetry in order:
                times[telemetry].append(in_fresh_process(telemetry, options.steps, f"{tmp}/{round_}-{telemetry}"))
            differences.append((times[True][-1] - times[False][-1]) / times[False][-1])
            print(f"round {round_}: off {times[False][-1]:.3f} s/step, on {times[True][-1]:.3f} s/step, "
                  f"difference {differences[-1]:+.4f}", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    q1, _, q3 = statistics.quantiles(differences, n=4) if len(differences) > 1 else (differences[0],) * 3
    print(f"median step time: off {off:.3f} s, on {on:.3f} s; off runs spread {min(times[False]):.3f}.."
          f"{max(times[False]):.3f} s; pass alone / off = {alone / off:.4f}")
    print(f"paired differences over {len(differences)} rounds: median {statistics.median(differences):+.4f}, "
          f"interquartile range {q1:+.4f}..{q3:+.4f}")
    print(f"telemetry_overhead={statistics.median(differences):.4f}")


if __name__ == "__main__":
    main()
