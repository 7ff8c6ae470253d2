"""Layout for a plain torch optimizer: one process, DDP, or DeepSpeed stage 0 without fp16.

Every process holds whole, already-averaged gradients, so each parameter is its own partition,
every process computes the same mask, and no collective is needed (random masks are keyed by
seed, step, tensor and position, never by rank).
"""

from __future__ import annotations

import torch

from .hooks import Partition, Piece

__all__ = ["torch_partitions"]


def torch_partitions(optimizer: torch.optim.Optimizer, tensor_id: dict[int, int]) -> dict[int, Partition]:
    partitions = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            tid = tensor_id.get(id(param))
            if tid is None:
                continue
            if not param.is_contiguous():
                raise ValueError(f"GMT needs contiguous parameters; tensor {tid} is not")
            partitions[id(param)] = Partition((tid,), (Piece(tid, 0, 0, param.numel()),))
    return partitions
