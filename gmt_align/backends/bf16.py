"""Backend for ``BF16_Optimizer`` (bf16 model, fp32 gradient accumulation, ZeRO stage 1, no offload).

Checked against deepspeed 0.19.8 (runtime/bf16_optimizer.py). Each rank holds one flat fp32
partition per parameter group (``fp32_groups_flat_partition``), mapped to the model's parameters
(``bf16_groups``) by the same ``_hp_mapping`` linkage as ZeRO-1/2 (read by
:func:`gmt_align.backends.zero12.flats_from_hp_mapping`); the inner optimizer steps all groups in
one step, so nothing is ever held back or republished by GMT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import Contract, OptimizerLayout
from .zero import refuse
from .zero12 import HP_MAPPING, flats_from_hp_mapping

__all__ = ["CONTRACT", "layout"]

CONTRACT = Contract(
    checked_with="deepspeed 0.19.8",
    optimizer=("optimizer", "dp_process_group", "fp32_groups_flat_partition", "bf16_groups", "_uses_muon"),
    **HP_MAPPING,
)


def layout(bf16_optimizer, params: Sequence[torch.nn.Parameter]) -> OptimizerLayout:
    tensor_id = {id(p): i for i, p in enumerate(params)}
    CONTRACT.check(bf16_optimizer, [lp for lps in bf16_optimizer.bf16_groups for lp in lps if id(lp) in tensor_id])
    refuse({"muon": bf16_optimizer._uses_muon})
    return OptimizerLayout(
        flats=flats_from_hp_mapping(bf16_optimizer.fp32_groups_flat_partition, bf16_optimizer.bf16_groups, tensor_id),
        steppers=[bf16_optimizer.optimizer],
        numels=[p.numel() for p in params],
        partitioned=True,
        process_group=bf16_optimizer.dp_process_group,
    )
