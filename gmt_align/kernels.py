"""The three full passes GMT makes over a gradient, as fused kernels (``torch.compile``) or eager.

Each kernel reads |g| straight from the gradient (fp32, bf16 or fp16, widened exactly to float32)
and never materialises |g|, a bool mask or an index at full size: the passes cost what reading
(and, for the mask, writing) the gradient costs. The score of an entry is the int32 bit pattern
of ``|g|`` as float32, which orders exactly like the value.

- :func:`count_at_least` — how many entries are ``>= probe`` for a few probes (one read);
- :func:`mask_and_flag` — zero the entries below ``lo`` in place, count those ``>= hi``, and mark
  the 64-entry blocks that hold an entry in ``[lo, hi)`` (one read-modify-write, writing 1/256 of
  the gradient's bytes for the marks);
- :func:`restore_masked` — ``update`` mode: put back the saved weights where ``|g| < threshold``.

Set ``GMT_ALIGN_COMPILE=0`` to use the eager versions (same results, several times slower); they
are also the fallback where ``torch.compile`` is unavailable (no C++ compiler, unsupported device).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

__all__ = ["BLOCK", "compiled", "count_at_least", "mask_and_flag", "restore_masked"]

logger = logging.getLogger(__name__)

BLOCK = 64
"""Entries per block for :func:`mask_and_flag`'s marks (one byte per block)."""

_MAX_PIECE = 1 << 30
"""Counts are accumulated in int32 (twice as many SIMD lanes): pieces are split below 2^31."""


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().view(torch.int32)


# --- eager definitions (also what torch.compile traces) ------------------------------------------
def _count(x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    bits = _bits(x)
    return torch.stack([(bits >= probes[j]).sum(dtype=torch.int32) for j in range(probes.shape[0])])


def _mask_flag(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    bits = _bits(blocks)
    blocks.copy_(torch.where(bits >= lo, blocks, 0.0))  # a scalar: zeros_like cost 40 % more here
    return ((bits >= lo) & (bits < hi)).any(1)


def _restore(weight: torch.Tensor, saved: torch.Tensor, grad: torch.Tensor, threshold: torch.Tensor) -> None:
    weight.copy_(torch.where(_bits(grad) >= threshold, weight, saved))


_EAGER = {"count": _count, "mask_flag": _mask_flag, "restore": _restore}
_COMPILED: dict[str, Callable] = {}
_FAILED: set[str] = set()


def compiled() -> bool:
    """Whether the fused kernels are used (``GMT_ALIGN_COMPILE``, default on)."""
    return os.environ.get("GMT_ALIGN_COMPILE", "1") not in ("0", "false", "False", "")


def _kernel(name: str) -> Callable:
    if not compiled() or name in _FAILED:
        return _EAGER[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_EAGER[name], dynamic=True)
    return _COMPILED[name]


def _run(name: str, *args):
    try:
        return _kernel(name)(*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, once, loudly
        if name in _FAILED or not compiled():
            raise
        _FAILED.add(name)
        logger.warning("gmt-align: torch.compile of the %s kernel failed (%s); using eager torch ops",
                       name, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return _EAGER[name](*args)


def count_at_least(x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """int64 ``[P]``: entries of ``x`` whose |x| bit pattern is ``>= probes[j]`` (int32 ``[P]``)."""
    if x.dim() > 1:  # a view of runs (selection's subsample): small
        return _run("count", x, probes).to(torch.int64).cpu()
    total = torch.zeros(probes.shape[0], dtype=torch.int64)
    for start in range(0, x.numel(), _MAX_PIECE):
        total += _run("count", x[start : start + _MAX_PIECE], probes).to(torch.int64).cpu()
    return total


def mask_and_flag(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """On a contiguous 1-D ``x``: zero every entry with ``bits(|x|) < lo`` in place.

    Returns one mark per :data:`BLOCK` entries (the last block may be short): True where the block
    holds an entry in ``[lo, hi)``.
    """
    n = x.numel()
    body = n - n % BLOCK
    lo_t = torch.tensor(lo, dtype=torch.int32, device=x.device)
    hi_t = torch.tensor(hi, dtype=torch.int32, device=x.device)
    marks = [_run("mask_flag", x[:body].view(-1, BLOCK), lo_t, hi_t)] if body else []
    if body < n:  # the short last block, eagerly
        marks.append(_mask_flag(x[body:].view(1, -1), lo_t, hi_t))
    return torch.cat(marks) if len(marks) > 1 else marks[0] if marks else torch.zeros(0, dtype=torch.bool)


def restore_masked(weight: torch.Tensor, saved: torch.Tensor, grad: torch.Tensor, threshold: int) -> None:
    """``weight[i] = saved[i]`` wherever ``bits(|grad[i]|) < threshold`` (the masked entries)."""
    if weight.numel():
        _run("restore", weight, saved, grad, torch.tensor(threshold, dtype=torch.int32, device=grad.device))
