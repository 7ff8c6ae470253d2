"""One adapter per kind of optimizer DeepSpeed or the Trainer really built; one dispatch on its class.

Every kind goes through :class:`~gmt_align.adapters.hooks.HookAdapter`; the kinds differ only in
the layout of what each rank holds (``torch_optimizer.py``, ``zero.py``) and in whether ranks must
sum their counts (ZeRO partitions) or already agree (whole averaged gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..distributed import AllReduce, rank_of
from ..engine import MaskEngine, MaskOptions
from .fsdp2 import ShardAdapter, fsdp2_layout, holds_dtensors, refuse_fsdp1
from .hooks import HookAdapter, Partition, Piece, tensor_table
from .torch_optimizer import torch_partitions
from .zero import (
    UnsupportedOptimizerError,
    hp_mapping_partitions,
    overflow_flag,
    refuse_unmappable,
    zero3_partitions,
    zero3_republish,
    zero12_republish,
)

__all__ = ["HookAdapter", "Partition", "Piece", "UnsupportedOptimizerError", "attach", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: object) -> object:
    """Strip accelerate's wrappers (AcceleratedOptimizer and subclasses) down to what really steps."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def attach(
    optimizer: object, model: torch.nn.Module, options: MaskOptions, current_step: Callable[[], int]
) -> HookAdapter:
    """Install GMT inside the step of ``optimizer`` (as returned by ``accelerator.prepare`` or
    ``deepspeed.initialize``) for the trainable parameters of ``model``."""
    inner = unwrap_optimizer(optimizer)
    params, tensors = tensor_table(model)
    tensor_id = {id(p): i for i, p in enumerate(params)}
    kind = type(inner).__name__
    reduce = republish = overflowed = None
    adapter = HookAdapter
    if type(inner).__module__.startswith("deepspeed"):
        refuse_unmappable(inner)
        if kind == "DeepSpeedZeroOptimizer":  # ZeRO-1 and ZeRO-2, offload or not
            partitions = hp_mapping_partitions(inner.single_partition_of_fp32_groups, inner.bit16_groups, tensor_id)
            steppers, republish = [inner.optimizer], zero12_republish(inner, rank_of(inner.dp_process_group))
            overflowed = overflow_flag(inner)
        elif kind == "DeepSpeedZeroOptimizer_Stage3":
            partitions = zero3_partitions(inner, tensor_id, rank_of(inner.dp_process_group))
            steppers, republish = [inner.optimizer], zero3_republish(inner)
            overflowed = overflow_flag(inner)
            if getattr(inner, "backup_optimizer", None) is not None:  # partial offload
                steppers.append(inner.backup_optimizer)
        elif kind == "BF16_Optimizer":
            partitions = hp_mapping_partitions(inner.fp32_groups_flat_partition, inner.bf16_groups, tensor_id)
            steppers = [inner.optimizer]
        else:
            raise UnsupportedOptimizerError(f"GMT cannot mask inside DeepSpeed's {kind}")
        reduce = AllReduce(inner.dp_process_group)
    elif isinstance(inner, torch.optim.Optimizer) and holds_dtensors(inner):  # FSDP2: local shards
        partitions, steppers, group = fsdp2_layout(inner, tensor_id, [t.names[0] for t in tensors])
        reduce, adapter = (AllReduce(group) if group is not None else None), ShardAdapter
    elif isinstance(inner, torch.optim.Optimizer):
        refuse_fsdp1(model)
        partitions, steppers = torch_partitions(inner, tensor_id), [inner]
    else:
        raise UnsupportedOptimizerError(f"GMT cannot mask inside {kind}")

    engine = MaskEngine(options, tensors, reduce)
    return adapter(steppers, partitions, engine, current_step, republish, overflowed)
