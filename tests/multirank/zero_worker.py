"""One rank of a real DeepSpeed job (gloo, DS_ACCELERATOR=cpu), launched by tests/multirank/launch.py.

For each case in the JSON file ``argv[1]``: build a small model whose tensors straddle the ZeRO
partition boundaries (and some of which a rank does not hold at all), ``deepspeed.initialize`` it,
attach GMT, run one accumulated step, and compare with what one process computes from the full
reduced gradient (gathered by ``safe_get_full_grad`` between backward and step: test code only).
Rank 0 writes one JSON line per case to ``argv[2]``.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from torch import nn

from gmt_align.backends import DEEPSPEED_BACKENDS, attach
from gmt_align.core.engine import MaskOptions
from gmt_align.core.rules import random_chunks
from gmt_align.core.selection import keep_count
from recording import record_masks


class Odd(nn.Module):
    """Sizes chosen so that tensors straddle partition boundaries and tiny ones sit on one rank."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(37, 12)
        self.up = nn.Linear(12, 29)
        self.mid = nn.Linear(29, 29, bias=False)
        self.scale = nn.Parameter(torch.ones(1))  # one element: under ZeRO-3 rank 1 holds none of it
        self.down = nn.Linear(29, 37)

    def forward(self, ids, labels):
        h = torch.tanh(self.up(self.embed(ids)))
        logits = self.down(torch.tanh(self.mid(h)) * self.scale)
        return nn.functional.cross_entropy(logits.view(-1, 37).float(), labels.view(-1))


