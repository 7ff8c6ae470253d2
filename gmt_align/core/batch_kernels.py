"""The passes of :mod:`gmt_align.core.selection` over every piece of every unit in one call.

A model has hundreds of tensors, and a ZeRO partition holds slices of hundreds: calling a kernel per
piece costs a dispatch, a thread-pool wake-up and Python per piece and per pass. These functions take
all the pieces at once (a list of 1-D gradient slices, or of 2-D views of runs) with per-piece
arguments (probes, brackets, thresholds), and run one C++ call each (``gmt_align/csrc/gmt_cpu.cpp``)
when every piece is fp32 on the CPU. Elsewhere (GPU, bf16/fp16, ``GMT_ALIGN_CPP=0``) they loop over
the pieces with the per-piece kernels of :mod:`gmt_align.core.kernels` (torch.compile or eager): same
results.

Scores: with ``keys`` None, the score of an entry is the bit pattern of ``|g|`` (``magnitude``). With
a key and an offset per piece (``random`` selection), the score of the entry at position ``q`` of its
tensor is :func:`random_bits` ``(key, q)``: uniform [0, 1) float32 with 24 random bits from a hash of
(key, q), computed where it is needed (never stored), so the gradient is only written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import kernels
from .masked_weights import Aside

__all__ = ["count_many", "kth_largest_many", "mask_many", "random_bits", "random_range", "sample_picks",
           "zero_below_many"]

_WORD = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit words (the C++ ``mix32``; products wrap, then masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _WORD
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _WORD
    return x ^ (x >> 16)


def random_bits(key: int, positions: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of the random scores at ``positions`` (int64) of a tensor with this step's
    ``key`` (k1: its low word, k2: its high word): ``mix32(lo(q) * (k2 | 1) + (k1 ^ hi(q) * 0x9E3779B9))
    >> 8``, over 2^24 — a Weyl sequence through a mixer (as splitmix), whose start and increment
    the key chooses."""
    k1, k2 = key & _WORD, (key >> 32) & _WORD
    lo, hi = positions & _WORD, positions >> 32
    h = _mix32((lo * (k2 | 1) + (k1 ^ ((hi * 0x9E3779B9) & _WORD))) & _WORD)
    return ((h >> 8).to(torch.float32) * 2.0**-24).view(torch.int32)


