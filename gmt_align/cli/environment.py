"""What this machine can run, and ``gmt-align env``.

:func:`machine_problems` lists, one line each, what a recipe asks of the machine that it lacks:
a package (``peft`` for ``use_peft``; ``bitsandbytes`` for ``load_in_4bit``/``load_in_8bit``;
``liger-kernel`` for ``use_liger_kernel``; ``vllm`` for GRPO's ``use_vllm``; ``math-verify`` for TRL's
accuracy rewards) or a GPU (QLoRA, Liger's Triton kernels and vLLM need one; so does ``bf16``, TRL's
default, unless ``use_cpu``; ``fp16`` needs one even then), and a stale lock left in torch's extension
folder by a killed build, on which the run would otherwise hang (:mod:`gmt_align.core.build_lock`), and an
installed torch, DeepSpeed or transformers without an internal that gmt_align reads
(:mod:`gmt_align.cli.contracts`), and ``push_to_hub`` where the Hub cannot be reached or no token is
set (:func:`gmt_align.cli.option_checks.hub_problems`). ``gmt-align sft|dpo`` refuses such a recipe before loading
anything; ``gmt-align validate`` notes them (recipes are often checked on a login node for GPU
nodes; ``--here`` makes them problems). :func:`model_option_problems` are the
combinations that fail on any machine.

``gmt-align env`` prints the versions to quote in a bug report, the GPU, and which GMT kernels
(:mod:`gmt_align.core.kernels`) will run.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from gmt_align.core.build_lock import stale_lock_problems
from gmt_align.training.machine import bf16_problem, cuda_available, fp16_problem, installed

from .contracts import missing_internals
from .common import option_value
from .option_checks import hub_problems, package_problems

__all__ = ["kernel_plan", "machine_problems", "main", "model_option_problems"]

def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_problems(training_args, model_args, script_args=None) -> list[str]:
    """What the recipe needs that this machine lacks, one line each (see the module docstring)."""
    from .rewards import missing_packages

    problems = missing_packages(script_args) if script_args is not None else []
    if option_value(model_args, "use_peft") and not installed("peft"):
        problems.append("use_peft needs the peft package, which is not installed: pip install peft "
                        "(or pip install 'gmt-align[peft]')")
    for key in ("load_in_4bit", "load_in_8bit"):
        if option_value(model_args, key):
            lacks = [what for what, ok in (("the bitsandbytes package", installed("bitsandbytes")),
                                           ("a CUDA GPU", cuda_available())) if not ok]
            if lacks:
                problems.append(f"{key} (QLoRA) needs bitsandbytes and a CUDA GPU, and this machine lacks "
                                f"{' and '.join(lacks)}: drop {key} (plain LoRA: use_peft alone)")
    if option_value(training_args, "use_liger_kernel"):
        from transformers.utils import is_liger_kernel_available

        lacks = [what for what, ok in (("the liger-kernel package (>= 0.3.0)", is_liger_kernel_available()),
                                       ("a CUDA GPU for its Triton kernels", cuda_available())) if not ok]
        if lacks:
            problems.append(f"use_liger_kernel needs liger-kernel and a GPU, and this machine lacks "
                            f"{' and '.join(lacks)}: drop use_liger_kernel")
    if option_value(training_args, "use_vllm"):  # GRPO's generation
        lacks = [what for what, ok in (("the vllm package", installed("vllm")), ("a CUDA GPU", cuda_available()))
                 if not ok]
        if lacks:
            problems.append(f"use_vllm needs vLLM and a CUDA GPU, and this machine lacks {' and '.join(lacks)}: drop "
                            "use_vllm (generation then runs with transformers)")
    bf16 = bf16_problem(option_value(training_args, "bf16"), option_value(training_args, "fp16"),
                        option_value(training_args, "use_cpu"))
    if bf16:
        problems.append(bf16)
    fp16 = fp16_problem(option_value(training_args, "fp16"), option_value(training_args, "use_cpu"))
    if fp16:
        problems.append(fp16)
    problems += hub_problems(training_args) + package_problems(training_args, model_args)
    return problems + stale_lock_problems() + missing_internals()


def model_option_problems(model_args) -> list[str]:
    """Model options that fail on any machine (TRL would take 4-bit silently over 8-bit, and
    transformers refuses to train a quantized model without adapters)."""
    problems = []
    four, eight = option_value(model_args, "load_in_4bit"), option_value(model_args, "load_in_8bit")
    if four and eight:
        problems.append("load_in_4bit and load_in_8bit are both true: choose one")
    if (four or eight) and not option_value(model_args, "use_peft"):
        problems.append(f"{'load_in_4bit' if four else 'load_in_8bit'} trains LoRA adapters on a quantized model "
                        "(QLoRA): set use_peft true")
    return problems


def kernel_plan() -> list[tuple[str, str]]:
    """Which implementation of GMT's passes runs for which gradients (see :mod:`gmt_align.core.kernels`)."""
    from gmt_align.core import kernels

    if not kernels.compiled():
        return [("all gradients", "eager torch ops (GMT_ALIGN_COMPILE=0)")]
    plan = []
    if os.environ.get("GMT_ALIGN_CPP", "1") in ("0", "false", "False", ""):
        plan.append(("fp32 on the CPU", "torch.compile (GMT_ALIGN_CPP=0)"))
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        plan.append(("fp32 on the CPU", "torch.compile (no C++ compiler found for the C++ kernels)"))
    else:
        built = kernels.cpp_build_directory()
        state = f"built in {built}" if kernels.cpp_built() else f"built on first use into {built} (~30 s)"
        plan.append(("fp32 on the CPU", f"C++ ({kernels.cpp_capability()}, {state})"))
    plan.append(("bf16 and fp16 on the CPU", "torch.compile (Inductor)"))
    if cuda_available():
        plan.append(("on the GPU", "torch.compile (Triton)" if installed("triton") else
                     "eager torch ops (no Triton for torch.compile)"))
    return plan


def report() -> list[str]:
    import torch

    from gmt_align import __version__

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = f"{len(names)} x {names[0]} (CUDA {torch.version.cuda}, bf16: {torch.cuda.is_bf16_supported()})"
    else:
        why = "CUDA_VISIBLE_DEVICES is empty" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else (
            "CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible")
        gpu = f"none ({why}): training runs on the CPU, where TRL's default bf16 is refused: --bf16 false"
    lines = [f"gmt-align {__version__}",
             f"- Platform: {platform.platform()}", f"- Python: {platform.python_version()}",
             f"- GPU: {gpu}"]
    for package in ("torch", "transformers", "trl", "accelerate", "deepspeed", "datasets", "peft",
                    "bitsandbytes", "liger-kernel", "wandb"):
        lines.append(f"- {package}: {_package_version(package)}")
    lines.append("- GMT kernels:")
    lines += [f"  - {gradients}: {implementation}" for gradients, implementation in kernel_plan()]
    return lines


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: gmt-align env\n\nVersions, GPU and GMT kernels of this machine, to quote in a bug report.")
        return 0
    if argv:
        print(f"gmt-align env: error: unexpected argument {argv[0]!r}", file=sys.stderr)
        return 2
    print("\n".join(report()))
    return 0