def ds_config(case):
    zero = {"stage": case["stage"]}
    if case.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    zero.update(case.get("zero_extra", {}))
    if case["stage"] == 3:
        zero["sub_group_size"] = case.get("sub_group_size", 1_000_000_000)
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": case.get("clip", 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": case.get("dtype") == "bf16"},
        # A loss scale of 2**40 overflows fp16 gradients: DeepSpeed must skip that step.
        "fp16": {"enabled": case.get("dtype") == "fp16", "initial_scale_power": 40, "loss_scale_window": 1},
    }
    if case.get("ds_optimizer"):
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}
    if case.get("bf16_optimizer"):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def run_case(case, rank, world):
    torch.manual_seed(0)
    model = Odd()
    optimizer = None
    if not case.get("ds_optimizer"):
        groups = [{"params": list(model.parameters())}]
        if case.get("two_groups"):  # like the HF Trainer: weight decay off for biases and 1-D tensors
            groups = [{"params": [p for p in model.parameters() if p.dim() > 1]},
                      {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(case))
    options = MaskOptions(
        mask_ratio=case["ratio"], granularity=case["granularity"], mode=case["mode"],
        selection=case.get("selection", "magnitude"), seed=3, exclude=tuple(case.get("exclude", ())),
    )
    adapter = attach(zopt, engine.module, options, lambda: 0)
    recorded = record_masks(adapter.engine)
    names = [info.names[0] for info in adapter.engine.tensors]
    params = dict(engine.module.named_parameters())

    gen = torch.Generator().manual_seed(100 + rank)
    for micro in range(2):  # one accumulation window: the first step() call only accumulates
        ids = torch.randint(0, 37, (2, 5), generator=gen)
        loss = engine(ids, torch.roll(ids, 1, dims=1))
        engine.backward(loss)
        if micro == 1:
            full_grads = {n: safe_get_full_grad(params[n]).float().clone() for n in names}
            before = {n: safe_get_full_fp32_param(params[n]).clone() for n in names}
        engine.step()
    after = {n: safe_get_full_fp32_param(params[n]).clone() for n in names}
    # The model's own (bit16 or fp32) weights must carry the fp32 master weights after the step.
    with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None):
        published = {n: bool(torch.equal(params[n].detach().flatten(), after[n].flatten().to(params[n].dtype)))
                     for n in names}
    if case.get("dtype") == "fp16":  # the overflow step: nothing masked, nothing moved, on every rank
        counts = [None] * world
        dist.all_gather_object(counts, len(recorded))
        moved = any(not torch.equal(after[n], before[n]) for n in names)
        adapter.detach()
        return {"case": case, "kind": type(zopt).__name__, "overflow": bool(zopt.overflow),
                "masked_calls_per_rank": counts, "moved": moved}

    if case.get("clip"):  # the reference sees what the optimizer saw: DeepSpeed's clip, same float ops
        norm = zopt._global_grad_norm
        combined_scale = torch.clamp(((norm / 1.0) + 1e-6) / case["clip"], min=1.0) * 1.0
        assert float(combined_scale) > 1, "the case must really clip"
        full_grads = {n: g.mul_(1.0 / combined_scale) for n, g in full_grads.items()}

    # Gather what each rank masked (test only: GMT itself never gathers).
    pieces = [(tid, offset, kept.tolist()) for tid, offset, kept in recorded]
    everyone = [None] * world
    dist.all_gather_object(everyone, pieces)
    kept_dist = {n: torch.full((full_grads[n].numel(),), -1, dtype=torch.int8) for n in names}
    for rank_pieces in everyone:
        for tid, offset, kept in rank_pieces:
            target = kept_dist[names[tid]][offset : offset + len(kept)]
            assert (target == -1).all(), "two ranks masked the same entry"
            target.copy_(torch.tensor(kept, dtype=torch.int8))

    held = [sorted({address.tensor_id for flat in adapter.flats.values() for address in flat.fragments})]
    held_by_rank = [None] * world
    dist.all_gather_object(held_by_rank, held[0])
    on_every_rank = set.intersection(*map(set, held_by_rank))

    # The single-process reference, by sorting.
    result = {"case": case, "tensors": {}, "comm_calls": adapter.engine.reduce.calls,
              "comm_bytes": adapter.engine.reduce.bytes, "units": len(adapter.engine.keep),
              "partitions": sum(1 for flat in adapter.flats.values() if adapter.engine.units_of(flat.tensors)),
              "straddling": len(on_every_rank), "not_on_every_rank": len(names) - len(on_every_rank)}
    result["kind"] = type(zopt).__name__
    result["inner"] = type(zopt.optimizer).__name__
    reported = adapter.kept()  # the public per-tensor counts, summed over ranks (after comm_calls: not counted)
    # Every private attribute the backend reads, on this real instance: on the optimizer, on every
    # parameter, on every _hp_mapping; a conditional one (backup_optimizer) exactly when DeepSpeed
    # builds it. The same check runs at attach time; here it is reported, not raised.
    contract = DEEPSPEED_BACKENDS[result["kind"]].CONTRACT
    result["contract_missing"] = contract.missing(zopt, list(engine.module.parameters()))
    result["conditional_present"] = [name for name in contract.conditional if hasattr(zopt, name)]
    mappings = [p._hp_mapping for p in engine.module.parameters() if getattr(p, "_hp_mapping", None) is not None]
    result["has_hp_mapping"] = bool(mappings)

    def scores(n):
        if options.selection == "random":
            return torch.cat(list(random_chunks(options.seed, 0, names.index(n), 0, full_grads[n].numel())))
        return full_grads[n].flatten().abs()

    maskable = [n for n in names if adapter.engine.unit_of[names.index(n)] >= 0]
    flat_all = torch.cat([scores(n) for n in maskable])
    for n in names:
        g = scores(n)
        if n not in maskable:  # excluded: never masked, fully updated
            result["tensors"][n] = {"excluded": True, "untouched_by_gmt": bool((kept_dist[n] == -1).all()),
                                    "all_moved": bool((after[n] != before[n]).all())}
            continue
        if case["granularity"] == "global":
            pool, k = flat_all, keep_count(flat_all.numel(), case["ratio"])
        else:
            pool, k = g, keep_count(g.numel(), case["ratio"])
        threshold = pool.sort(descending=True).values[k - 1]
        floor = 0 if options.selection == "random" else 1  # exact zeros are never kept by magnitude
        expected = g.view(torch.int32) >= max(int(threshold.view(torch.int32)), floor)
        tid = names.index(n)
        unit = adapter.engine.unit_of[tid]
        got_threshold = int(adapter.engine.thresholds[unit])
        want_threshold = max(int(threshold.view(torch.int32)), floor)
        unchanged = (after[n] == before[n]).flatten()
        result["tensors"][n] = {
            "threshold_equal": got_threshold == want_threshold,
            "all_entries_covered": bool((kept_dist[n] >= 0).all()),
            "mask_equal": bool(torch.equal(kept_dist[n] == 1, expected)),
            "masked": int((~expected).sum()),
            "numel": g.numel(),
            "kept_reported": reported.get(n) == (int(expected.sum()), g.numel()),
            "unchanged_equals_masked": bool(torch.equal(unchanged, ~expected)),
            "masked_unchanged": bool(unchanged[~expected].all()),
            "model_weights_published": published[n],
        }
    adapter.detach()
    return result


def main():
    cases = json.loads(open(sys.argv[1]).read())
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True  # the CPU accelerator says no; gloo works
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = []
    for case in cases:
        try:
            lines.append(run_case(case, rank, world))
        except Exception as error:  # reported per case; the other cases still run
            lines.append({"case": case, "error": f"{type(error).__name__}: {error}"})
    if rank == 0:
        with open(sys.argv[2], "w") as out:
            for line in lines:
                out.write(json.dumps(line) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
