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
    "select_and_mask",
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


# --- magnitude selection fused with masking ---------------------------------------------------------
# select_thresholds above reads every entry four times (one histogram per digit) with eager ops.
# For magnitude selection the passes below read the gradient about twice and write it once:
#   guess   a strided sample of each unit gives probe values near the k-th largest (no full read);
#   count   one fused pass counts the entries >= each of a few probes: exact counts, all-reduced,
#           bracket the threshold in [lo, hi) with few entries inside (repeated only if not);
#   mask    one fused read-modify-write zeroes everything below lo and marks the 64-entry blocks
#           holding an entry in [lo, hi) (the candidates);
#   finish  a radix select over the candidates only (gathered from the marked blocks, a tiny
#           fraction of the gradient) finds the exact threshold T in [lo, hi); the candidates
#           below T are zeroed in their blocks.
# Every decision is taken from all-reduced integer counts, so every rank takes the same one, and
# the result is the exact threshold of select_thresholds (tests check both against a sort).

SAMPLE = 8192
"""Entries per unit (per process) in the strided sample that gives the first probes."""

RUN, RUNS = 512, 2048
"""The second guess counts ``RUNS`` evenly spaced runs of ``RUN`` contiguous entries of each piece
(1 Mi entries: a cheap read, and runs cover many rows of a matrix)."""

PROBES = 8


def _max_candidates(numel: int) -> int:
    """Candidates allowed in [lo, hi) before the masking pass (bounds the gathered blocks to ~3%)."""
    return numel // 2048 + 4096


def _prime_at_least(value: int) -> int:
    value = max(2, value)
    while any(value % d == 0 for d in range(2, int(value**0.5) + 1)):
        value += 1
    return value


