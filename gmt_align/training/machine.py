"""What this machine has that the training configs need to know: packages, a GPU, bf16.

Lower than the command line (the configs check bf16 in ``__post_init__``; :mod:`gmt_align.cli.environment`
builds ``gmt-align env`` and the recipe's machine problems on these).
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["BF16_FIX", "accelerator_available", "bf16_problem", "cuda_available", "fp16_problem", "installed"]

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
