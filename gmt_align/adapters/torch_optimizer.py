"""Adapter for a plain torch optimizer: one process, or DDP (every rank holds the averaged grads).

The mask goes in through ``torch.optim.Optimizer``'s public step hooks: the pre-hook sees the
gradient accumulated over the whole accumulation window, already all-reduced by DDP and already
clipped by the Trainer (clipping uses the unmasked norm, as DeepSpeed does), and masks it; the
post-hook restores masked weights in ``update`` mode. No collective is needed: every rank computes
the same mask from the same gradient (random masks are keyed by seed and step, not by rank).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine import Fragment, MaskEngine, MaskOptions
from .layout import tensor_table

__all__ = ["TorchOptimizerAdapter"]


class TorchOptimizerAdapter:
    """Masks through ``register_step_pre_hook`` / ``register_step_post_hook`` of ``optimizer``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        options: MaskOptions,
        current_step: Callable[[], int],
    ):
        params, tensors = tensor_table(model)
        self.tensor_id = {id(p): i for i, p in enumerate(params)}
        self.engine = MaskEngine(options, tensors)
        self.current_step = current_step
        self._fragments: list[Fragment] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        fragments = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                tensor_id = self.tensor_id.get(id(param))
                if param.grad is None or tensor_id is None:
                    continue
                if param.grad.is_sparse or not param.grad.is_contiguous():
                    raise ValueError(f"GMT needs dense contiguous gradients; {param.shape} is not")
                fragments.append(Fragment(tensor_id, 0, param.grad.view(-1), param.data.view(-1)))
        self.engine.select(fragments, self.current_step())
        self.engine.mask(fragments)
        self._fragments = fragments

    def _after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.engine.restore(self._fragments)
        self.engine.end_step()
        self._fragments = []

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
