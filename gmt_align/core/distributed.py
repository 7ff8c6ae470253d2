"""The only module that talks to ``torch.distributed``: the all-reduce handed to the selection.

Collectives degrade gracefully: without an initialised process group (or with one process) the
reduction returns its input, so the same selection code runs in a unit test and on many ranks.
"""

from __future__ import annotations

import torch

__all__ = ["AllReduce", "adopt_launcher_arguments", "rank_of", "single_process_environment", "world_size_of"]


class AllReduce:
    """Sum a tensor across ``group`` in place. Counts calls and bytes (see docs/performance.md).

    GMT only ever reduces small int64 count tensors (per selection round, one row of at most 4096
    counts per unit; per tensor, non-finite flags and, at logging steps, kept counts), never
    gradients.
    """

    def __init__(self, group=None):
        self.group = group
        self.calls = 0
        self.bytes = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.group) == 1:
            return tensor
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        if dist.get_backend(self.group) == "gloo" or tensor.device.type != "cpu":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return tensor
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))  # NCCL needs device tensors
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.copy_(on_device)


def rank_of(group=None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size_of(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def ensure_deepspeed_comm(training_args) -> None:
    """Let DeepSpeed's comm layer adopt the process group before a ZeRO-3 model is built.

    transformers builds a ZeRO-3 model inside ``deepspeed.zero.Init``, which reads the world size
    from ``deepspeed.comm``. accelerate initialises that layer on GPUs, but on the CPU
    (``use_cpu=True``, gloo) it only initialises ``torch.distributed``, and ZeRO-3 then sees one
    process. ``deepspeed.init_distributed`` adopts the existing group; it starts nothing new.
    """
    import torch.distributed as dist

    _ = training_args.device  # sets up the process group, as the Trainer would
    if not (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed
    from deepspeed import comm

    if not comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def adopt_launcher_arguments(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` (or ``--local-rank N``) that launchers insert.

    The ``deepspeed`` launcher runs ``python -u -m MODULE --local_rank=N ARGS...`` (before the
    subcommand), and ``torch.distributed.launch`` may too; the value also lands in ``LOCAL_RANK``,
    which is where everything downstream reads it. Kept in ``LOCAL_RANK`` if that is unset.
    """
    import os

    kept, index = [], 0
    while index < len(argv):
        item = argv[index]
        name, _, value = item.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not value and index + 1 < len(argv):
                index += 1
                value = argv[index]
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            kept.append(item)
        index += 1
    return kept


# Set by torchrun/accelerate/deepspeed (WORLD_SIZE) or by MPI launchers, which DeepSpeed discovers itself.
_LAUNCHER_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK")


def single_process_environment() -> dict[str, str]:
    """The rendezvous variables of a one-process job, when no launcher set any (else ``{}``).

    Without them ``deepspeed.init_distributed`` falls back to MPI discovery (``No module named
    'mpi4py'``); with them, ``gmt-align sft --deepspeed ...`` runs as one rank, as under a launcher.
    """
    import os
    import socket

    if any(name in os.environ for name in _LAUNCHER_VARIABLES):
        return {}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
