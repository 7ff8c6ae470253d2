"""The full passes GMT makes over a gradient, as fused kernels or eager torch ops.

Each kernel reads |g| straight from the gradient (fp32, bf16 or fp16, widened exactly to float32)
and never materialises |g|, a bool mask or an index at full size: the passes cost what reading
(and, for the mask, writing) the gradient costs. The score of an entry is the int32 bit pattern
of ``|g|`` as float32, which orders exactly like the value.

- :func:`count_at_least` — how many entries are ``>= probe`` for a few probes (one read);
- :func:`mask_candidates` — zero the entries below ``lo`` in place and return the entries in
  ``[lo, hi)`` (positions and bit patterns): one read-modify-write;

Three implementations give the same results:

- **C++** (``gmt_align/csrc/gmt_cpu.cpp``; one module with ``csrc/masked_weights.cpp``, ``update``
  mode's kernels) for fp32 gradients on the CPU, where selection calls them once per pass for all
  its pieces (:mod:`gmt_align.core.batch_kernels`; the functions here are the one-piece case): one pass
  each, vectorised with the widest instructions torch reports (``torch.backends.cpu.get_cpu_capability()``), threaded
  with torch's own pool. It is compiled once with ``torch.utils.cpp_extension`` (about 25 s) into
  ``TORCH_EXTENSIONS_DIR``, under a name that holds the instruction set (``GMT_ALIGN_CPU_CAPABILITY``
  = ``AVX2`` or ``DEFAULT`` builds for less, e.g. for nodes of mixed CPUs). ``GMT_ALIGN_CPP=0`` skips it.
- **torch.compile** (Inductor; Triton on GPUs) for everything else, called piece by piece by
  :mod:`gmt_align.core.batch_kernels` (each call a few fused launches). Inductor's CPU code for the
  masking pass reads the gradient twice (once for the block marks, once to mask), which is why the
  CPU has its own kernels. The candidates are then gathered from the marked 64-entry blocks.
- **eager** torch ops, the fallback of both where a compiler is missing or fails, and what
  ``GMT_ALIGN_COMPILE=0`` selects (several times slower).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .build_lock import extension_folder, refuse_stale_lock

__all__ = ["BLOCK", "compiled", "count_at_least", "cpp_build_directory", "cpp_built", "cpp_capability", "cpp_kernels",
           "mask_and_flag", "mask_candidates"]

logger = logging.getLogger(__name__)

BLOCK = 64
"""Entries per block for :func:`mask_and_flag`'s marks (one byte per block); the C++ kernels check
their candidate flags per block of the same size (``BLOCK`` there too)."""

_MAX_PIECE = 1 << 30
"""Counts are accumulated in int32 (twice as many SIMD lanes): pieces are split below 2^31."""


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().view(torch.int32)


# --- eager definitions (also what torch.compile traces) ------------------------------------------
def _count(x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    bits = _bits(x)
    return torch.stack([(bits >= probes[j]).sum(dtype=torch.int32) for j in range(probes.shape[0])])


def _mask_flag(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    bits = _bits(blocks)
    blocks.copy_(torch.where(bits >= lo, blocks, 0.0))  # a scalar: zeros_like cost 40 % more here
    return ((bits >= lo) & (bits < hi)).any(1)


_EAGER = {"count": _count, "mask_flag": _mask_flag}
_COMPILED: dict[str, Callable] = {}
_FAILED: set[str] = set()


def compiled() -> bool:
    """Whether the fused kernels are used (``GMT_ALIGN_COMPILE``, default on)."""
    return os.environ.get("GMT_ALIGN_COMPILE", "1") not in ("0", "false", "False", "")


def _kernel(name: str) -> Callable:
    if not compiled() or name in _FAILED:
        return _EAGER[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_EAGER[name], dynamic=True)
    return _COMPILED[name]


def _run(name: str, *args):
    try:
        return _kernel(name)(*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, once, loudly
        if name in _FAILED or not compiled():
            raise
        _FAILED.add(name)
        logger.warning("gmt-align: torch.compile of the %s kernel failed (%s); using eager torch ops",
                       name, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return _EAGER[name](*args)


_CPP: list = []  # [module or None], once loaded or refused
_CPP_LOCK = threading.Lock()
_CPP_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("gmt_cpu.cpp", "masked_weights.cpp")]
"""One module: the selection's passes, and update mode's packing (:mod:`gmt_align.core.masked_weights`)."""
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "AVX2": ["-mavx2", "-mfma"],
}


def cpp_kernels():
    """The C++ CPU kernels (built on first use), or None where disabled or not buildable."""
    if not compiled() or os.environ.get("GMT_ALIGN_CPP", "1") in ("0", "false", "False", ""):
        return None
    if _CPP:  # loaded (or refused) already: no lock on the hot path
        return _CPP[0]
    with _CPP_LOCK:
        if not _CPP:
            _CPP.append(_load_cpp())
    return _CPP[0]


def cpp_capability() -> str:
    """The instruction set the C++ kernels are built for (GMT_ALIGN_CPU_CAPABILITY: AVX512, AVX2,
    DEFAULT builds for less than this CPU has)."""
    return os.environ.get("GMT_ALIGN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()


def _cpp_name(sources: list[bytes] | None = None) -> str:
    """The extension's name holds the instruction set and a digest of the source: builds of different
    sources (another gmt-align version, another checkout) never share one folder of a shared
    TORCH_EXTENSIONS_DIR, where a concurrent build of the other could be loaded. ``sources``: the
    texts of ``_CPP_SOURCES`` in that order, if not this checkout's (benchmarks/kernel_ab.py)."""
    import hashlib

    if sources is None:
        sources = [source.read_bytes() for source in _CPP_SOURCES]
    return f"gmt_align_cpu_{cpp_capability().lower()}_{hashlib.sha1(b''.join(sources)).hexdigest()[:10]}"


