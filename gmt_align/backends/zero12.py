"""Backend for ZeRO-1 and ZeRO-2 (``DeepSpeedZeroOptimizer``), with or without CPU offload.

Checked against deepspeed 0.19.8 (runtime/zero/stage_1_and_2.py). Each rank holds one flat fp32
partition per parameter group (``single_partition_of_fp32_groups``), and the inner optimizer
steps one group at a time. Every model parameter ``lp`` of the group (``bit16_groups``) carries
``lp._hp_mapping`` (DeepSpeed's mixed-precision linkage, also used by BF16_Optimizer): None if it
does not overlap this rank's partition, else ``hp_fragment_address`` (the fragment's place in the
flat partition) and ``lp_fragment_address`` (its place in ``lp.view(-1)``), padding excluded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmt_align.core.distributed import rank_of

from .layout import Contract, FlatLayout, FragmentAddress, OptimizerLayout
from .zero import refuse

__all__ = ["CONTRACT", "HP_MAPPING", "flats_from_hp_mapping", "layout"]

HP_MAPPING = {"parameter": ("_hp_mapping",), "mapping": ("hp_fragment_address", "lp_fragment_address")}
"""What :func:`flats_from_hp_mapping` reads on the parameters (ZeRO-1/2 and BF16_Optimizer)."""

CONTRACT = Contract(
    checked_with="deepspeed 0.19.8",
    optimizer=("optimizer", "dp_process_group", "single_partition_of_fp32_groups", "bit16_groups",
               "parallel_partitioned_bit16_groups", "round_robin_gradients", "zenflow", "overflow", "dtype"),
    **HP_MAPPING,
)


def layout(zero_optimizer, params: Sequence[torch.nn.Parameter]) -> OptimizerLayout:
    tensor_id = {id(p): i for i, p in enumerate(params)}
    CONTRACT.check(zero_optimizer, [lp for lps in zero_optimizer.bit16_groups for lp in lps if id(lp) in tensor_id])
    refuse({
        "round_robin_gradients": zero_optimizer.round_robin_gradients,
        "zenflow": zero_optimizer.zenflow,
        # DeepSpeed's own test for a Muon group under ZeRO-1/2 (_is_muon_group) is the class name
        "muon": "muon" in type(zero_optimizer.optimizer).__name__.lower(),
    })
    group_of = {id(flat): i for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups)}
    partition_id = rank_of(zero_optimizer.dp_process_group)

    def republish(flat: torch.Tensor) -> None:
        """Copy a group's fp32 partition into its bit16 partition, as ZeRO-1/2's step does after each
        group (DeepSpeed all-gathers the bit16 partitions once all groups have stepped)."""
        bit16 = zero_optimizer.parallel_partitioned_bit16_groups[group_of[id(flat)]][partition_id]
        bit16.data.copy_(flat.data)

    return OptimizerLayout(
        flats=flats_from_hp_mapping(zero_optimizer.single_partition_of_fp32_groups, zero_optimizer.bit16_groups,
                                    tensor_id),
        steppers=[zero_optimizer.optimizer],
        numels=[p.numel() for p in params],
        partitioned=True,
        process_group=zero_optimizer.dp_process_group,
        republish=republish,
        overflowed=_overflow_flag(zero_optimizer),
    )


def flats_from_hp_mapping(
    flat_partitions: list[torch.Tensor], lp_groups: list[list[torch.nn.Parameter]], tensor_id: dict[int, int]
) -> dict[int, FlatLayout]:
    """One flat partition per group, its fragments read from each parameter's ``_hp_mapping``."""
    flats = {}
    for flat, lps in zip(flat_partitions, lp_groups):
        tensors, fragments = [], []
        for lp in lps:
            tid = tensor_id.get(id(lp))
            if tid is None:
                continue
            tensors.append(tid)
            mapping = lp._hp_mapping
            if mapping is not None:
                hp, lp_address = mapping.hp_fragment_address, mapping.lp_fragment_address
                fragments.append(FragmentAddress(tid, lp_address.start, hp.start, hp.numel))
        flats[id(flat)] = FlatLayout(tuple(tensors), tuple(fragments))
    return flats


def _overflow_flag(zero_optimizer):
    """fp32 or bf16: whether the last step was skipped because the gradient norm was inf/NaN
    (DeepSpeed then skips every group on every rank, before GMT's hooks run). ``None`` under fp16,
    where a skipped overflow step is the loss scaler's normal work."""
    if zero_optimizer.dtype == torch.float16:
        return None
    return lambda: bool(zero_optimizer.overflow)
