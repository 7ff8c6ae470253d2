"""Time GMT's distributed selection against the ZeRO step it lives in, on 2 CPU ranks (gloo).

    .venv/bin/python benchmarks/zero_selection.py [--stages 2 3] [--steps 5] [--ratio 0.2]
                                                  [--mode gradient] [--rounds 3]

Model: SmolLM2-135M's architecture (random weights, fp32), client AdamW with the Trainer's two
parameter groups, micro-batch 1 x 32 tokens, clipping 1.0, ZeRO buckets of 5e7 entries (the
defaults, 5e8, take 2 GB more per rank). Every run is a fresh pair of ranks of itself on 127.0.0.1
(DS_ACCELERATOR=cpu, one thread per rank) that measures one arm of one stage: GMT (tensor
granularity, ``--mode``) or vanilla, ``steps`` optimizer steps after one warm-up, on the same
batches. Runs alternate GMT / vanilla (which goes first alternates from round to round) for
``--rounds`` rounds, so the machine's state hits both alike; two engines in one process would hold
twice the memory. Prints each run's median ZeRO step (engine.step), GMT's selection and masking
(MaskEngine.apply, summed over the groups of a step) and the all-reduce time and calls inside it;
then per stage:

    zero2: gmt_step/vanilla_step=<median GMT step / median vanilla step over all runs>
           (per round: ...; GMT a-b s, vanilla c-d s) selection_share=<median>
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

    from gmt_align.backends import attach
    from gmt_align.core.engine import MaskOptions

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.01},
              {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}}
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    times = {"step": [], "apply": [], "allreduce": []}
    reduce = None
    if args.arm == "gmt":
        adapter = attach(zopt, engine.module, MaskOptions(mask_ratio=args.ratio, mode=args.mode), lambda: 0)
        eng = adapter.engine
        eng.apply = timed(times["apply"], eng.apply)
        reduce = eng.reduce
        eng.reduce = timed(times["allreduce"], reduce)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for step in range(args.steps + 1):
        ids = torch.randint(0, 49152, (1, 32), generator=gen)
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
    row = {k: (sum(v) / args.steps if k != "step" else statistics.median(v)) for k, v in times.items()}
    row["allreduce_calls"] = (reduce.calls if reduce is not None else 0) // (args.steps + 1)
    row["steps"] = times["step"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--mode", choices=["gradient", "update"], default="gradient")
    parser.add_argument("--rounds", type=int, default=3, help="GMT / vanilla pairs of fresh runs per stage")
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=["gmt", "vanilla"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if "RANK" in os.environ:
        row = run_rank(args)
        if os.environ["RANK"] == "0":
            Path(args.out).write_text(json.dumps(row))
        return

    import tempfile

    from gmt_align.testing import run_ranks

    print(f"2 ranks, gloo, CPU; SmolLM2-135M shapes (134.5M params), ratio {args.ratio}, {args.mode} mode, "
          f"{args.steps} steps per run, {args.rounds} rounds of fresh GMT / vanilla runs", flush=True)
    print(f"{'run':<24}{'ZeRO step s':>12}{'select+mask s':>14}{'all-reduce s':>14}{'calls':>7}  steps (s)", flush=True)
    rows: dict[tuple[int, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for stage in args.stages:
            arms = ("vanilla", "gmt") if round_index % 2 == 0 else ("gmt", "vanilla")
            for arm in arms:
                with tempfile.TemporaryDirectory() as folder:
                    out = Path(folder) / "row.json"
                    argv = [__file__, "--stage", str(stage), "--arm", arm, "--steps", str(args.steps), "--ratio",
                            str(args.ratio), "--mode", args.mode, "--out", str(out)]
                    for rank in run_ranks(argv, world=2, timeout=3000):
                        if rank.returncode != 0:
                            sys.exit(rank.stdout[-4000:])
                    r = json.loads(out.read_text())
                rows.setdefault((stage, arm), []).append(r)
                steps = ", ".join(f"{t:.3f}" for t in r["steps"])
                print(f"{f'round {round_index} zero{stage}-{arm}':<24}{r['step']:>12.3f}{r['apply']:>14.3f}"
                      f"{r['allreduce']:>14.4f}{r['allreduce_calls']:>7}  {steps}", flush=True)
    for stage in args.stages:
        gmt, vanilla = rows[(stage, "gmt")], rows[(stage, "vanilla")]
        gmt_all = [t for r in gmt for t in r["steps"]]
        vanilla_all = [t for r in vanilla for t in r["steps"]]
        per_round = ", ".join(f"{g['step'] / v['step']:.3f}" for g, v in zip(gmt, vanilla))
        share = statistics.median(r["apply"] / r["step"] for r in gmt)
        print(f"zero{stage}: gmt_step/vanilla_step={statistics.median(gmt_all) / statistics.median(vanilla_all):.3f} "
              f"(per round: {per_round}; GMT {min(gmt_all):.3f}-{max(gmt_all):.3f} s, vanilla "
              f"{min(vanilla_all):.3f}-{max(vanilla_all):.3f} s) selection_share={share:.3f}")


if __name__ == "__main__":
    main()
