"""What GMT's masking costs next to the optimizer step it rides on: one process, no communication.

    .venv/bin/python benchmarks/mask_overhead.py [--sizes 33750000 135000000] [--shapes smollm2]
                                                 [--repeats 7] [--ratio 0.2] [--device cpu] [--processes 1]
                                                 [--clock wall]

For each gradient (flat fp32 vectors of the given sizes — 33.75M is one partition of
SmolLM2-135M over 4 ranks — and SmolLM2-135M's 272 real tensor shapes) it times, as the median
of ``--repeats`` interleaved runs after one warm-up (which also compiles the kernels):

- (a) one torch AdamW step over the same parameters: ``fused=True`` and ``foreach=True``;
- (b) the engine's selection + masking (``MaskEngine.apply``; ``update`` mode adds keeping the
  weights and ``restore``), for ``tensor`` and ``global`` granularity, ``gradient`` and ``update`` mode;
- (c) the naive reference: ``torch.kthvalue(|g|)`` per unit, then ``masked_fill_``.

- (d) ``random`` selection (tensor granularity, gradient mode) through the same engine.

Peak extra memory of (b) and (c) is what the torch allocator hands out during one call (from the
profiler's allocation events); in ``update`` mode, also what the engine keeps from step to step
(measured on the first call of a fresh engine, which allocates it); relative to the gradient's bytes.
``--clock cpu`` times the CPU time of the process instead of the wall time: with
``OMP_NUM_THREADS=1``, the work each method does, which other jobs on a shared machine disturb much
less than they disturb wall time (they still share the memory bandwidth). Every ratio is also taken
run by run (each method's run of one repeat against AdamW's run of the same repeat: interleaved,
so load on a shared machine hits both alike) and printed with its spread. The last line is

    mask_vs_adamw=<r> naive_vs_mask=<r> extra_mem_frac=<f> tensor_shapes_vs_adamw=<r> update_vs_adamw=<r>
    update_mem_frac=<f> random_vs_magnitude=<r>

mask_vs_adamw, naive_vs_mask, extra_mem_frac, update_vs_adamw and update_mem_frac for the first
size (GMT tensor granularity against the fused AdamW step; the naive reference against GMT; update
mode through the engine's update-mode path); tensor_shapes_vs_adamw and random_vs_magnitude on
SmolLM2's shapes (tensor granularity, gradient mode). Ratios are medians of the per-repeat ratios.

The fused AdamW step runs at one of two speeds from one process to the next on our 2-core machine
(9 or 14 ms on 33.75M entries; steady within a process). ``--processes N`` runs the whole
measurement in N fresh processes one after the other, prints each one's table, and ends with the
line above made of the medians over the processes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gmt_align.core.engine import Fragment, MaskEngine, MaskOptions, TensorInfo  # noqa: E402
from gmt_align.core import kernels  # noqa: E402
from gmt_align.core.selection import keep_count  # noqa: E402


def smollm2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """SmolLM2-135M's trainable tensors (tied embeddings counted once): 134.5M entries in 272 tensors."""
    hidden, inter, layers, vocab, kv = 576, 1536, 30, 49152, 192
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,))]


