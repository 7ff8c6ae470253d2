"""Every contract in one list, checked at start-up (see :mod:`gmt_align.core.contract`).

``gmt-align sft|dpo`` refuse to start, in one line, when an installed torch, DeepSpeed or
transformers lacks a name that some module of gmt_align reads; ``gmt-align env`` lists them.
"""

from __future__ import annotations

import importlib

from gmt_align.core.contract import Contract

__all__ = ["READERS", "contracts", "missing_internals"]

# The modules that read another library's internals, each with its CONTRACT.
READERS = (
    "gmt_align.core.build_lock",
    "gmt_align.backends.hooks",
    "gmt_align.backends.zero12",
    "gmt_align.backends.zero3",
    "gmt_align.backends.bf16",
    "gmt_align.backends.fsdp2",
    "gmt_align.training.telemetry",
    "gmt_align.cli.deepspeed_checks",
    "gmt_align.cli.train",
)


def contracts() -> dict[str, Contract]:
    """Reader module -> its contract."""
    return {name: importlib.import_module(name).CONTRACT for name in READERS}


def missing_internals() -> list[str]:
    """One line per module whose contract names something this installation lacks."""
    return [f"{reader} reads {', '.join(absent)} (as in {contract.checked_with}), which this installation lacks"
            for reader, contract in contracts().items() if (absent := contract.missing_names())]
