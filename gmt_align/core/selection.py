"""Magnitude selection fused with masking: keep the ``keep`` largest |g| of each unit, zero the rest.

This module is pure: tensors in, thresholds out. It knows nothing of DeepSpeed or process groups;
the caller passes a ``reduce`` callable (identity on one process, an all-reduce(SUM) across ranks)
and every decision is taken from reduced integer counts, so every rank takes the same one and the
result is the exact threshold a sort of the whole unit would give (tests check it against a sort).

:func:`select_and_mask` reads the gradient about twice and writes it once, in four phases, each
one batched kernel call over every piece of every unit (:mod:`gmt_align.core.batch_kernels`: a model's
hundreds of tensors, or a ZeRO partition's hundreds of slices, cost one call per pass, not one each):

1. :func:`guess` — a strided sample of each unit, then (big units) counts over evenly spaced runs,
   give probe values near the threshold T without a full read; one ``[units, 16]`` all-reduce each;
2. :func:`count` — one fused pass counts the entries at or above each of 15 probes; the exact
   counts, all-reduced (``[units, 18]``), bracket T in ``[lo, hi)`` with few entries inside
   (repeated only if not); the first round also counts inf/NaN, so every rank raises together;
3. :func:`mask` — one fused read-modify-write zeroes everything below ``lo`` and collects the
   entries in ``[lo, hi)``: the candidates, a tiny fraction of the gradient;
4. :func:`finish` — the exact T among the candidates (the k-th largest of each unit's candidates
   on one process, radix rounds of at most ``[units, 4096]`` counts across ranks:
   :func:`gmt_align.core.radix.radix_within`); the candidates below T are zeroed.

The score of an entry is the int32 bit pattern of |g| as float32 (which orders like the value);
probes and brackets live in :mod:`gmt_align.core.brackets`. ``random`` selection runs the same phases
over position-keyed random scores (``random_keys``), which the kernels compute where they need them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence

import torch

from . import batch_kernels
from .brackets import PROBES, RUN, RUNS, Bracket, max_candidates, runs_of, sample_size, sample_stride
from .masked_weights import Aside
from .radix import (
    INF_BITS,
    NonFiniteGradientError,
    Reduce,
    ZeroGradientError,
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
    "ZeroGradientError",
    "chunks_of",
    "keep_count",
    "select_and_mask",
    "select_thresholds",
]

CHUNK = 1 << 20
"""Elements per chunk: bounds the temporaries of every pass to a few MiB."""

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
    random_keys: Callable[[int], Sequence[tuple[int, int]]] | None = None,
    aside: Aside | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Keep, in place, the ``keep[u]`` largest-|g| entries of each unit; zero the others.

    ``pieces(u)`` returns the unit's contiguous 1-D gradient pieces held by this process (any
    float dtype; the score is |g| widened to float32). ``sizes[u]`` is the unit's entry count over
    all processes. The rule is :func:`select_thresholds`' with exact zeros never kept: T is the
    ``keep[u]``-th largest |g| (at least the smallest positive float), kept = |g| >= T.

    With ``random_keys`` (``random`` selection), ``random_keys(u)`` gives each piece's (key, offset)
    and the score of an entry is :func:`gmt_align.core.batch_kernels.random_bits` of its position instead
    of |g|; T is then the exact ``keep[u]``-th largest score (no floor).

    With ``aside`` (``update`` mode; its weights: one per piece, unit after unit), the masking pass
    also keeps the weights of the entries it zeroes, and :func:`finish` those of the candidates it
    zeroes: :class:`gmt_align.core.masked_weights.Aside`.

    Returns the thresholds (int64 bit patterns; +inf bits for ``keep 0``) and, per unit and piece,
    how many entries were kept. Collective through ``reduce`` like :func:`select_thresholds`;
    it raises :class:`NonFiniteGradientError` on every process together.
    """
    parts = [list(pieces(u)) for u in range(num_units)]
    alone = reduce is None
    flat = Pieces(parts, [list(random_keys(u)) for u in range(num_units)] if random_keys else None)
    quantum = flat.quantum = _grid_of(parts) if alone and random_keys is None else 1
    reduce = reduce or identity
    keep = [int(k) for k in torch.as_tensor(keep, dtype=torch.int64)]
    brackets = {u: Bracket(int(sizes[u]), keep[u], len(parts[u])) for u in range(num_units) if keep[u] > 0}
    guess(brackets, flat, quantum, reduce)
    count(brackets, flat, quantum, reduce, names)
    thresholds, kept, candidates = mask(brackets, flat, quantum, aside)
    finish(brackets, flat, candidates, thresholds, kept, alone, reduce, aside)
    return thresholds, kept


