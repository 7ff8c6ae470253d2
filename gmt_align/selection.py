"""Exact, chunked, distributable k-th-largest selection over non-negative float32 scores.

This module is pure: tensors in, thresholds out. It knows nothing of DeepSpeed or process groups;
the caller passes a ``reduce`` callable (identity on one process, an all-reduce(SUM) across ranks)
and this code calls it once per radix round with a small ``[units, 256]`` int64 count matrix.

Why counting on bit patterns: a non-negative IEEE float32 orders exactly like its int32 bit
pattern, so the k-th largest value is found digit by digit (8, 8, 8 then 7 bits) by histogramming
the candidates that still match the prefix chosen so far. Four rounds give the exact value a sort
would give, without sorting, without copying the scores, in memory bounded by one chunk, for any
number of elements (torch.quantile refuses more than 2^24 and interpolates; kthvalue sorts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "CHUNK",
    "INF_BITS",
    "NonFiniteGradientError",
    "chunks_of",
    "keep_count",
    "select_thresholds",
]

CHUNK = 1 << 20
"""Elements per chunk: bounds the temporaries of every pass to a few MiB."""

INF_BITS = 0x7F800000
"""Bit pattern of +inf; any |x| whose bits are >= this is inf or NaN."""

# (shift, width) of each radix digit over the 31 value bits of a non-negative float32.
_DIGITS = ((23, 8), (15, 8), (7, 8), (0, 7))

ScoreChunks = Callable[[int], Iterable[torch.Tensor]]
Reduce = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteGradientError(FloatingPointError):
    """Raised (identically on every rank) when a selection unit holds an inf or NaN score."""


def keep_count(numel: int, mask_ratio: float) -> int:
    """Entries to keep out of ``numel``: ``numel - floor(mask_ratio * numel)``.

    The floor is taken on the decimal value the user wrote (0.29 * 100 is 29, not 28.999...).
    """
    from fractions import Fraction

    masked = int(Fraction(repr(float(mask_ratio))) * numel)
    return numel - masked


def _identity(counts: torch.Tensor) -> torch.Tensor:
    return counts


def select_thresholds(
    num_units: int,
    score_chunks: ScoreChunks,
    keep: Sequence[int] | torch.Tensor,
    reduce: Reduce | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Return, per unit, the bit pattern (int64) of its ``keep[u]``-th largest score.

    Args:
        num_units: number of selection units (tensors, or 1 for a global threshold).
        score_chunks: ``score_chunks(u)`` yields the unit's scores held by this process as
            contiguous, non-negative float32 1-D tensors (e.g. ``|g|`` chunk by chunk). It is
            called once per round, so it must yield the same values each time.
        keep: per unit, how many entries to keep, counted over *all* processes. 0 keeps none
            (the threshold is +inf).
        reduce: sums a count tensor across processes in place and returns it. Called exactly
            ``len(_DIGITS)`` times, with the same shape on every process.
        names: unit names, only for the error message on non-finite scores.

    Returns:
        int64 tensor ``[num_units]``: entry ``x`` of unit ``u`` is kept iff
        ``bits(x) >= result[u]``. Ties at the threshold are all kept.

    Raises:
        NonFiniteGradientError: a unit holds inf/NaN (detected from the reduced counts of the first
            round, so every process raises together instead of hanging in a collective).
        ValueError: the reduced counts hold fewer than ``keep[u]`` entries.
    """
    reduce = reduce or _identity
    need = torch.as_tensor(keep, dtype=torch.int64).clone()
    if need.shape != (num_units,):
        raise ValueError(f"keep has shape {tuple(need.shape)}, expected ({num_units},)")
    prefix = torch.zeros(num_units, dtype=torch.int64)
    for round_index, (shift, width) in enumerate(_DIGITS):
        counts = torch.zeros(num_units, 256, dtype=torch.int64)
        high = shift + width
        for u in range(num_units):
            if need[u] <= 0:
                continue
            want = int(prefix[u])
            row = counts[u]
            for chunk in score_chunks(u):
                bits = chunk.view(torch.int32)
                if round_index > 0:
                    bits = bits[(bits >> high) == want]
                digit = (bits >> shift) & ((1 << width) - 1)
                row += torch.bincount(digit, minlength=256).to(row.device)
        counts = reduce(counts)
        if round_index == 0:
            _raise_on_non_finite(counts[:, INF_BITS >> 23], names)
        # at_or_above[u, b] = candidates whose digit is >= b.
        at_or_above = counts.flip(1).cumsum(1).flip(1)
        active = need > 0
        digit = (at_or_above >= need[:, None]).sum(1) - 1
        if bool((digit[active] < 0).any()):
            bad = [u for u in range(num_units) if active[u] and digit[u] < 0]
            raise ValueError(f"fewer entries than keep counts for units {bad}")
        digit = digit.clamp(min=0)
        above = torch.where(
            digit < 255, at_or_above.gather(1, (digit + 1).clamp(max=255)[:, None])[:, 0], 0
        )
        need = torch.where(active, need - above, need)
        prefix = torch.where(active, (prefix << width) | digit, prefix)
    return torch.where(torch.as_tensor(keep, dtype=torch.int64) > 0, prefix, INF_BITS)


def _raise_on_non_finite(non_finite: torch.Tensor, names: Sequence[str] | None) -> None:
    bad = torch.nonzero(non_finite).flatten().tolist()
    if bad:
        label = [names[u] if names else str(u) for u in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteGradientError(
            f"gradient has inf/NaN entries in {', '.join(label)}{more}; GMT refuses to pick a mask"
        )


def chunks_of(flat: torch.Tensor, chunk: int = CHUNK) -> Iterable[torch.Tensor]:
    """Yield ``|flat|`` as contiguous float32 chunks (a bf16/fp16 gradient is widened exactly)."""
    for start in range(0, flat.numel(), chunk):
        yield flat[start : start + chunk].float().abs()


RANDOM_BLOCK = 1 << 16
"""Random scores are drawn in blocks of this many positions, each from its own seed, so the score of
an element depends only on (seed, step, tensor, position): any sharding sees the same scores."""


def random_chunks(
    seed: int, step: int, tensor_id: int, offset: int, numel: int
) -> Iterable[torch.Tensor]:
    """Yield uniform [0, 1) float32 scores for positions ``[offset, offset + numel)`` of a tensor."""
    end = offset + numel
    generator = torch.Generator()
    for block in range(offset // RANDOM_BLOCK, -(-end // RANDOM_BLOCK)):
        generator.manual_seed(_mix(seed, step, tensor_id, block))
        start = block * RANDOM_BLOCK
        scores = torch.rand(RANDOM_BLOCK, generator=generator)
        yield scores[max(offset, start) - start : min(end, start + RANDOM_BLOCK) - start]


def _mix(*values: int) -> int:
    """splitmix64 over the values: distinct (seed, step, tensor, block) give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF
