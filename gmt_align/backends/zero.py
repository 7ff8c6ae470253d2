"""What GMT refuses in DeepSpeed's settings, said once for both moments it can be seen.

- Before any model loads, from the DeepSpeed JSON: :func:`refusals_in_config` (``gmt-align
  sft|dpo`` and ``gmt-align validate`` call it through ``gmt_align.cli.deepspeed_checks.deepspeed_refusals``).
- At attach time, from the optimizer DeepSpeed built: each backend (``zero12.py``, ``zero3.py``,
  ``bf16.py``) reads the attributes that carry these settings on its class — listed in its
  ``CONTRACT`` — and hands them to :func:`refuse`.

This module reads no DeepSpeed internals itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from .layout import UnsupportedOptimizerError

__all__ = ["REFUSALS", "refusals_in_config", "refuse"]

REFUSALS = {
    # setting -> the one line said when it is on
    "round_robin_gradients": "GMT cannot map ZeRO partitions with round_robin_gradients=true; set it false",
    "zenflow": "GMT does not support ZenFlow (zero_optimization.zenflow); remove it",
    "nvme": "GMT does not support optimizer offload to NVMe; use offload_optimizer.device=cpu",
    "muon": "GMT does not support DeepSpeed's Muon optimizer",
}


def settings_in_config(config: Mapping) -> dict[str, bool]:
    """Which refused settings a DeepSpeed JSON config (as a dict) turns on."""
    zero = config.get("zero_optimization") or {}
    return {
        "round_robin_gradients": bool(zero.get("round_robin_gradients")),
        "zenflow": bool(zero.get("zenflow")),
        "nvme": (zero.get("offload_optimizer") or {}).get("device") == "nvme",
        "muon": str((config.get("optimizer") or {}).get("type", "")).lower() == "muon",
    }


def refusals_in_config(config: Mapping) -> list[str]:
    """One line per setting of the DeepSpeed JSON config that GMT refuses (none: an empty list)."""
    return [REFUSALS[key] for key, on in settings_in_config(config).items() if on]


def refuse(found: Mapping[str, object]) -> None:
    """Raise :class:`UnsupportedOptimizerError` with the line of the first refused setting that is on
    (``found``: setting -> value read from the optimizer, for the settings its class can have)."""
    for key, on in found.items():
        if on:
            raise UnsupportedOptimizerError(REFUSALS[key])
