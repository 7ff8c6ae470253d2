"""Time the FSDP2 optimizer step with GMT against the same step without, on 2 CPU ranks (gloo).

    .venv/bin/python benchmarks/fsdp2_step.py [--steps 5] [--ratio 0.2] [--mode gradient]

Starts 2 ranks of itself on 127.0.0.1. Model: SmolLM2-135M's architecture (random weights, fp32),
``fully_shard`` on every decoder layer and on the root (as accelerate's TRANSFORMER_BASED_WRAP
does), torch AdamW with the Trainer's two parameter groups, micro-batch 1 x 32 tokens, clipping 1.0
by ``clip_grad_norm_`` before the step (as the Trainer does). For each arm it runs ``steps``
measured steps (after one warm-up, which also loads or compiles GMT's kernels) and prints medians:
``optimizer.step()`` (GMT's pre- and post-hooks included), GMT's selection and masking
(``MaskEngine.apply``), and the all-reduces inside it; and forward + backward, for scale.
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
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from gmt_align.backends import attach
    from gmt_align.core.engine import MaskOptions

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    rows = {}
    for gmt in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.01},
                  {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=1e-5)
        times = {"step": [], "forward_backward": [], "apply": [], "allreduce": []}
        adapter = None
        if gmt:
            adapter = attach(optimizer, model, MaskOptions(mask_ratio=args.ratio, mode=args.mode), lambda: 0)
            engine = adapter.engine
            engine.apply = timed(times["apply"], engine.apply)
            reduce = engine.reduce
            engine.reduce = timed(times["allreduce"], reduce)
        gen = torch.Generator().manual_seed(dist.get_rank())
        for step in range(args.steps + 1):
            ids = torch.randint(0, 49152, (1, 32), generator=gen)
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            middle = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad()
            end = time.perf_counter()
            if step == 0:  # warm-up
                for values in times.values():
                    values.clear()
                continue
            times["forward_backward"].append(middle - start)
            times["step"].append(end - middle)
        row = {k: statistics.median(v) if k in ("step", "forward_backward") else sum(v) / args.steps
               for k, v in times.items()}
        row["allreduce_calls"] = (reduce.calls if gmt else 0) // (args.steps + 1)
        rows["gmt" if gmt else "vanilla"] = row
        if adapter is not None:
            adapter.detach()
        del model, optimizer
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--mode", choices=["gradient", "update"], default="gradient")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "RANK" in os.environ:
        rows = run_rank(args)
        if os.environ["RANK"] == "0":
            Path(args.out).write_text(json.dumps(rows))
        return

    import tempfile

    from gmt_align.testing import run_ranks

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        argv = [__file__, "--steps", str(args.steps), "--ratio", str(args.ratio), "--mode", args.mode,
                "--out", str(out)]
        for rank in run_ranks(argv, world=2, timeout=3000):
            if rank.returncode != 0:
                sys.exit(rank.stdout[-4000:])
        rows = json.loads(out.read_text())
    print(f"2 ranks, gloo, CPU, FSDP2; SmolLM2-135M shapes (134.5M params), ratio {args.ratio}, "
          f"{args.mode} mode, {args.steps} steps")
    print(f"{'run':<9}{'fwd+bwd s':>10}{'step s':>9}{'select+mask s':>14}{'all-reduce s':>14}{'calls':>7}")
    for name, r in rows.items():
        print(f"{name:<9}{r['forward_backward']:>10.3f}{r['step']:>9.3f}{r['apply']:>14.3f}"
              f"{r['allreduce']:>14.4f}{r['allreduce_calls']:>7}")
    gmt, vanilla = rows["gmt"], rows["vanilla"]
    print(f"fsdp2: gmt_step/vanilla_step={gmt['step'] / vanilla['step']:.2f} "
          f"selection_share={gmt['apply'] / gmt['step']:.2f} "
          f"gmt_iteration/vanilla_iteration={(gmt['step'] + gmt['forward_backward']) / (vanilla['step'] + vanilla['forward_backward']):.2f}")


if __name__ == "__main__":
    main()
