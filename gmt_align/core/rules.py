"""The selection rules — ``magnitude`` and ``random`` — each one object, chosen once per engine.

A rule does three things for the engine (:class:`gmt_align.core.engine.MaskEngine`), on the fragments of
the units being selected, grouped by unit:

- :meth:`~SelectionRule.select_and_mask` — find each unit's threshold collectively (through
  ``reduce``) and zero the masked gradient entries in place (``update`` mode: keeping their weights
  aside in the same pass, :class:`gmt_align.core.masked_weights.Aside`); returns the thresholds (int32 bit
  patterns as int64) and the kept count of every fragment;
- :meth:`~SelectionRule.kept_mask` — which entries of a fragment the last selection kept (until the
  optimizer step ends: optimizers read the gradient but do not change it);
- :meth:`~SelectionRule.count_masked`, :meth:`~SelectionRule.pack` and :meth:`~SelectionRule.restore`
  — ``update`` mode, for the weights the masking pass did not keep: count and pack a fragment's masked
  weights after selection, and write them back after the step, bit for bit
  (:mod:`gmt_align.core.masked_weights`; the masked entries are found again each time, from the masked
  gradient or the scores, so no index is kept).

Both keep entries whose score's bit pattern is ``>= T``. ``magnitude``: score = |g|, and T is at
least the smallest positive float, so a kept entry has a non-zero gradient and a masked one a zero
gradient: the masked gradient *is* the kept mask (``gradient_is_kept_mask``). ``random``: score =
uniform [0, 1) from (seed, step, tensor, position) — :func:`random_chunks`, below — so every
sharding of a tensor sees the same scores and the same mask; they are not the gradient, so the
rule does not find inf/NaN gradients itself (``reads_gradient`` is False: the engine checks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch

from .batch_kernels import random_range
from .masked_weights import (
    Aside,
    MaskedWeights,
    Packed,
    count_below,
    pack_below,
    pack_where,
    unpack_below,
    unpack_where,
)
from .radix import Reduce
from .selection import select_and_mask

__all__ = ["RANDOM_BLOCK", "MagnitudeRule", "RandomRule", "SelectionRule", "random_chunks", "random_key", "rule_for"]


class SelectionRule(Protocol):
    reads_gradient: bool  # the selection reads every gradient entry, so it finds inf/NaN itself
    gradient_is_kept_mask: bool  # after masking, an entry is kept iff its gradient is non-zero

    def select_and_mask(self, rows: Sequence[Sequence], keep: Sequence[int], sizes: Sequence[int],
                        reduce: Reduce | None, names: Sequence[str], step: int, aside: Aside | None = None
                        ) -> tuple[torch.Tensor, list[list[int]]]: ...

    def kept_mask(self, fragment, threshold: int, step: int) -> torch.Tensor: ...

    def count_masked(self, fragment, threshold: int, step: int, store: MaskedWeights | None = None) -> Packed: ...

    def pack(self, fragment, threshold: int, step: int, packed: Packed) -> None: ...

    def restore(self, fragment, packed: Packed, threshold: int, step: int) -> None: ...


class MagnitudeRule:
    """Keep the largest |g| of each unit (:func:`gmt_align.core.selection.select_and_mask`)."""

    reads_gradient = True
    gradient_is_kept_mask = True

    def select_and_mask(self, rows, keep, sizes, reduce, names, step, aside=None):
        grads = [[fragment.grad for fragment in row] for row in rows]
        return select_and_mask(len(rows), grads.__getitem__, keep, sizes, reduce, names, aside=aside)

    def kept_mask(self, fragment, threshold: int, step: int) -> torch.Tensor:
        # kept: |g| >= T >= smallest positive; masked entries are 0
        return fragment.grad.float().abs().view(torch.int32) >= threshold

    # masked: bits(|g|) < T (i.e. g == 0 once masked)
    def count_masked(self, fragment, threshold: int, step: int, store: MaskedWeights | None = None) -> Packed:
        return count_below(fragment.weight, fragment.grad, threshold, store)

    def pack(self, fragment, threshold: int, step: int, packed: Packed) -> None:
        pack_below(fragment.weight, fragment.grad, threshold, packed)

    def restore(self, fragment, packed: Packed, threshold: int, step: int) -> None:
        unpack_below(fragment.weight, fragment.grad, threshold, packed)


class RandomRule:
    """Keep the entries of each unit with the largest random scores (the paper's random baseline)."""

    reads_gradient = False
    gradient_is_kept_mask = False

    def __init__(self, seed: int):
        self.seed = seed

    def key(self, fragment, step: int) -> int:
        """The key of the fragment's tensor at this step: its scores are random_bits(key, position)."""
        return random_key(self.seed, step, fragment.tensor_id)

    def scores(self, fragment, step: int) -> Iterator[torch.Tensor]:
        """The fragment's scores, chunk by chunk: the same whichever process holds it."""
        yield from random_chunks(self.seed, step, fragment.tensor_id, fragment.offset, fragment.grad.numel(),
                                 fragment.grad.device)

    def select_and_mask(self, rows, keep, sizes, reduce, names, step, aside=None):
        # the magnitude machinery over position-keyed scores: counted and masked without storing them
        grads = [[fragment.grad for fragment in row] for row in rows]
        keys = [[(self.key(fragment, step), fragment.offset) for fragment in row] for row in rows]
        return select_and_mask(len(rows), grads.__getitem__, keep, sizes, reduce, names, random_keys=keys.__getitem__,
                               aside=aside)

    def kept_mask(self, fragment, threshold: int, step: int) -> torch.Tensor:
        return torch.cat([c.view(torch.int32) >= threshold for c in self.scores(fragment, step)]
                         or [torch.zeros(0, dtype=torch.bool, device=fragment.grad.device)])

    def _masked(self, fragment, threshold: int, step: int) -> Iterator[torch.Tensor]:
        for scores in self.scores(fragment, step):
            yield scores.view(torch.int32) < threshold

    def count_masked(self, fragment, threshold: int, step: int, store: MaskedWeights | None = None) -> Packed:
        return Packed(torch.empty(0), counts=[int(m.sum()) for m in self._masked(fragment, threshold, step)])

    def pack(self, fragment, threshold: int, step: int, packed: Packed) -> None:
        pack_where(fragment.weight, self._masked(fragment, threshold, step), packed)

    def restore(self, fragment, packed: Packed, threshold: int, step: int) -> None:
        unpack_where(fragment.weight, self._masked(fragment, threshold, step), packed)


def rule_for(selection: str, seed: int) -> SelectionRule:
    """The rule named by ``gmt_selection``."""
    if selection == "magnitude":
        return MagnitudeRule()
    if selection == "random":
        return RandomRule(seed)
    raise ValueError(f"unknown selection {selection!r}: magnitude or random")


# --- random scores -------------------------------------------------------------------------------
RANDOM_BLOCK = 1 << 20
""":func:`random_chunks` yields the scores in chunks of this many positions (bounded temporaries)."""


def random_key(seed: int, step: int, tensor_id: int) -> int:
    """The 63-bit key of a tensor's random scores at a step (splitmix64 of the three)."""
    return _mix(seed, step, tensor_id)


def random_chunks(seed: int, step: int, tensor_id: int, offset: int, numel: int,
                  device: torch.device | str | None = None) -> Iterable[torch.Tensor]:
    """Yield uniform [0, 1) float32 scores for positions ``[offset, offset + numel)`` of a tensor.

    The score of position q is a hash of (seed, step, tensor, q) (:func:`gmt_align.core.batch_kernels.random_bits`,
    24 random bits): any sharding, any process sees the same scores, and the selection kernels
    compute them where they need them instead of storing them."""
    key = random_key(seed, step, tensor_id)
    for start in range(offset, offset + numel, RANDOM_BLOCK):
        yield random_range(key, start, min(RANDOM_BLOCK, offset + numel - start), device).view(torch.float32)


def _mix(*values: int) -> int:
    """splitmix64 over the values: distinct (seed, step, tensor) give unrelated keys."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF
