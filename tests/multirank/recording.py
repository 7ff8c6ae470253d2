"""The masks the engine applied, recorded for tests through its ``observers`` (production code keeps
no test switch): each apply() adds (tensor id, fragment offset, kept mask) per masked fragment."""

from __future__ import annotations

import torch


def record_masks(engine) -> list[tuple[int, int, torch.Tensor]]:
    """Record every later apply() of ``engine``; returns the list the records go into."""
    recorded: list[tuple[int, int, torch.Tensor]] = []

    def observe(fragments, step):
        recorded.extend((f.tensor_id, f.offset, engine.kept_mask(f).clone()) for f in fragments)

    engine.observers.insert(0, observe)  # first, as the engine's own recording was: before telemetry
    return recorded