class Pieces:
    """Every piece of every unit in one list, unit after unit (what the batched kernels take)."""

    def __init__(self, parts: list[list[torch.Tensor]], keys: list[list[tuple[int, int]]] | None):
        self.parts = parts
        self.tensors = [p for unit_parts in parts for p in unit_parts]
        self.unit = [u for u, unit_parts in enumerate(parts) for _ in unit_parts]
        self.first = [0]
        for unit_parts in parts:
            self.first.append(self.first[-1] + len(unit_parts))
        self.keys = [k for unit_keys in keys for k, _ in unit_keys] if keys is not None else None
        self.offsets = [o for unit_keys in keys for _, o in unit_keys] if keys is not None else None
        self.floor = 0 if keys is not None else 1  # magnitude never keeps an exact zero
        self.quantum = 1  # the grid of the probes (select_and_mask sets it)

    def of(self, units: Sequence[int]) -> list[int]:
        """Indices of the pieces of ``units``, in order."""
        return [k for u in units for k in range(self.first[u], self.first[u + 1])]

    def keys_of(self, indices: Sequence[int]) -> tuple[list[int] | None, list[int] | None]:
        if self.keys is None:
            return None, None
        return [self.keys[k] for k in indices], [self.offsets[k] for k in indices]


def _grid_of(parts: list[list[torch.Tensor]]) -> int:
    """bf16/fp16 gradients widen to float32 bit patterns on a grid: probes on the grid resolve ties
    faster. Only on one process: ranks would have to agree on it, and sharded gradients are fp32."""
    dtypes = {p.dtype for ps in parts for p in ps}
    return 1 << 16 if dtypes == {torch.bfloat16} else 1 << 13 if dtypes == {torch.float16} else 1


def _held(unit_parts: list[torch.Tensor]) -> int:
    return sum(p.numel() for p in unit_parts)


# --- 1. guess ----------------------------------------------------------------------------------------
def guess(brackets: dict[int, Bracket], flat: Pieces, quantum: int, reduce: Reduce) -> None:
    """Set each bracket's first probes: from samples, then (units of 8 Mi entries or more) from runs.
    Random scores are uniform: their quantiles are known, nothing is read (the same on every rank)."""
    if flat.keys is not None:
        _guess_uniform(brackets)
        return
    _guess_from_samples(brackets, flat, quantum, reduce)
    big = [u for u, bracket in brackets.items() if bracket.size >= 8 * RUN * RUNS]
    if big:
        _guess_from_runs(big, brackets, flat, quantum, reduce)


_SPOTS = (-3.0, -2.3, -1.75, -1.3, -0.9, -0.55, -0.25, 0.0, 0.25, 0.55, 0.9, 1.3, 1.75, 2.3, 3.0)
"""Sample quantiles taken as probes, in units of a sample quantile's expected error around keep/n."""