def _cpp_cflags() -> list[str]:
    return ["-O3", *_CAPABILITY_FLAGS.get(cpp_capability(), [])]


def cpp_build_directory() -> str:
    """Where torch's JIT builds (and finds) the C++ kernels: under TORCH_EXTENSIONS_DIR if set."""
    return str(extension_folder(_cpp_name()))


def cpp_built() -> bool:
    """Whether loading the C++ kernels will not compile them: torch's JIT runs ninja, which rebuilds
    when the module is missing, when build.ninja names another copy of the source (another checkout
    sharing TORCH_EXTENSIONS_DIR), or when the source is newer than the module."""
    build = Path(cpp_build_directory())
    module, ninja = build / f"{_cpp_name()}.so", build / "build.ninja"
    try:
        return (module.stat().st_mtime >= max(source.stat().st_mtime for source in _CPP_SOURCES)
                and f"compile {_CPP_SOURCES[0]}" in ninja.read_text())
    except OSError:
        return False


def _load_cpp():
    try:
        import sys

        from torch.utils.cpp_extension import load

        refuse_stale_lock(cpp_build_directory())  # torch would wait on a killed build's lock forever
        if not cpp_built() and os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node, not per rank
            print(f"gmt-align: building the C++ CPU kernels once (~30 s) into {cpp_build_directory()}",
                  file=sys.stderr, flush=True)
        return load(name=_cpp_name(), sources=[str(source) for source in _CPP_SOURCES],
                    extra_cflags=_cpp_cflags())
    except Exception as error:  # noqa: BLE001 - no compiler, no headers: the torch.compile kernels
        logger.warning("gmt-align: the C++ CPU kernels could not be built (%s); using torch.compile",
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None


def _cpp_for(x: torch.Tensor):
    """The C++ kernels if they handle ``x`` (fp32 on the CPU), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return cpp_kernels()


def count_at_least(x: torch.Tensor, probes: torch.Tensor, on_device: bool = False) -> torch.Tensor:
    """int64 ``[P]``: entries of ``x`` whose |x| bit pattern is ``>= probes[j]`` (int32 ``[P]``).
    With ``on_device``, left on x's device (no wait for the kernel: callers gather many first)."""
    cpp = _cpp_for(x)
    if cpp is not None and probes.numel() <= 16 and (
            (x.dim() == 1 and x.is_contiguous()) or (x.dim() == 2 and x.stride(1) == 1)):
        none = torch.zeros(0, dtype=torch.int64)
        return cpp.count_many([x], none, none, probes.to(torch.int32).reshape(1, -1).contiguous())[0]
    if x.dim() > 1:  # a view of runs (selection's subsample): small
        total = _run("count", x, probes).to(torch.int64)
    else:
        total = torch.zeros(probes.shape[0], dtype=torch.int64, device=x.device)
        for start in range(0, x.numel(), _MAX_PIECE):
            total += _run("count", x[start : start + _MAX_PIECE], probes).to(torch.int64)
    return total if on_device else total.cpu()


def mask_and_flag(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """On a contiguous 1-D ``x``: zero every entry with ``bits(|x|) < lo`` in place.

    Returns one mark per :data:`BLOCK` entries (the last block may be short): True where the block
    holds an entry in ``[lo, hi)``.
    """
    n = x.numel()
    body = n - n % BLOCK
    lo_t = torch.tensor(lo, dtype=torch.int32, device=x.device)
    hi_t = torch.tensor(hi, dtype=torch.int32, device=x.device)
    marks = [_run("mask_flag", x[:body].view(-1, BLOCK), lo_t, hi_t)] if body else []
    if body < n:  # the short last block, eagerly
        marks.append(_mask_flag(x[body:].view(1, -1), lo_t, hi_t))
    return torch.cat(marks) if len(marks) > 1 else marks[0] if marks else torch.zeros(0, dtype=torch.bool)


_GATHER_ROWS = 4096
"""Marked blocks gathered at a time (1 MiB of fp32): bounds the finishing step's memory."""


def mask_candidates(x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On a contiguous 1-D ``x``: zero every entry with ``bits(|x|) < lo`` in place, and return the
    positions and bit patterns (both int64, on the CPU, ascending positions) of its entries in
    ``[lo, hi)`` (none when ``lo == hi``)."""
    cpp = _cpp_for(x)
    if cpp is not None and x.is_contiguous():
        none = torch.zeros(0, dtype=torch.int64)
        positions, bits, _ = cpp.mask_many([x], none, none, torch.tensor([lo]), torch.tensor([hi]))
        return positions, bits
    marks = mask_and_flag(x, lo, hi)
    if lo >= hi:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    blocks = marks.nonzero().flatten()
    full = x.numel() // BLOCK
    view = x[: full * BLOCK].view(full, BLOCK)
    positions, values = [], []

    def take(rows_values: torch.Tensor, first_positions: torch.Tensor) -> None:
        bits = _bits(rows_values)
        row, col = ((bits >= lo) & (bits < hi)).nonzero(as_tuple=True)
        positions.append((first_positions[row] + col).cpu())
        values.append(bits[row, col].to(torch.int64).cpu())

    inner = blocks[blocks < full]
    for start in range(0, inner.numel(), _GATHER_ROWS):
        rows = inner[start : start + _GATHER_ROWS]
        take(view.index_select(0, rows), rows * BLOCK)
    if blocks.numel() and int(blocks[-1]) >= full:  # the short last block
        take(x[full * BLOCK :].view(1, -1), torch.tensor([full * BLOCK], device=x.device))
    if not positions:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(positions), torch.cat(values)


