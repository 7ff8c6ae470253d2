"""Selection against a sort-based oracle; no process group (a thread 'all-reduce' stands in for ranks)."""

import threading

import pytest
import torch

from gmt_align.selection import (
    INF_BITS,
    NonFiniteGradientError,
    chunks_of,
    keep_count,
    random_chunks,
    select_thresholds,
)


def oracle_bits(scores: torch.Tensor, k: int) -> int:
    """Bit pattern of the k-th largest |score| by sorting (k >= 1)."""
    value = scores.float().abs().sort(descending=True).values[k - 1]
    return int(value.view(torch.int32))


def select_one(scores: torch.Tensor, k: int, chunk: int = 1 << 20) -> int:
    return int(select_thresholds(1, lambda u: chunks_of(scores, chunk), [k])[0])


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

    slots = [None] * world
    barrier = threading.Barrier(world)
    results = [None] * world

    def make_reduce(rank):
        def reduce(counts):
            slots[rank] = counts.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            counts.copy_(total)
            return counts

        return reduce

    def run(rank):
        results[rank] = select_thresholds(
            len(units), lambda u: chunks_of(shards[rank][u], 64), keep, reduce=make_reduce(rank)
        )

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = [oracle_bits(u, k) for u, k in zip(units, keep)]
    for rank in range(world):
        assert results[rank].tolist() == expected


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