def _guess_from_samples(brackets, flat: Pieces, quantum, reduce) -> None:
    """Probes at sample quantiles around keep/n, averaged over processes with weights = entries held.

    The sample of a unit: every ``stride``-th entry of its pieces (:func:`gmt_align.core.brackets.sample_stride`,
    continued from piece to piece); all units' picks in one batched call. A process samples its share
    of :func:`gmt_align.core.brackets.sample_size` (entries held / unit size): the average of the processes'
    quantiles is then as precise as one process's over the whole sample, and the probes are spread by
    the precision of that whole (on N ranks, each reads 1/N of the picks one process would)."""
    parts = flat.parts
    local = [_held(unit_parts) for unit_parts in parts]
    guesses = torch.zeros(len(parts), PROBES + 1, dtype=torch.int64)
    members = [u for u in brackets if local[u] > 0]
    indices, starts, strides, sizes = [], [], [], []
    for u in members:
        stride = sample_stride(local[u], -(-sample_size(brackets[u].size) * local[u] // brackets[u].size))
        start, size = 0, 0
        for index in range(flat.first[u], flat.first[u + 1]):
            numel = flat.tensors[index].numel()
            indices.append(index), starts.append(start), strides.append(stride)
            if start < numel:
                size += (numel - start + stride - 1) // stride
            start = (start - numel) % stride if numel else start
        sizes.append(size)
    if members:
        rows = torch.tensor(members)
        size = torch.tensor(sizes, dtype=torch.float64)[:, None]
        fraction = torch.tensor([brackets[u].keep / brackets[u].size for u in members], dtype=torch.float64)[:, None]
        share = torch.tensor([local[u] / brackets[u].size for u in members], dtype=torch.float64)[:, None]
        whole = size / share  # the picks of every process together (about)
        sigma = (fraction * (1 - fraction) / whole).sqrt() + 1 / size  # of their mean quantile, as a fraction
        at = ((fraction + torch.tensor(_SPOTS, dtype=torch.float64) * sigma) * size).to(torch.int64)
        picks = torch.zeros(len(parts), PROBES, dtype=torch.int64)
        picks[rows] = torch.minimum(at.clamp(min=0), size.to(torch.int64) - 1)
        picked = batch_kernels.sample_picks([flat.tensors[k] for k in indices], [flat.unit[k] for k in indices],
                                            starts, strides, picks, *flat.keys_of(indices))
        held = torch.tensor([local[u] for u in members], dtype=torch.int64)
        guesses[rows, :PROBES] = picked[rows] * held[:, None]
        guesses[rows, PROBES] = held
    guesses = reduce(guesses)
    weight = guesses[:, PROBES :].clamp(min=1)
    values = ((guesses[:, :PROBES] // weight).clamp(1, INF_BITS - 1) // quantum * quantum).tolist()
    for u, bracket in brackets.items():
        bracket.probes = (sorted(set(values[u])) + [INF_BITS] * PROBES)[:PROBES]


def _guess_uniform(brackets: dict[int, Bracket]) -> None:
    """Probes around the keep-th largest of n uniform [0, 1) scores: 1 - keep/n, give or take its
    standard deviation sqrt(q (1 - q) / n) (q = keep/n) times each of _SPOTS."""
    for bracket in brackets.values():
        q = bracket.keep / bracket.size
        sigma = (q * (1 - q) / bracket.size) ** 0.5
        values = {min(max(_float_bits(1 - q + c * sigma), 1), INF_BITS - 1) for c in _SPOTS}
        bracket.probes = (sorted(values) + [INF_BITS] * PROBES)[:PROBES]


def _float_bits(value: float) -> int:
    """The bit pattern of ``value`` as a non-negative float32 (0 for negative values)."""
    return struct.unpack("<i", struct.pack("<f", max(value, 0.0)))[0]


def _guess_from_runs(big, brackets, flat: Pieces, quantum, reduce) -> None:
    """Count the sample probes over evenly spaced runs of the big units: a better aim for one exact round."""
    table, _ = _count_round(big, brackets, flat, reduce, subsample=True)
    for u in big:
        bracket = brackets[u]
        seen, held = int(table[u, PROBES + 1]), int(table[u, PROBES + 2])
        if seen == 0:  # no process holds a piece big enough: keep the first guess
            continue
        scale = held / seen
        sigma = 2 * (scale * bracket.keep * (1 - bracket.keep / bracket.size)) ** 0.5 + 1
        bracket.aim_from_runs(table[u, :PROBES].tolist(), scale, sigma, quantum)


def _count_round(chosen: list[int], brackets: dict[int, Bracket], flat: Pieces, reduce: Reduce,
                 subsample: bool) -> tuple[torch.Tensor, dict[int, list[list[int]]]]:
    """All-reduced counts ``[units, PROBES + 3]`` of the entries at or above each unit's probes
    (column PROBES: inf/NaN; with ``subsample``, over the runs only, and the last two columns hold
    the entries counted and held), and this process's counts per piece. One batched kernel call."""
    table = torch.zeros(len(flat.parts), PROBES + 3, dtype=torch.int64)
    indices = flat.of(chosen)
    views = [runs_of(flat.tensors[k]) if subsample else flat.tensors[k] for k in indices]
    counted = [i for i, view in enumerate(views) if view is not None and view.numel()]
    per_piece = torch.zeros(len(indices), PROBES + 1, dtype=torch.int64)
    if counted:
        probes = torch.tensor([brackets[flat.unit[indices[i]]].probes + [INF_BITS] for i in counted], dtype=torch.int32)
        keys, offsets = flat.keys_of([indices[i] for i in counted])
        per_piece[torch.tensor(counted)] = batch_kernels.count_many([views[i] for i in counted], probes, keys, offsets)
    unit_index = torch.tensor([flat.unit[k] for k in indices], dtype=torch.int64)
    if indices:
        table[:, : PROBES + 1].index_add_(0, unit_index, per_piece)
    rows = per_piece.tolist()
    local_counts: dict[int, list[list[int]]] = {}
    at = 0
    for u in chosen:
        count_u = flat.first[u + 1] - flat.first[u]
        local_counts[u] = rows[at : at + count_u]
        at += count_u
    if subsample:
        for u in chosen:
            seen = sum(views[i].numel() for i, k in enumerate(indices) if flat.unit[k] == u and views[i] is not None)
            table[u, PROBES + 1 :] = torch.tensor([seen, _held(flat.parts[u])])
    return reduce(table), local_counts


# --- 2. count ----------------------------------------------------------------------------------------
def count(brackets: dict[int, Bracket], flat: Pieces, quantum: int, reduce: Reduce,
          names: Sequence[str] | None) -> None:
    """Exact count rounds until every bracket holds at most max_candidates entries (or is resolved)."""
    pending = list(brackets)
    for round_index in range(40):
        if not pending:
            break
        table, local_counts = _count_round(pending, brackets, flat, reduce, subsample=False)
        if round_index == 0:
            raise_on_non_finite(table[:, PROBES], names)
        counts = table[:, :PROBES].tolist()
        for u in pending:
            brackets[u].narrow(counts[u], local_counts[u], quantum)
        pending = [u for u in pending
                   if brackets[u].inside > max_candidates(brackets[u].size) and not brackets[u].resolved(quantum)]
    else:
        raise RuntimeError("GMT selection did not converge")


# --- 3. mask -----------------------------------------------------------------------------------------
Candidates = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Of every piece, one after the other: positions, bit patterns, and how many per piece."""


def mask(brackets: dict[int, Bracket], flat: Pieces, quantum: int, aside: Aside | None = None
         ) -> tuple[torch.Tensor, list[list[int]], Candidates]:
    """Zero below each bracket's ``lo`` and collect the candidates in ``[lo, hi)``: one batched call
    (with ``aside``, keeping the zeroed entries' weights in the same pass).

    Returns the thresholds known already (units that keep nothing: +inf bits; resolved brackets),
    the kept counts per unit and piece so far (the entries at or above ``hi``, or all kept entries
    of a resolved unit), and the candidates of the units still open.
    """
    parts = flat.parts
    thresholds = torch.full((len(parts),), INF_BITS, dtype=torch.int64)
    kept: list[list[int]] = [[0] * len(unit_parts) for unit_parts in parts]
    lo = [INF_BITS] * len(parts)
    hi = [INF_BITS] * len(parts)
    at_lo: list[list[int]] = [[0] * len(unit_parts) for unit_parts in parts]  # entries >= lo, per piece
    for u, unit_parts in enumerate(parts):
        bracket = brackets.get(u)
        if bracket is None:  # keep nothing
            continue
        if bracket.resolved(quantum):
            thresholds[u] = lo[u] = hi[u] = max(bracket.lo, flat.floor)
            if bracket.lo > 0:  # kept: the entries >= lo
                kept[u] = list(bracket.local_lo)
            elif flat.floor:  # lo = 0: the non-zero ones, which are the entries >= hi
                kept[u] = list(bracket.local_hi)
            else:  # random scores, threshold 0: everything
                kept[u] = [p.numel() for p in unit_parts]
            at_lo[u] = kept[u]
        else:
            kept[u] = list(bracket.local_hi)
            lo[u], hi[u] = bracket.lo, bracket.hi
            at_lo[u] = [p.numel() if c is None else c for p, c in zip(unit_parts, bracket.local_lo)]
    room = None
    if aside is not None:  # per piece, the entries below lo, which the pass zeroes; and at most how many
        # candidates finish() zeroes here: of a unit's c_lo - c_hi candidates it keeps keep - c_hi or more
        below = [p.numel() - c for unit_parts, counts in zip(parts, at_lo) for p, c in zip(unit_parts, counts)]
        later = sum(min(bracket.c_lo - bracket.keep, sum(at_lo[u]) - sum(kept[u]))
                    for u, bracket in brackets.items() if lo[u] != hi[u])
        room = aside, below, max(later, 0)
    candidates = batch_kernels.mask_many(flat.tensors, [lo[u] for u in flat.unit], [hi[u] for u in flat.unit],
                                         flat.keys, flat.offsets, room)
    return thresholds, kept, candidates


# --- 4. finish ---------------------------------------------------------------------------------------
def finish(brackets: dict[int, Bracket], flat: Pieces, candidates: Candidates,
           thresholds: torch.Tensor, kept: list[list[int]], alone: bool, reduce: Reduce,
           aside: Aside | None = None) -> None:
    """The exact threshold of each open unit among its candidates; zero the candidates below it (with
    ``aside``, keeping their weights first). Completes ``thresholds`` and ``kept`` in place."""
    positions, values, per_piece = candidates
    open_units = sorted(u for u, bracket in brackets.items() if not bracket.resolved(flat.quantum))
    if not open_units:
        return
    piece_unit = torch.tensor(flat.unit, dtype=torch.int64)
    need = torch.tensor([brackets[u].keep - brackets[u].c_hi for u in open_units], dtype=torch.int64)
    lo = torch.tensor([brackets[u].lo for u in open_units], dtype=torch.int64)
    if alone:  # one process holds every candidate: the need-th largest, all units in one call
        per_unit = torch.zeros(len(flat.parts), dtype=torch.int64).index_add_(0, piece_unit, per_piece)
        found = batch_kernels.kth_largest_many(values, per_unit[open_units], need)
    else:  # radix rounds, each count all-reduced
        owner = piece_unit.repeat_interleave(per_piece)
        base = torch.zeros(len(flat.parts), dtype=torch.int64)
        base[open_units] = lo
        within = radix_within(open_units, values - base.index_select(0, owner), owner,
                              {u: brackets[u].hi - brackets[u].lo for u in open_units},
                              dict(zip(open_units, need.tolist())), reduce)
        found = lo + torch.tensor([within[u] for u in open_units], dtype=torch.int64)
    thresholds[open_units] = found.clamp(min=flat.floor)
    if aside is not None:
        aside.zeroed(per_piece, positions, values, thresholds[piece_unit])
    kept_now = batch_kernels.zero_below_many(flat.tensors, per_piece, positions, values, thresholds[piece_unit])
    for index, count in enumerate(kept_now.tolist()):
        if count:
            u = flat.unit[index]
            kept[u][index - flat.first[u]] += count
