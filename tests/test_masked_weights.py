"""update mode's packing of the masked weights (gmt_align/core/masked_weights.py): C++ and torch paths."""


import pytest
import torch

from gmt_align.core import masked_weights
from gmt_align.core.engine import Fragment, MaskEngine, MaskOptions, TensorInfo


@pytest.fixture(params=["cpp", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("GMT_ALIGN_CPP", "1" if request.param == "cpp" else "0")
    if request.param == "cpp":
        assert masked_weights._cpp() is not None, "the C++ kernels of update mode did not build"
    return request.param


def gradient(n: int, dtype=torch.float32) -> torch.Tensor:
    """Masked-looking: ~30 % exact zeros (both signs), denormals, the rest spread over magnitudes."""
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).add_(0.01).pow_(-1)
    g[torch.rand(n, generator=gen) < 0.3] = 0.0
    specials = torch.tensor([-0.0, 1e-45, -1e-40, 3e38, 0.0])
    g[torch.randperm(n, generator=gen)[: min(n, 5)]] = specials[: min(n, 5)]
    return g.to(dtype)


PACK_SIZES = (1, 15, 17, 4096, 65_535, 65_537, 200_003)


@pytest.mark.parametrize("n", PACK_SIZES)
def test_pack_then_unpack_restores_exactly_the_masked_weights(path, n):
    """Odd sizes around the 16-lane vectors and the 65 536-entry chunks; thresholds 1 (the zeros: what
    magnitude selection masks) and a median (ties, denormals and signs on both sides)."""
    g = gradient(n)
    bits = g.abs().view(torch.int32)
    for threshold in (1, int(bits.median())):
        weight = torch.randn(n, generator=torch.Generator().manual_seed(1))
        before = weight.clone()
        masked = bits < threshold
        packed = masked_weights.count_below(weight, g, threshold)
        assert (packed.offsets is not None) == (path == "cpp")
        assert masked_weights.entries(packed) == int(masked.sum())
        packed.values = torch.full((masked_weights.entries(packed) + 1,), float("nan"))
        masked_weights.pack_below(weight, g, threshold, packed)
        assert torch.equal(packed.values[:-1], before[masked])  # in order, nothing else written
        weight.mul_(3).add_(1)  # the optimizer step
        stepped = weight.clone()
        masked_weights.unpack_below(weight, g, threshold, packed)
        want = torch.where(masked, before, stepped)
        assert torch.equal(weight.view(torch.int32), want.view(torch.int32))


def test_bf16_and_fp16_weights_take_the_torch_path():
    for dtype in (torch.bfloat16, torch.float16):
        g = gradient(70_001, dtype)
        weight = torch.randn(70_001).to(dtype)
        before = weight.clone()
        packed = masked_weights.count_below(weight, g, 1)
        assert packed.offsets is None and masked_weights.entries(packed) == int((g == 0).sum())
        packed.values = torch.empty(masked_weights.entries(packed) + 1, dtype=dtype)
        masked_weights.pack_below(weight, g, 1, packed)
        weight.add_(1)
        masked_weights.unpack_below(weight, g, 1, packed)
        assert torch.equal(weight[g == 0], before[g == 0]) and torch.equal(weight[g != 0], before[g != 0] + 1)


def test_update_mode_holds_about_the_ratio_of_the_weights_and_reuses_it(path):
    """The extra memory of update mode: the masked entries only (default ratio 0.1; 0.2 here), one
    buffer reused from step to step, and the masked weights unchanged through AdamW bit for bit."""
    n = 300_000
    param = torch.nn.Parameter(torch.randn(n))
    optimizer = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1)
    engine = MaskEngine(MaskOptions(mask_ratio=0.2, mode="update"), [TensorInfo(("w",), n)])
    buffers = []
    for step in range(3):
        param.grad = torch.randn(n, generator=torch.Generator().manual_seed(step))
        fragments = [Fragment(0, 0, param.grad, param.data)]
        before = param.detach().clone()
        engine.apply(fragments, step)
        masked = param.grad == 0
        optimizer.step()
        engine.restore(fragments)
        assert torch.equal(param.data[masked].view(torch.int32), before[masked].view(torch.int32))
        assert (param.data != before)[~masked].float().mean() > 0.999  # kept: moved (bar exact cancellations)
        assert engine.masked_weights.nbytes() <= (0.2 + 1 / 32) * 1.05 * n * 4  # values, marks, growth room
        buffers.append({b.data_ptr() for b in engine.masked_weights.buffers.values()})
    assert buffers[0] == buffers[1] == buffers[2]  # the same buffers (values, and the C++ path's marks)


