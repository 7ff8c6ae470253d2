"""What the mask telemetry adds to a training step: quickstart SFT, ``gmt_telemetry`` on vs off.

```bash
HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/telemetry_overhead.py --rounds 3 --steps 11
```

Each run trains ``--steps`` optimizer steps of ``recipes/quickstart/sft.yaml`` (logging_steps 10) in
this process; the step time is the wall time between the first and the last ``on_step_end``
divided by the steps between them (it includes the logging step's collective figures). Runs
alternate off/on so that drift of a shared machine hits both alike. It also times the per-step
telemetry pass alone (``MaskTelemetry.observe`` over the whole model's gradient) for a figure that
no noise hides. The last line is ``telemetry_overhead=<(on - off) / off>``.
"""

from __future__ import annotations

import argparse
import statistics
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
    from gmt_align.train import load_train_dataset, parse_recipe
    from gmt_align.trainers import GMTSFTTrainer

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


def observe_time(repeats: int = 5) -> tuple[float, int]:
    """Seconds per telemetry pass over a gradient the size of the quickstart model's (magnitude masks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gmt_align.adapters.hooks import tensor_table
    from gmt_align.engine import Fragment, MaskEngine, MaskOptions
    from gmt_align.telemetry import MaskTelemetry

    config = AutoConfig.from_pretrained(".cache/quickstart/SmolLM2-135M-Instruct")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, tensors = tensor_table(model)
    engine = MaskEngine(MaskOptions(0.2), tensors)
    telemetry = MaskTelemetry(engine)
    grads = [torch.randn(t.numel) * (torch.rand(t.numel) > 0.2) for t in tensors]
    fragments = [Fragment(i, 0, g, g) for i, g in enumerate(grads)]
    telemetry.observe(fragments, 0)
    start = time.perf_counter()
    for step in range(1, repeats + 1):
        telemetry.observe(fragments, step)
    return (time.perf_counter() - start) / repeats, sum(t.numel for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps per run (logging at 10)")
    options = parser.parse_args()
    alone, entries = observe_time()
    print(f"telemetry pass alone: {alone * 1e3:.1f} ms per step over {entries / 1e6:.1f} M entries")
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(options.rounds):
            for telemetry in (False, True):
                times[telemetry].append(step_time(telemetry, options.steps, f"{tmp}/{round_}-{telemetry}"))
                print(f"round {round_} telemetry={telemetry}: {times[telemetry][-1]:.3f} s/step", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"median step time: off {off:.3f} s, on {on:.3f} s; pass alone / off = {alone / off:.4f}")
    print(f"telemetry_overhead={(on - off) / off:.4f}")


if __name__ == "__main__":
    main()
