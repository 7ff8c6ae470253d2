"""Layouts of DeepSpeed's optimizers: which pieces of which tensors each flat fp32 partition holds.

This is the only module that reads DeepSpeed's private attributes. Checked against deepspeed
0.19.8; ``tests/test_zero.py`` checks every attribute in ``CONTRACT`` on real instances.

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``: every model parameter ``lp`` that
  overlaps this rank's flat partition of its group carries ``lp._hp_mapping``, whose
  ``hp_fragment_address`` is the piece's place in the flat partition and ``lp_fragment_address``
  its place in ``lp.view(-1)`` (padding excluded). ZeRO-1/2 steps one group per inner step;
  BF16_Optimizer steps all groups in one.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``grad_position[param_id] = [sub_group, start,
  partition_numel]``; rank ``r`` holds elements ``[r*pn, (r+1)*pn)`` of the parameter, of which
  ``max(0, min(pn, ds_numel - r*pn))`` are real. One sub-group per inner step; with partial
  offload some sub-groups step through ``backup_optimizer``.
"""

from __future__ import annotations

import torch

from .hooks import Partition, Piece

__all__ = [
    "CONTRACT",
    "REFUSALS",
    "UnsupportedOptimizerError",
    "hp_mapping_partitions",
    "overflow_flag",
    "refuse_unmappable",
    "zero3_partitions",
    "zero3_republish",
    "zero12_republish",
]

CONTRACT = {
    # optimizer class -> private attributes this module reads (tests/test_zero.py checks them on real
    # instances, so a DeepSpeed upgrade that renames one fails loudly instead of masking wrongly).
    "DeepSpeedZeroOptimizer": ("optimizer", "dp_process_group", "single_partition_of_fp32_groups", "bit16_groups",
                               "round_robin_gradients", "parallel_partitioned_bit16_groups", "overflow", "dtype"),
    "DeepSpeedZeroOptimizer_Stage3": ("optimizer", "dp_process_group", "fp32_partitioned_groups_flat", "fp16_groups",
                                      "grad_position", "get_param_id", "swap_optimizer",
                                      "_reassign_or_swap_out_partitioned_parameters", "overflow", "dtype"),
    "BF16_Optimizer": ("optimizer", "dp_process_group", "fp32_groups_flat_partition", "bf16_groups"),
    "_hp_mapping": ("hp_fragment_address", "lp_fragment_address"),
}


class UnsupportedOptimizerError(RuntimeError):
    """GMT cannot place its mask inside this optimizer; training must not go on unmasked."""


REFUSALS = {
    # setting -> the one line said when it is on (also checked in the DeepSpeed JSON before loading)
    "round_robin_gradients": "GMT cannot map ZeRO partitions with round_robin_gradients=true; set it false",
    "zenflow": "GMT does not support ZenFlow (zero_optimization.zenflow); remove it",
    "nvme": "GMT does not support optimizer offload to NVMe; use offload_optimizer.device=cpu",
    "muon": "GMT does not support DeepSpeed's Muon optimizer",
}


def refuse_unmappable(zero_optimizer) -> None:
    """Refuse, with one line naming the option, settings whose partition layout we cannot map."""
    found = {
        "round_robin_gradients": getattr(zero_optimizer, "round_robin_gradients", False),
        "zenflow": getattr(zero_optimizer, "zenflow", False),
        "nvme": getattr(zero_optimizer, "swap_optimizer", False),
        "muon": getattr(zero_optimizer, "use_muon", False) or getattr(zero_optimizer, "_uses_muon", False),
    }
    for key, on in found.items():
        if on:
            raise UnsupportedOptimizerError(REFUSALS[key])


def hp_mapping_partitions(
    flat_partitions: list[torch.Tensor], lp_groups: list[list[torch.nn.Parameter]], tensor_id: dict[int, int]
) -> dict[int, Partition]:
    """ZeRO-1/2 (``single_partition_of_fp32_groups``, ``bit16_groups``) and BF16_Optimizer
    (``fp32_groups_flat_partition``, ``bf16_groups``)."""
    partitions = {}
    for flat, lps in zip(flat_partitions, lp_groups):
        tensors, pieces = [], []
        for lp in lps:
            tid = tensor_id.get(id(lp))
            if tid is None:
                continue
            tensors.append(tid)
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is not None:
                hp, lp_address = mapping.hp_fragment_address, mapping.lp_fragment_address
                pieces.append(Piece(tid, lp_address.start, hp.start, hp.numel))
        partitions[id(flat)] = Partition(tuple(tensors), tuple(pieces))
    return partitions


def zero3_partitions(zero_optimizer, tensor_id: dict[int, int], rank: int) -> dict[int, Partition]:
    """ZeRO-3: one partition per sub-group (``fp32_partitioned_groups_flat``, ``fp16_groups``)."""
    partitions = {}
    for sub_group, (flat, params) in enumerate(zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups)):
        tensors, pieces = [], []
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
                pieces.append(Piece(tid, rank * partition_numel, start, real))
        partitions[id(flat)] = Partition(tuple(tensors), tuple(pieces))
    return partitions


def zero12_republish(zero_optimizer, partition_id: int):
    """Copy a group's fp32 partition into its bit16 partition, as ZeRO-1/2's step does after each
    group (DeepSpeed all-gathers the bit16 partitions once all groups have stepped)."""
    group_of = {id(flat): i for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups)}

    def republish(flat: torch.Tensor) -> None:
        bit16 = zero_optimizer.parallel_partitioned_bit16_groups[group_of[id(flat)]][partition_id]
        bit16.data.copy_(flat.data)

    return republish


def zero3_republish(zero_optimizer):
    """Copy a sub-group's fp32 partition into the model's partitioned parameters, as ZeRO-3's step
    does after each sub-group."""
    sub_group_of = {id(flat): i for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)}

    def republish(flat: torch.Tensor) -> None:
        zero_optimizer._reassign_or_swap_out_partitioned_parameters(sub_group_of[id(flat)])

    return republish


def overflow_flag(zero_optimizer):
    """ZeRO-1/2/3 in fp32 or bf16: a callable telling whether the last step was skipped because the
    gradient norm was inf/NaN (DeepSpeed then skips every group on every rank, before GMT's hooks
    run). ``None`` under fp16, where a skipped overflow step is the loss scaler's normal work."""
    if zero_optimizer.dtype == torch.float16:
        return None
    return lambda: bool(zero_optimizer.overflow)