@pytest.mark.build
@pytest.mark.parametrize("capability", ["DEFAULT"])
def test_cpp_kernels_built_without_avx512_agree(capability):
    """The portable loops (what machines without AVX-512 compile), in their own process."""
    from subrun import run_tests

    env = {"GMT_ALIGN_CPU_CAPABILITY": capability, "GMT_ALIGN_CPP": "1", "GMT_ALIGN_COMPILE": "1"}
    passed, output = run_tests(__file__, "test_pack_then_unpack_restores_exactly_the_masked_weights and cpp", env)
    assert sorted(passed) == sorted(f"test_pack_then_unpack_restores_exactly_the_masked_weights[cpp-{n}]"
                                    for n in PACK_SIZES), output


def test_random_selection_in_update_mode_keeps_its_masked_weights():
    """The random rule packs by its scores (chunk by chunk), here on two fragments of one tensor, the
    second starting mid-way through a block of scores."""
    n, split = 150_000, 70_000
    param = torch.nn.Parameter(torch.randn(n))
    param.grad = torch.randn(n)
    engine = MaskEngine(MaskOptions(mask_ratio=0.3, mode="update", selection="random"), [TensorInfo(("w",), n)])
    fragments = [Fragment(0, 0, param.grad[:split], param.data[:split]),
                 Fragment(0, split, param.grad[split:], param.data[split:])]
    before = param.detach().clone()
    engine.apply(fragments, 4)
    masked = ~torch.cat([engine.kept_mask(fragment) for fragment in fragments])
    assert 0.25 < masked.float().mean() < 0.35
    torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1).step()
    engine.restore(fragments)
    assert torch.equal(param.data[masked].view(torch.int32), before[masked].view(torch.int32))
    assert (param.data != before)[~masked].all()


@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_the_masking_pass_keeps_the_masked_weights_itself(selection, monkeypatch):
    """fp32 CPU weights are kept by the selection's masking pass (one pass over gradient and weight), and
    the candidates zeroed after it with their positions; on 2 threads, over fragments of odd sizes (one
    tensor in two fragments, as ZeRO slices it). With too little room the pass keeps nothing and the
    fragments are kept apart: the masked weights come back bit for bit either way."""
    assert masked_weights._cpp() is not None, "the C++ kernels did not build"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sizes, split = [200_003, 70_001, 4_099, 17], 90_001
        params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for n in sizes]
        engine = MaskEngine(MaskOptions(mask_ratio=0.3, mode="update", selection=selection),
                            [TensorInfo((f"w{i}",), n) for i, n in enumerate(sizes)])
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        for step, room in enumerate(["enough", "enough", "too little"]):
            if room == "too little":
                arguments = masked_weights.Aside.arguments
                monkeypatch.setattr(masked_weights.Aside, "arguments", lambda self, *a: _shrunk(arguments(self, *a)))
            for p in params:
                p.grad = gradient(p.numel()).roll(step)
            fragments = [Fragment(0, 0, params[0].grad[:split], params[0].data[:split]),
                         Fragment(0, split, params[0].grad[split:], params[0].data[split:])]
            fragments += [Fragment(i, 0, p.grad, p.data) for i, p in enumerate(params) if i]
            before = [p.detach().clone() for p in params]
            engine.apply(fragments, step)
            packs = [f._saved for f in fragments]
            if room == "enough":
                assert all(p.starts is not None for p in packs)
                if selection == "magnitude":  # the big tensors' brackets stay open: candidates zeroed later
                    assert sum(p.positions.numel() for p in packs) > 0
            else:  # (a fragment with nothing below lo needs no room)
                assert sum(p.starts is None for p in packs) >= 3
            masked = [~torch.cat([engine.kept_mask(f) for f in fragments[:2]])] + \
                [~engine.kept_mask(f) for f in fragments[2:]]
            optimizer.step()
            engine.restore(fragments)
            for p, was, m in zip(params, before, masked):
                assert 0 < int(m.sum()) < m.numel() or m.numel() < 100
                assert torch.equal(p.data[m].view(torch.int32), was[m].view(torch.int32))
                assert (p.data != was)[~m].float().mean() > 0.999  # kept: moved (bar exact cancellations)
    finally:
        torch.set_num_threads(threads)


def _shrunk(arguments: list) -> list:
    """mask_many_aside's arguments with one entry less of room for every piece's weights."""
    weights, words, values, starts = arguments
    return [weights, words, [v[:-1] if v.numel() else v for v in values], starts]


@pytest.mark.build
def test_the_masking_pass_keeps_them_without_avx512_too():
    """The masking pass's portable loops (what machines without AVX-512 compile), in their own process."""
    from subrun import run_tests

    env = {"GMT_ALIGN_CPU_CAPABILITY": "DEFAULT", "GMT_ALIGN_CPP": "1", "GMT_ALIGN_COMPILE": "1"}
    passed, output = run_tests(__file__, "test_the_masking_pass_keeps_the_masked_weights_itself", env)
    assert sorted(passed) == [f"test_the_masking_pass_keeps_the_masked_weights_itself[{selection}]"
                              for selection in ("magnitude", "random")], output