def heavy_tailed(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random gradient with heavier tails than a normal's, like real ones."""
    g = torch.randn(shape, generator=gen)
    return g.mul_(torch.rand(shape, generator=gen).add_(0.05).pow_(-0.5)).mul_(1e-4)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Case:
    """Parameters and their pristine gradients (heavy-tailed, like real ones), restored before each run."""

    def __init__(self, label: str, shapes: list[tuple[str, tuple[int, ...]]], device: str):
        gen = torch.Generator().manual_seed(0)
        self.label = label
        self.names = [name for name, _ in shapes]
        self.params = [torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(device))
                       for _, shape in shapes]
        self.pristine = []
        for p in self.params:
            g = heavy_tailed(p.shape, gen)
            self.pristine.append(g.to(device))
            p.grad = g.clone().to(device)
        self.numel = sum(p.numel() for p in self.params)
        self.grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in self.params)

    def reset(self) -> None:
        for p, g in zip(self.params, self.pristine):
            p.grad.copy_(g)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_extra_bytes(fn, device: str) -> int:
    """Peak of (allocated - freed) bytes during ``fn()``, from the allocator's events."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for event in events:
        now += event.nbytes()
        peak = max(peak, now)
    return peak


def gmt_runner(case: Case, granularity: str, mode: str, ratio: float, selection: str = "magnitude"):
    infos = [TensorInfo((name,), p.numel()) for name, p in zip(case.names, case.params)]
    engine = MaskEngine(MaskOptions(mask_ratio=ratio, granularity=granularity, mode=mode, selection=selection), infos)
    fragments = [Fragment(i, 0, p.grad.view(-1), p.data.view(-1)) for i, p in enumerate(case.params)]
    step = [0]

    def run():
        step[0] += 1
        engine.apply(fragments, step[0])
        if mode == "update":  # the optimizer step would run here
            engine.restore(fragments)

    return run


def naive_runner(case: Case, ratio: float):
    def run():
        for p in case.params:
            g = p.grad.view(-1)
            k = keep_count(g.numel(), ratio)
            if k == 0:
                g.zero_()
                continue
            threshold = torch.kthvalue(g.abs(), g.numel() - k + 1).values.clamp(min=torch.finfo(torch.float32).tiny)
            g.masked_fill_(g.abs() < threshold, 0)

    return run


def adamw_runner(case: Case, **kind):
    optimizer = torch.optim.AdamW(case.params, lr=1e-5, weight_decay=0.0, **kind)
    return optimizer.step


def measure(case: Case, args) -> dict[str, dict]:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    makers = {
        "adamw fused": (lambda: adamw_runner(case, fused=True), False),
        "adamw foreach": (lambda: adamw_runner(case, foreach=True), False),
    }
    for granularity in ("tensor", "global"):
        for mode in ("gradient", "update"):
            makers[f"gmt {granularity} {mode}"] = (
                lambda g=granularity, m=mode: gmt_runner(case, g, m, args.ratio), True)
    makers["gmt tensor random"] = (lambda: gmt_runner(case, "tensor", "gradient", args.ratio, "random"), True)
    if case.numel <= args.naive_max:
        makers["naive kthvalue+mask"] = (lambda: naive_runner(case, args.ratio), True)
    first_call = {}  # update mode keeps memory from step to step: seen on a fresh engine's first call
    for name, (make, masks) in makers.items():
        if masks and " update" in name:
            case.reset()
            first_call[name] = peak_extra_bytes(make(), args.device)
    runners = {name: (make(), masks) for name, (make, masks) in makers.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for name, (run, masks) in runners.items():  # warm-up: compiles kernels, creates optimizer state
        case.reset()
        run()
    for _ in range(args.repeats):  # interleaved, so load on the machine hits every method alike
        for name, (run, masks) in runners.items():
            case.reset()
            sync(args.device)
            start = clock()
            run()
            sync(args.device)
            times[name].append(clock() - start)
    results = {}
    for name, (run, masks) in runners.items():
        case.reset()
        extra = max(peak_extra_bytes(run, args.device), first_call.get(name, 0)) if masks else None
        results[name] = {"s": statistics.median(times[name]), "extra": extra, "times": times[name]}
    return results


def ratios(results: dict[str, dict], name: str, against: str) -> list[float]:
    """Run by run: each repeat's time of ``name`` over the same repeat's time of ``against``."""
    return [a / b for a, b in zip(results[name]["times"], results[against]["times"])]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[33_750_000, 135_000_000])
    parser.add_argument("--shapes", choices=["smollm2", "none"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive_max", type=int, default=200_000_000, help="skip the naive reference above this size")
    parser.add_argument("--processes", type=int, default=1, help="repeat in this many fresh processes; medians")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the CPU time of the process (with OMP_NUM_THREADS=1: the work "
                             "done, whatever else shares the machine)")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.processes > 1:
        return over_processes(args, list(sys.argv[1:] if argv is None else argv))

    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"{cpu_name()}, {torch.get_num_threads()} threads")
    if not kernels.compiled():
        kind = "eager"
    elif args.device == "cpu" and kernels.cpp_kernels() is not None:
        kind = f"C++ ({torch.backends.cpu.get_cpu_capability()})"
    else:
        kind = "torch.compile"
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu times CPU work: only with --device cpu")
    print(f"# {device}; torch {torch.__version__}; kernels {kind}; "
          f"mask ratio {args.ratio}; median of {args.repeats}; {args.clock} clock")
    cases = [Case(f"flat {n / 1e6:g}M", [(f"flat{n}", (n,))], args.device) for n in args.sizes]
    if args.shapes == "smollm2":
        cases.append(Case("SmolLM2-135M shapes", smollm2_shapes(), args.device))
    print(f"{'gradient':<22} {'method':<22} {'time (s)':>10} {'x fused AdamW':>14} {'per-repeat ratio [spread]':>26} "
          f"{'extra mem':>10}")
    line: dict[str, float] = {}
    for index, case in enumerate(cases):
        results = measure(case, args)
        adamw = results["adamw fused"]["s"]
        for name, r in results.items():
            extra = "" if r["extra"] is None else f"{r['extra'] / case.grad_bytes:.3f}"
            print(f"{case.label:<22} {name:<22} {r['s']:>10.4f} {r['s'] / adamw:>14.2f} "
                  f"{spread(ratios(results, name, 'adamw fused')):>26} {extra:>10}")
        vs_adamw = lambda name: statistics.median(ratios(results, name, "adamw fused"))  # noqa: E731
        if index == 0 and "naive kthvalue+mask" in results:
            mask = results["gmt tensor gradient"]
            line.update(mask_vs_adamw=vs_adamw("gmt tensor gradient"),
                        naive_vs_mask=statistics.median(ratios(results, "naive kthvalue+mask", "gmt tensor gradient")),
                        extra_mem_frac=mask["extra"] / case.grad_bytes,
                        update_vs_adamw=vs_adamw("gmt tensor update"),
                        update_mem_frac=results["gmt tensor update"]["extra"] / case.grad_bytes)
        if case.label.startswith("SmolLM2"):
            random_vs = ratios(results, "gmt tensor random", "gmt tensor gradient")
            print(f"{case.label:<22} random / magnitude     {spread(random_vs):>26}")
            line.update(tensor_shapes_vs_adamw=vs_adamw("gmt tensor gradient"),
                        random_vs_magnitude=statistics.median(random_vs))
        del case
    if line:
        print(final_line(line))
    return 0


FIELDS = ("mask_vs_adamw", "naive_vs_mask", "extra_mem_frac", "tensor_shapes_vs_adamw", "update_vs_adamw",
          "update_mem_frac", "random_vs_magnitude")
_DIGITS = {"naive_vs_mask": 1, "extra_mem_frac": 4, "update_mem_frac": 4}


def final_line(values: dict[str, float]) -> str:
    """The last line: every field measured (those of a case not run are left out)."""
    return " ".join(f"{key}={values[key]:.{_DIGITS.get(key, 3)}f}" for key in FIELDS if key in values)


def over_processes(args, argv: list[str]) -> int:
    """Run the measurement in ``args.processes`` fresh processes; the final line holds the medians."""
    i = argv.index("--processes") if "--processes" in argv else None
    rest = argv[:i] + argv[i + 2 :] if i is not None else [a for a in argv if not a.startswith("--processes=")]
    found: list[dict[str, float]] = []
    for k in range(args.processes):
        out = subprocess.run([sys.executable, __file__, *rest], check=True, capture_output=True, text=True).stdout
        print(f"## process {k + 1} of {args.processes}\n{out}", end="", flush=True)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        values = dict(re.findall(r"(\w+)=(\S+)", last))
        if values and all(key in FIELDS for key in values):
            found.append({key: float(value) for key, value in values.items()})
    if not found:
        return 1
    for key in FIELDS:
        per = [row[key] for row in found if key in row]
        if per:
            print(f"## {key} per process: {', '.join(f'{v:.3f}' for v in per)}")
    print(final_line({key: statistics.median(row[key] for row in found if key in row)
                      for key in FIELDS if any(key in row for row in found)}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
