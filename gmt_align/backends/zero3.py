"""Backend for ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``), with or without (partial) CPU offload.

Checked against deepspeed 0.19.8 (runtime/zero/stage3.py). Each rank holds one flat fp32 partition
per sub-group (``fp32_partitioned_groups_flat``, sub_group_size entries at most), and the inner
optimizer steps one sub-group at a time; with partial offload (``offload_optimizer.ratio`` < 1)
some sub-groups step through ``backup_optimizer`` instead. For a parameter ``p`` of sub-group ``sg``
(``fp16_groups[sg]``), ``grad_position[get_param_id(p)] = [sg, start, partition_numel]``: rank ``r``
holds elements ``[r*pn, (r+1)*pn)`` of ``p``, of which ``max(0, min(pn, p.ds_numel - r*pn))`` are
real (``ds_numel`` is the full size; the parameter's own data is empty outside a gather).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmt_align.core.distributed import rank_of

from .layout import Contract, FlatLayout, FragmentAddress, OptimizerLayout, UnsupportedOptimizerError
from .zero import refuse

__all__ = ["CONTRACT", "layout"]


def _has_backup_optimizer(zero_optimizer) -> bool:
    """DeepSpeed builds ``backup_optimizer`` only for partial offload (stage3.py, ``__init__``)."""
    return bool(zero_optimizer.offload_optimizer) and zero_optimizer.partial_offload != 1.0


CONTRACT = Contract(
    checked_with="deepspeed 0.19.8",
    optimizer=("optimizer", "dp_process_group", "fp32_partitioned_groups_flat", "fp16_groups", "grad_position",
               "get_param_id", "_reassign_or_swap_out_partitioned_parameters", "offload_optimizer",
               "partial_offload", "zenflow", "swap_optimizer", "use_muon", "overflow", "dtype"),
    parameter=("ds_numel",),
    conditional={"backup_optimizer": _has_backup_optimizer},
)


def layout(zero_optimizer, params: Sequence[torch.nn.Parameter]) -> OptimizerLayout:
    tensor_id = {id(p): i for i, p in enumerate(params)}
    CONTRACT.check(zero_optimizer, [p for ps in zero_optimizer.fp16_groups for p in ps if id(p) in tensor_id])
    refuse({"zenflow": zero_optimizer.zenflow, "nvme": zero_optimizer.swap_optimizer, "muon": zero_optimizer.use_muon})
    steppers = [zero_optimizer.optimizer]
    if _has_backup_optimizer(zero_optimizer):
        steppers.append(zero_optimizer.backup_optimizer)
    sub_group_of = {id(flat): i for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)}

    def republish(flat: torch.Tensor) -> None:
        """Copy a sub-group's fp32 partition into the model's partitioned parameters, as ZeRO-3's
        step does after each sub-group."""
        zero_optimizer._reassign_or_swap_out_partitioned_parameters(sub_group_of[id(flat)])

    return OptimizerLayout(
        flats=_flats(zero_optimizer, tensor_id, rank_of(zero_optimizer.dp_process_group)),
        steppers=steppers,
        # a trainable parameter outside the optimizer's groups is never stepped; its size is only a label
        numels=[int(getattr(p, "ds_numel", p.numel())) for p in params],
        partitioned=True,
        process_group=zero_optimizer.dp_process_group,
        republish=republish,
        overflowed=None if zero_optimizer.dtype == torch.float16 else lambda: bool(zero_optimizer.overflow),
    )


def _flats(zero_optimizer, tensor_id: dict[int, int], rank: int) -> dict[int, FlatLayout]:
    """One flat partition per sub-group, its fragments read from ``grad_position``."""
    flats = {}
    for sub_group, (flat, params) in enumerate(zip(zero_optimizer.fp32_partitioned_groups_flat,
                                                   zero_optimizer.fp16_groups)):
        tensors, fragments = [], []
        for param in params:
            tid = tensor_id.get(id(param))
            if tid is None:
                continue
            tensors.append(tid)
            group_of, start, partition_numel = zero_optimizer.grad_position[zero_optimizer.get_param_id(param)]
            if group_of != sub_group:
                raise UnsupportedOptimizerError(f"ZeRO-3 layout changed: parameter {tid} not in its sub-group")
            real = max(0, min(partition_numel, param.ds_numel - rank * partition_numel))
            if real:
                fragments.append(FragmentAddress(tid, rank * partition_numel, start, real))
        flats[id(flat)] = FlatLayout(tuple(tensors), tuple(fragments))
    return flats
