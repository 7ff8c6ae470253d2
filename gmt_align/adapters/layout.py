"""The parameter table every adapter shares: stable tensor ids and all the names of each tensor."""

from __future__ import annotations

import torch

from ..engine import TensorInfo


def tensor_table(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[TensorInfo]]:
    """Trainable parameters in ``named_parameters()`` order, each with every name it has.

    A tied parameter (``lm_head.weight`` sharing ``model.embed_tokens.weight``) appears once, under
    all its names, so an exclude pattern matching any of them excludes it. The order is the same
    on every rank, which makes the index a tensor id that all ranks agree on.
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
    return params, [TensorInfo(tuple(names[id(p)]), _numel(p)) for p in params]


def _numel(param: torch.nn.Parameter) -> int:
    # ZeRO-3 replaces a partitioned parameter's data by an empty tensor and keeps the size here.
    return int(getattr(param, "ds_numel", param.numel()))
