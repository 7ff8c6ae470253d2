"""Magnitude selection fused with masking: keep the ``keep`` largest |g| of each unit, zero the rest.

This module is pure: tensors in, thresholds out. It knows nothing of DeepSpeed or process groups;
the caller passes a ``reduce`` callable (identity on one process, an all-reduce(SUM) across ranks)
and every decision is taken from reduced integer counts, so every rank takes the same one and the
result is the exact threshold a sort of the whole unit would give (tests check it against a sort).

:func:`select_and_mask` reads the gradient about twice and writes it once, in four phases:

1. :func:`guess` — a strided sample of each unit, then (big units) counts over evenly spaced runs,
   give probe values near the threshold T without a full read; one ``[units, 9]`` all-reduce each;
2. :func:`count` — one fused pass counts the entries at or above each probe; the exact counts,
   all-reduced (``[units, 11]``), bracket T in ``[lo, hi)`` with few entries inside (repeated only
   if not); the first round also counts inf/NaN, so every rank raises together;
3. :func:`mask` — one fused read-modify-write zeroes everything below ``lo`` and collects the
   entries in ``[lo, hi)``: the candidates, a tiny fraction of the gradient;
4. :func:`finish` — the exact T among the candidates (``kthvalue`` on one process, radix rounds of
   at most ``[units, 4096]`` counts across ranks: :func:`gmt_align.radix.radix_within`); the
   candidates below T are zeroed.

The score of an entry is the int32 bit pattern of |g| as float32 (which orders like the value);
probes and brackets live in :mod:`gmt_align.brackets`, the fused passes in :mod:`gmt_align.kernels`.
``random`` selection scores differently and counts with :func:`gmt_align.radix.select_thresholds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from . import kernels
from .brackets import PROBES, RUN, RUNS, Bracket, max_candidates, runs_of, sample_bits, sample_size
from .radix import (
    INF_BITS,
    NonFiniteGradientError,
    Reduce,
    identity,
    radix_within,
    raise_on_non_finite,
    select_thresholds,
)

__all__ = [
    "CHUNK",
    "INF_BITS",
    "NonFiniteGradientError",
    "RUN",
    "RUNS",
    "Reduce",
    "chunks_of",
    "keep_count",
    "select_and_mask",
    "select_thresholds",
]

CHUNK = 1 << 20
"""Elements per chunk: bounds the temporaries of every pass to a few MiB."""

Candidates = dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
"""Per open unit, per piece: (positions, bit patterns) of its entries inside the bracket."""


def keep_count(numel: int, mask_ratio: float) -> int:
    """Entries to keep out of ``numel``: ``numel - floor(mask_ratio * numel)``.

    The floor is taken on the decimal value the user wrote (0.29 * 100 is 29, not 28.999...).
    """
    from fractions import Fraction

    masked = int(Fraction(repr(float(mask_ratio))) * numel)
    return numel - masked


def chunks_of(flat: torch.Tensor, chunk: int = CHUNK) -> Iterable[torch.Tensor]:
    """Yield ``|flat|`` as contiguous float32 chunks (a bf16/fp16 gradient is widened exactly)."""
    for start in range(0, flat.numel(), chunk):
        yield flat[start : start + chunk].float().abs()


def select_and_mask(
    num_units: int,
    pieces: Callable[[int], Sequence[torch.Tensor]],
    keep: Sequence[int] | torch.Tensor,
    sizes: Sequence[int],
    reduce: Reduce | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Keep, in place, the ``keep[u]`` largest-|g| entries of each unit; zero the others.

    ``pieces(u)`` returns the unit's contiguous 1-D gradient pieces held by this process (any
    float dtype; the score is |g| widened to float32). ``sizes[u]`` is the unit's entry count over
    all processes. The rule is :func:`select_thresholds`' with exact zeros never kept: T is the
    ``keep[u]``-th largest |g| (at least the smallest positive float), kept = |g| >= T.

    Returns the thresholds (int64 bit patterns; +inf bits for ``keep 0``) and, per unit and piece,
    how many entries were kept. Collective through ``reduce`` like :func:`select_thresholds`;
    it raises :class:`NonFiniteGradientError` on every process together.
    """
    parts = [list(pieces(u)) for u in range(num_units)]
    alone = reduce is None
    quantum = _grid_of(parts) if alone else 1
    reduce = reduce or identity
    keep = [int(k) for k in torch.as_tensor(keep, dtype=torch.int64)]
    brackets = {u: Bracket(int(sizes[u]), keep[u], len(parts[u])) for u in range(num_units) if keep[u] > 0}
    guess(brackets, parts, quantum, reduce)
    count(brackets, parts, quantum, reduce, names)
    thresholds, kept, candidates = mask(brackets, parts, quantum)
    finish(brackets, parts, candidates, thresholds, kept, alone, reduce)
    return thresholds, kept


