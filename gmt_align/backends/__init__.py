"""GMT inside whichever optimizer really steps: one backend module per kind, one dispatch on its class.

Every kind goes through :class:`~gmt_align.backends.hooks.MaskHooks` (the optimizer step hooks);
the kinds differ only in the layout of what each process holds and in whether processes must sum
their counts (ZeRO partitions) or already agree (whole averaged gradients). Each backend module is
the only code that reads its optimizer's internals, and lists them in its ``CONTRACT``:

- any ``torch.optim.Optimizer`` (one process, DDP): ``torch_optimizer.py`` — a flat tensor is a
  whole parameter;
- ``DeepSpeedZeroOptimizer`` (ZeRO-1/2): ``zero12.py`` — a group's fp32 partition;
- ``DeepSpeedZeroOptimizer_Stage3`` (ZeRO-3): ``zero3.py`` — a sub-group's fp32 partition;
- ``BF16_Optimizer``: ``bf16.py`` — a group's fp32 partition;
- any torch optimizer over FSDP2's DTensor parameters (``fully_shard``): ``fsdp2.py`` — each
  parameter's local shard.

Every contract is one :class:`~gmt_align.core.contract.Contract`, checked at start-up for the names
of modules and classes and at attach time on the live optimizer and parameters. What GMT refuses in
DeepSpeed's settings is said once, in ``zero.py``; the words (flat tensor, fragment, unit, stepper)
are defined in ``layout.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gmt_align.core.distributed import AllReduce
from gmt_align.core.engine import MaskEngine, MaskOptions, TensorInfo

from . import bf16, fsdp2, torch_optimizer, zero3, zero12
from .hooks import MaskHooks, tensor_table
from .layout import Backend, FlatLayout, FragmentAddress, OptimizerLayout, UnsupportedOptimizerError

__all__ = ["Backend", "FlatLayout", "FragmentAddress", "MaskHooks", "OptimizerLayout", "UnsupportedOptimizerError",
           "attach", "backend_for", "unwrap_optimizer"]

DEEPSPEED_BACKENDS: dict[str, Backend] = {
    # the class DeepSpeed really built (dtype and offload change it, not only the stage) -> backend
    "DeepSpeedZeroOptimizer": zero12,
    "DeepSpeedZeroOptimizer_Stage3": zero3,
    "BF16_Optimizer": bf16,
}


def unwrap_optimizer(optimizer: object) -> object:
    """Strip accelerate's wrappers (AcceleratedOptimizer and subclasses) down to what really steps."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def backend_for(optimizer: object) -> Backend:
    """The backend module for an (unwrapped) optimizer, by its class; refuses the others in one line."""
    kind = type(optimizer).__name__
    if type(optimizer).__module__.startswith("deepspeed"):  # DeepSpeed's own torch optimizers too
        if kind in DEEPSPEED_BACKENDS:
            return DEEPSPEED_BACKENDS[kind]
        raise UnsupportedOptimizerError(f"GMT cannot mask inside DeepSpeed's {kind}")
    if isinstance(optimizer, torch.optim.Optimizer):  # FSDP2 steps DTensors (local shards); else whole tensors
        return fsdp2 if fsdp2.holds_dtensors(optimizer) else torch_optimizer
    raise UnsupportedOptimizerError(f"GMT cannot mask inside {kind}")


def attach(
    optimizer: object, model: torch.nn.Module, options: MaskOptions, current_step: Callable[[], int]
) -> MaskHooks:
    """Install GMT inside the step of ``optimizer`` for the trainable parameters of ``model``: any
    torch optimizer (one process, DDP, FSDP2), or what ``accelerator.prepare`` or
    ``deepspeed.initialize`` returns. From then on each ``optimizer.step()`` masks the gradient the
    optimizer sees (``options.mode == "update"``: the masked weights also stay unchanged); the step
    number that random masks hash comes from ``current_step()``. Returns the :class:`MaskHooks`:
    ``hooks.kept()`` says what the last step kept per tensor, ``hooks.detach()`` removes GMT::

        hooks = gmt_align.attach(optimizer, model, gmt_align.MaskOptions(mask_ratio=0.5), lambda: step)
    """
    inner = unwrap_optimizer(optimizer)
    backend = backend_for(inner)
    if backend is torch_optimizer:
        fsdp2.refuse_fsdp1(model)  # FSDP1's flat parameters are plain tensors to the optimizer
    params, tensors = tensor_table(model)
    layout = backend.layout(inner, params)
    tensors = [TensorInfo(info.names, numel) for info, numel in zip(tensors, layout.numels)]
    engine = MaskEngine(options, tensors, AllReduce(layout.process_group) if layout.partitioned else None)
    return MaskHooks(layout, engine, current_step, backend.__name__.rpartition(".")[2])
