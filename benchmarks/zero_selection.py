"""Time GMT's distributed selection against the ZeRO step it lives in, on 2 CPU ranks (gloo).

    .venv/bin/python benchmarks/zero_selection.py [--stages 2 3] [--steps 5] [--ratio 0.2]
                                                  [--mode gradient] [--processes 3]

Starts 2 ranks of itself on 127.0.0.1 (DS_ACCELERATOR=cpu), ``--processes`` times, each a fresh
pair of processes. Model: SmolLM2-135M's architecture (random weights, fp32), client AdamW with
the Trainer's two parameter groups, micro-batch 1 x 32 tokens, clipping 1.0. For each stage a
process builds two DeepSpeed engines side by side, one with GMT (tensor granularity, ``--mode``)
and one without, and after one warm-up step each runs ``steps`` optimizer steps of each,
alternating (which arm goes first alternates from process to process), so the machine's state
hits both alike. Prints, per process, the medians of the whole ZeRO step (engine.step), GMT's
selection and masking (MaskEngine.apply, summed over the groups of a step) and the all-reduce time
and calls inside it; then per stage the ratio of the GMT step to the vanilla one in every process,
and their median and spread:

    zero2: gmt_step/vanilla_step=<median> (<min>-<max> over N processes) selection_share=<median>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def timed(store: list, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        store.append(time.perf_counter() - start)
        return out

    return wrapper


def run_rank(args) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from gmt_align.adapters import attach
    from gmt_align.engine import MaskOptions

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    rows = {}
    for stage in args.stages:
        arms = {}
        for gmt in (False, True):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
            groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.01},
                      {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
            optimizer = torch.optim.AdamW(groups, lr=1e-5)
            ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                         "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                         "zero_allow_untested_optimizer": True}
            engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            times = {"step": [], "apply": [], "allreduce": []}
            adapter, reduce = None, None
            if gmt:
                adapter = attach(zopt, engine.module, MaskOptions(mask_ratio=args.ratio, mode=args.mode), lambda: 0)
                eng = adapter.engine
                eng.apply = timed(times["apply"], eng.apply)
                reduce = eng.reduce
                eng.reduce = timed(times["allreduce"], reduce)
            arms["gmt" if gmt else "vanilla"] = (engine, times, adapter, reduce)
        gen = torch.Generator().manual_seed(dist.get_rank())
        order = ["gmt", "vanilla"] if args.first == "gmt" else ["vanilla", "gmt"]
        for step in range(args.steps + 1):
            ids = torch.randint(0, 49152, (1, 32), generator=gen)
            for arm in order:  # the same batch for both arms, one after the other
                engine, times = arms[arm][:2]
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                start = time.perf_counter()
                engine.step()
                elapsed = time.perf_counter() - start
                if step == 0:  # warm-up
                    for values in times.values():
                        values.clear()
                    continue
                times["step"].append(elapsed)
        for arm, (engine, times, adapter, reduce) in arms.items():
            per_step = {k: (sum(v) / args.steps if k != "step" else statistics.median(v)) for k, v in times.items()}
            per_step["allreduce_calls"] = (reduce.calls if reduce is not None else 0) // (args.steps + 1)
            per_step["steps"] = times["step"]
            rows[f"zero{stage}-{arm}"] = per_step
            if adapter is not None:
                adapter.detach()
        del arms, engine
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--mode", choices=["gradient", "update"], default="gradient")
    parser.add_argument("--processes", type=int, default=3, help="fresh 2-rank runs, one after the other")
    parser.add_argument("--first", choices=["gmt", "vanilla"], default="vanilla", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes < 1 or args.steps < 1:
        parser.error("--processes and --steps must be at least 1")
    if "RANK" in os.environ:
        rows = run_rank(args)
        if os.environ["RANK"] == "0":
            Path(args.out).write_text(json.dumps(rows))
        return

    import tempfile

    from multirank.launch import run_ranks

    print(f"2 ranks, gloo, CPU; SmolLM2-135M shapes (134.5M params), ratio {args.ratio}, {args.mode} mode, "
          f"{args.steps} steps per arm, arms alternating, {args.processes} fresh processes", flush=True)
    ratios: dict[int, list[float]] = {stage: [] for stage in args.stages}
    shares: dict[int, list[float]] = {stage: [] for stage in args.stages}
    for process in range(args.processes):
        first = "vanilla" if process % 2 == 0 else "gmt"
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "rows.json"
            argv = [__file__, "--stages", *map(str, args.stages), "--steps", str(args.steps), "--ratio",
                    str(args.ratio), "--mode", args.mode, "--first", first, "--out", str(out)]
            for rank in run_ranks(argv, world=2, timeout=3000):
                if rank.returncode != 0:
                    sys.exit(rank.stdout[-4000:])
            rows = json.loads(out.read_text())
        print(f"## process {process + 1} of {args.processes} ({first} first)")
        print(f"{'run':<16}{'ZeRO step s':>12}{'select+mask s':>14}{'all-reduce s':>14}{'calls':>7}  steps (s)")
        for name, r in rows.items():
            steps = ", ".join(f"{t:.3f}" for t in r["steps"])
            print(f"{name:<16}{r['step']:>12.3f}{r['apply']:>14.3f}{r['allreduce']:>14.4f}{r['allreduce_calls']:>7}  "
                  f"{steps}")
        for stage in args.stages:
            gmt, vanilla = rows[f"zero{stage}-gmt"], rows[f"zero{stage}-vanilla"]
            ratios[stage].append(gmt["step"] / vanilla["step"])
            shares[stage].append(gmt["apply"] / gmt["step"])
        sys.stdout.flush()
    for stage in args.stages:
        each = ", ".join(f"{r:.3f}" for r in ratios[stage])
        print(f"zero{stage}: gmt_step/vanilla_step={statistics.median(ratios[stage]):.3f} "
              f"({min(ratios[stage]):.3f}-{max(ratios[stage]):.3f} over {args.processes} processes: {each}) "
              f"selection_share={statistics.median(shares[stage]):.3f}")


if __name__ == "__main__":
    main()