def _grid_of(parts: list[list[torch.Tensor]]) -> int:
    """bf16/fp16 gradients widen to float32 bit patterns on a grid: probes on the grid resolve ties
    faster. Only on one process: ranks would have to agree on it, and sharded gradients are fp32."""
    dtypes = {p.dtype for ps in parts for p in ps}
    return 1 << 16 if dtypes == {torch.bfloat16} else 1 << 13 if dtypes == {torch.float16} else 1


def _held(unit_parts: list[torch.Tensor]) -> int:
    return sum(p.numel() for p in unit_parts)


# --- 1. guess ----------------------------------------------------------------------------------------
def guess(brackets: dict[int, Bracket], parts: list[list[torch.Tensor]], quantum: int, reduce: Reduce) -> None:
    """Set each bracket's first probes: from samples, then (units of 8 Mi entries or more) from runs."""
    _guess_from_samples(brackets, parts, quantum, reduce)
    big = [u for u, bracket in brackets.items() if bracket.size >= 8 * RUN * RUNS]
    if big:
        _guess_from_runs(big, brackets, parts, quantum, reduce)


_SPOTS = (-3.0, -1.5, -0.6, -0.2, 0.2, 0.6, 1.5, 3.0)
"""Sample quantiles taken as probes, in units of a sample quantile's expected error around keep/n."""


