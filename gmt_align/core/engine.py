"""The masking engine: one implementation of GMT, fed by whichever optimizer backend is in use.

A backend (:mod:`gmt_align.backends`) describes what this process really holds as
:class:`Fragment` s — 1-D views of a gradient and of the weights the optimizer will update, each
tagged with the parameter tensor it belongs to and its offset inside that tensor (the words are
defined in :mod:`gmt_align.backends.layout`). On one process (or DDP) a fragment is a whole
parameter; under ZeRO it is the slice of a parameter inside this rank's flat fp32 partition.
The engine then, with the selection rule chosen once from ``gmt_selection``
(:mod:`gmt_align.core.rules`):

1. :meth:`MaskEngine.apply` — finds each unit's threshold and zeroes the masked gradient entries
   in place (``magnitude``: :func:`gmt_align.core.selection.select_and_mask`, about two reads and one
   write of the gradient; ``random``: the same passes over random scores), collectively through
   ``reduce``, so every rank gets the single-process answer; in ``update`` mode it keeps the masked
   entries' weights aside (fp32 CPU weights in the masking pass itself:
   :class:`gmt_align.core.masked_weights.Aside`);
2. :meth:`MaskEngine.restore` — after the optimizer step (``update`` mode), writes the masked
   weights back bit for bit.

Selection rule (identical on every rank):
    k = n - floor(ratio * n) entries of a unit of n entries are to be kept. T is the k-th largest
    score. ``magnitude``: score = |g|, and T is raised to the smallest positive float, so an entry
    whose gradient is exactly zero is never kept (it carries no signal). Kept = score >= T: ties
    at T are all kept, so at least k entries are kept, unless fewer than k are non-zero.
    ``random``: score = uniform [0, 1) drawn from (seed, step, tensor, position); same rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .masked_weights import Aside, MaskedWeights, Packed, entries, marks_needed, restore_aside
from .radix import NonFiniteGradientError, Reduce
from .rules import rule_for
from .selection import keep_count

__all__ = ["Fragment", "MaskEngine", "MaskOptions", "TensorInfo", "excluded"]


@dataclass(frozen=True)
class MaskOptions:
    """The ``gmt_*`` options, resolved (see :class:`gmt_align.training.config.GMTArguments`)."""

    mask_ratio: float
    granularity: str = "tensor"
    mode: str = "gradient"
    selection: str = "magnitude"
    exclude: tuple[str, ...] = ()
    seed: int = 0
    nonfinite: str = "raise"


@dataclass(frozen=True)
class TensorInfo:
    """A parameter tensor as every rank sees it: stable id (its index here), names, full size."""

    names: tuple[str, ...]
    numel: int


@dataclass
class Fragment:
    """Views of the gradient and weights of one contiguous slice of a parameter tensor that this
    process holds: entries ``[offset, offset + grad.numel())`` of tensor ``tensor_id``."""

    tensor_id: int
    offset: int
    grad: torch.Tensor
    weight: torch.Tensor
    # update mode: the masked entries' weights before the step, from MaskEngine.apply until restore.
    _saved: Packed | None = field(default=None, repr=False)


def excluded(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """True if any name of the tensor matches (``re.search``) any exclude pattern."""
    return any(re.search(pattern, name) for pattern in patterns for name in names)


class MaskEngine:
    """GMT on the fragments a backend hands it. Holds no reference to DeepSpeed or to ranks."""

    def __init__(self, options: MaskOptions, tensors: Sequence[TensorInfo], reduce: Reduce | None = None):
        self.options = options
        self.rule = rule_for(options.selection, options.seed)  # magnitude or random, chosen once
        # Called in every apply() with (the fragments, step): ``before_mask`` before selection,
        # ``observers`` once their gradients are masked. MaskTelemetry hooks in here.
        self.before_mask: list = []
        self.observers: list = []
        self.masked_weights = MaskedWeights()  # update mode: the masked weights, packed, across the step
        self._packed_pending = 0  # fragments packed and not yet restored
        self.tensors = list(tensors)
        self.reduce = reduce
        self.maskable = [not excluded(t.names, options.exclude) for t in self.tensors]
        if options.granularity == "global":
            self.unit_of = [0 if m else -1 for m in self.maskable]
            self.unit_names = ["global"]
            total = sum(t.numel for t, m in zip(self.tensors, self.maskable) if m)
            self.keep = [keep_count(total, options.mask_ratio)]
            self.sizes = [total]
        else:
            ids = [i for i, m in enumerate(self.maskable) if m]
            self.unit_of = [-1] * len(self.tensors)
            for unit, i in enumerate(ids):
                self.unit_of[i] = unit
            self.unit_names = [self.tensors[i].names[0] for i in ids]
            self.keep = [keep_count(self.tensors[i].numel, options.mask_ratio) for i in ids]
            self.sizes = [self.tensors[i].numel for i in ids]
        self.thresholds = torch.full((len(self.keep),), -1, dtype=torch.int64)
        self.step = -1
        self.kept_counts = torch.zeros(len(self.tensors), dtype=torch.int64)  # since telemetry last took them
        self.last_kept = torch.zeros(len(self.tensors), dtype=torch.int64)  # at ``self.step`` (this process's)
        self.steps_since_log = 0

    # --- non-finite gradients --------------------------------------------------------------------
    def nonfinite_outside_selection(self, fragments: Sequence[Fragment]) -> None:
        """Raise :class:`NonFiniteGradientError` (on every process together) if a gradient that the
        selection does not read holds inf/NaN: an excluded tensor's, or any under ``random``
        selection (its scores are not the gradient). Magnitude selection finds the others itself.

        Collective when the engine has a ``reduce`` and such tensors exist: every process calls it
        at each step call, with whatever fragments it holds.
        """
        checked_by_rule = self.rule.reads_gradient
        unchecked = [i for i, maskable in enumerate(self.maskable) if not (maskable and checked_by_rule)]
        if not unchecked:
            return
        flags = torch.zeros(len(self.tensors), dtype=torch.int64)
        for fragment in fragments:
            if not (self.maskable[fragment.tensor_id] and checked_by_rule) \
                    and fragment.grad.numel() and not bool(torch.isfinite(fragment.grad).all()):
                flags[fragment.tensor_id] = 1
        if self.reduce is not None:
            flags = self.reduce(flags)
        bad = torch.nonzero(flags).flatten().tolist()
        if bad:
            label = ", ".join(self.tensors[i].names[0] for i in bad[:5])
            label += f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise NonFiniteGradientError(f"gradient has inf/NaN entries in {label}; GMT refuses to step")

    # --- selection and masking -----------------------------------------------------------------
    def units_of(self, tensor_ids: Sequence[int]) -> list[int]:
        """The selection units that the given tensors belong to (excluded tensors have none)."""
        return sorted({self.unit_of[t] for t in tensor_ids if self.unit_of[t] >= 0})

    def apply(self, fragments: Sequence[Fragment], step: int, units: Sequence[int] | None = None) -> torch.Tensor:
        """Select each unit's threshold over ``fragments`` and mask their gradients in place.

        In ``update`` mode the masked entries' weights are kept aside for :meth:`restore`. Every
        process must pass the same ``units`` (default: all), even one that holds no fragment of
        them: the counts reduced across processes have one row per unit. Returns the thresholds.
        """
        units = list(range(len(self.keep))) if units is None else list(units)
        if step != self.step:
            self.step = step
            self.steps_since_log += 1
            self.last_kept.zero_()
            self._packed_pending = 0  # packs of an earlier step that were never restored are dropped
        row_of = {unit: row for row, unit in enumerate(units)}
        by_row: list[list[Fragment]] = [[] for _ in units]
        for fragment in fragments:
            row = row_of.get(self.unit_of[fragment.tensor_id])
            if row is not None:
                by_row[row].append(fragment)
        names = [self.unit_names[u] for u in units]
        keep = [self.keep[u] for u in units]
        masking = [f for group in by_row for f in group]
        for observer in self.before_mask:
            observer(masking, self.step)
        aside = None
        if self.options.mode == "update":  # fp32 CPU weights are kept by the masking pass itself
            if self._packed_pending == 0:
                self.masked_weights.release()
            aside = Aside([f.weight if f.weight.numel() == f.grad.numel() else None for f in masking],
                          self.masked_weights)
        thresholds, kept = self.rule.select_and_mask(by_row, keep, [self.sizes[u] for u in units], self.reduce,
                                                     names, self.step, aside)
        ids = [fragment.tensor_id for group in by_row for fragment in group]
        if ids:  # one add for all fragments (a model has hundreds)
            ids, counts = torch.tensor(ids), torch.tensor([c for row in kept for c in row])
            self.kept_counts.index_add_(0, ids, counts)
            self.last_kept.index_add_(0, ids, counts)
        self.thresholds[units] = thresholds
        if aside is not None:
            for fragment, packed in zip(masking, aside.packs):
                if packed is not None:
                    fragment._saved = packed
                    self._packed_pending += 1
            self._pack_masked([f for f, packed in zip(masking, aside.packs) if packed is None])
        for observer in self.observers:
            observer(masking, self.step)
        return thresholds

    def threshold_of(self, fragment: Fragment) -> int:
        """The threshold (bit pattern) of the unit of ``fragment`` at the last :meth:`apply`."""
        return int(self.thresholds[self.unit_of[fragment.tensor_id]])

    def kept_mask(self, fragment: Fragment) -> torch.Tensor:
        """Bool mask of the entries of a fragment kept by the last :meth:`apply` (until the optimizer
        step ends), as the selection rule finds it again (from the masked gradient, or the scores)."""
        return self.rule.kept_mask(fragment, self.threshold_of(fragment), self.step)

    # --- update mode: pack before the step, restore after it ----------------------------------------
    def _pack_masked(self, fragments: Sequence[Fragment]) -> None:
        """Pack the weights of the masked entries of ``fragments`` (masked by this apply) aside: those
        the masking pass did not keep itself (not fp32 on the CPU, C++ kernels off)."""
        fragments = [fragment for fragment in fragments if fragment.weight.numel()]
        if not fragments:
            return
        store = self.masked_weights  # room for all fragments at once: one buffer each, not one per fragment
        if self.rule.gradient_is_kept_mask:  # the magnitude rule: fp32 CPU fragments take marks
            marks = sum(marks_needed(f.weight, f.grad) + 1 for f in fragments)
            if marks > len(fragments):
                store.reserve(marks, torch.device("cpu"), torch.int16)
        counted = [(f, self.threshold_of(f)) for f in fragments]
        counted = [(f, threshold, self.rule.count_masked(f, threshold, self.step, store)) for f, threshold in counted]
        totals: dict[tuple, int] = {}
        for fragment, _, packed in counted:
            key = (fragment.weight.device, fragment.weight.dtype)
            totals[key] = totals.get(key, 0) + entries(packed) + 1
        for (device, dtype), total in totals.items():
            store.reserve(total, device, dtype)
        for fragment, threshold, packed in counted:
            weight = fragment.weight
            packed.values = self.masked_weights.take(entries(packed), weight.device, weight.dtype)
            self.rule.pack(fragment, threshold, self.step, packed)
            fragment._saved = packed
            self._packed_pending += 1

    def restore(self, fragments: Sequence[Fragment]) -> None:
        """After the optimizer step: write back the masked weights kept aside by :meth:`apply`, bit
        for bit. The masked entries are known from the bits the masking pass wrote (fp32 CPU
        weights, all fragments in one call), or found again from the gradient, which the optimizer
        reads but does not change (magnitude: |g| < T; random: the same position-keyed scores)."""
        kept_aside = [(f.weight, f._saved) for f in fragments if f._saved is not None and f._saved.starts is not None]
        restore_aside(kept_aside)  # all of them in one call
        for fragment in fragments:
            if fragment._saved is not None:
                if fragment._saved.starts is None:
                    self.rule.restore(fragment, fragment._saved, self.threshold_of(fragment), self.step)
                fragment._saved = None
                self._packed_pending -= 1

    # --- counts for the figures (MaskTelemetry owns the figures and reduces these) ----------------
    def take_counts(self) -> tuple[torch.Tensor, int]:
        """This process's kept entries per tensor and the optimizer steps since the last call; resets
        both. Not collective: :meth:`gmt_align.training.telemetry.MaskTelemetry.pop_figures` reduces them
        together with its own sums, in one all-reduce."""
        kept, steps = self.kept_counts.clone(), self.steps_since_log
        self.kept_counts.zero_()
        self.steps_since_log = 0
        return kept, steps
