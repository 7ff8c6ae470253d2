"""The ``gmt/...`` figures: which tensors each group holds, and the figures from per-tensor sums.

Every figure is a ratio of sums over parameter tensors. :class:`~gmt_align.training.telemetry.MaskTelemetry`
keeps, per tensor, the rows of :data:`SUMS` on each process, reduces them across processes in
one all-reduce and hands them to :func:`figures`; the definitions (with formulas) are in
docs/telemetry.md. Groups: the transformer blocks (``block_NN``) and the module kinds
(``q_proj`` ... ``embed``, ``norm``, ``lm_head``, ``other``). Keys:

* headline, shown on the console too: ``gmt/kept_fraction``, ``gmt/retained_energy``,
  ``gmt/churn``, ``gmt/coverage`` (:data:`HEADLINE`);
* whole-model, not on the console: ``gmt/masked_fraction_target``, ``gmt/threshold_{min,median,max}``;
* per group, ``gmt/FIGURE/GROUP`` (:func:`is_group_key`): for the report_to backends and
  ``gmt_stats.jsonl``, never the console.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["HEADLINE", "SUMS", "TensorGroups", "block_of", "figures", "is_group_key", "kind_of", "split_group_key"]

HEADLINE = ("gmt/kept_fraction", "gmt/retained_energy", "gmt/churn", "gmt/coverage")
# Per-tensor sums since the last log (``covered``: since training began), one row each.
SUMS = ("kept", "changed", "compared", "covered", "energy_kept", "energy")
FIGURES_BY_GROUP = ("kept_fraction", "retained_energy", "churn", "coverage", "threshold")

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_KINDS = (
    ("q_proj", r"q_proj"), ("k_proj", r"k_proj"), ("v_proj", r"v_proj"), ("o_proj", r"o_proj"),
    ("gate_proj", r"gate_proj"), ("up_proj", r"up_proj"), ("down_proj", r"down_proj"),
    ("lm_head", r"lm_head"), ("embed", r"embed|wte|wpe"), ("norm", r"norm|ln_"),
)


def block_of(name: str) -> int | None:
    """The transformer block a parameter belongs to (``...layers.N....``), or None."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def kind_of(name: str) -> str:
    """q/k/v/o_proj, gate/up/down_proj, embed, norm, lm_head, or other (first matching pattern)."""
    return next((kind for kind, pattern in _KINDS if re.search(pattern, name)), "other")


def is_group_key(key: str) -> bool:
    """``gmt/FIGURE/GROUP``: a per-block or per-kind figure."""
    return key.startswith("gmt/") and key.count("/") == 2


def split_group_key(key: str) -> tuple[str, str]:
    """``gmt/churn/block_03`` -> ("churn", "block_03")."""
    _, figure, group = key.split("/")
    return figure, group


class TensorGroups:
    """The blocks and module kinds of a model's tensors (first name of each; a tied embedding
    counts once, as ``embed``). Only maskable tensors count; a group without one has no key."""

    def __init__(self, names: Sequence[str], maskable: Sequence[bool]):
        import torch  # here, not at the top: gmt-align report reads the keys without torch

        blocks = [block_of(name) for name in names]
        width = max(2, len(str(max((b for b in blocks if b is not None), default=0))))
        self.maskable = torch.tensor(list(maskable), dtype=torch.bool)
        self.members: dict[str, torch.Tensor] = {}  # group -> bool per tensor
        numbered = sorted({b for b in blocks if b is not None})
        candidates = [*((f"block_{b:0{width}d}", [b == x for x in blocks]) for b in numbered),
                      *((kind, [kind == kind_of(n) for n in names]) for kind, _ in (*_KINDS, ("other", "")))]
        for key, ids in candidates:
            members = torch.tensor(ids, dtype=torch.bool) & self.maskable
            if members.any():
                self.members[key] = members
        self.blocks = [key for key in self.members if key.startswith("block_")]


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    den = float(denominator)
    return float(numerator) / den if den > 0 else None


def figures(
    sums: torch.Tensor, numel: torch.Tensor, steps: int, thresholds: Sequence[float | None],
    groups: TensorGroups, granularity: str, mask_ratio: float, per_entry: bool,
) -> dict[str, float]:
    """The figures of one logging step from the reduced per-tensor ``sums`` (float64, rows
    :data:`SUMS`), the tensors' sizes and ``steps`` (optimizer steps since the last log).

    ``thresholds``: per tensor, the last step's threshold of its unit (None: excluded, or never
    selected). Figures whose denominator is 0 (no step compared yet, no gradient energy) are absent.
    A group's threshold is the median of its tensors' (the mean of the two middle ones for an even
    count).
    """
    import torch
    rows = dict(zip(SUMS, sums.to(torch.float64)))
    numel = numel.to(torch.float64)
    out: dict[str, float] = {}

    def put(key: str, value: float | None) -> None:
        if value is not None:
            out[key] = value

    def over(members: torch.Tensor, suffix: str = "") -> None:
        if granularity == "global" or not suffix:  # per group it varies only under a global threshold
            put(f"gmt/kept_fraction{suffix}", _ratio(rows["kept"][members].sum(), numel[members].sum() * steps))
        if per_entry:
            put(f"gmt/retained_energy{suffix}", _ratio(rows["energy_kept"][members].sum(), rows["energy"][members].sum()))
            put(f"gmt/churn{suffix}", _ratio(rows["changed"][members].sum(), rows["compared"][members].sum()))
            put(f"gmt/coverage{suffix}", _ratio(rows["covered"][members].sum(), numel[members].sum()))

    if steps == 0:
        return out
    over(groups.maskable)
    out["gmt/masked_fraction_target"] = float(mask_ratio)
    known = torch.tensor([t for t in thresholds if t is not None], dtype=torch.float64)
    if known.numel():
        out["gmt/threshold_min"] = float(known.min())
        out["gmt/threshold_median"] = float(known.quantile(0.5))
        out["gmt/threshold_max"] = float(known.max())
    for key, members in groups.members.items():
        over(members, f"/{key}")
        if granularity == "tensor":  # one threshold per tensor: the group's median
            own = torch.tensor([t for t, m in zip(thresholds, members.tolist()) if m and t is not None],
                               dtype=torch.float64)
            if own.numel():
                out[f"gmt/threshold/{key}"] = float(own.quantile(0.5))
    return out
