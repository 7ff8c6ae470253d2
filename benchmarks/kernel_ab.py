"""The C++ CPU kernels of this checkout against those of another revision, side by side in one process.

    .venv/bin/python benchmarks/kernel_ab.py --base REV [--shapes smollm2|flat] [--size N] [--rounds 9]

Builds ``gmt_align/core/csrc/*.cpp`` (``gmt_align/csrc/`` in revisions before the layered package) as
they are at git revision ``REV`` (once, into TORCH_EXTENSIONS_DIR, under the name of their digest, as
gmt-align names its own build; no build when they equal this checkout's), loads both modules into this
process and, on the same gradients (SmolLM2-135M's 272 tensor shapes, or one flat tensor of
``--size`` entries; heavy-tailed like benchmarks/mask_overhead.py's), first checks that both give the same counts and the same masks,
then times the two passes of magnitude selection — the counting pass (``count_many``, 15 probes
around the ``1 - ratio`` quantile) and the masking pass (``mask_many``, gradients restored before
each call) — alternating which build goes first from round to round. Measurements of two builds in
two processes differ by the machine's state between them (±30 % here); in one process, call after
call, they share it. With one torch thread (``OMP_NUM_THREADS=1``) each call is timed in the thread's
CPU time, else in wall time. Prints a table (median [min-max] per pass and build, ms) and ends with
the line

    count_new_vs_base=<r> mask_new_vs_base=<r>

(ratios of the medians; below 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from gmt_align.core import kernels  # noqa: E402
from mask_overhead import cpu_name, heavy_tailed, smollm2_shapes  # noqa: E402


def base_module(rev: str):
    """The C++ kernels built from the sources at ``rev`` (this checkout's own module if they are the same)."""
    sources = []
    for path in kernels._CPP_SOURCES:
        relative = path.relative_to(ROOT).as_posix()
        for where in (relative, f"gmt_align/csrc/{path.name}"):  # the second: before the layered package
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{where}"], capture_output=True)
            if shown.returncode == 0:
                break
        else:
            raise SystemExit(f"kernel_ab: {relative} at {rev!r}: {shown.stderr.decode().strip().splitlines()[-1]}")
        sources.append(shown.stdout)
    name = kernels._cpp_name(sources)
    if name == kernels._cpp_name():
        return kernels.cpp_kernels(), name
    from torch.utils.cpp_extension import load

    from gmt_align.core.build_lock import extension_folder

    build = extension_folder(name)
    folder = Path(build).with_name(name + "-sources")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for path, text in zip(kernels._CPP_SOURCES, sources):
        files.append(folder / path.name)
        if not files[-1].exists() or files[-1].read_bytes() != text:
            files[-1].write_bytes(text)
    if not (Path(build) / f"{name}.so").exists():
        print(f"# building the C++ kernels of {rev} once into {build}", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(f) for f in files], extra_cflags=kernels._cpp_cflags()), name


def gradients(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [heavy_tailed(shape, gen).reshape(-1) for shape in shapes]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose C++ kernels to compare against")
    parser.add_argument("--shapes", choices=["smollm2", "flat"], default="smollm2")
    parser.add_argument("--size", type=int, default=33_750_000, help="entries of the flat tensor")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--ratio", type=float, default=0.2, help="masked share: the probes sit around its quantile")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size < 1 or not 0 < args.ratio < 1:
        parser.error("--rounds and --size must be positive, --ratio in (0, 1)")
    new = kernels.cpp_kernels()
    if new is None:
        raise SystemExit("kernel_ab: this checkout's C++ kernels could not be built")
    base, base_name = base_module(args.base)

    pieces = gradients([shape for _, shape in smollm2_shapes()] if args.shapes == "smollm2" else [(args.size,)])
    pristine = [p.clone() for p in pieces]
    sample = torch.cat([p[:: max(1, p.numel() // 2048)] for p in pieces]).abs()
    middle = 1 - args.ratio
    quantiles = torch.linspace(max(0.0, middle - 0.02), min(1.0, middle + 0.02), 15)
    probes = torch.quantile(sample, quantiles).float().view(torch.int32).sort().values
    probes = probes.reshape(1, -1).repeat(len(pieces), 1).contiguous()
    lo = torch.full((len(pieces),), int(probes[0, 6]), dtype=torch.int64)
    hi = torch.full((len(pieces),), int(probes[0, 8]), dtype=torch.int64)
    none = torch.zeros(0, dtype=torch.int64)

    def restore():
        for p, g in zip(pieces, pristine):
            p.copy_(g)

    # the same results first: a faster build that counts or masks otherwise is no faster build
    if not torch.equal(base.count_many(pieces, none, none, probes), new.count_many(pieces, none, none, probes)):
        raise SystemExit("kernel_ab: the two builds count differently")
    found = base.mask_many(pieces, none, none, lo, hi)
    masked = [p.clone() for p in pieces]
    restore()
    if not (all(torch.equal(a, b) for a, b in zip(found, new.mask_many(pieces, none, none, lo, hi)))
            and all(torch.equal(a, b) for a, b in zip(masked, pieces))):
        raise SystemExit("kernel_ab: the two builds mask differently")
    restore()

    one = torch.get_num_threads() == 1
    clock = time.thread_time if one else time.perf_counter
    times = {(phase, build): [] for phase in ("count", "mask") for build in ("base", "new")}
    for r in range(args.rounds):
        order = [("base", base), ("new", new)]
        for build, module in order if r % 2 == 0 else order[::-1]:
            start = clock()
            module.count_many(pieces, none, none, probes)
            times[("count", build)].append(clock() - start)
            start = clock()
            module.mask_many(pieces, none, none, lo, hi)
            times[("mask", build)].append(clock() - start)
            restore()

    entries = sum(p.numel() for p in pieces)
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; "
          f"{entries / 1e6:.1f}M entries in {len(pieces)} tensors; base {args.base} ({base_name}), "
          f"new {kernels._cpp_name()}; {args.rounds} rounds; {'thread CPU' if one else 'wall'} time, ms")
    for (phase, build), values in times.items():
        print(f"{phase:6s} {build:5s} {1e3 * statistics.median(values):8.2f} "
              f"[{1e3 * min(values):.2f}-{1e3 * max(values):.2f}]")
    ratio = {phase: statistics.median(times[(phase, "new")]) / statistics.median(times[(phase, "base")])
             for phase in ("count", "mask")}
    print(f"count_new_vs_base={ratio['count']:.3f} mask_new_vs_base={ratio['mask']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