def random_range(key: int, offset: int, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`random_bits` of positions ``[offset, offset + numel)`` (int32, on ``device``)."""
    device = torch.device(device or "cpu")
    cpp = kernels.cpp_kernels() if device.type == "cpu" else None
    if cpp is not None:
        out = torch.empty(numel, dtype=torch.int32)
        cpp.random_fill(out, key, offset)
        return out
    return random_bits(key, torch.arange(offset, offset + numel, dtype=torch.int64, device=device))


def _cpp_for(tensors: Sequence[torch.Tensor]):
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return kernels.cpp_kernels()
    return None


def _keys(keys: Sequence[int] | None, offsets: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if keys is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.tensor(list(keys), dtype=torch.int64), torch.tensor(list(offsets), dtype=torch.int64)


_CHUNK = 1 << 20
"""Entries per chunk of the eager random scores: bounds their temporaries."""


def _random_chunks(view: torch.Tensor, key: int, offset: int):
    """Eager: (start, int32 scores) of a 1-D piece chunk by chunk, or of a 2-D view of runs (rows
    ``stride(0)`` apart; small) at once."""
    if view.dim() == 2:
        rows = torch.arange(view.shape[0], dtype=torch.int64, device=view.device) * view.stride(0)
        positions = offset + rows[:, None] + torch.arange(view.shape[1], dtype=torch.int64, device=view.device)
        yield 0, random_bits(key, positions).reshape(-1)
        return
    for start in range(0, view.numel(), _CHUNK):
        yield start, random_range(key, offset + start, min(_CHUNK, view.numel() - start), view.device)


def count_many(views: Sequence[torch.Tensor], probes: torch.Tensor, keys: Sequence[int] | None = None,
               offsets: Sequence[int] | None = None) -> torch.Tensor:
    """int64 ``[pieces, P]``: per piece, its entries whose score is ``>= probes[k, j]`` (int32 ``[pieces, P]``)."""
    probes = probes.to(torch.int32).contiguous()
    cpp = _cpp_for(views)
    if cpp is not None and probes.shape[1] <= 16 and all(
            (v.dim() == 1 and (v.is_contiguous() or v.numel() <= 1)) or (v.dim() == 2 and v.stride(1) == 1)
            for v in views):
        return cpp.count_many(list(views), *_keys(keys, offsets), probes)
    # piece by piece, the counts left on the device and fetched together: one wait, not one per piece
    on = {v.device: probes.to(v.device) for v in views}
    rows = []
    for k, view in enumerate(views):
        if keys is None:
            rows.append(kernels.count_at_least(view, on[view.device][k], on_device=True).to(views[0].device))
        else:
            row = torch.zeros(probes.shape[1], dtype=torch.int64, device=view.device)
            for _, bits in _random_chunks(view, keys[k], offsets[k]):
                row += (bits[:, None] >= on[view.device][k]).sum(0)
            rows.append(row.to(views[0].device))
    return torch.stack(rows).cpu() if rows else torch.zeros(0, probes.shape[1], dtype=torch.int64)


def mask_many(pieces: Sequence[torch.Tensor], lo: Sequence[int], hi: Sequence[int],
              keys: Sequence[int] | None = None, offsets: Sequence[int] | None = None,
              aside: tuple[Aside, Sequence[int], int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place on each 1-D piece: zero the entries whose score is below ``lo[k]``. Returns the entries
    in ``[lo[k], hi[k])`` piece after piece (positions inside their piece and scores, int64, CPU,
    ascending positions) and how many each piece gave (int64 ``[pieces]``).

    ``aside`` (``update`` mode: an :class:`~gmt_align.core.masked_weights.Aside`, per piece how many
    entries lie below ``lo``, and how many candidates may be zeroed later, at most): the C++ pass also
    keeps the zeroed entries' weights
    (:meth:`Aside.masked <gmt_align.core.masked_weights.Aside.masked>`); other paths leave that to the
    caller."""
    cpp = _cpp_for(pieces)
    if cpp is not None and all(p.is_contiguous() for p in pieces):
        bounds = torch.tensor(list(lo), dtype=torch.int64), torch.tensor(list(hi), dtype=torch.int64)
        if aside is not None:
            keeper, below, later = aside
            *found, held = cpp.mask_many_aside(list(pieces), *_keys(keys, offsets), *bounds,
                                               *keeper.arguments(pieces, below, later))
            keeper.masked(held)
            return tuple(found)
        return tuple(cpp.mask_many(list(pieces), *_keys(keys, offsets), *bounds))
    positions, values, counts = [], [], []
    for k, piece in enumerate(pieces):
        if keys is None:
            where, bits = kernels.mask_candidates(piece, int(lo[k]), int(hi[k]))
        else:
            found, scores = [], []
            for start, chunk in _random_chunks(piece, keys[k], offsets[k]):
                piece[start : start + chunk.numel()].masked_fill_(chunk < lo[k], 0)
                inside = ((chunk >= lo[k]) & (chunk < hi[k])).nonzero().flatten()
                found.append((inside + start).cpu()), scores.append(chunk[inside].to(torch.int64).cpu())
            empty = torch.zeros(0, dtype=torch.int64)
            where, bits = torch.cat(found) if found else empty, torch.cat(scores) if scores else empty
        positions.append(where)
        values.append(bits)
        counts.append(where.numel())
    empty = torch.zeros(0, dtype=torch.int64)
    return (torch.cat(positions) if positions else empty, torch.cat(values) if values else empty,
            torch.tensor(counts, dtype=torch.int64))


def sample_picks(pieces: Sequence[torch.Tensor], rows: Sequence[int], starts: Sequence[int], strides: Sequence[int],
                 picks: torch.Tensor, keys: Sequence[int] | None = None, offsets: Sequence[int] | None = None
                 ) -> torch.Tensor:
    """Per row r of ``picks`` (int64 ``[rows, P]``, ascending): the scores at those positions of the
    row's strided sample sorted in descending order; piece k (of row ``rows[k]``, a row's pieces
    consecutive) gives its entries ``starts[k]``, ``starts[k] + strides[k]``, ..."""
    picks = picks.to(torch.int64).contiguous()
    cpp = _cpp_for(pieces)
    if cpp is not None and all(p.is_contiguous() for p in pieces):
        return cpp.sample_picks(list(pieces), *_keys(keys, offsets), torch.tensor(list(starts), dtype=torch.int64),
                                torch.tensor(list(strides), dtype=torch.int64), torch.tensor(list(rows), dtype=torch.int64),
                                picks)
    samples: dict[int, list[torch.Tensor]] = {}
    for k, piece in enumerate(pieces):
        if starts[k] < piece.numel():
            if keys is None:
                taken = piece[starts[k]::strides[k]].float().abs().view(torch.int32).cpu()
            else:
                positions = torch.arange(starts[k], piece.numel(), strides[k], dtype=torch.int64) + offsets[k]
                taken = random_bits(keys[k], positions)
            samples.setdefault(rows[k], []).append(taken)
    out = torch.zeros(picks.shape, dtype=torch.int64)
    buckets: dict[int, list[int]] = {}  # rows whose samples have about the same size, sorted together
    whole = {r: torch.cat(parts) for r, parts in samples.items()}
    for r, sample in whole.items():
        buckets.setdefault(sample.numel().bit_length(), []).append(r)
    for members in buckets.values():  # rows padded with -1, which sorts last
        table = torch.full((len(members), max(whole[r].numel() for r in members)), -1, dtype=torch.int32)
        for i, r in enumerate(members):
            table[i, : whole[r].numel()] = whole[r]
        at = torch.stack([picks[r].clamp(max=whole[r].numel() - 1) for r in members])
        out[torch.tensor(members)] = table.sort(dim=1, descending=True).values.gather(1, at).to(torch.int64)
    return out


def kth_largest_many(values: torch.Tensor, counts: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per segment s of ``values`` (int64, ``counts[s]`` values each, one after the other): its
    ``need[s]``-th largest value (``1 <= need[s] <= counts[s]``)."""
    cpp = kernels.cpp_kernels()
    if cpp is not None:
        return cpp.kth_largest_many(values.contiguous(), counts.to(torch.int64), need.to(torch.int64))
    out = torch.zeros(counts.numel(), dtype=torch.int64)
    for s, segment in enumerate(values.split(counts.tolist())):
        out[s] = segment.kthvalue(segment.numel() - int(need[s]) + 1).values
    return out


def zero_below_many(pieces: Sequence[torch.Tensor], counts: torch.Tensor, positions: torch.Tensor,
                    values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Piece after piece (``counts[k]`` candidates each, as :func:`mask_many` returns them): zero the
    candidates whose score is below ``thresholds[k]``. Returns how many each piece keeps (int64)."""
    cpp = _cpp_for(pieces)
    if cpp is not None:
        return cpp.zero_below_many(list(pieces), counts, positions.contiguous(), values.contiguous(),
                                   thresholds.to(torch.int64).contiguous())
    kept = torch.zeros(len(pieces), dtype=torch.int64)
    for k, (piece, where, bits) in enumerate(zip(pieces, positions.split(counts.tolist()), values.split(counts.tolist()))):
        if where.numel():
            below = bits < thresholds[k]
            if bool(below.any()):
                piece.index_fill_(0, where[below].to(piece.device), 0)
            kept[k] = int((~below).sum())
    return kept
