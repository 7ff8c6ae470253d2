"""What a backend tells GMT about an optimizer: the one interface between backends and the hooks.

Words (used the same way in every module of gmt_align):

- **tensor** — a trainable parameter of the model, as every process sees it; its *tensor id* is
  its index in ``named_parameters()`` order (:func:`gmt_align.backends.hooks.tensor_table`).
- **flat tensor** — a tensor that a torch optimizer really steps: the parameter itself (plain
  torch optimizer, DDP), or a flat fp32 partition (ZeRO-1/2, BF16_Optimizer) or sub-group
  partition (ZeRO-3) of many parameters. :class:`FlatLayout` says what one holds.
- **fragment** — a contiguous slice of one tensor that this process holds, inside a flat tensor.
  :class:`FragmentAddress` says where it lies (in the tensor and in the flat tensor);
  :class:`gmt_align.core.engine.Fragment` is the same slice at step time, as views of the gradient
  and of the weights.
- **unit** — what one threshold is selected over: one tensor (``tensor`` granularity) or all
  maskable tensors together (``global``).
- **stepper** — a torch optimizer whose ``step`` GMT hooks (DeepSpeed's inner optimizer, or the
  Trainer's own).
- **backend** — one module per kind of optimizer (``torch_optimizer``, ``zero12``, ``zero3``,
  ``bf16``): the only code that reads that optimizer's internals. It lists every private attribute
  it reads in its :class:`Contract` and returns an :class:`OptimizerLayout`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from gmt_align.core.contract import Contract, UnsupportedOptimizerError

__all__ = ["Backend", "Contract", "FlatLayout", "FragmentAddress", "OptimizerLayout", "UnsupportedOptimizerError"]


@dataclass(frozen=True)
class FragmentAddress:
    """Entries ``[offset, offset + numel)`` of tensor ``tensor_id`` sit at ``start`` in a flat tensor."""

    tensor_id: int
    offset: int
    start: int
    numel: int


@dataclass(frozen=True)
class FlatLayout:
    """What one flat tensor holds on this process (``fragments``), and which tensors its group has on
    any process (``tensors``: the same on every process, it decides the rows of the reduced counts)."""

    tensors: tuple[int, ...]
    fragments: tuple[FragmentAddress, ...]


@dataclass(frozen=True)
class OptimizerLayout:
    """A backend's answer for one optimizer.

    Attributes:
        flats: ``id(flat tensor)`` -> its :class:`FlatLayout`, for every flat tensor that holds
            trainable tensors.
        steppers: the torch optimizers whose steps GMT hooks.
        numels: the full size of every tensor, by tensor id (ZeRO-3 keeps it apart from the data).
        partitioned: the fragments of a unit are spread over the processes of ``process_group``,
            which sum their counts; False when every process holds whole, already-averaged
            gradients (they agree without communicating).
        process_group: the data-parallel group (DeepSpeed's ``dp_process_group``).
        republish: copies a flat tensor's fp32 weights to where the model reads them, as the
            backend's own step does after each flat tensor (needed to replay held steps).
        overflowed: whether the backend itself skipped the last step for a non-finite gradient
            norm (ZeRO in fp32/bf16; under fp16 a skipped step is the loss scaler's normal work).
        local: the tensor this process holds of a flat tensor, its gradient or its weights (FSDP2:
            a DTensor's ``to_local()``, which shares the storage the optimizer updates); ``None``:
            the tensor itself.
    """

    flats: dict[int, FlatLayout]
    steppers: list[torch.optim.Optimizer]
    numels: list[int]
    partitioned: bool = False
    process_group: object | None = None
    republish: Callable[[torch.Tensor], None] | None = None
    overflowed: Callable[[], bool] | None = None
    local: Callable[[torch.Tensor], torch.Tensor] | None = None


class Backend(Protocol):
    """A backend module (``torch_optimizer``, ``zero12``, ``zero3``, ``bf16``): checks its contract
    and refusals on the optimizer, then says what each process holds. ``params`` are the trainable
    tensors; a tensor's id is its index there."""

    def layout(self, optimizer: object, params: Sequence[torch.nn.Parameter]) -> OptimizerLayout: ...
