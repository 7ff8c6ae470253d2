"""One rank of a real FSDP2 job (gloo, CPU), launched by tests/multirank/launch.py.

For each case in the JSON file ``argv[1]``: build a small model whose dim 0 does not divide by the
world size, with a one-element tensor (a rank holds none of it) and a tied embedding, shard it
with ``fully_shard`` (1-D mesh, or HSDP on a 2-D mesh), attach GMT to a torch AdamW, run one
accumulated step, and compare with what one process computes by sorting the full reduced
gradient (gathered with ``full_tensor()`` in a step pre-hook that runs before GMT's: test code
only). Rank 0 writes one JSON line per case to ``argv[2]``.
"""

import json
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from gmt_align.backends import attach
from recording import record_masks
from gmt_align.backends.fsdp2 import contract_missing
from gmt_align.core.engine import MaskOptions
from gmt_align.core.rules import random_chunks
from gmt_align.core.selection import NonFiniteGradientError, keep_count
from gmt_align.training.telemetry import MaskTelemetry


class Odd(nn.Module):
    """37 and 29 rows (uneven on 2 ranks), one element (``scale``), the output head tied to ``embed``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(37, 12)
        self.up = nn.Linear(12, 29)
        self.mid = nn.Linear(29, 29, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        self.down = nn.Linear(29, 12)
        self.head = nn.Linear(12, 37, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, labels):
        h = torch.tanh(self.up(self.embed(ids)))
        logits = self.head(self.down(torch.tanh(self.mid(h)) * self.scale))
        return nn.functional.cross_entropy(logits.view(-1, 37).float(), labels.view(-1))


def shard(model, case, world):
    if case.get("fsdp1"):  # the flat-parameter wrapper: GMT must refuse it
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    kwargs = {}
    if case.get("shard_dim1"):  # FSDP2 told to shard on dim 1: not a layout GMT maps
        from torch.distributed.tensor import Shard

        kwargs["shard_placement_fn"] = lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else Shard(0)
    if case.get("mesh"):
        kwargs["mesh"] = init_device_mesh("cpu", tuple(case["mesh"]), mesh_dim_names=("replicate", "shard"))
    if case.get("dtype") == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if case.get("offload"):
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for module in (model.up, model.mid):
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def reference_mask(scores, k, floor):
    threshold = scores.sort(descending=True).values[k - 1]
    return scores.view(torch.int32) >= max(int(threshold.view(torch.int32)), floor), max(int(threshold.view(torch.int32)), floor)


def mask_options(case):
    return MaskOptions(mask_ratio=case["ratio"], granularity=case["granularity"], mode=case["mode"],
                       selection=case.get("selection", "magnitude"), seed=3,
                       exclude=tuple(case.get("exclude", ())), nonfinite=case.get("nonfinite", "raise"))


def train_step(model, optimizer, rank, step):
    """One accumulation window of 2 micro-batches; each rank's data depend on the rank and the step only."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    for _ in range(2):
        ids = torch.randint(0, 37, (2, 5), generator=gen)
        model(ids, torch.roll(ids, 1, dims=1)).backward()
    optimizer.step()
    optimizer.zero_grad()


def resume_case(case, rank, world):
    """A sharded checkpoint (torch.distributed.checkpoint: each rank writes its own shards and AdamW
    state) after step 1 of 2; a fresh model resumed from it masks and ends bit for bit as the
    uninterrupted run. GMT is attached after loading, as the Trainer attaches it after its resume."""
    import shutil
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder)

    def build():
        torch.manual_seed(0)
        model = shard(Odd(), case, world)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def second_step(model, optimizer):
        hooks = attach(optimizer, model, mask_options(case), lambda: 1)
        recorded = record_masks(hooks.engine)
        train_step(model, optimizer, rank, 1)
        hooks.detach()
        weights = {n: p.full_tensor() for n, p in model.named_parameters()}
        return weights, [(t, o, kept.tolist()) for t, o, kept in recorded]

    model, optimizer = build()
    hooks = attach(optimizer, model, mask_options(case), lambda: 0)
    train_step(model, optimizer, rank, 0)
    hooks.detach()
    at_checkpoint = {n: p.full_tensor() for n, p in model.named_parameters()}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder[0])
    uninterrupted, uninterrupted_masks = second_step(model, optimizer)

    model, optimizer = build()
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the shapes to load into
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder[0])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    resumed, resumed_masks = second_step(model, optimizer)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(folder[0])
    agree = [None] * world
    dist.all_gather_object(agree, resumed_masks == uninterrupted_masks and bool(uninterrupted_masks))
    return {"case": case, "same_masks_on_every_rank": all(agree),
            "resumed_equals_uninterrupted": all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted),
            "second_step_moved": any(not torch.equal(uninterrupted[n], at_checkpoint[n]) for n in uninterrupted)}


