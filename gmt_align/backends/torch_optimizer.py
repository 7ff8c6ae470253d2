"""Backend for a plain torch optimizer: one process, DDP, or DeepSpeed stage 0 without fp16.

Every process holds whole, already-averaged gradients, so each parameter is its own flat tensor,
every process computes the same mask, and no collective is needed (random masks are keyed by
seed, step, tensor and position, never by rank). Reads only torch's public ``param_groups``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import FlatLayout, FragmentAddress, OptimizerLayout

__all__ = ["layout"]


def layout(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> OptimizerLayout:
    """Each parameter the optimizer steps holds one whole tensor, on every process."""
    tensor_id = {id(p): i for i, p in enumerate(params)}
    flats = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            tid = tensor_id.get(id(param))
            if tid is None:
                continue
            if not param.is_contiguous():
                raise ValueError(f"GMT needs contiguous parameters; tensor {tid} is not")
            flats[id(param)] = FlatLayout((tid,), (FragmentAddress(tid, 0, 0, param.numel()),))
    return OptimizerLayout(flats, [optimizer], [p.numel() for p in params])
