"""The only module that talks to ``torch.distributed``: the all-reduce handed to the selection.

Collectives degrade gracefully: without an initialised process group (or with one process) the
reduction returns its input, so the same selection code runs in a unit test and on many ranks.
"""

from __future__ import annotations

import torch

__all__ = ["AllReduce", "rank_of"]


class AllReduce:
    """Sum a tensor across ``group`` in place. Counts calls and bytes (see docs/performance.md).

    GMT only ever reduces small int64 count tensors (``[units, 256]`` per radix round, and the
    kept counts at logging steps), never gradients.
    """

    def __init__(self, group=None):
        self.group = group
        self.calls = 0
        self.bytes = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.group) == 1:
            return tensor
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        if dist.get_backend(self.group) == "gloo" or tensor.device.type != "cpu":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return tensor
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))  # NCCL needs device tensors
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.copy_(on_device)


def rank_of(group=None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
