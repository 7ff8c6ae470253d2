"""Start real ranks on this machine: separate processes, gloo, DS_ACCELERATOR=cpu, 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
