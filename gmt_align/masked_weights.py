"""``update`` mode: the masked entries of the weights, kept across the optimizer step in a packed buffer.

The optimizer steps every entry of the weights it holds; in ``update`` mode the masked ones must come
out bit for bit as they went in. Only they are kept (``ratio`` of the weights, not a full copy): the
engine packs them after selection, and unpacks them after the step. Which entries are masked is
known from what the optimizer reads but does not change — the masked gradient (magnitude:
``bits(|g|) < T``) or the position-keyed random scores — so no index is stored: the C++ path keeps
one bit per entry (1/32 of the fp32 weights) so as not to read the gradient again, the torch path
finds the entries again.

- :class:`MaskedWeights` — one buffer per device and dtype, held from step to step and grown when a
  step masks more entries than it holds (the extra memory of ``update`` mode: ~``ratio`` of the
  weights it masks, e.g. of the fp32 partition under ZeRO);
- :func:`count_below`, :func:`pack_below`, :func:`unpack_below` — the magnitude rule's entries
  (``bits(|g|) < T``). For an fp32 CPU weight the C++ kernels of ``masked_weights.cpp``: one read of
  the gradient (marking the masked entries' bits), one of the weight (packing), and a masked write
  of the weight (unpacking), with compress/expand instructions where the CPU has AVX-512; elsewhere
  (GPU, bf16/fp16) torch's ``masked_select`` / ``masked_scatter_``, chunk by chunk, so the bool masks
  stay small;
- :func:`pack_where` / :func:`unpack_where` — any masks given chunk by chunk (the random rule's).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels

__all__ = ["MaskedWeights", "Packed", "pack_below", "pack_where", "unpack_below", "unpack_where"]

logger = logging.getLogger(__name__)

EAGER_CHUNK = 1 << 22
"""Entries per bool mask on the torch path (4 MiB of mask at a time)."""

_SOURCE = Path(__file__).with_name("masked_weights.cpp")
_CPP: list = []
_LOCK = threading.Lock()


@dataclass
class Packed:
    """A fragment's masked weights: ``values`` (a view of a buffer, one entry to spare), and either the
    C++ kernels' marks (``words``: one bit per entry) with where each chunk's entries start
    (``offsets``), or how many entries each torch chunk holds (``counts``)."""

    values: torch.Tensor
    offsets: torch.Tensor | None = None
    words: torch.Tensor | None = None
    counts: list[int] | None = None


class MaskedWeights:
    """The buffers that hold the packed masked weights between :meth:`MaskEngine.apply
    <gmt_align.engine.MaskEngine.apply>` and :meth:`~gmt_align.engine.MaskEngine.restore`: one per
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


def _cpp():
    """The C++ kernels (built once, ~20 s), or None where the project's C++ kernels are off
    (``GMT_ALIGN_CPP=0``, ``GMT_ALIGN_COMPILE=0``) or the build fails."""
    if not kernels.compiled() or os.environ.get("GMT_ALIGN_CPP", "1") in ("0", "false", "False", ""):
        return None
    if not _CPP:
        with _LOCK:
            if not _CPP:
                _CPP.append(_load())
    return _CPP[0]


def _load():
    capability = kernels.cpp_capability()
    digest = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:10]
    name = f"gmt_align_masked_weights_{capability.lower()}_{digest}"  # see kernels._cpp_name
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        from .build_lock import refuse_stale_lock

        refuse_stale_lock(_get_build_directory(name, verbose=False))  # else a killed build's lock: a hang
        if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists() \
                and os.environ.get("LOCAL_RANK", "0") == "0":
            print("gmt-align: building the C++ kernels of update mode once (~20 s)", file=sys.stderr, flush=True)
        return load(name=name, sources=[str(_SOURCE)],
                    extra_cflags=["-O3", *kernels._CAPABILITY_FLAGS.get(capability, [])])
    except Exception as error:  # noqa: BLE001 - no compiler: torch's masked_select / masked_scatter_
        logger.warning("gmt-align: the C++ kernels of update mode could not be built (%s); using torch ops",
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None


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
