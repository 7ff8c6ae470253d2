"""Layout under FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank's shard of every DTensor.

This is the only module that reads DTensor/FSDP internals. Checked against torch 2.13 and
accelerate 1.15; ``tests/multirank/fsdp2_worker.py`` checks every name in ``CONTRACT`` on real
``fully_shard`` modules, and :func:`layout` checks them again at start-up.

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 (``Shard(0)``; with HSDP a 2-D mesh
``(Replicate(), Shard(0))``). Chunks may be uneven, and a rank may hold none of a small tensor. By
the time the Trainer calls ``optimizer.step()`` on its plain torch optimizer, each ``.grad`` is a
DTensor with the same placement, already reduce-scattered (averaged, cast to the parameter's
dtype, clipped by the Trainer). So the layout is one flat tensor per parameter: its local shard
(``to_local()``: contiguous rows), at the offset of its first row in the full tensor, as DTensor
computes it (``compute_local_shape_and_global_offset``). Counts are summed over the mesh dimension
that shards (one HSDP replica); every replica holds the same shards, so each picks the same mask.

FSDP1 (``FullyShardedDataParallel``, flat parameters) is refused: its flat, padded shards do not
line up with the model's tensors the way a DTensor's rows do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from gmt_align.core.contract import Contract

from .layout import FlatLayout, FragmentAddress, OptimizerLayout, UnsupportedOptimizerError

__all__ = [
    "CONTRACT",
    "FSDP1_REFUSAL",
    "contract_missing",
    "fsdp_problems",
    "holds_dtensors",
    "layout",
    "refuse_fsdp1",
]

CONTRACT = Contract(
    checked_with="torch 2.13",
    names=(
        "torch.distributed.tensor:DTensor.placements", "torch.distributed.tensor:DTensor.device_mesh",
        "torch.distributed.tensor:DTensor.to_local", "torch.distributed.device_mesh:DeviceMesh.get_group",
        "torch.distributed.tensor.placement_types:Placement.is_replicate", "torch.distributed.tensor:Shard.dim",
        "torch.distributed.tensor._utils:compute_local_shape_and_global_offset",  # private
        "torch.distributed.fsdp:FullyShardedDataParallel", "torch.distributed.fsdp:FlatParameter",  # FSDP1, refused
    ),
    parameter=("placements", "device_mesh", "to_local", "shape"),  # on DTensor parameters and their .grad
)

FSDP1_REFUSAL = ("GMT supports FSDP2 only, not FSDP1 (flat parameters): set fsdp_version: 2 in the accelerate "
                 "config (see recipes/accelerate_configs/fsdp2.yaml), or fsdp_config: {version: 2} in the recipe")


def _dtensor_class():
    from torch.distributed.tensor import DTensor

    return DTensor


def holds_dtensors(optimizer: torch.optim.Optimizer) -> bool:
    """True if the optimizer steps DTensor parameters (FSDP2, or tensor parallelism)."""
    dtensor = _dtensor_class()
    return any(isinstance(p, dtensor) for group in optimizer.param_groups for p in group["params"])


def contract_missing(params) -> list[str]:
    """The names of ``CONTRACT`` that torch and these DTensor parameters (and their gradients) lack:
    ``[]`` when intact."""
    tensors = [t for p in params[:1] for t in ((p, p.grad) if p.grad is not None else (p,))]
    return CONTRACT.missing_names() + CONTRACT.missing(None, tensors)


def refuse_fsdp1(model: torch.nn.Module) -> None:
    """Start-up: refuse a model wrapped by FSDP1 (the flat-parameter ``FullyShardedDataParallel``)."""
    from torch.distributed.fsdp import FlatParameter, FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
        isinstance(p, FlatParameter) for p in model.parameters()
    ):
        raise UnsupportedOptimizerError(FSDP1_REFUSAL)


def fsdp_problems(training_args, environ=None) -> list[str]:
    """Parse time, before any model loads: one line per FSDP setting GMT cannot run.

    - FSDP1. The Trainer builds its FSDP plugin from the recipe's ``fsdp``/``fsdp_config`` when set
      (``version`` defaults to 2 in transformers); otherwise accelerate builds it from what
      ``accelerate launch`` exported from its config (``FSDP_VERSION``, which defaults to 1 there).
    - FSDP from ``accelerate launch`` next to the recipe's ``deepspeed:`` (the paper recipes name
      ZeRO-3): one of the two would be dropped without a word.
    """
    environ = os.environ if environ is None else environ
    plugin_args = getattr(training_args, "fsdp_plugin_args", None)
    launched_fsdp = environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if plugin_args:
        version = plugin_args.get("fsdp_version", 2)
    elif launched_fsdp:
        version = environ.get("FSDP_VERSION", "1")
    else:
        return []
    problems = [] if str(version) == "2" else [FSDP1_REFUSAL]
    if launched_fsdp and getattr(training_args, "deepspeed", None):
        problems.append(f"accelerate launched FSDP, but the recipe names a DeepSpeed config ({training_args.deepspeed}): "
                        "add --deepspeed \"\" to train under FSDP2, or launch with a ZeRO accelerate config")
    return problems


def _shard_dim(param, name: str) -> int | None:
    """The mesh dimension that shards ``param`` on its dim 0 (None: replicated on every dimension)."""
    from torch.distributed.tensor import Shard

    sharding = [d for d, p in enumerate(param.placements) if not p.is_replicate()]
    if any(type(param.placements[d]) is not Shard or param.placements[d].dim != 0 for d in sharding) or len(sharding) > 1:
        raise UnsupportedOptimizerError(
            f"GMT maps FSDP2 parameters sharded on dim 0 only (Shard(0), with HSDP Replicate() x Shard(0)); "
            f"{name} has {tuple(param.placements)}")
    return sharding[0] if sharding else None


def layout(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> OptimizerLayout:
    """A torch optimizer over FSDP2 parameters: each parameter is its own flat tensor, of which this
    process holds its local shard, whole, at the flat offset of its first row. Counts are summed over
    the mesh dimension that shards (none when nothing is sharded: every rank then holds whole,
    averaged gradients and needs no collective)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dtensor = _dtensor_class()
    tensor_id = {id(p): i for i, p in enumerate(params)}
    names = [f"tensor {i}" for i in range(len(params))]
    stepped = [p for group in optimizer.param_groups for p in group["params"] if id(p) in tensor_id]
    missing = contract_missing(stepped)
    if missing:
        raise UnsupportedOptimizerError(f"GMT cannot map FSDP2 parameters: torch lacks {', '.join(missing)} "
                                        "(read as in torch 2.13; this torch differs)")
    meshes, flats = set(), {}
    for param in stepped:
        name = names[tensor_id[id(param)]]
        if not isinstance(param, dtensor):
            raise UnsupportedOptimizerError(f"GMT under FSDP2 needs every trainable parameter sharded by "
                                            f"fully_shard; {name} is a plain tensor")
        meshes.add((param.device_mesh, _shard_dim(param, name)))
        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        if tuple(local.shape) != tuple(shape) or not local.is_contiguous():
            raise UnsupportedOptimizerError(f"GMT cannot map the FSDP2 shard of {name}: local shape "
                                            f"{tuple(local.shape)}, DTensor computes {tuple(shape)}")
        tid, numel = tensor_id[id(param)], local.numel()
        start = offset[0] * math.prod(param.shape[1:]) if param.dim() else 0
        flats[id(param)] = FlatLayout((tid,), (FragmentAddress(tid, start, 0, numel),) if numel else ())
    if len(meshes) > 1:
        raise UnsupportedOptimizerError("GMT under FSDP2 needs one device mesh (and sharding dimension) for "
                                        "all trainable parameters")
    mesh, dim = next(iter(meshes)) if meshes else (None, None)
    group = None if dim is None else mesh.get_group(dim)
    return OptimizerLayout(flats, [optimizer], [p.numel() for p in params], partitioned=group is not None,
                           process_group=group, local=_local_shard)


def _local_shard(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local()