def _guess_from_samples(brackets, parts, quantum, reduce) -> None:
    """Probes at sample quantiles around keep/n, averaged over processes with weights = entries held."""
    local = [_held(unit_parts) for unit_parts in parts]
    guesses = torch.zeros(len(parts), PROBES + 1, dtype=torch.int64)
    samples = {u: sample_bits(parts[u], local[u], sample_size(bracket.size)) for u, bracket in brackets.items()}
    buckets: dict[int, list[int]] = {}  # units whose samples have about the same size, sorted together
    for u, sample in samples.items():
        if sample.numel():
            buckets.setdefault(sample.numel().bit_length(), []).append(u)
    for members in buckets.values():  # rows padded with -1, which sorts last
        table = torch.full((len(members), max(samples[u].numel() for u in members)), -1, dtype=torch.int32)
        positions = torch.zeros(len(members), PROBES, dtype=torch.int64)
        for row, u in enumerate(members):
            n, k, size = brackets[u].size, brackets[u].keep, samples[u].numel()
            table[row, :size] = samples[u]
            sigma = (k / n * (1 - k / n) / size) ** 0.5 + 1 / size  # of a sample quantile, as a fraction
            positions[row] = torch.tensor([min(max(int((k / n + c * sigma) * size), 0), size - 1) for c in _SPOTS])
        picked = table.sort(dim=1, descending=True).values.gather(1, positions).to(torch.int64)
        held = torch.tensor([local[u] for u in members], dtype=torch.int64)
        guesses[torch.tensor(members), :PROBES] = picked * held[:, None]
        guesses[torch.tensor(members), PROBES] = held
    guesses = reduce(guesses)
    for u, bracket in brackets.items():
        weight = max(int(guesses[u, PROBES]), 1)
        values = {(min(max(int(guesses[u, j]) // weight, 1), INF_BITS - 1) // quantum) * quantum for j in range(PROBES)}
        bracket.probes = (sorted(values) + [INF_BITS] * PROBES)[:PROBES]


def _guess_from_runs(big, brackets, parts, quantum, reduce) -> None:
    """Count the sample probes over evenly spaced runs of the big units: a better aim for one exact round."""
    table, _ = _count_round(big, brackets, parts, reduce, subsample=True)
    for u in big:
        bracket = brackets[u]
        seen, held = int(table[u, PROBES + 1]), int(table[u, PROBES + 2])
        if seen == 0:  # no process holds a piece big enough: keep the first guess
            continue
        scale = held / seen
        sigma = 2 * (scale * bracket.keep * (1 - bracket.keep / bracket.size)) ** 0.5 + 1
        bracket.aim_from_runs(table[u, :PROBES].tolist(), scale, sigma, quantum)


def _count_round(chosen: list[int], brackets: dict[int, Bracket], parts: list[list[torch.Tensor]], reduce: Reduce,
                 subsample: bool) -> tuple[torch.Tensor, dict[int, list[list[int]]]]:
    """All-reduced counts ``[units, PROBES + 3]`` of the entries at or above each unit's probes
    (column PROBES: inf/NaN; with ``subsample``, over the runs only, and the last two columns hold
    the entries counted and held), and this process's counts per piece."""
    table = torch.zeros(len(parts), PROBES + 3, dtype=torch.int64)
    local_counts: dict[int, list[list[int]]] = {}
    for u in chosen:
        probe = torch.tensor(brackets[u].probes + [INF_BITS], dtype=torch.int32)
        rows = []
        for part in parts[u]:
            view = runs_of(part) if subsample else part
            counts = kernels.count_at_least(view, probe.to(part.device)) if view is not None and view.numel() \
                else torch.zeros(PROBES + 1, dtype=torch.int64)
            table[u, : PROBES + 1] += counts
            rows.append(counts.tolist())
        local_counts[u] = rows
        if subsample:
            seen = sum(view.numel() for view in map(runs_of, parts[u]) if view is not None)
            table[u, PROBES + 1 :] = torch.tensor([seen, _held(parts[u])])
    return reduce(table), local_counts


# --- 2. count ----------------------------------------------------------------------------------------
def count(brackets: dict[int, Bracket], parts: list[list[torch.Tensor]], quantum: int, reduce: Reduce,
          names: Sequence[str] | None) -> None:
    """Exact count rounds until every bracket holds at most max_candidates entries (or is resolved)."""
    pending = list(brackets)
    for round_index in range(40):
        if not pending:
            break
        table, local_counts = _count_round(pending, brackets, parts, reduce, subsample=False)
        if round_index == 0:
            raise_on_non_finite(table[:, PROBES], names)
        for u in pending:
            brackets[u].narrow(table[u, :PROBES].tolist(), local_counts[u], quantum)
        pending = [u for u in pending
                   if brackets[u].inside > max_candidates(brackets[u].size) and not brackets[u].resolved(quantum)]
    else:
        raise RuntimeError("GMT selection did not converge")


# --- 3. mask -----------------------------------------------------------------------------------------
def mask(brackets: dict[int, Bracket], parts: list[list[torch.Tensor]],
         quantum: int) -> tuple[torch.Tensor, list[list[int]], Candidates]:
    """Zero below each bracket's ``lo`` and collect the candidates in ``[lo, hi)``.

    Returns the thresholds known already (units that keep nothing: +inf bits; resolved brackets),
    the kept counts per unit and piece so far (the entries at or above ``hi``, or all kept entries
    of a resolved unit), and the candidates of the units still open.
    """
    thresholds = torch.full((len(parts),), INF_BITS, dtype=torch.int64)
    kept: list[list[int]] = [[0] * len(unit_parts) for unit_parts in parts]
    candidates: Candidates = {}
    for u, unit_parts in enumerate(parts):
        bracket = brackets.get(u)
        if bracket is None:  # keep nothing
            for part in unit_parts:
                kernels.mask_candidates(part, INF_BITS, INF_BITS)
        elif bracket.resolved(quantum):
            thresholds[u] = max(bracket.lo, 1)
            # kept: entries >= lo, or (lo = 0) the non-zero ones, which are the entries >= hi
            kept[u] = list(bracket.local_lo if bracket.lo > 0 else bracket.local_hi)
            for part in unit_parts:
                kernels.mask_candidates(part, int(thresholds[u]), int(thresholds[u]))
        else:
            kept[u] = list(bracket.local_hi)
            candidates[u] = [kernels.mask_candidates(part, bracket.lo, bracket.hi) for part in unit_parts]
    return thresholds, kept, candidates


# --- 4. finish ---------------------------------------------------------------------------------------
def finish(brackets: dict[int, Bracket], parts: list[list[torch.Tensor]], candidates: Candidates,
           thresholds: torch.Tensor, kept: list[list[int]], alone: bool, reduce: Reduce) -> None:
    """The exact threshold of each open unit among its candidates; zero the candidates below it.
    Completes ``thresholds`` and ``kept`` in place."""
    open_units = list(candidates)
    if alone:  # one process holds every candidate: the need-th largest, unit by unit
        found = {}
        for u in open_units:
            values = torch.cat([bits for _, bits in candidates[u]])
            need = brackets[u].keep - brackets[u].c_hi  # 1 <= need <= candidates (the bracket's counts)
            found[u] = int(values.kthvalue(values.numel() - need + 1).values) - brackets[u].lo
    else:  # radix rounds, each count all-reduced
        cand_bits = [bits - brackets[u].lo for u in open_units for _, bits in candidates[u]]
        cand_unit = [torch.full_like(bits, u) for u in open_units for _, bits in candidates[u]]
        found = radix_within(
            open_units,
            torch.cat(cand_bits) if cand_bits else torch.zeros(0, dtype=torch.int64),
            torch.cat(cand_unit) if cand_unit else torch.zeros(0, dtype=torch.int64),
            {u: brackets[u].hi - brackets[u].lo for u in open_units},
            {u: brackets[u].keep - brackets[u].c_hi for u in open_units},
            reduce,
        )
    for u in open_units:
        threshold = max(brackets[u].lo + found[u], 1)
        thresholds[u] = threshold
        for index, (part, (positions, bits)) in enumerate(zip(parts[u], candidates[u])):
            below = bits < threshold
            if bool(below.any()):
                part.index_fill_(0, positions[below].to(part.device), 0)
            kept[u][index] += int((~below).sum())
