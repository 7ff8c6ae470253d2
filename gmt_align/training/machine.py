"""What this machine has that the training configs need to know: packages, a GPU, bf16.

Lower than the command line (the configs check bf16 in ``__post_init__``; :mod:`gmt_align.cli.environment`
builds ``gmt-align env`` and the recipe's machine problems on these).
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["BF16_FIX", "accelerator_available", "bf16_problem", "cpu_threads", "cuda_available", "fp16_problem",
           "installed"]

BF16_FIX = "set --bf16 false (bf16: false in the recipe) to train in fp32 here"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, without importing it; None in sys.modules: blocked)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_problem(bf16, fp16, use_cpu) -> str | None:
    """transformers' own rule (TrainingArguments refuses bf16 without a bf16 device unless use_cpu),
    in gmt-align's words. ``bf16`` None is TRL's default: true unless fp16."""
    if not (not fp16 if bf16 is None else bf16) or use_cpu:
        return None
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if is_torch_bf16_gpu_available() or is_torch_xla_available():
        return None
    default = " (TRL's default when the recipe does not set it)" if bf16 is None else ""
    return f"bf16 is true{default}, but this machine has no GPU with bf16: {BF16_FIX}"


def accelerator_available() -> bool:
    """A device other than the CPU that torch can train on (CUDA, ROCm, XPU, MPS, ...), or XLA."""
    import torch
    from transformers.utils import is_torch_xla_available

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available() if accelerator is not None else torch.cuda.is_available()) \
        or is_torch_xla_available()


def fp16_problem(fp16, use_cpu) -> str | None:
    """fp16 mixed precision on the CPU: accelerate turns autocast and the loss scaler on only for other
    devices, so the run would train in fp32, silently. Refused like bf16 without a bf16 GPU."""
    if not fp16:
        return None
    if use_cpu:
        return "fp16 is true, but use_cpu is true and fp16 mixed precision does not run on the CPU (the run would " \
               "silently train in fp32): set --fp16 false (fp16: false in the recipe)"
    if accelerator_available():
        return None
    return "fp16 is true, but this machine has no GPU, and fp16 mixed precision does not run on the CPU (the run " \
           "would silently train in fp32): set --fp16 false (fp16: false in the recipe)"


def cpu_threads(environ=None) -> tuple[int, str]:
    """The torch thread count for training on the CPU, and why (for the line the run starts with).

    ``OMP_NUM_THREADS`` when set (launchers set it: accelerate and torchrun to 1 per process). Otherwise
    the cores this process may run on, shared among the node's processes (``LOCAL_WORLD_SIZE``), less
    those the machine is already busy with (its 1-minute load average), and at least 1: torch's default
    (every core) on a busy machine makes each thread wait for the others (benchmarks/cpu_threads.py;
    figures in docs/performance.md).
    """
    import os

    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(cores // processes, int((cores - load) // processes)))
    shared = f", {processes} processes" if processes > 1 else ""
    return threads, f"{cores} cores, load average {load:.1f}{shared}"
