"""GMT on one GPU: compiled kernels vs eager ones bit for bit, the masking cost, a bf16 step.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--model DIR]

What ``benchmarks/gpu_check.sh`` runs (see there; ``--device cpu --quick`` is its CPU mode, which a
test runs). Three parts, each printing its lines, then one summary line:

1. **kernels** — on the selection test cases (``gmt_align.testing.gradient_case``, as tests/test_selection.py: normal, heavy
   tailed, ties, exact zeros, bf16 and fp16 gradients; sizes 1 to 300 001, plus one big enough for
   the counted runs), ``select_and_mask`` on the device with the ``torch.compile`` kernels
   (``GMT_ALIGN_COMPILE=1``) against the eager torch ops (``GMT_ALIGN_COMPILE=0``): thresholds, kept
   counts and masked gradients bit for bit, and both against a sort on the CPU; the kernels
   ``count_at_least`` / ``mask_candidates`` alone, and ``update`` mode's packing (pack, scribble,
   unpack: the masked weights come back bit for bit). A compiled kernel that fell back to eager
   ops counts as a failure: the comparison would prove nothing.
2. **mask_overhead** — ``benchmarks/mask_overhead.py --device DEVICE`` in its own process (beside
   fused AdamW on the same device); its final line is passed on.
3. **step** — a small Llama in bf16 (SmolLM2-135M-Instruct from ``--model``, or the same architecture
   with random weights when absent), fused AdamW, a batch of 8 x 512 tokens: the median training step
   (forward, backward, optimizer step) without GMT, with GMT (``gradient`` mode) and with ``update``
   mode, interleaved over rounds, each arm on its own copy of the model.

Summary line: ``gpu_check device=... kernels=ok|FAIL(n) <mask_overhead's fields> step_gmt_vs_vanilla=...
step_update_vs_vanilla=...``; the exit status is 1 if a kernel check failed.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gmt_align.core import kernels, masked_weights  # noqa: E402
from gmt_align.core.selection import keep_count, select_and_mask  # noqa: E402
from gmt_align.testing import gradient_case as unit_of  # noqa: E402  (the selection tests' own cases)

KINDS = ("normal", "heavy", "ties", "zeros", "bf16", "fp16")
QUICK_KINDS = ("heavy", "zeros", "bf16", "fp16")  # every gradient dtype, ties and zeros
RATIOS = (0.0, 0.2, 0.6, 0.999)
QUICK_RATIOS = (0.2,)


def sorted_threshold(g: torch.Tensor, k: int) -> int:
    """The rule by sorting (on the CPU): the k-th largest |g| bit pattern, at least 1; none kept: +inf."""
    if k == 0:
        return 0x7F800000
    bits = g.float().abs().view(torch.int32).sort(descending=True).values
    return max(int(bits[k - 1]), 1)


def select_on(units, ratio, device, compiled: bool):
    os.environ["GMT_ALIGN_COMPILE"] = "1" if compiled else "0"
    work = [u.to(device) for u in units]
    pieces = [list(w.tensor_split(3)) for w in work]
    keep = [keep_count(u.numel(), ratio) for u in units]
    thresholds, kept = select_and_mask(len(units), lambda u: pieces[u], keep, [u.numel() for u in units])
    return thresholds.tolist(), kept, [w.cpu() for w in work]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_kernels(device: str, quick: bool) -> tuple[int, int]:
    """Returns (cases checked, failures)."""
    saved = {key: os.environ.get(key) for key in ("GMT_ALIGN_CPP", "GMT_ALIGN_COMPILE")}
    os.environ["GMT_ALIGN_CPP"] = "0"  # on the CPU (--device cpu) check the torch.compile kernels too
    try:
        return _check_kernels(device, quick)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_kernels(device: str, quick: bool) -> tuple[int, int]:
    from gmt_align.core.selection import RUN, RUNS

    import torch._dynamo

    # every case compiled: past dynamo's recompile limit a new shape would silently run eagerly
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    sizes = (7, 65_537) if quick else (1, 7, 64, 1000, 65_537, 300_001)
    cases, failures = 0, 0

    def fail(what: str) -> None:
        nonlocal failures
        failures += 1
        print(f"kernels: FAIL {what}", flush=True)

    for kind in QUICK_KINDS if quick else KINDS:
        units = [unit_of(kind, n, seed) for seed, n in enumerate(sizes)]
        if not quick and kind in ("normal", "heavy", "bf16"):
            units.append(unit_of(kind, 8 * RUN * RUNS + 12_345, 5))  # big: the counted runs
        for ratio in QUICK_RATIOS if quick else RATIOS:
            cases += 1
            compiled = select_on(units, ratio, device, True)
            eager = select_on(units, ratio, device, False)
            if compiled[0] != eager[0] or compiled[1] != eager[1] \
                    or not all(same_bits(a, b) for a, b in zip(compiled[2], eager[2])):
                fail(f"select_and_mask {kind} ratio {ratio}: compiled and eager differ")
            expected = [sorted_threshold(u, keep_count(u.numel(), ratio)) for u in units]
            if compiled[0] != expected:
                fail(f"select_and_mask {kind} ratio {ratio}: thresholds differ from a sort")
            for u, t, masked in zip(units, expected, compiled[2]):
                want = torch.where(u.float().abs().view(torch.int32) >= t, u, torch.zeros_like(u))
                if not same_bits(masked, want):
                    fail(f"select_and_mask {kind} ratio {ratio} n={u.numel()}: masked gradient differs from a sort")
                    break
        for n in (4097,) if quick else (15, 4097, 70_001):
            cases += 1
            g = unit_of(kind, n, n).to(device)
            bits = g.float().abs().view(torch.int32)
            probes = torch.tensor([0, 1, int(bits.median()), 2**30, 0x7F800000], dtype=torch.int32, device=device)
            lo, hi = sorted(int(v) for v in bits[:2])
            results = []
            for compiled_ in (True, False):
                os.environ["GMT_ALIGN_COMPILE"] = "1" if compiled_ else "0"
                x = g.clone()
                counts = kernels.count_at_least(g, probes)
                positions, values = kernels.mask_candidates(x, lo, hi)
                results.append((counts.tolist(), x.cpu(), positions.tolist(), values.tolist()))
            if results[0][0] != results[1][0] or results[0][2:] != results[1][2:] \
                    or not same_bits(results[0][1], results[1][1]):
                fail(f"count_at_least/mask_candidates {kind} n={n}: compiled and eager differ")
            cases += 1
            if not pack_round_trip(g, int(bits.median()) if n > 1 else 1):
                fail(f"update-mode packing {kind} n={n}: masked weights not restored bit for bit")
    if kernels._FAILED:  # noqa: SLF001 - a fallback would have compared eager with eager
        fail(f"torch.compile fell back to eager ops for {sorted(kernels._FAILED)}")  # noqa: SLF001
    return cases, failures


def pack_round_trip(grad: torch.Tensor, threshold: int) -> bool:
    """Pack the weights where bits(|grad|) < threshold, scribble on all weights, unpack: the masked
    ones must come back bit for bit, the others keep the scribble."""
    weight = torch.randn(grad.numel(), device=grad.device).to(grad.dtype)
    before = weight.clone()
    packed = masked_weights.count_below(weight, grad, threshold)
    packed.values = torch.empty(masked_weights.entries(packed) + 1, dtype=weight.dtype, device=weight.device)
    masked_weights.pack_below(weight, grad, threshold, packed)
    weight.add_(1)
    scribbled = weight.clone()
    masked_weights.unpack_below(weight, grad, threshold, packed)
    masked = grad.float().abs().view(torch.int32) < threshold
    return same_bits(weight, torch.where(masked, before, scribbled))


def mask_overhead(device: str, quick: bool) -> str:
    argv = [sys.executable, str(ROOT / "benchmarks" / "mask_overhead.py"), "--device", device]
    if quick:
        argv += ["--sizes", "200000", "--shapes", "none", "--repeats", "5"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    print(result.stdout, end="", flush=True)
    if result.returncode:
        print(result.stderr[-3000:], file=sys.stderr)
        return "mask_overhead=FAILED"
    last = [line for line in result.stdout.splitlines() if re.match(r"^mask_vs_adamw=", line)]
    return last[-1] if last else "mask_overhead=NO_LINE"


def step_times(device: str, quick: bool, model_dir: Path | None, rounds: int, steps: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from gmt_align.backends import attach
    from gmt_align.core.engine import MaskOptions

    torch.manual_seed(0)
    if quick:
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        base, batch = LlamaForCausalLM(config), (1, 16)
        label = "tiny Llama (random weights)"
    elif model_dir is not None and (model_dir / "config.json").exists():
        base, batch = AutoModelForCausalLM.from_pretrained(model_dir), (8, 512)
        label = f"{model_dir.name}"
    else:
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        base, batch = LlamaForCausalLM(config), (8, 512)
        label = "SmolLM2-135M architecture (random weights)"
    base = base.to(device=device, dtype=torch.bfloat16)
    arms = {}
    for arm, mode in (("vanilla", None), ("gmt", "gradient"), ("update", "update")):
        model = copy.deepcopy(base)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.startswith("cuda"))
        step = [0]
        if mode is not None:
            attach(optimizer, model, MaskOptions(mask_ratio=0.1, mode=mode), lambda: step[0])
        arms[arm] = (model, optimizer, step)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, batch, generator=gen).to(device)
    times: dict[str, list[float]] = {arm: [] for arm in arms}

    def one_step(arm: str) -> float:
        model, optimizer, step = arms[arm]
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        step[0] += 1
        sync()
        return time.perf_counter() - start

    for arm in arms:  # warm-up: compiles the kernels, creates the optimizer state
        one_step(arm)
        one_step(arm)
    for _ in range(rounds):  # interleaved, so the machine's state hits every arm alike
        for arm in arms:
            times[arm] += [one_step(arm) for _ in range(steps)]
    medians = {arm: statistics.median(values) for arm, values in times.items()}
    spreads = {arm: (min(values), max(values)) for arm, values in times.items()}
    print(f"step: {label}, bf16 weights and gradients, fused AdamW, batch {batch[0]} x {batch[1]} tokens, "
          f"GMT ratio 0.1 tensor granularity; {rounds} rounds x {steps} steps per arm")
    for arm in arms:
        print(f"step: {arm:<8} median {medians[arm] * 1000:.1f} ms (min {spreads[arm][0] * 1000:.1f}, "
              f"max {spreads[arm][1] * 1000:.1f})")
    return medians


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small cases and a tiny model (the CPU mode)")
    parser.add_argument("--model", default=str(ROOT / ".cache" / "quickstart" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm and round")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device visible to torch")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# gpu_check on {name}; torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    cases, failures = check_kernels(args.device, args.quick)
    print(f"kernels: {cases} cases, {failures} failures ({time.perf_counter() - start:.0f} s)", flush=True)
    overhead = mask_overhead(args.device, args.quick)
    medians = step_times(args.device, args.quick, Path(args.model), args.rounds, args.steps)
    kernels_field = "ok" if failures == 0 else f"FAIL({failures})"
    print(f"gpu_check device={name.replace(' ', '_')} kernels={kernels_field} {overhead} "
          f"step_gmt_vs_vanilla={medians['gmt'] / medians['vanilla']:.3f} "
          f"step_update_vs_vanilla={medians['update'] / medians['vanilla']:.3f}")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