def run_case(case, rank, world):
    if case.get("resume"):
        return resume_case(case, rank, world)
    torch.manual_seed(0)
    model = shard(Odd(), case, world)
    params = list(model.parameters())
    groups = [{"params": params}]
    if case.get("two_groups"):  # like the HF Trainer: weight decay off for biases and 1-D tensors
        groups = [{"params": [p for p in params if p.dim() > 1]},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    named = dict(model.named_parameters())
    names = list(named)
    full = {}

    def capture(opt, args, kwargs):  # runs before GMT's pre-hook (registered first): the unmasked grads
        full["grad"] = {n: p.grad.full_tensor().float().clone() for n, p in named.items()}
        full["before"] = {n: p.full_tensor().clone() for n, p in named.items()}

    optimizer.register_step_pre_hook(capture)
    options = mask_options(case)
    if case.get("refused"):
        try:
            attach(optimizer, model, options, lambda: 0)
        except Exception as error:
            return {"case": case, "error": f"{type(error).__name__}: {error}"}
        return {"case": case, "attached": True}
    adapter = attach(optimizer, model, options, lambda: 0)
    recorded = record_masks(adapter.engine)
    telemetry = MaskTelemetry(adapter.engine, per_entry=True)
    assert [i.names[0] for i in adapter.engine.tensors] == names

    # Each data-parallel rank draws its own micro-batches (HSDP replicas too).
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):  # one accumulation window: FSDP2 reduce-scatters and sums into the sharded grads
        ids = torch.randint(0, 37, (2, 5), generator=gen)
        model(ids, torch.roll(ids, 1, dims=1)).backward()
    result = {"case": case, "contract_missing": contract_missing(params), "kind": adapter.backend}
    if case.get("nan"):  # a NaN in one rank's shard only
        name, on_rank = case["nan"]
        if rank == on_rank:
            named[name].grad.to_local().view(-1)[0] = float("nan")
    if case.get("clip"):
        unclipped = torch.cat([p.grad.full_tensor().flatten() for p in params])
        norm = torch.nn.utils.clip_grad_norm_(params, case["clip"])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        result["clip"] = {"norm_is_unmasked_norm": bool(torch.isclose(norm, unclipped.norm(), rtol=1e-5)),
                          "clipped": float(norm) > case["clip"]}
    try:
        optimizer.step()
    except NonFiniteGradientError as error:
        raised = [None] * world
        dist.all_gather_object(raised, str(error))  # every rank raised, together (no rank hangs)
        result["raised"] = raised
        adapter.detach()
        return result
    after = {n: p.full_tensor().clone() for n, p in named.items()}
    result["skipped"] = sorted(adapter.skipped_steps)
    if case.get("nonfinite") == "skip":
        result["moved"] = any(not torch.equal(after[n], full["before"][n]) for n in names)
        result["optimizer_state"] = len(optimizer.state)
        adapter.detach()
        return result
    stats = telemetry.pop_figures()

    # Gather what each rank masked (test only: GMT itself never gathers).
    pieces = [(tid, offset, kept.tolist()) for tid, offset, kept in recorded]
    everyone = [None] * world
    dist.all_gather_object(everyone, (rank, pieces))
    replicas = case.get("mesh", [1, world])[0]
    per_replica = [dict() for _ in range(replicas)]  # replica index -> name -> kept mask
    duplicated = False
    for other, rank_pieces in everyone:
        replica = other // (world // replicas)
        for tid, offset, kept in rank_pieces:
            n = names[tid]
            mask = per_replica[replica].setdefault(n, torch.full((full["grad"][n].numel(),), -1, dtype=torch.int8))
            target = mask[offset: offset + len(kept)]
            duplicated |= bool((target != -1).any())
            target.copy_(torch.tensor(kept, dtype=torch.int8))
    result["two_ranks_masked_one_entry"] = duplicated
    result["replicas_agree"] = all(
        per_replica[0].keys() == r.keys() and all(torch.equal(per_replica[0][n], r[n]) for n in r) for r in per_replica)
    held = [sorted({a.tensor_id for flat in adapter.flats.values() for a in flat.fragments})]
    held_by_rank = [None] * world
    dist.all_gather_object(held_by_rank, held[0])
    result["not_on_every_rank"] = len(names) - len(set.intersection(*map(set, held_by_rank)))
    result["uneven"] = sum(1 for n in names if named[n].shape[0] % world)
    result["comm_calls"] = adapter.engine.reduce.calls if adapter.engine.reduce is not None else 0
    result["shard_group_size"] = dist.get_world_size(adapter.engine.reduce.group) if adapter.engine.reduce else 1

    # The single-process reference, by sorting; and what each shard's own (local) threshold would keep.
    def scores(n):
        if options.selection == "random":
            return torch.cat(list(random_chunks(options.seed, 0, names.index(n), 0, full["grad"][n].numel())))
        return full["grad"][n].flatten().abs()

    floor = 0 if options.selection == "random" else 1  # exact zeros are never kept by magnitude
    maskable = [n for n in names if adapter.engine.unit_of[names.index(n)] >= 0]
    pooled = torch.cat([scores(n) for n in maskable])
    kept_total, local_differs = 0, False
    result["tensors"] = {}
    for n in names:
        if n not in maskable:  # excluded: never masked, fully updated
            result["tensors"][n] = {"excluded": True, "untouched_by_gmt": n not in per_replica[0],
                                    "all_moved": bool((after[n] != full["before"][n]).all())}
            continue
        g = scores(n)
        pool = pooled if case["granularity"] == "global" else g
        expected, threshold = reference_mask(pool, keep_count(pool.numel(), case["ratio"]), floor)
        if case["granularity"] == "global":
            expected = g.view(torch.int32) >= threshold
        else:  # a shard masked against its own threshold: rows split as DTensor splits them
            rows, shards = named[n].shape[0], world // replicas
            bounds = [min(rows, r * -(-rows // shards)) for r in range(shards + 1)]
            row = g.numel() // max(rows, 1)
            local = torch.cat([reference_mask(g[a * row: b * row], keep_count((b - a) * row, case["ratio"]), floor)[0]
                               for a, b in zip(bounds, bounds[1:]) if b > a])
            local_differs |= not torch.equal(local, expected)
        kept_total += int(expected.sum())
        got = per_replica[0][n]
        unchanged = (after[n] == full["before"][n]).flatten()
        result["tensors"][n] = {
            "threshold_equal": int(adapter.engine.thresholds[adapter.engine.unit_of[names.index(n)]]) == threshold,
            "all_entries_covered": bool((got >= 0).all()),
            "mask_equal": bool(torch.equal(got == 1, expected)),
            "unchanged_equals_masked": bool(torch.equal(unchanged, ~expected)),
            "moved_where_kept": bool((~unchanged[expected]).all()),
        }
    result["local_threshold_would_differ"] = local_differs
    total = sum(full["grad"][n].numel() for n in maskable)
    result["kept_fraction"] = {"reported": stats["gmt/kept_fraction"], "reference": kept_total / total,
                               "coverage": stats.get("gmt/coverage")}
    adapter.detach()
    return result


def main():
    cases = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = []
    for case in cases:
        if case.get("world", 2) != world:
            continue
        try:
            start = time.perf_counter()
            lines.append(run_case(case, rank, world))
            lines[-1]["seconds"] = round(time.perf_counter() - start, 2)
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
