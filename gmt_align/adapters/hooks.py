"""The one mechanism every adapter shares: GMT inside ``torch.optim.Optimizer.step`` hooks.

Whatever DeepSpeed builds, the tensor that is finally stepped is a torch optimizer's parameter:
the model's own parameters (one process, DDP, DeepSpeed stage 0), or flat fp32 partitions
(ZeRO-1/2, ZeRO-3, BF16_Optimizer). At that moment its ``.grad`` is exactly what the optimizer
will use: accumulated, reduced, unscaled and clipped (clipping therefore uses the unmasked norm).
The public step pre-hook masks it; the post-hook restores masked weights (``update`` mode) before
DeepSpeed copies the fp32 master weights back to the model's weights.

An adapter only says, for each stepped tensor, which pieces of which model tensors it holds: a
:class:`Partition`. Everything else is here and in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..engine import Fragment, MaskEngine, TensorInfo

__all__ = ["HookAdapter", "Partition", "Piece", "tensor_table"]


@dataclass(frozen=True)
class Piece:
    """Elements ``[offset, offset + numel)`` of model tensor ``tensor_id`` sit at ``start`` in a flat tensor."""

    tensor_id: int
    offset: int
    start: int
    numel: int


@dataclass(frozen=True)
class Partition:
    """What a stepped tensor holds on this process, and which model tensors its group has on any process.

    ``tensors`` must be the same on every process: it decides the rows of the reduced counts.
    """

    tensors: tuple[int, ...]
    pieces: tuple[Piece, ...]


def tensor_table(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[TensorInfo]]:
    """Trainable parameters in ``named_parameters()`` order, each with every name it has.

    A tied parameter (``lm_head.weight`` sharing ``model.embed_tokens.weight``) appears once, under
    all its names. The order is the same on every rank, so the index is a tensor id all ranks agree
    on. Sizes are full sizes (ZeRO-3 keeps a partitioned parameter's size in ``ds_numel``).
    """
    names: dict[int, list[str]] = {}
    params: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        if id(param) not in names:
            names[id(param)] = []
            params.append(param)
        names[id(param)].append(name)
    infos = [TensorInfo(tuple(names[id(p)]), int(getattr(p, "ds_numel", p.numel()))) for p in params]
    return params, infos


class HookAdapter:
    """Runs the engine inside the step of ``optimizers`` for the tensors listed in ``partitions``.

    ``partitions`` maps ``id(stepped tensor)`` to its :class:`Partition`. A step call may cover one
    partition (ZeRO steps one group or sub-group at a time) or all (a plain optimizer): the units
    selected in a call are those of the groups of the partitions it steps.
    """

    def __init__(
        self,
        optimizers: Iterable[torch.optim.Optimizer],
        partitions: dict[int, Partition],
        engine: MaskEngine,
        current_step: Callable[[], int],
    ):
        self.partitions = partitions
        self.engine = engine
        self.current_step = current_step
        self._fragments: list[Fragment] = []
        self._handles = []
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _stepped(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [
            p for group in optimizer.param_groups for p in group["params"]
            if id(p) in self.partitions and p.grad is not None
        ]

    def fragments(self, stepped: Sequence[torch.Tensor]) -> list[Fragment]:
        fragments = []
        for flat in stepped:
            grad, weight = flat.grad.view(-1), flat.data.view(-1)
            for piece in self.partitions[id(flat)].pieces:
                end = piece.start + piece.numel
                fragments.append(Fragment(piece.tensor_id, piece.offset, grad[piece.start : end], weight[piece.start : end]))
        return fragments

    def _before_step(self, optimizer, args, kwargs) -> None:
        stepped = self._stepped(optimizer)
        if not stepped:
            return
        tensors = [t for flat in stepped for t in self.partitions[id(flat)].tensors]
        fragments = self.fragments(stepped)
        self.engine.select(fragments, self.current_step(), self.engine.units_of(tensors))
        self.engine.mask(fragments)
        self._fragments = fragments

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.engine.restore(self._fragments)
        self._fragments = []

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
