"""The engine through the plain-torch adapter: what the optimizer sees and what the step changes."""

import copy

import pytest
import torch
from torch import nn

from gmt_align.backends import attach as attach_gmt
from gmt_align.core.engine import MaskOptions
from gmt_align.core.selection import NonFiniteGradientError, ZeroGradientError, keep_count
from gmt_align.training.telemetry import MaskTelemetry


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, like SmolLM2

    def forward(self, ids):
        return self.head(self.norm(self.proj(self.embed(ids))))


def make(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def backward(model, seed=0):
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(seed))
    logits = model(ids)
    nn.functional.cross_entropy(logits.view(-1, 50), ids.view(-1)).backward()


def attach(model, optimizer, **options):
    step = {"n": 0}
    adapter = attach_gmt(optimizer, model, MaskOptions(**options), lambda: step["n"])
    return adapter, step


def expected_keep(grad: torch.Tensor, ratio: float) -> torch.Tensor:
    """Reference rule by sorting: |g| >= k-th largest |g|, and never an exact zero."""
    flat = grad.flatten().abs()
    k = keep_count(flat.numel(), ratio)
    threshold = flat.sort(descending=True).values[k - 1]
    return ((flat >= threshold) & (flat > 0)).view_as(grad)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_gradient_mode_feeds_the_masked_gradient_to_the_optimizer(ratio):
    model, reference = make(), make()
    backward(model)
    backward(reference)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    attach(model, opt, mask_ratio=ratio)
    for p in reference.parameters():
        p.grad *= expected_keep(p.grad, ratio)
    opt.step()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.grad, q.grad), name


def test_kept_count_is_exact_for_distinct_gradients():
    model = make()
    backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    attach(model, opt, mask_ratio=0.3)
    opt.step()
    for name, p in model.named_parameters():
        nonzero = int((grads[name] != 0).sum())
        want = min(keep_count(p.numel(), 0.3), nonzero)  # zeros are never kept
        assert int((p.grad != 0).sum()) == want, name


def test_update_mode_leaves_masked_weights_bit_for_bit():
    model = make()
    backward(model)
    keep = {n: expected_keep(p.grad, 0.4) for n, p in model.named_parameters()}
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    attach(model, opt, mask_ratio=0.4, mode="update")
    opt.step()
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        changed = p != q
        assert not changed[~keep[name]].any(), name  # masked: untouched, weight decay included
        assert changed[keep[name]].all(), name  # kept: moved
    # The optimizer state of masked entries saw a zero gradient.
    state = opt.state[model.proj.weight]
    assert torch.equal(state["exp_avg"][~keep["proj.weight"]], torch.zeros_like(state["exp_avg"])[~keep["proj.weight"]])


def test_gradient_mode_lets_weight_decay_move_masked_entries():
    model = make()
    backward(model)
    keep = expected_keep(model.proj.weight.grad, 0.5)
    before = model.proj.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    attach(model, opt, mask_ratio=0.5, mode="gradient")
    opt.step()
    assert (model.proj.weight != before)[~keep].all()  # documented: decoupled decay still applies


def test_global_granularity_uses_one_threshold():
    model = make()
    backward(model)
    all_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    k = keep_count(all_grads.numel(), 0.6)
    threshold = all_grads.abs().sort(descending=True).values[k - 1]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    attach(model, opt, mask_ratio=0.6, granularity="global")
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(p.grad, g * ((g.abs() >= threshold) & (g != 0)))


def test_excluded_tensors_are_never_masked_even_through_a_tied_name():
    model = make()
    backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    attach(model, opt, mask_ratio=0.9, exclude=("norm", r"^head\."))
    opt.step()
    assert torch.equal(model.norm.weight.grad, grads["norm.weight"])
    assert torch.equal(model.embed.weight.grad, grads["embed.weight"])  # tied to head.weight
    assert not torch.equal(model.proj.weight.grad, grads["proj.weight"])


def test_random_selection_is_reproducible_and_fresh_each_step():
    def masks(seed, step):
        model = make()
        backward(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        _, counter = attach(model, opt, mask_ratio=0.5, selection="random", seed=seed)
        counter["n"] = step
        opt.step()
        return [p.grad != 0 for p in model.parameters()]

    first = masks(seed=1, step=0)
    assert all(torch.equal(a, b) for a, b in zip(first, masks(seed=1, step=0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, masks(seed=2, step=0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, masks(seed=1, step=1)))
    proj = first[1]
    assert int(proj.sum()) <= keep_count(proj.numel(), 0.5)  # a kept entry may have a zero gradient
    assert int(proj.sum()) >= keep_count(proj.numel(), 0.5) - 5


def test_non_finite_gradient_raises_before_the_step():
    model = make()
    backward(model)
    model.proj.weight.grad[0, 0] = float("nan")
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    attach(model, opt, mask_ratio=0.2)
    with pytest.raises(NonFiniteGradientError, match="proj.weight"):
        opt.step()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)


def zero_gradients(model, alive=()):
    """A gradient exactly zero in every tensor but those named in ``alive`` (a diverged model)."""
    for name, param in model.named_parameters():
        param.grad = torch.ones_like(param) if name in alive else torch.zeros_like(param)


@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_a_gradient_zero_in_every_tensor_raises_before_the_step(selection):
    model = make()
    zero_gradients(model)
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # decay would move every weight
    attach(model, opt, mask_ratio=0.2, selection=selection)
    with pytest.raises(ZeroGradientError, match="step 1: the gradient is exactly zero in every tensor"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_one_live_tensor_excluded_or_not_is_not_an_all_zero_step(selection):
    for alive, exclude in ((("norm.bias",), ("norm",)), (("proj.bias",), ())):
        model = make()
        zero_gradients(model, alive)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        attach(model, opt, mask_ratio=0.2, selection=selection, exclude=exclude)
        opt.step()  # no error: a tensor still learns


def test_all_zero_is_decided_over_every_rank():
    """The decision is one count reduced over the processes: a process whose own gradients are all
    zero steps on when another's are not (here the reduce adds the other process's count)."""
    for others, raises in ((0, True), (7, False)):
        model = make()
        zero_gradients(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        adapter, _ = attach(model, opt, mask_ratio=0.2)
        adapter.engine.reduce = lambda counts, others=others: counts + others if counts.shape == (1,) else counts
        if raises:
            with pytest.raises(ZeroGradientError):
                opt.step()
        else:
            opt.step()


def test_skip_skips_an_all_zero_step_and_counts_it():
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    adapter, step = attach(model, opt, mask_ratio=0.2, nonfinite="skip")
    backward(model)
    opt.step()  # a live step
    opt.zero_grad()
    step["n"] += 1
    zero_gradients(model)
    before = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="GMT skips step 2: the gradient is exactly zero"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert adapter.skipped_steps == {1}


def test_stats_report_the_kept_fraction():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adapter, step = attach(model, opt, mask_ratio=0.25)
    kept = total = 0
    for i in range(3):
        backward(model, seed=i)
        opt.step()
        kept += sum(int((p.grad != 0).sum()) for p in model.parameters())  # kept <=> non-zero here
        total += sum(p.numel() for p in model.parameters())
        opt.zero_grad()
        step["n"] += 1
    figures = MaskTelemetry(adapter.engine, per_entry=False).pop_figures()
    assert figures["gmt/kept_fraction"] == pytest.approx(kept / total)
    assert figures["gmt/kept_fraction"] <= 0.75
    assert 0 < figures["gmt/threshold_min"] <= figures["gmt/threshold_median"] <= figures["gmt/threshold_max"]
    assert adapter.engine.take_counts()[1] == 0  # taken: counting starts again
