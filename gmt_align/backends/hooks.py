"""The one mechanism every backend shares: GMT inside ``torch.optim.Optimizer.step`` hooks.

Whatever DeepSpeed builds, the tensor that is finally stepped is a torch optimizer's parameter:
the model's own parameters (one process, DDP, DeepSpeed stage 0), or flat fp32 partitions
(ZeRO-1/2, ZeRO-3, BF16_Optimizer). At that moment its ``.grad`` is exactly what the optimizer
will use: accumulated, reduced, unscaled and clipped (clipping therefore uses the unmasked norm).
The public step pre-hook masks it; the post-hook restores masked weights (``update`` mode) before
DeepSpeed copies the fp32 master weights back to the model's weights.

A backend only says, for each flat tensor, which fragments of which tensors it holds
(:class:`~gmt_align.backends.layout.OptimizerLayout`; the words are defined in ``layout.py``).
Everything else is here and in the engine.

What this module touches of DeepSpeed's inner optimizer is torch's public optimizer interface (step
hooks, ``param_groups``), listed in :data:`CONTRACT` and checked on every stepper at attach time: a
global threshold over flat tensors that DeepSpeed steps one group at a time (ZeRO-1/2 narrows
``param_groups`` to group i around each inner step; ZeRO-3 steps each sub-group) empties a group's
``params`` for that inner step, and steps it later with the others (``_hold`` / ``_replay_held``).
``gmt_nonfinite: skip`` holds them the same way, so that a step is skipped whole or not at all.

A step whose gradient is exactly zero in every tensor on every rank (a diverged run: the loss stuck
at ln(vocabulary size)) follows the ``gmt_nonfinite`` rule too (:class:`ZeroGradientError`). The
decision is collective and costs one all-reduce of one count per optimizer step: magnitude
selection's kept counts say it for the masked tensors for free (an entry is kept only if its
gradient is non-zero, and every unit keeps at least one entry when one is non-zero); excluded
tensors' gradients, and every gradient under ``random`` selection, are read once more to count
their non-zero entries.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gmt_align.core.contract import Contract
from gmt_align.core.engine import Fragment, MaskEngine, TensorInfo
from gmt_align.core.selection import NonFiniteGradientError, ZeroGradientError

from .layout import OptimizerLayout

__all__ = ["CONTRACT", "MaskHooks", "tensor_table"]

# On each stepper (a torch optimizer, DeepSpeed's inner one included): hooks, and the groups that
# _hold / _skip empty and put back around an inner step.
CONTRACT = Contract(checked_with="torch 2.13",
                    optimizer=("param_groups", "register_step_pre_hook", "register_step_post_hook"))


def tensor_table(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[TensorInfo]]:
    """Trainable parameters in ``named_parameters()`` order, each with every name it has.

    A tied parameter (``lm_head.weight`` sharing ``model.embed_tokens.weight``) appears once, under
    all its names. The order is the same on every rank, so the index is a tensor id all ranks agree
    on. Sizes are the parameters' own; a backend that partitions parameters (ZeRO-3, where a
    parameter is empty outside a gather) gives the full sizes in its layout's ``numels``.
    """
    names: dict[int, list[str]] = {}
    params: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        if id(param) not in names:
            names[id(param)] = []
            params.append(param)
        names[id(param)].append(name)
    return params, [TensorInfo(tuple(names[id(p)]), p.numel()) for p in params]


@dataclass
class _Held:
    """Flat tensors whose inner step was held back until the global threshold is known."""

    optimizer: torch.optim.Optimizer
    groups: list[tuple[dict, list]]  # the param groups (and their params) as DeepSpeed set them
    flats: list[torch.Tensor]
    grads: list[torch.Tensor]


class MaskHooks:
    """GMT attached to an optimizer: runs the engine inside the steps of the layout's steppers, for
    the tensors its flat tensors hold. What ``attach`` returns; ``detach`` removes the hooks.

    ``flats`` maps ``id(flat tensor)`` to its :class:`~gmt_align.backends.layout.FlatLayout`. A
    step call may cover one flat tensor (ZeRO steps one group or sub-group at a time) or all (a
    plain optimizer): the units selected in a call are those of the groups of the flat tensors it
    steps.

    A global threshold needs every flat tensor's gradient, but ZeRO builds, clips and steps them one
    at a time. With ``republish`` (how DeepSpeed copies a flat tensor's fp32 weights back to the
    model's weights), the hooks hold back the inner step of every flat tensor but the last (the step
    runs on an emptied param list: a no-op), keep their clipped gradients alive, and at the last one
    select over all of them, replay the held steps exactly as DeepSpeed set them up, and republish
    their weights before DeepSpeed all-gathers. Memory: the held fp32 gradients (this rank's share
    of the whole gradient) until the last flat tensor steps.
    """

    def __init__(self, layout: OptimizerLayout, engine: MaskEngine, current_step: Callable[[], int],
                 backend: str = ""):
        self.backend = backend  # the name of the backend module that made the layout, e.g. "zero3"
        self.flats = layout.flats
        # True after a step that the backend itself skipped for a non-finite gradient norm (ZeRO).
        self.backend_overflowed = layout.overflowed or (lambda: False)
        self.engine = engine
        self.current_step = current_step
        self.republish = layout.republish
        self._local = layout.local or (lambda tensor: tensor)
        with_units = {key for key, flat in self.flats.items() if engine.units_of(flat.tensors)}
        # Flat tensors stepped apart are held until the last: a global threshold needs them all, and
        # gmt_nonfinite: skip skips a step whole (an inf/NaN or all-zero gradient in any of them).
        hold_to_skip = engine.options.nonfinite == "skip" and layout.republish is not None
        self._global_split = (engine.options.granularity == "global" or hold_to_skip) and len(with_units) > 1
        self._with_units = with_units
        self._to_come: set[int] = set()
        self._held_step = -1
        self._held: list[_Held] = []
        self._held_now: list[tuple[dict, list]] = []
        self._replaying = False
        self._fragments: list[Fragment] = []
        self.skipped_steps: set[int] = set()  # steps skipped for inf/NaN or all-zero gradients (gmt_nonfinite: skip)
        # This step's non-zero gradient entries (this process's) that the engine's kept counts do not
        # show, and whether the all-zero decision was taken in a step call (else at the step's end).
        self._zero_check_step = -1
        self._nonzero_unseen = 0
        self._zero_decided = False
        self._handles = []
        for optimizer in layout.steppers:
            CONTRACT.check(optimizer)
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _stepped(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [
            p for group in optimizer.param_groups for p in group["params"]
            if id(p) in self.flats and p.grad is not None
        ]

    def fragments(self, stepped: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None = None) -> list[Fragment]:
        fragments = []
        for index, flat in enumerate(stepped):
            grad = self._local(grads[index] if grads is not None else flat.grad).view(-1)
            weight = self._local(flat.data).view(-1)
            for address in self.flats[id(flat)].fragments:
                end = address.start + address.numel
                fragments.append(Fragment(address.tensor_id, address.offset, grad[address.start : end],
                                          weight[address.start : end]))
        return fragments

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._replaying:
            return
        stepped = self._stepped(optimizer)
        if self._global_split and any(id(p) in self._with_units for p in stepped):
            step = self.current_step()
            if not self._to_come:
                self._to_come, self._held_step = set(self._with_units), step
            elif step != self._held_step:
                raise RuntimeError(f"GMT held flat tensors of step {self._held_step} that never completed")
            self._to_come -= {id(p) for p in stepped}
            if self._to_come:
                self._hold(optimizer, stepped)
                return
        flats = stepped + [flat for held in self._held for flat in held.flats]
        units = self.engine.units_of([t for flat in flats for t in self.flats[id(flat)].tensors])
        fragments = self.fragments(stepped)
        held_fragments = [self.fragments(held.flats, held.grads) for held in self._held]
        everything = fragments + [f for group in held_fragments for f in group]
        try:
            self.engine.nonfinite_outside_selection(everything)
            self._count_unseen_nonzero(everything)
            if units:  # else only excluded tensors here (the same on every rank): nothing to select
                self.engine.apply(everything, self.current_step(), units)
            if len(units) == len(self.engine.keep):  # every unit selected in this call: decide here
                self._raise_if_all_zero()
        except NonFiniteGradientError as error:  # raised on every rank together, before any write
            if self.engine.options.nonfinite != "skip":
                raise type(error)(f"step {self.current_step() + 1}: {error} (gmt_nonfinite: skip "
                                  "would skip such steps)") from None
            if isinstance(error, ZeroGradientError) and not self.skipped_steps:
                warnings.warn(f"GMT skips step {self.current_step() + 1}: {error}; such steps are counted in "
                              "gmt/skipped_steps", stacklevel=2)
            self._skip(optimizer, stepped)
            return
        self._replay_held(held_fragments)
        self._fragments = fragments

    # --- a gradient that is exactly zero everywhere ----------------------------------------------------
    # False where a zero gradient is normal: online RL (GRPO, RLOO), whose steps have zero advantage, and
    # so an exactly zero gradient, when every group's completions got equal rewards. Set by the trainer.
    zero_gradient_fails = True

    def _count_unseen_nonzero(self, fragments: Sequence[Fragment]) -> None:
        """Count this process's non-zero gradient entries that selection's kept counts will not show:
        excluded tensors', and every tensor's under random selection (whose kept entries are random)."""
        step = self.current_step()
        if step != self._zero_check_step:
            self._zero_check_step, self._nonzero_unseen, self._zero_decided = step, 0, False
        if not self.zero_gradient_fails:
            return
        by_rule = self.engine.rule.gradient_is_kept_mask
        for fragment in fragments:
            if fragment.grad.numel() and not (by_rule and self.engine.maskable[fragment.tensor_id]):
                self._nonzero_unseen += int(torch.count_nonzero(fragment.grad))

    def _raise_if_all_zero(self) -> None:
        """Raise :class:`ZeroGradientError` on every process together if this step's gradient, over
        every tensor and every process, is exactly zero. Collective (one all-reduce of one count)."""
        self._zero_decided = True
        if not self.zero_gradient_fails:
            return
        engine = self.engine
        local = self._nonzero_unseen + (int(engine.last_kept.sum()) if engine.rule.gradient_is_kept_mask
                                        and engine.step == self._zero_check_step else 0)
        evidence = torch.tensor([local], dtype=torch.int64)
        if engine.reduce is not None:
            evidence = engine.reduce(evidence)
        if int(evidence[0]) == 0:
            raise ZeroGradientError("the gradient is exactly zero in every tensor (the model no longer learns: "
                                    "did the run diverge? check learning_rate)")

    def step_ended(self) -> None:
        """At the end of an optimizer step (every process): the all-zero decision, when no single step
        call selected every unit (ZeRO stepping parameter groups apart under ``tensor`` granularity and
        ``gmt_nonfinite: raise``). Raises :class:`ZeroGradientError` as :meth:`_before_step` would."""
        if self._zero_decided or self._zero_check_step < 0:
            return
        try:
            self._raise_if_all_zero()
        except ZeroGradientError as error:
            raise ZeroGradientError(f"step {self._zero_check_step + 1}: {error} (gmt_nonfinite: skip would "
                                    "skip such steps)") from None

    def _skip(self, optimizer, stepped) -> None:
        """Make this step a no-op on this rank (every rank takes the same decision): the held
        flat tensors are dropped unstepped, and this one's inner step finds nothing to update."""
        self.skipped_steps.add(self.current_step())
        self._held = []
        skipped = {id(p) for p in stepped}
        self._held_now = [(group, list(group["params"])) for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in skipped]

    def _hold(self, optimizer, stepped) -> None:
        if self.republish is None:
            raise RuntimeError("a global threshold over flat tensors stepped apart needs a republish function")
        held_ids = {id(p) for p in stepped}
        groups = [(group, list(group["params"])) for group in optimizer.param_groups]
        self._held.append(_Held(optimizer, groups, stepped, [p.grad for p in stepped]))
        self._held_now = groups
        for group in optimizer.param_groups:  # the inner step now finds nothing to update
            group["params"] = [p for p in group["params"] if id(p) not in held_ids]

    def _replay_held(self, held_fragments: list[list[Fragment]]) -> None:
        self._replaying = True
        try:
            for held, fragments in zip(self._held, held_fragments):
                optimizer = held.optimizer
                now = (optimizer.param_groups, [(g, g["params"]) for g in optimizer.param_groups])
                previous_grads = [flat.grad for flat in held.flats]
                optimizer.param_groups = [group for group, _ in held.groups]
                for group, params in held.groups:
                    group["params"] = params
                for flat, grad in zip(held.flats, held.grads):
                    flat.grad = grad
                optimizer.step()
                self.engine.restore(fragments)
                for flat, grad in zip(held.flats, previous_grads):
                    flat.grad = grad
                optimizer.param_groups = now[0]
                for group, params in now[1]:
                    group["params"] = params
                for flat in held.flats:
                    self.republish(flat)
        finally:
            self._replaying = False
            self._held = []

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._replaying:
            return
        if self._held_now:  # put back what _hold emptied, so DeepSpeed's bookkeeping sees no change
            for group, params in self._held_now:
                group["params"] = params
            self._held_now = []
            return
        self.engine.restore(self._fragments)
        self._fragments = []

    def kept(self) -> dict[str, tuple[int, int]]:
        """What the last masked step kept, per maskable tensor: ``{name: (kept entries, entries)}``,
        summed over the processes that hold pieces of it (then collective: call it on every rank).
        Excluded tensors are left out (always fully updated); ``{}`` before the first step."""
        engine = self.engine
        if engine.step < 0:
            return {}
        counts = engine.last_kept.clone()
        if engine.reduce is not None:
            counts = engine.reduce(counts)
        return {tensor.names[0]: (int(counts[i]), tensor.numel)
                for i, tensor in enumerate(engine.tensors) if engine.maskable[i]}

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
