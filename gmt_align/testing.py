"""Helpers for gmt-align's tests and benchmarks: real CPU ranks on this machine, and gradient cases.

Multi-rank behaviour is tested with real processes (gloo, ``DS_ACCELERATOR=cpu``, 127.0.0.1), not
mocks: :func:`run_ranks` starts ``python ARGS`` as N ranks; :func:`run_together` starts any set of
commands at once (the launchers of several nodes) and kills them all, with whatever they started,
if one outlives its time. No module of gmt_align imports this one.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["GRADIENT_KINDS", "ROOT", "cpu_env", "distinct_characters", "free_port", "gradient_case", "rank_env",
           "run_ranks", "run_together"]

GRADIENT_KINDS = ("normal", "heavy", "ties", "zeros", "bf16", "fp16")
ROOT = Path(__file__).resolve().parents[1]  # the checkout that holds this package (an editable install)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict:
    """What every process of a CPU job needs (a launcher adds the rank variables itself)."""
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def rank_env(rank: int, world: int, port: int) -> dict:
    return cpu_env(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )


def run_ranks(argv: list[str], world: int = 2, timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Run ``python argv...`` as ``world`` ranks; kill all of them if any outlives ``timeout``."""
    port = free_port()
    return run_together([([sys.executable, *argv], rank_env(r, world, port)) for r in range(world)], timeout)


def run_together(commands: list[tuple[list[str], dict]], timeout: float = 900,
                 cwd: Path = ROOT) -> list[subprocess.CompletedProcess]:
    """Start every (command, environment) at once from ``cwd`` (ranks, or the launchers of several
    nodes); kill all of them, with whatever they started, if any outlives ``timeout``."""
    procs = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # a launcher's ranks are its process group
        for command, env in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # keep what it printed: it says where it hung
                os.killpg(proc.pid, signal.SIGKILL)
                out = f"{proc.communicate()[0]}\n[killed after {timeout:.0f} s]"
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return results


def gradient_case(kind: str, n: int, seed: int) -> torch.Tensor:
    """A gradient of ``n`` entries of one of :data:`GRADIENT_KINDS`: normal, heavy-tailed, ties, mostly
    zeros, bf16 or fp16 (the selection's test cases; benchmarks/gpu_check.py times the same ones)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=gen) * 1e-3
    if kind == "heavy":  # Student-t with 1.5 degrees of freedom: a few huge entries
        return torch.randn(n, generator=gen) / torch.rand(n, generator=gen).pow(1 / 1.5)
    if kind == "ties":
        return torch.randint(-3, 4, (n,), generator=gen).float()
    if kind == "zeros":
        g = torch.randn(n, generator=gen)
        g[torch.rand(n, generator=gen) < 0.6] = 0
        return g
    if kind == "bf16":
        return torch.randn(n, generator=gen).to(torch.bfloat16)
    if kind == "fp16":
        return (torch.randn(n, generator=gen) * 1e-2).to(torch.float16)
    raise ValueError(kind)


def distinct_characters(completions, **kwargs) -> list[float]:
    """A GRPO reward for models that know nothing (the tests' tiny random one): the number of distinct
    characters of each completion, which differs within a group, so that advantages (and the gradient)
    are not zero. Named in a recipe as ``reward_funcs: [gmt_align.testing.distinct_characters]``."""
    from gmt_align.evaluation.rewards import completion_text

    return [float(len(set(completion_text(completion)))) for completion in completions]