def _sample_size(size: int) -> int:
    """Enough that one exact count usually brackets the threshold within _max_candidates(size):
    a sample quantile is off by about size * 0.5 / sqrt(sample) entries."""
    return min(SAMPLE, max(512, (size // 8192) ** 2))


def _sample_bits(parts: Sequence[torch.Tensor], numel: int, wanted: int) -> torch.Tensor:
    """Bit patterns (int32, unsorted) of about ``wanted`` entries taken with a prime stride."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.int32)
    stride = 1 if numel <= wanted else _prime_at_least(numel // wanted)
    picked, start = [], 0  # position of the next sampled entry inside the unit's local entries
    for part in parts:
        if start < part.numel():
            picked.append(part[start::stride].float().abs().view(torch.int32).cpu())
        start = (start - part.numel()) % stride if part.numel() else start
    return torch.cat(picked) if len(picked) > 1 else picked[0] if picked else torch.zeros(0, dtype=torch.int32)


def _runs(part: torch.Tensor) -> torch.Tensor | None:
    """``RUNS`` evenly spaced runs of ``RUN`` entries of ``part`` as a 2-D view, or None if too small."""
    gap = part.numel() // RUNS
    if gap < 2 * RUN:
        return None
    return part[: gap * RUNS].view(RUNS, gap)[:, :RUN]


_AROUND = (-0.1, 0.1, -0.35, 0.35, -1.0, 1.0, -2.5, 2.5)
"""Probe offsets around the best guess, in units of its expected error (the nearest first)."""


def _spread(center: float, sigma: float, slope: float, lo: int, hi: int, quantum: int,
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


class _Unit:
    """The bracket [lo, hi) of one unit's threshold: C(lo) >= keep > C(hi), C(x) = entries >= x over
    all processes; ``local_*`` are this process's counts per piece at lo and hi."""

    def __init__(self, size: int, keep: int, pieces: int):
        self.size, self.keep = size, keep
        self.lo, self.hi = 0, INF_BITS
        self.c_lo, self.c_hi = size, 0
        self.local_lo, self.local_hi = [None] * pieces, [0] * pieces
        self.probes: list[int] = []

    @property
    def inside(self) -> int:
        return self.c_lo - self.c_hi

    def narrow(self, counts: list[int], local: list[list[int]] | None, quantum: int,
               scale: float = 1.0, sigma: float | None = None, guarantee: bool = True) -> None:
        """Move the bracket to the probes around the keep-th entry; aim the next probes inside."""
        for j, (value, count) in enumerate(zip(self.probes, counts)):
            if value >= INF_BITS:
                break
            count = int(count * scale)
            if count >= self.keep and value > self.lo:
                self.lo, self.c_lo = value, count
                self.local_lo = [row[j] for row in local] if local else self.local_lo
            elif count < self.keep and value < self.hi:
                self.hi, self.c_hi = value, count
                self.local_hi = [row[j] for row in local] if local else self.local_hi
        slope = (self.hi - self.lo) / max(self.inside, 1)
        sigma = sigma if sigma is not None else max(2 * max(self.inside, 1) ** 0.5, self.inside / 16)
        center = self.lo + (self.c_lo - self.keep + 0.5) * slope
        self.aim = center, sigma, slope
        self.probes = _spread(center, sigma, slope, self.lo, self.hi, quantum, guarantee)


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
    from . import kernels

    keep_t = [int(k) for k in torch.as_tensor(keep, dtype=torch.int64)]
    parts = [[p for p in pieces(u)] for u in range(num_units)]
    local = [sum(p.numel() for p in ps) for ps in parts]
    # bf16/fp16 gradients widen to float32 bit patterns on a grid: probes on the grid resolve ties
    # faster. Only alone: ranks must agree on it, and sharded gradients are fp32 anyway.
    dtypes = {p.dtype for ps in parts for p in ps}
    quantum, alone = 1, reduce is None
    if alone:
        quantum = 1 << 16 if dtypes == {torch.bfloat16} else 1 << 13 if dtypes == {torch.float16} else 1
    reduce = reduce or _identity
    units = {u: _Unit(int(sizes[u]), keep_t[u], len(parts[u])) for u in range(num_units) if keep_t[u] > 0}

    # guess: probes from each process's sample, averaged with weights = entries held.
    guesses = torch.zeros(num_units, PROBES + 1, dtype=torch.int64)
    samples = {u: _sample_bits(parts[u], local[u], _sample_size(units[u].size)) for u in units}
    buckets: dict[int, list[int]] = {}  # units whose samples have about the same size, sorted together
    for u, sample in samples.items():
        if sample.numel():
            buckets.setdefault(sample.numel().bit_length(), []).append(u)
    spots = (-3.0, -1.5, -0.6, -0.2, 0.2, 0.6, 1.5, 3.0)
    for members in buckets.values():  # rows padded with -1, which sorts last
        table = torch.full((len(members), max(samples[u].numel() for u in members)), -1, dtype=torch.int32)
        positions = torch.zeros(len(members), PROBES, dtype=torch.int64)
        for row, u in enumerate(members):
            n, k, size = units[u].size, units[u].keep, samples[u].numel()
            table[row, :size] = samples[u]
            sigma = (k / n * (1 - k / n) / size) ** 0.5 + 1 / size  # of a sample quantile, as a fraction
            positions[row] = torch.tensor([min(max(int((k / n + c * sigma) * size), 0), size - 1) for c in spots])
        picked = table.sort(dim=1, descending=True).values.gather(1, positions).to(torch.int64)
        held = torch.tensor([local[u] for u in members], dtype=torch.int64)
        guesses[torch.tensor(members), :PROBES] = picked * held[:, None]
        guesses[torch.tensor(members), PROBES] = held
    guesses = reduce(guesses)
    for u, unit in units.items():
        weight = max(int(guesses[u, PROBES]), 1)
        values = {(min(max(int(guesses[u, j]) // weight, 1), INF_BITS - 1) // quantum) * quantum for j in range(PROBES)}
        unit.probes = (sorted(values) + [INF_BITS] * PROBES)[:PROBES]

    def count_round(chosen: list[int], subsample: bool, extra=None) -> tuple[torch.Tensor, dict[int, list[list[int]]]]:
        """All-reduced counts ``[units, PROBES + 1 (+ extras)]`` (column PROBES: inf/NaN) and the
        local counts per piece; ``extra(u)`` adds columns to the same all-reduce."""
        table = torch.zeros(num_units, PROBES + 3, dtype=torch.int64)
        local_counts: dict[int, list[list[int]]] = {}
        for u in chosen:
            probe = torch.tensor(units[u].probes + [INF_BITS], dtype=torch.int32)
            rows = []
            for part in parts[u]:
                view = _runs(part) if subsample else part
                counts = kernels.count_at_least(view, probe.to(part.device)) if view is not None and view.numel() \
                    else torch.zeros(PROBES + 1, dtype=torch.int64)
                table[u, : PROBES + 1] += counts
                rows.append(counts.tolist())
            local_counts[u] = rows
            if extra is not None:
                table[u, PROBES + 1 :] = torch.tensor(extra(u))
        return reduce(table), local_counts

    # count the runs of big pieces first: a better guess for one exact round.
    big = [u for u, unit in units.items() if unit.size >= 8 * RUN * RUNS]
    if big:
        table, _ = count_round(big, subsample=True, extra=lambda u: [
            sum(view.numel() for view in map(_runs, parts[u]) if view is not None), local[u]])
        for u in big:
            unit = units[u]
            seen, held = int(table[u, PROBES + 1]), int(table[u, PROBES + 2])
            if seen == 0:  # no process holds a piece big enough: keep the first guess
                continue
            scale = held / seen
            sigma = 2 * (scale * unit.keep * (1 - unit.keep / unit.size)) ** 0.5 + 1
            exact = unit.lo, unit.hi, unit.c_lo, unit.c_hi
            unit.narrow(table[u, :PROBES].tolist(), None, quantum, scale, sigma, guarantee=False)
            unit.lo, unit.hi, unit.c_lo, unit.c_hi = exact  # estimates never bound the exact bracket
            # ... nor the probes: aimed at the estimate, spread within the exact bracket
            unit.probes = _spread(*unit.aim, unit.lo, unit.hi, quantum, guarantee=False)
    pending, first = list(units), True
    for _ in range(40):
        if not pending:
            break
        table, local_counts = count_round(pending, subsample=False)
        if first:
            _raise_on_non_finite(table[:, PROBES], names)
            first = False
        for u in pending:
            units[u].narrow(table[u, :PROBES].tolist(), local_counts[u], quantum)
        pending = [u for u in pending
                   if units[u].inside > _max_candidates(units[u].size) and units[u].hi - units[u].lo > quantum]
    else:
        raise RuntimeError("GMT selection did not converge")

    # mask: zero below lo; collect the candidates in [lo, hi).
    thresholds = torch.full((num_units,), INF_BITS, dtype=torch.int64)
    kept: list[list[int]] = [[0] * len(parts[u]) for u in range(num_units)]
    marked: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per piece: (positions, bits)
    for u in range(num_units):
        unit = units.get(u)
        if unit is None:  # keep nothing
            for part in parts[u]:
                kernels.mask_candidates(part, INF_BITS, INF_BITS)
            continue
        if unit.hi - unit.lo <= quantum:  # resolved: no entry strictly inside the bracket
            thresholds[u] = max(unit.lo, 1)
            # kept: entries >= lo, or (lo = 0) the non-zero ones, which are the entries >= hi
            kept[u] = list(unit.local_lo if unit.lo > 0 else unit.local_hi)
            for part in parts[u]:
                kernels.mask_candidates(part, int(thresholds[u]), int(thresholds[u]))
            continue
        kept[u] = list(unit.local_hi)
        marked[u] = [kernels.mask_candidates(part, unit.lo, unit.hi) for part in parts[u]]

    # finish: exact threshold among the candidates, then zero the candidates below it.
    open_units = list(marked)
    if alone:  # one process holds every candidate: the need-th largest, unit by unit
        found = {}
        for u in open_units:
            values = torch.cat([bits for _, bits in marked[u]])
            need = units[u].keep - units[u].c_hi  # 1 <= need <= candidates (the bracket's counts)
            found[u] = int(values.kthvalue(values.numel() - need + 1).values) - units[u].lo
    else:  # radix rounds, each count all-reduced
        cand_bits = [bits - units[u].lo for u in open_units for _, bits in marked[u]]
        cand_unit = [torch.full_like(bits, u) for u in open_units for _, bits in marked[u]]
        found = _radix_within(
            open_units,
            torch.cat(cand_bits) if cand_bits else torch.zeros(0, dtype=torch.int64),
            torch.cat(cand_unit) if cand_unit else torch.zeros(0, dtype=torch.int64),
            {u: units[u].hi - units[u].lo for u in open_units},
            {u: units[u].keep - units[u].c_hi for u in open_units},
            reduce,
        )
    for u in open_units:
        threshold = max(units[u].lo + found[u], 1)
        thresholds[u] = threshold
        for index, (part, (positions, bits)) in enumerate(zip(parts[u], marked[u])):
            below = bits < threshold
            if bool(below.any()):
                part.index_fill_(0, positions[below].to(part.device), 0)
            kept[u][index] += int((~below).sum())
    return thresholds, kept


def _radix_within(
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
    round over the units still going (the same on every process: spans are global).
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
    slot = index_of[owner] if owner.numel() else owner  # each candidate's position in ``units``
    for round_index in range(int(width.max()) // digit_bits + 1):
        going = torch.nonzero(width > digit_bits * round_index).flatten()
        if not going.numel():
            break
        high = (width - digit_bits * round_index).clamp(min=0)
        low = (high - digit_bits).clamp(min=0)
        row_of = torch.full((len(units),), -1, dtype=torch.int64)
        row_of[going] = torch.arange(going.numel())
        ok = row_of[slot] >= 0
        ok &= (values >> high[slot]) == prefix[slot]
        s, v = slot[ok], values[ok]
        digit = (v >> low[s]) & ((1 << (high - low)[s]) - 1)
        counts = torch.bincount(row_of[s] * bins + digit, minlength=going.numel() * bins).view(-1, bins)
        counts = reduce(counts.clone())
        at_or_above = counts.flip(1).cumsum(1).flip(1)
        need_now = remaining[going]
        chosen = (at_or_above >= need_now[:, None]).sum(1) - 1
        if bool((chosen < 0).any()):
            raise ValueError(f"fewer candidates than needed for units {going[chosen < 0].tolist()}")
        above = torch.where(chosen < bins - 1, at_or_above.gather(1, (chosen + 1).clamp(max=bins - 1)[:, None])[:, 0], 0)
        remaining[going] = need_now - above
        prefix[going] = (prefix[going] << (high - low)[going]) | chosen
    return dict(zip(units, prefix.tolist()))
