"""Selection against a sort-based oracle; no process group (a thread 'all-reduce' stands in for ranks)."""

import threading

import pytest
import torch

from gmt_align.core import kernels
from gmt_align.core.rules import random_chunks
from gmt_align.testing import GRADIENT_KINDS
from gmt_align.testing import gradient_case as unit_of
from gmt_align.core.selection import (
    INF_BITS,
    NonFiniteGradientError,
    chunks_of,
    keep_count,
    select_and_mask,
    select_thresholds,
)


def oracle_bits(scores: torch.Tensor, k: int) -> int:
    """Bit pattern of the k-th largest |score| by sorting (k >= 1)."""
    value = scores.float().abs().sort(descending=True).values[k - 1]
    return int(value.view(torch.int32))


def select_one(scores: torch.Tensor, k: int, chunk: int = 1 << 20) -> int:
    return int(select_thresholds(1, lambda u: chunks_of(scores, chunk), [k])[0])


def on_thread_ranks(world: int, work):
    """Run ``work(rank, reduce)`` on ``world`` threads standing in for ranks, where ``reduce`` sums a count
    tensor over them in place (a barrier 'all-reduce'). Returns each rank's result and how many times it
    reduced; an error on one rank breaks the barrier (no rank waits forever) and is raised here."""
    slots, results, calls = [None] * world, [None] * world, [0] * world
    barrier = threading.Barrier(world)

    def make_reduce(rank):
        def reduce(counts):
            calls[rank] += 1
            slots[rank] = counts.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return counts.copy_(total)

        return reduce

    def run(rank):
        try:
            results[rank] = work(rank, make_reduce(rank))
        except BaseException as error:  # noqa: BLE001 - raised below
            results[rank] = error
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:  # the rank that failed first, not the others' broken barrier
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results, calls


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 65_537])
def test_matches_sort_for_every_kind_of_k(n):
    g = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for k in sorted(k for k in {1, 2, n // 3, n // 2, n - 1, n} if 1 <= k <= n):
        assert select_one(g, k, chunk=4096) == oracle_bits(g, k), (n, k)


def test_ties_and_exact_zeros():
    g = torch.randint(-3, 4, (10_000,), generator=torch.Generator().manual_seed(0)).float()
    for k in (1, 1500, 5000, 9000, 10_000):
        assert select_one(g, k) == oracle_bits(g, k)
    zeros = torch.zeros(100)
    assert select_one(zeros, 50) == 0
    negative_zero = torch.full((10,), -0.0)
    assert select_one(negative_zero, 3) == 0


def test_bf16_rounded_gradients_widen_exactly():
    g = torch.randn(50_000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for k in (1, 123, 25_000, 49_999):
        assert select_one(g, k, chunk=8192) == oracle_bits(g, k)


def test_tiny_and_huge_magnitudes():
    g = torch.tensor([1e-45, -1e-45, 3e38, -3e38, 1e-38, 0.0, 5.0])
    for k in range(1, 8):
        assert select_one(g, k) == oracle_bits(g, k)


def test_beyond_torch_quantile_limit():
    n = (1 << 24) + 5  # torch.quantile refuses inputs this large
    g = torch.randn(n, generator=torch.Generator().manual_seed(2))
    k = n - int(0.3 * n)
    expected = int(g.abs().kthvalue(n - k + 1).values.view(torch.int32))
    assert select_one(g, k) == expected


def test_empty_unit_and_keep_zero_keep_nothing():
    empty = torch.zeros(0)
    assert select_one(empty, 0) == INF_BITS
    assert select_one(torch.randn(10), 0) == INF_BITS


def test_many_units_split_into_fragments():
    gen = torch.Generator().manual_seed(3)
    units = [torch.randn(n, generator=gen) for n in (5, 300, 4097, 1)]
    pieces = [[u[:2], u[2:]] for u in units]
    keep = [max(1, u.numel() // 2) for u in units]

    def score_chunks(index):
        for piece in pieces[index]:
            yield from chunks_of(piece, 1000)

    got = select_thresholds(len(units), score_chunks, keep)
    assert got.tolist() == [oracle_bits(u, k) for u, k in zip(units, keep)]


def test_fewer_entries_than_keep_is_an_error():
    with pytest.raises(ValueError, match="fewer entries"):
        select_one(torch.randn(4), 5)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_scores_raise_naming_the_unit(bad):
    g = torch.randn(100)
    g[17] = bad
    with pytest.raises(NonFiniteGradientError, match="layer.3"):
        select_thresholds(2, lambda u: chunks_of(g if u == 1 else torch.ones(3)), [1, 50], names=["a", "layer.3"])


def test_reduce_is_called_once_per_round_with_small_counts():
    shapes = []

    def spy(counts):
        shapes.append(tuple(counts.shape))
        return counts

    g = torch.randn(10_000)
    select_thresholds(3, lambda u: chunks_of(g), [1, 2, 3], reduce=spy)
    assert shapes == [(3, 256)] * 4


def test_ranks_get_the_single_process_answer():
    """Shards on 3 threads, summed by a barrier 'all-reduce', give the unsharded thresholds."""
    world = 3
    gen = torch.Generator().manual_seed(4)
    units = [torch.randn(n, generator=gen) for n in (10, 1000, 3, 20_000)]
    units[2] = torch.tensor([1.0, 1.0, 2.0])  # rank 0 owns all of it, ranks 1 and 2 none
    keep = [keep_count(u.numel(), 0.4) for u in units]
    bounds = lambda n, r: (min(n, r * -(-n // world)), min(n, (r + 1) * -(-n // world)))  # noqa: E731
    shards = [[u[slice(*bounds(u.numel(), r))] for u in units] for r in range(world)]
    shards[1][2], shards[2][2] = torch.zeros(0), torch.zeros(0)
    shards[0][2] = units[2]

    results, _ = on_thread_ranks(world, lambda rank, reduce: select_thresholds(
        len(units), lambda u: chunks_of(shards[rank][u], 64), keep, reduce=reduce))
    expected = [oracle_bits(u, k) for u, k in zip(units, keep)]
    for rank in range(world):
        assert results[rank].tolist() == expected


@pytest.mark.parametrize("num_units", [5, 40])  # 12-bit digits up to 16 units, 8-bit above
def test_radix_within_ranks_find_the_need_th_largest_candidate(num_units):
    """Candidates of units with spans from 1 to 2^22 (one to three rounds; units stop at different
    rounds), split over 3 thread-ranks, some ranks holding none of a unit: every rank must find,
    per unit, the need-th largest candidate of all ranks (a sort's answer)."""
    from gmt_align.core.radix import radix_within

    world = 3
    gen = torch.Generator().manual_seed(num_units)
    units = list(range(1, 2 * num_units, 2))  # unit ids need not be 0..n-1
    spans = {u: int(torch.randint(1, 1 << int(torch.randint(1, 23, (1,), generator=gen)), (1,), generator=gen)) + 1
             for u in units}
    spans[units[0]] = 1  # a span of one value
    every = {u: torch.randint(0, spans[u], (int(torch.randint(1, 3000, (1,), generator=gen)),), generator=gen)
             for u in units}
    every[units[1]] = torch.full((50,), spans[units[1]] - 1)  # ties at the top of the span
    need = {u: int(torch.randint(1, every[u].numel() + 1, (1,), generator=gen)) for u in units}
    expected = {u: int(every[u].sort(descending=True).values[need[u] - 1]) for u in units}
    held = [{u: every[u].tensor_split(world)[r] for u in units} for r in range(world)]
    held[1][units[2]] = held[2][units[2]] = torch.zeros(0, dtype=torch.int64)  # rank 0 holds them all
    held[0][units[2]] = every[units[2]]

    def run(rank, reduce):
        order = torch.randperm(len(units), generator=torch.Generator().manual_seed(rank)).tolist()
        values = torch.cat([held[rank][units[i]] for i in order])  # candidates in any order of units
        owner = torch.cat([torch.full((held[rank][units[i]].numel(),), units[i]) for i in order])
        return radix_within(units, values, owner, spans, need, reduce)

    results, _ = on_thread_ranks(world, run)
    for result in results:
        assert result == expected


def test_keep_count_floors_the_decimal_ratio():
    assert keep_count(100, 0.29) == 71  # 0.29 * 100 is 28.999999999999996 in binary floating point
    assert keep_count(10, 0.0) == 10
    assert keep_count(10, 0.99) == 1
    assert keep_count(0, 0.5) == 0
    assert keep_count(7, 0.5) == 4


def test_random_scores_depend_only_on_position():
    whole = torch.cat(list(random_chunks(7, 3, 11, 0, 200_000)))
    split = torch.cat(list(random_chunks(7, 3, 11, 0, 70_001)) + list(random_chunks(7, 3, 11, 70_001, 129_999)))
    assert torch.equal(whole, split)
    assert 0 <= float(whole.min()) and float(whole.max()) < 1
    for other in [(8, 3, 11), (7, 4, 11), (7, 3, 12)]:
        assert not torch.equal(whole[:1000], torch.cat(list(random_chunks(*other, 0, 1000))))


# --- select_and_mask: magnitude selection fused with masking (C++, torch.compile and eager kernels) -
@pytest.fixture(params=["cpp", "compiled", "eager"])
def kernel_mode(request, monkeypatch):
    monkeypatch.setenv("GMT_ALIGN_COMPILE", "0" if request.param == "eager" else "1")
    monkeypatch.setenv("GMT_ALIGN_CPP", "1" if request.param == "cpp" else "0")
    if request.param == "cpp":
        assert kernels.cpp_kernels() is not None, "the C++ CPU kernels did not build"
    return request.param


def expected_mask(g: torch.Tensor, k: int) -> tuple[int, torch.Tensor]:
    """Threshold bits (zeros never kept) and the masked gradient, by sorting."""
    threshold = max(oracle_bits(g, k), 1) if k else INF_BITS
    kept = g.float().abs().view(torch.int32) >= threshold
    return threshold, torch.where(kept, g, torch.zeros_like(g))


def check_select_and_mask(units: list[torch.Tensor], ratio: float, splits: int = 1, reduce=None):
    keep = [keep_count(u.numel(), ratio) for u in units]
    work = [u.clone() for u in units]
    pieces = [list(w.tensor_split(splits)) for w in work]
    thresholds, kept = select_and_mask(len(units), lambda u: pieces[u], keep, [u.numel() for u in units], reduce)
    for u, (g, k) in enumerate(zip(units, keep)):
        threshold, masked = expected_mask(g, k)
        assert int(thresholds[u]) == threshold, (u, ratio)
        assert torch.equal(work[u], masked), (u, ratio)
        assert sum(kept[u]) == int((masked != 0).sum()), (u, ratio)
        assert kept[u] == [int((p != 0).sum()) for p in masked.tensor_split(splits)]


@pytest.mark.parametrize("kind", GRADIENT_KINDS)
def test_select_and_mask_matches_sort(kernel_mode, kind):
    units = [unit_of(kind, n, seed) for seed, n in enumerate((1, 7, 64, 1000, 65_537, 300_001))]
    for ratio in (0.0, 0.2, 0.6, 0.95, 0.999):
        check_select_and_mask(units, ratio, splits=3)


def test_select_and_mask_on_big_units_uses_the_runs_and_stays_exact(kernel_mode):
    from gmt_align.core.selection import RUN, RUNS

    n = 8 * RUN * RUNS + 12_345  # big enough for the counting of runs
    for kind in ("normal", "heavy", "ties"):
        check_select_and_mask([unit_of(kind, n, 5)], 0.2)
    # rows of very different scale: runs of one kind of row mislead the first guess, not the result
    g = unit_of("normal", n, 6)
    g[: n // 3] *= 1000
    check_select_and_mask([g], 0.5, splits=2)


def test_select_and_mask_tiny_and_huge_magnitudes(kernel_mode):
    g = torch.tensor([1e-45, -1e-45, 3e38, -3e38, 1e-38, 0.0, 5.0])
    for ratio in (0.0, 0.15, 0.3, 0.5, 0.7, 0.85):
        check_select_and_mask([g], ratio)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_select_and_mask_refuses_non_finite_before_touching_anything(kernel_mode, bad):
    g = torch.randn(1000)
    g[17] = bad
    before = g.clone()
    with pytest.raises(NonFiniteGradientError, match="layer.3"):
        select_and_mask(2, lambda u: [g if u == 1 else torch.ones(3)], [1, 500], [3, 1000], names=["a", "layer.3"])
    assert torch.equal(g.nan_to_num(), before.nan_to_num())  # raised before masking


KERNEL_SIZES = (1, 15, 16, 4095, 4096, 4097, 70_001)


@pytest.mark.parametrize("n", KERNEL_SIZES)
def test_kernels_count_and_mask_like_plain_torch(kernel_mode, n):
    """Each kernel against plain torch on the bit patterns: odd sizes around the C++ kernels' 16-lane
    vectors and 4096-entry work items, signed zeros, inf, NaN, denormals, probes at 0 and +inf."""
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).add_(0.01).pow_(-1)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40, 3e38])
    g[torch.randperm(n, generator=gen)[: min(n, 8)]] = specials[: min(n, 8)]
    bits = g.abs().view(torch.int32)
    finite = bits[bits < INF_BITS]
    probes = torch.tensor([0, 1, int(finite.median()) if finite.numel() else 5, 2**30, INF_BITS], dtype=torch.int32)
    assert kernels.count_at_least(g, probes).tolist() == [int((bits >= p).sum()) for p in probes.tolist()]
    if n >= 64:  # the runs view of the subsample: rows of a matrix, unit column stride
        rows = g[: n // 64 * 64].view(-1, 64)[:, :40]
        rbits = rows.abs().view(torch.int32)
        assert kernels.count_at_least(rows, probes).tolist() == [int((rbits >= p).sum()) for p in probes.tolist()]

    g = g.nan_to_num(posinf=5.0, neginf=-5.0)  # masking runs on finite gradients only
    bits = g.abs().view(torch.int32)
    lo, hi = sorted(int(v) for v in bits[torch.randint(n, (2,), generator=gen)])
    for lo_, hi_ in ((lo, hi), (lo, lo), (0, INF_BITS), (INF_BITS, INF_BITS)):
        x = g.clone()
        positions, values = kernels.mask_candidates(x, lo_, hi_)
        assert torch.equal(x.view(torch.int32), torch.where(bits >= lo_, g, 0.0).view(torch.int32))
        inside = ((bits >= lo_) & (bits < hi_)).nonzero().flatten()
        assert torch.equal(positions, inside) and torch.equal(values, bits[inside].to(torch.int64))


@pytest.mark.build
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_cpp_kernels_built_without_avx512_agree(capability):
    """The portable vector code (AVX2, SSE: what machines without AVX-512 compile) in its own process."""
    from subrun import run_tests

    env = {"GMT_ALIGN_CPU_CAPABILITY": capability, "GMT_ALIGN_CPP": "1", "GMT_ALIGN_COMPILE": "1"}
    passed, output = run_tests(__file__, "test_kernels_count_and_mask_like_plain_torch and cpp", env)
    expected = [f"test_kernels_count_and_mask_like_plain_torch[cpp-{n}]" for n in KERNEL_SIZES]
    assert sorted(passed) == sorted(expected), output


def test_cpp_kernels_that_do_not_build_fall_back_with_a_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "_CPP", [])  # forget the loaded module, for this test only
    with caplog.at_level("WARNING", logger="gmt_align.core.kernels"):
        assert kernels.cpp_kernels() is None
        g = torch.tensor([3.0, -1.0, 0.5, 2.0])
        assert kernels.count_at_least(g, torch.tensor([0, INF_BITS], dtype=torch.int32)).tolist() == [4, 0]
    assert "C++ CPU kernels could not be built (no C++ compiler here)" in caplog.text
    assert kernels.cpp_kernels() is None  # tried once, not on every call


def test_select_and_mask_ranks_get_the_single_process_mask():
    """3 threads stand in for ranks: shards of each unit, a barrier 'all-reduce'; every shard must be
    masked as the unsharded unit is, and every rank must take the same number of rounds."""
    from gmt_align.core.selection import RUN, RUNS

    world = 3
    units = [unit_of("normal", 8 * RUN * RUNS + 5, 7), unit_of("heavy", 100_003, 8), unit_of("ties", 999, 9),
             torch.tensor([1.0, 1.0, 2.0])]
    keep = [keep_count(u.numel(), 0.3) for u in units]
    shards = [list(u.clone().tensor_split(world)) for u in units]
    shards[3] = [units[3].clone(), torch.zeros(0), torch.zeros(0)]  # rank 0 holds all of it
    results, calls = on_thread_ranks(world, lambda rank, reduce: select_and_mask(
        len(units), lambda u: [shards[u][rank]], keep, [u.numel() for u in units], reduce))
    assert len(set(calls)) == 1 and calls[0] <= 6, calls
    for u, (g, k) in enumerate(zip(units, keep)):
        threshold, masked = expected_mask(g, k)
        assert all(int(result[0][u]) == threshold for result in results)
        assert torch.equal(torch.cat([shards[u][r] for r in range(world)]), masked)
        assert sum(result[1][u][0] for result in results) == int((masked != 0).sum())


# --- batched kernels and random scores ------------------------------------------------------------
def test_random_scores_of_the_cpp_kernels_are_the_torch_formula():
    from gmt_align.core.batch_kernels import random_bits, random_range

    assert kernels.cpp_kernels() is not None, "the C++ CPU kernels did not build"
    key = (7 << 40) + 12345
    for offset, n in ((0, 1000), (3, 17), ((1 << 32) - 21, 70)):  # the last one carries into the high word
        cpp = random_range(key, offset, n)
        assert torch.equal(cpp, random_bits(key, torch.arange(offset, offset + n, dtype=torch.int64)))
        assert 0 <= float(cpp.view(torch.float32).min()) and float(cpp.view(torch.float32).max()) < 1


def test_count_many_counts_every_piece_with_its_own_probes(kernel_mode):
    from gmt_align.core.batch_kernels import count_many, random_bits

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen) for n in (0, 5, 4096, 4097, 70_001)]
    grads[3][7] = float("nan")
    views = grads + [grads[4][: 64 * 1000].view(1000, 64)[:, :40]]  # a view of runs
    keys, offsets = [11, 12, 13, 14, 15, 16], [0, 9, 3, 1 << 32, 5, 5]
    for random in (False, True):
        # position of entry (r, c) of a view of runs: r * stride(0) + c inside the piece
        at = [torch.arange(v.numel()) if v.dim() == 1 else torch.arange(v.shape[0])[:, None] * v.stride(0)
              + torch.arange(v.shape[1]) for v in views]
        scores = [random_bits(keys[k], offsets[k] + at[k]) if random else v.abs().view(torch.int32)
                  for k, v in enumerate(views)]
        probes = torch.stack([torch.tensor(sorted(int(x) for x in torch.randint(0, 2**30, (5,), generator=gen)))
                              for _ in views]).to(torch.int32)
        probes = torch.cat([probes, torch.full((len(views), 1), INF_BITS, dtype=torch.int32)], 1)
        got = count_many(views, probes, keys if random else None, offsets if random else None)
        for k, s in enumerate(scores):
            assert got[k].tolist() == [int((s >= p).sum()) for p in probes[k].tolist()], (random, k)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_random_select_and_mask_matches_sort_of_the_scores(kernel_mode, ratio):
    """Random selection is the magnitude machinery over position-keyed scores: the exact keep-th largest
    score of each unit (no floor), over pieces at their offsets, and the masked gradient."""
    from gmt_align.core.batch_kernels import random_bits

    gen = torch.Generator().manual_seed(4)
    units = [torch.randn(n, generator=gen) for n in (1, 64, 1000, 300_001)]
    keys = [101, 202, 303, 404]
    work = [u.clone() for u in units]
    pieces = [list(w.tensor_split(3)) for w in work]
    placed = [[(keys[u], int(sum(p.numel() for p in pieces[u][:i]))) for i in range(3)] for u in range(len(units))]
    keep = [keep_count(u.numel(), ratio) for u in units]
    thresholds, kept = select_and_mask(len(units), lambda u: pieces[u], keep, [u.numel() for u in units],
                                       random_keys=lambda u: placed[u])
    for u, g in enumerate(units):
        scores = random_bits(keys[u], torch.arange(g.numel()))
        threshold = int(scores.sort(descending=True).values[keep[u] - 1]) if keep[u] else INF_BITS
        assert int(thresholds[u]) == threshold
        assert torch.equal(work[u], torch.where(scores >= threshold, g, 0.0))
        assert kept[u] == [int((s >= threshold).sum()) for s in scores.tensor_split(3)]
