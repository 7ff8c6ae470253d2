"""One adapter per kind of optimizer DeepSpeed or the Trainer really built; one dispatch on its class."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine import MaskOptions
from .torch_optimizer import TorchOptimizerAdapter

__all__ = ["TorchOptimizerAdapter", "UnsupportedOptimizerError", "attach", "unwrap_optimizer"]


class UnsupportedOptimizerError(RuntimeError):
    """GMT cannot place its mask inside this optimizer; training must not go on unmasked."""


def unwrap_optimizer(optimizer: object) -> object:
    """Strip accelerate's wrappers (AcceleratedOptimizer and subclasses) down to what really steps."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def attach(
    optimizer: object, model: torch.nn.Module, options: MaskOptions, current_step: Callable[[], int]
) -> TorchOptimizerAdapter:
    """Install GMT inside the step of ``optimizer`` (as returned by ``accelerator.prepare``)."""
    inner = unwrap_optimizer(optimizer)
    module = type(inner).__module__
    if module.startswith("deepspeed"):
        raise UnsupportedOptimizerError(
            f"GMT does not support DeepSpeed's {type(inner).__name__} yet; run without --deepspeed"
        )
    if not isinstance(inner, torch.optim.Optimizer):
        raise UnsupportedOptimizerError(f"GMT cannot mask inside {type(inner).__name__}")
    return TorchOptimizerAdapter(inner, model, options, current_step)
