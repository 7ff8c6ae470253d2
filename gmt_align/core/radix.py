"""Exact k-th largest by counting bit patterns: radix rounds with one reduced count matrix each.

A non-negative IEEE float32 orders exactly like its int32 bit pattern, so the k-th largest value is
found digit by digit by histogramming the values that still match the prefix chosen so far. Each
round sums its histograms across processes with the ``reduce`` callable the caller passes (identity
on one process, an all-reduce(SUM) across ranks), so every process picks the same digit: the exact
value a sort of everything would give, without sorting, without copying, in memory bounded by one
chunk (torch.quantile refuses more than 2^24 entries and interpolates; kthvalue sorts).

- :func:`select_thresholds` — over any scores given chunk by chunk (a simple exact reference, which
  the tests use): 4 rounds (8, 8, 8 then 7 bits), one ``[units, 256]`` matrix each.
- :func:`radix_within` — over the few candidates left inside each unit's bracket by
  :func:`gmt_align.core.selection.select_and_mask`: digits of 12 bits (``[units, 4096]``) or 8 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["INF_BITS", "NonFiniteGradientError", "Reduce", "ZeroGradientError", "radix_within",
           "raise_on_non_finite", "select_thresholds"]

INF_BITS = 0x7F800000
"""Bit pattern of +inf; any |x| whose bits are >= this is inf or NaN."""

# (shift, width) of each radix digit over the 31 value bits of a non-negative float32.
_DIGITS = ((23, 8), (15, 8), (7, 8), (0, 7))

ScoreChunks = Callable[[int], Iterable[torch.Tensor]]
Reduce = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteGradientError(FloatingPointError):
    """Raised (identically on every rank) when a selection unit holds an inf or NaN score."""


class ZeroGradientError(NonFiniteGradientError):
    """Raised (identically on every rank) when a step's gradient is exactly zero in every tensor on
    every rank: nothing can be learnt from it (typically a diverged run). It follows the same
    ``gmt_nonfinite`` rule as an inf/NaN gradient, hence the subclass."""


def identity(counts: torch.Tensor) -> torch.Tensor:
    """The ``reduce`` of one process: nothing to sum."""
    return counts


def raise_on_non_finite(non_finite: torch.Tensor, names: Sequence[str] | None) -> None:
    """Raise :class:`NonFiniteGradientError` naming the units whose reduced inf/NaN count is not 0."""
    bad = torch.nonzero(non_finite).flatten().tolist()
    if bad:
        label = [names[u] if names else str(u) for u in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteGradientError(
            f"gradient has inf/NaN entries in {', '.join(label)}{more}; GMT refuses to pick a mask"
        )


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
    reduce = reduce or identity
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
            raise_on_non_finite(counts[:, INF_BITS >> 23], names)
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


def radix_within(
    units: list[int],
    values: torch.Tensor,
    owner: torch.Tensor,
    span: dict[int, int],
    need: dict[int, int],
    reduce: Reduce,
) -> dict[int, int]:
    """Per unit, the largest ``d`` in ``[0, span)`` with at least ``need`` candidates ``>= d``.

    ``values`` (int64, ``[0, span[owner])``) are this process's candidates, ``owner`` their units.
    Radix rounds from the top of the span (12-bit digits for up to 16 units, else 8-bit: the
    reduced matrices stay under 64 Ki counts); all units advance together, one all-reduce per
    round over the units still going (the same on every process: spans are global). After each
    round only the candidates whose digit is the chosen one stay in play, so the later rounds read
    a few of them, not all again.
    """
    if not units:
        return {}
    digit_bits = 12 if len(units) <= 16 else 8
    bins = 1 << digit_bits
    width = torch.tensor([max(span[u] - 1, 1).bit_length() for u in units])
    prefix = torch.zeros(len(units), dtype=torch.int64)
    remaining = torch.tensor([need[u] for u in units], dtype=torch.int64)
    index_of = torch.full((max(units) + 1,), -1, dtype=torch.int64)
    index_of[torch.tensor(units)] = torch.arange(len(units))
    slot = index_of.index_select(0, owner)  # each candidate's position in ``units``
    # (index_select: several times faster than ``t[index]`` on a long int64 index, on the CPU)
    # In play: round 0 takes every candidate (all lie below their span, so every unit is going and
    # the prefix, 0, matches); each round keeps only those that match the prefix of the next.
    for round_index in range(int(width.max()) // digit_bits + 1):
        going = torch.nonzero(width > digit_bits * round_index).flatten()
        if not going.numel():
            break
        high = (width - digit_bits * round_index).clamp(min=0)
        low = (high - digit_bits).clamp(min=0)
        first_bin = torch.full((len(units),), -1, dtype=torch.int64)  # the unit's row in counts, times bins
        first_bin[going] = torch.arange(going.numel()) * bins
        digit_mask = (1 << (high - low)) - 1
        digit = (values >> low.index_select(0, slot)) & digit_mask.index_select(0, slot)
        index = first_bin.index_select(0, slot) + digit  # the candidate's bin in counts, flattened
        counts = torch.bincount(index, minlength=going.numel() * bins).view(-1, bins)
        counts = reduce(counts)
        at_or_above = counts.flip(1).cumsum(1).flip(1)
        need_now = remaining[going]
        chosen = (at_or_above >= need_now[:, None]).sum(1) - 1
        if bool((chosen < 0).any()):
            raise ValueError(f"fewer candidates than needed for units {going[chosen < 0].tolist()}")
        above = torch.where(chosen < bins - 1,
                            at_or_above.gather(1, (chosen + 1).clamp(max=bins - 1)[:, None])[:, 0], 0)
        remaining[going] = need_now - above
        prefix[going] = (prefix[going] << (high - low)[going]) | chosen
        # stay in play: the chosen bin of a unit with digits left (-1, never an index, for the others)
        stay = torch.full((len(units),), -1, dtype=torch.int64)
        stay[going] = torch.where(width[going] > digit_bits * (round_index + 1), first_bin[going] + chosen, -1)
        kept = index == stay.index_select(0, slot)
        slot, values = slot[kept], values[kept]
    return dict(zip(units, prefix.tolist()))
