"""Where selection probes: samples, runs, and the bracket ``[lo, hi)`` of each threshold.

:func:`gmt_align.core.selection.select_and_mask` narrows, per unit, a bracket around its threshold T
(the ``keep``-th largest bit pattern of |g|) from exact counts of the entries at or above a few
probe values. This module holds the bracket (:class:`Bracket`) and the ways to choose probes:

- a strided sample of the unit (:func:`sample_stride`; :func:`sample_size` entries, each process its share);
- evenly spaced runs of contiguous entries of a big piece (:func:`runs_of`);
- probes spread around the best guess (:func:`spread`), some of them fixed so that every exact
  round shrinks the bracket at least threefold whatever the data.
"""

from __future__ import annotations

import functools

import torch

from .radix import INF_BITS

__all__ = ["PROBES", "RUN", "RUNS", "Bracket", "max_candidates", "runs_of", "sample_size", "sample_stride",
           "spread"]

SAMPLE = 4096
"""Entries per unit in the strided sample that gives the first probes (each process reads its share)."""

RUN, RUNS = 512, 2048
"""The second guess counts ``RUNS`` evenly spaced runs of ``RUN`` contiguous entries of each piece
(1 Mi entries: a cheap read, and runs cover many rows of a matrix)."""

PROBES = 15
"""Probe values counted per unit and exact round (one count pass counts them all, with +inf: the C++
kernels' 16). The pass compares each entry with the lowest and highest probe only, and the few
entries between them with every probe, so more probes cost little and narrow the bracket more."""

_AROUND = (-0.1, 0.1, -0.25, 0.25, -0.45, 0.45, -0.75, 0.75, -1.3, 1.3, -2.5, 2.5)
"""Probe offsets around the best guess, in units of its expected error (the nearest first)."""


def max_candidates(numel: int) -> int:
    """Candidates allowed in [lo, hi) before the masking pass (bounds the gathered blocks to ~3%)."""
    return numel // 2048 + 4096


def sample_size(size: int) -> int:
    """Enough that one exact count usually brackets the threshold within max_candidates(size):
    a sample quantile is off by about size * 0.5 / sqrt(sample) entries."""
    return min(SAMPLE, max(512, (size // 8192) ** 2))


@functools.lru_cache(maxsize=4096)
def _prime_at_least(value: int) -> int:
    value = max(2, value)
    while any(value % d == 0 for d in range(2, int(value**0.5) + 1)):
        value += 1
    return value


def sample_stride(local: int, wanted: int) -> int:
    """The stride of a unit's sample: 1, or a prime (so it does not follow a matrix's rows) that picks
    about ``wanted`` of the ``local`` entries this process holds. The sample continues from piece to
    piece: :func:`gmt_align.core.batch_kernels.sample_picks` takes its picks."""
    return 1 if local <= wanted else _prime_at_least(local // wanted)


def runs_of(part: torch.Tensor) -> torch.Tensor | None:
    """``RUNS`` evenly spaced runs of ``RUN`` entries of ``part`` as a 2-D view, or None if too small."""
    gap = part.numel() // RUNS
    if gap < 2 * RUN:
        return None
    return part[: gap * RUNS].view(RUNS, gap)[:, :RUN]


def spread(center: float, sigma: float, slope: float, lo: int, hi: int, quantum: int,
           guarantee: bool = True) -> list[int]:
    """PROBES probe values in (lo, hi) around ``center`` (bits), the best guess of the threshold.

    With ``guarantee``, three of them are fixed: two cut the bracket in thirds (so it shrinks at
    least threefold whatever the data) and one sits at ``lo + quantum`` (ties: the threshold is lo
    itself). Without (the first exact round, aimed by counted runs), all of them go around center.
    """
    span = hi - lo
    fixed = [lo + quantum, lo + span // 3, lo + 2 * span // 3] if guarantee else []
    around = [int(center + c * sigma * slope) for c in _AROUND]
    chosen: list[int] = []
    for p in around[:2] + fixed + around[2:]:
        p = (p // quantum) * quantum
        if lo < p < hi and p not in chosen and len(chosen) < PROBES:
            chosen.append(p)
    return sorted(chosen) + [INF_BITS] * (PROBES - len(chosen))


class Bracket:
    """The bracket [lo, hi) of one unit's threshold: C(lo) >= keep > C(hi), C(x) = entries >= x over
    all processes; ``local_*`` are this process's counts per piece at lo and hi; ``probes`` the
    values the next count round counts."""

    def __init__(self, size: int, keep: int, pieces: int):
        self.size, self.keep = size, keep
        self.lo, self.hi = 0, INF_BITS
        self.c_lo, self.c_hi = size, 0
        self.local_lo, self.local_hi = [None] * pieces, [0] * pieces
        self.probes: list[int] = []

    @property
    def inside(self) -> int:
        return self.c_lo - self.c_hi

    def resolved(self, quantum: int) -> bool:
        """No entry can lie strictly inside: the threshold is ``lo`` (or, ``lo`` = 0, the smallest positive)."""
        return self.hi - self.lo <= quantum

    def narrow(self, counts: list[int], local: list[list[int]] | None, quantum: int,
               scale: float = 1.0, sigma: float | None = None, guarantee: bool = True) -> None:
        """Move the bracket to the probes around the keep-th entry; aim the next probes inside."""
        at_lo = at_hi = None  # the probes that became lo and hi
        for j, (value, count) in enumerate(zip(self.probes, counts)):
            if value >= INF_BITS:
                break
            count = int(count * scale)
            if count >= self.keep and value > self.lo:
                self.lo, self.c_lo, at_lo = value, count, j
            elif count < self.keep and value < self.hi:
                self.hi, self.c_hi, at_hi = value, count, j
        if local and at_lo is not None:
            self.local_lo = [row[at_lo] for row in local]
        if local and at_hi is not None:
            self.local_hi = [row[at_hi] for row in local]
        slope = (self.hi - self.lo) / max(self.inside, 1)
        sigma = sigma if sigma is not None else max(2 * max(self.inside, 1) ** 0.5, self.inside / 16)
        center = self.lo + (self.c_lo - self.keep + 0.5) * slope
        self.aim = center, sigma, slope
        self.probes = spread(center, sigma, slope, self.lo, self.hi, quantum, guarantee)

    def aim_from_runs(self, counts: list[int], scale: float, sigma: float, quantum: int) -> None:
        """Aim the probes with counts over runs (estimates, scaled by ``scale``): they move the
        guess, never the exact bracket, and the probes spread within the exact bracket."""
        exact = self.lo, self.hi, self.c_lo, self.c_hi
        self.narrow(counts, None, quantum, scale, sigma, guarantee=False)
        self.lo, self.hi, self.c_lo, self.c_hi = exact
        self.probes = spread(*self.aim, self.lo, self.hi, quantum, guarantee=False)
