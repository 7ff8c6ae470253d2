"""``update`` mode: the masked entries of the weights, kept across the optimizer step in a packed buffer.

The optimizer steps every entry of the weights it holds; in ``update`` mode the masked ones must come
out bit for bit as they went in. Only they are kept (``ratio`` of the weights, not a full copy), and
no index is stored: which entries are masked is known from one bit per entry (1/32 of the fp32
weights), or found again from what the optimizer reads but does not change — the masked gradient
(magnitude: ``bits(|g|) < T``) or the position-keyed random scores.

- :class:`MaskedWeights` — one buffer per device and dtype, held from step to step and grown when a
  step masks more entries than it holds (the extra memory of ``update`` mode: ~``ratio`` of the
  weights it masks, e.g. of the fp32 partition under ZeRO);
- :class:`Aside` — fp32 weights on the CPU: the selection's masking pass, which reads and writes every
  gradient entry anyway, writes the bit of each entry it zeroes and packs its weight in the same pass
  (``mask_many_aside`` in ``csrc/gmt_cpu.cpp``); the few candidates zeroed after it, below the exact
  threshold, are kept with their positions; :func:`restore_aside` writes everything back after the
  step, all fragments in one call (``csrc/masked_weights.cpp``). The gradient is not read again;
- :func:`count_below`, :func:`pack_below`, :func:`unpack_below` — the magnitude rule's entries
  (``bits(|g|) < T``), for the weights the masking pass does not cover. For an fp32 CPU weight the C++
  kernels of ``csrc/masked_weights.cpp``: one read of the gradient (marking the masked entries' bits),
  one of the weight (packing), and a masked write of the weight (unpacking), with compress/expand
  instructions where the CPU has AVX-512; elsewhere (GPU, bf16/fp16) torch's ``masked_select`` /
  ``masked_scatter_``, chunk by chunk, so the bool masks stay small;
- :func:`pack_where` / :func:`unpack_where` — any masks given chunk by chunk (the random rule's).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from . import kernels

__all__ = ["Aside", "MaskedWeights", "Packed", "pack_below", "pack_where", "restore_aside", "unpack_below",
           "unpack_where"]

EAGER_CHUNK = 1 << 22
"""Entries per bool mask on the torch path (4 MiB of mask at a time)."""


@dataclass
class Packed:
    """A fragment's masked weights: ``values`` (a view of a buffer), and either the C++ kernels' marks
    (``words``: one bit per entry) with where each chunk's entries start (``offsets``; ``values`` has
    one entry to spare), or how many entries each torch chunk holds (``counts``), or (:class:`Aside`)
    the marks with where each work item's entries start (``starts``) and the candidates zeroed after
    the masking pass (``positions``, and their weights ``extras``)."""

    values: torch.Tensor
    offsets: torch.Tensor | None = None
    words: torch.Tensor | None = None
    counts: list[int] | None = None
    starts: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    extras: torch.Tensor | None = None


class MaskedWeights:
    """The buffers that hold the packed masked weights between :meth:`MaskEngine.apply
    <gmt_align.core.engine.MaskEngine.apply>` and :meth:`~gmt_align.core.engine.MaskEngine.restore`: one per
    (device, dtype), reused from step to step. Space is taken from the front; :meth:`release` (once
    every packed fragment is restored) makes all of it free again."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.used: dict[tuple, int] = {}

    def reserve(self, entries: int, device: torch.device, dtype: torch.dtype) -> None:
        """Make room for ``entries`` more entries, taken by later :meth:`take` calls of this apply. A
        buffer too small is replaced by one 1/32 larger than needed, so a count that creeps up does
        not reallocate each step; views still held keep the old one alive until they are restored."""
        key = (device, dtype)
        held, used = self.buffers.get(key), self.used.get(key, 0)
        if held is None or held.numel() < used + entries:
            self.buffers.pop(key, None)  # dropped before the new one is made: never both, if nothing is pending
            self.buffers[key] = torch.empty(entries + entries // 32 + 16, dtype=dtype, device=device)
            self.used[key] = 0

    def take(self, entries: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A view of ``entries + 1`` free entries (one to spare), from what :meth:`reserve` made room for."""
        self.reserve(entries + 1, device, dtype)
        key = (device, dtype)
        used = self.used.get(key, 0)
        self.used[key] = used + entries + 1
        return self.buffers[key][used : used + entries + 1]

    def release(self) -> None:
        self.used.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class Aside:
    """``update`` mode inside the selection's masking pass, for fp32 weights on the CPU: handed to
    :func:`gmt_align.core.selection.select_and_mask` with the weights of its pieces (in their order; None
    where it is not to keep them), it leaves in :attr:`packs` the :class:`Packed` of every piece it
    kept. A piece it could not keep (its weight or gradient not fp32 on the CPU, 2^31 entries or more,
    the C++ kernels off, or too little room) has None there, and is kept apart (:func:`count_below`
    & co). Its room comes from the engine's :class:`MaskedWeights`: the packed weights (fp32), one bit
    per entry (int16 words), each work item's start (int32); the few candidates zeroed after the pass
    take their weights and int32 positions from the fp32 buffer too, whose 1/32 of room to grow holds
    them (one buffer per dtype, the same from step to step)."""

    def __init__(self, weights: Sequence[torch.Tensor | None], store: MaskedWeights):
        self.store = store
        self.weights = [w if w is not None and 0 < w.numel() < 2**31 and w.device.type == "cpu"
                        and w.dtype == torch.float32 and w.is_contiguous() else None for w in weights]
        if any(w is not None for w in self.weights) and _cpp() is None:  # (no build for GPU weights)
            self.weights = [None] * len(weights)
        self.packs: list[Packed | None] = [None] * len(weights)

    def arguments(self, pieces: Sequence[torch.Tensor], below: Sequence[int], later: int) -> list:
        """``mask_many_aside``'s weights, words, values and starts, with room for ``below[k]`` masked
        entries of piece k (exactly what the pass zeroes), and reserved for ``later`` candidates that
        :meth:`zeroed` may keep (their weights and positions)."""
        cpu, item = torch.device("cpu"), _cpp().ITEM
        keep = [k for k, (w, g) in enumerate(zip(self.weights, pieces)) if w is not None and w.numel() == g.numel()]
        store = self.store
        store.reserve(sum((pieces[k].numel() + 15) // 16 + 1 for k in keep), cpu, torch.int16)
        store.reserve(sum(below[k] + 1 for k in keep) + 2 * later + 1, cpu, torch.float32)
        store.reserve(sum((pieces[k].numel() + item - 1) // item + 1 for k in keep), cpu, torch.int32)
        empty = torch.zeros(0)
        weights, values = [empty] * len(pieces), [empty] * len(pieces)
        words = [torch.zeros(0, dtype=torch.int16)] * len(pieces)
        starts = [torch.zeros(0, dtype=torch.int32)] * len(pieces)
        for k in keep:
            n = pieces[k].numel()
            weights[k] = self.weights[k]
            words[k] = store.take((n + 15) // 16, cpu, torch.int16)[:-1]
            values[k] = store.take(below[k], cpu, torch.float32)[:-1]
            starts[k] = store.take((n + item - 1) // item, cpu, torch.int32)[:-1]
        self._room = (words, values, starts)
        return [weights, words, values, starts]

    def masked(self, held: torch.Tensor) -> None:
        """After the masking pass: ``held[k]`` weights kept of piece k (-1: none)."""
        words, values, starts = self._room
        for k, count in enumerate(held.tolist()):
            if count >= 0:
                self.packs[k] = Packed(values[k][:count], words=words[k], starts=starts[k],
                                       positions=torch.zeros(0, dtype=torch.int32), extras=torch.zeros(0))

    def zeroed(self, counts: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
               thresholds: torch.Tensor) -> None:
        """Before the candidates below each piece's threshold are zeroed (the candidates as
        :func:`gmt_align.core.batch_kernels.mask_many` gave them): keep their positions and weights."""
        kept = torch.tensor([pack is not None for pack in self.packs], dtype=torch.bool)
        if not positions.numel() or not bool(kept.any()):
            return
        below = (scores < thresholds.repeat_interleave(counts)) & kept.repeat_interleave(counts)
        total, cpu = int(below.sum()), torch.device("cpu")
        room = self.store.take(2 * total, cpu, torch.float32)  # their positions ride as int32 bit patterns
        weights, where = room[:total], room[total : 2 * total].view(torch.int32)
        kept_weights = [w if pack is not None else torch.zeros(0) for w, pack in zip(self.weights, self.packs)]
        saved = _cpp().save_zeroed(kept_weights, counts, positions.contiguous(), scores.contiguous(),
                                   thresholds.to(torch.int64).contiguous(), where, weights).tolist()
        first = 0
        for pack, count in zip(self.packs, saved):
            if pack is not None and count:
                pack.positions, pack.extras = where[first : first + count], weights[first : first + count]
            first += count


def restore_aside(packs: Sequence[tuple[torch.Tensor, Packed]]) -> None:
    """Write back the weights :class:`Aside` kept, of every (weight, pack) in one call."""
    if packs:
        _cpp().restore_items([w for w, _ in packs], [p.words for _, p in packs], [p.starts for _, p in packs],
                             [p.values for _, p in packs], [p.positions for _, p in packs],
                             [p.extras for _, p in packs], _cpp().ITEM)


def _cpp():
    """The C++ kernels (:func:`gmt_align.core.kernels.cpp_kernels`: one module with the selection's), or None
    where they are off (``GMT_ALIGN_CPP=0``, ``GMT_ALIGN_COMPILE=0``) or the build fails."""
    return kernels.cpp_kernels()


def marks_needed(weight: torch.Tensor, grad: torch.Tensor) -> int:
    """The int16 words of marks that :func:`count_below` takes for this fragment (the C++ path's)."""
    return (grad.numel() + 15) // 16 if _cpp_for(weight, grad) is not None else 0


def _cpp_for(weight: torch.Tensor, grad: torch.Tensor):
    if weight.device.type == "cpu" and weight.dtype == grad.dtype == torch.float32 \
            and weight.is_contiguous() and grad.is_contiguous():
        return _cpp()
    return None


def _below(grad: torch.Tensor, threshold: int) -> Iterable[torch.Tensor]:
    """The masked entries of ``grad`` (``bits(|g|) < threshold``), one bool chunk at a time."""
    for start in range(0, grad.numel(), EAGER_CHUNK):
        yield grad[start : start + EAGER_CHUNK].float().abs().view(torch.int32) < threshold


# --- magnitude: masked where bits(|g|) < T ------------------------------------------------------
def count_below(weight: torch.Tensor, grad: torch.Tensor, threshold: int, store: MaskedWeights | None = None
                ) -> Packed:
    """How many entries are masked, and the bookkeeping to pack them (``values`` not yet set). The C++
    path's marks come from ``store`` (or are allocated, without one)."""
    cpp = _cpp_for(weight, grad)
    if cpp is not None:
        words = (grad.numel() + 15) // 16
        words = store.take(words, grad.device, torch.int16)[:words] if store else torch.empty(words, dtype=torch.int16)
        return Packed(torch.empty(0), offsets=cpp.mark_masked(grad, threshold, words), words=words)
    return Packed(torch.empty(0), counts=[int(mask.sum()) for mask in _below(grad, threshold)])


def entries(packed: Packed) -> int:
    return int(packed.offsets[-1]) if packed.offsets is not None else sum(packed.counts)


def pack_below(weight: torch.Tensor, grad: torch.Tensor, threshold: int, packed: Packed) -> None:
    """Copy the masked weights into ``packed.values`` (after :func:`count_below`)."""
    if packed.words is not None:
        _cpp().save_masked(weight, packed.words, packed.offsets, packed.values)
    else:
        pack_where(weight, _below(grad, threshold), packed)


def unpack_below(weight: torch.Tensor, grad: torch.Tensor, threshold: int, packed: Packed) -> None:
    """Write ``packed.values`` back into the masked entries of ``weight``."""
    if packed.words is not None:
        _cpp().restore_masked(weight, packed.words, packed.offsets, packed.values)
    else:
        unpack_where(weight, _below(grad, threshold), packed)


# --- any masks, chunk by chunk --------------------------------------------------------------------
def pack_where(weight: torch.Tensor, masks: Iterable[torch.Tensor], packed: Packed) -> None:
    """Copy ``weight``'s entries where the consecutive bool chunks ``masks`` are True into
    ``packed.values``, whose chunk counts ``packed.counts`` are known."""
    start = position = 0
    for mask, count in zip(masks, packed.counts):
        stop = start + mask.numel()
        if count:
            torch.masked_select(weight[start:stop], mask.to(weight.device),
                                out=packed.values[position : position + count])
        start, position = stop, position + count


def unpack_where(weight: torch.Tensor, masks: Iterable[torch.Tensor], packed: Packed) -> None:
    """The inverse of :func:`pack_where`."""
    start = position = 0
    for mask, count in zip(masks, packed.counts):
        stop = start + mask.numel()
        if count:
            weight[start:stop].masked_scatter_(mask.to(weight.device), packed.values[position : position + count])
        start, position = stop, position + count
