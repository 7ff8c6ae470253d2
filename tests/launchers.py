"""The launcher lines that README.md and docs/*.md show, and how the tests run each one as written.

A line runs through bash with its text unchanged; the tests add only the environment (CPU ranks:
``DS_ACCELERATOR=cpu``, offline hub, one thread per rank) and, at the end of the line, ``--use_cpu
true`` and their own overrides (``--output_dir``, ``--max_steps``, ...). It runs from a scratch
directory that looks like the repository root (recipes/, ds_configs/ and .cache/ linked in) and also
holds the ``hostfile`` and ``.deepspeed_env`` that the multi-node lines read. Multi-node lines run
every node at once on this machine, at 127.0.0.1: each node is the same line with its own
``NODE_RANK``, or the launcher starts the nodes through the stand-ins in tests/multirank/bin (ssh,
pdsh, sbatch, srun, scontrol), which run each node's command as a local process.

Every line carries the name of the test that runs it; tests/test_launchers.py checks that the
registry and the documents show the same lines, and that each named test runs its line.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from multirank.launch import ROOT, cpu_env, run_together
from quickstart_runs import SHORT_RUN

STAND_INS = ROOT / "tests" / "multirank" / "bin"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What each "node" of the hostfile line gets: a stand-in ssh login passes on no variable of ours, so
# these go through DeepSpeed's own channel for them, a .deepspeed_env file in the launch directory.
# PATH too, as users put their environment's tools first on every node: torch builds JIT extensions with
# the first `ninja` on PATH, and a login PATH's system ninja would rebuild what the venv's built.
NODE_VARIABLES = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
                  "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "WANDB_MODE",
                  "CUDA_VISIBLE_DEVICES", "GMT_ALIGN_CPP", "GMT_ALIGN_COMPILE", "PATH")
DEFAULT_PORT = 29500  # deepspeed's, accelerate's and torchrun's, and the README's --main_process_port
HOSTFILE = "node0 slots=1\nnode1 slots=1\n"  # 2 nodes of 1 process each, the README's example


@dataclass(frozen=True)
class Launcher:
    line: str  # as the documents show it, continuation lines joined, comment left out
    tested_by: str  # "tests/FILE.py::NAME": the test (or fixture) that runs it
    nodes: int = 1  # started once per node, all at once, with NODE_RANK=0, 1, ... and HEAD_ADDR=127.0.0.1
    # False for FSDP2: with --use_cpu transformers asks accelerate for CPU ranks, which gives plain DDP
    # (the FSDP2 tests turn FSDP on for CPU ranks their own way: tests/fsdp2_on_cpu).
    use_cpu: bool = True


LAUNCHERS = {
    "deepspeed": Launcher(
        "deepspeed --num_gpus 2 --module gmt_align.cli sft --config recipes/quickstart/sft.yaml"
        " --deepspeed ds_configs/zero2.json",
        "tests/conftest.py::zero2_reference"),
    "accelerate_zero3": Launcher(
        "accelerate launch --config_file recipes/accelerate_configs/zero3.yaml --num_processes 2"
        " -m gmt_align.cli sft --config recipes/quickstart/sft.yaml",
        "tests/test_zero_trainer.py::test_sft_masks_what_one_process_masks"),
    "accelerate_ddp": Launcher(
        "accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml --num_processes 2"
        " -m gmt_align.cli sft --config recipes/quickstart/sft.yaml",
        "tests/test_zero_trainer.py::test_sft_masks_what_one_process_masks"),
    "accelerate_zero2_dpo": Launcher(
        "accelerate launch --config_file recipes/accelerate_configs/zero2.yaml --num_processes 2"
        " -m gmt_align.cli dpo --config recipes/quickstart/dpo.yaml",
        "tests/test_zero_trainer.py::test_dpo_under_zero"),
    "accelerate_use_deepspeed_dpo": Launcher(
        "accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero3.json --num_processes 2"
        " -m gmt_align.cli dpo --config recipes/quickstart/dpo.yaml",
        "tests/test_zero_trainer.py::test_dpo_under_zero"),
    "accelerate_zero3_grpo": Launcher(
        "accelerate launch --config_file recipes/accelerate_configs/zero3.yaml --num_processes 2"
        " -m gmt_align.cli grpo --config recipes/quickstart/grpo.yaml",
        "tests/test_grpo.py::test_grpo_launched_under_zero3"),
    "torchrun_cpu": Launcher(
        "DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m gmt_align.cli sft --config recipes/quickstart/sft.yaml"
        " --deepspeed ds_configs/zero2_offload.json --use_cpu true --max_steps 2",
        "tests/test_zero_trainer.py::test_sft_masks_what_one_process_masks"),
    "one_process": Launcher(
        "gmt-align sft --config recipes/quickstart/sft.yaml --deepspeed ds_configs/zero2.json",
        "tests/test_zero_trainer.py::test_one_process_under_zero2_without_a_launcher"),
    "deepspeed_hostfile": Launcher(
        "deepspeed --hostfile hostfile --module gmt_align.cli sft --config recipes/quickstart/sft.yaml"
        " --deepspeed ds_configs/zero2.json",
        "tests/test_multinode.py::test_deepspeed_hostfile_two_nodes_save_what_one_node_saves"),
    "accelerate_two_nodes": Launcher(
        "accelerate launch --config_file recipes/accelerate_configs/zero2.yaml --num_machines 2 --num_processes 2"
        " --machine_rank $NODE_RANK --main_process_ip $HEAD_ADDR --main_process_port 29500"
        " -m gmt_align.cli sft --config recipes/quickstart/sft.yaml",
        "tests/test_multinode.py::test_accelerate_two_nodes_save_what_one_node_saves", nodes=2),
    "accelerate_fsdp2": Launcher(
        "accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml --num_processes 2"
        " -m gmt_align.cli sft --config recipes/quickstart/sft.yaml",
        "tests/test_fsdp2_trainer.py::fsdp2_checkpointed", use_cpu=False),
    "accelerate_fsdp2_resume": Launcher(
        "accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml --num_processes 2"
        " -m gmt_align.cli sft --config recipes/quickstart/sft.yaml --resume_from_checkpoint true",
        "tests/test_fsdp2_trainer.py::test_fsdp2_resumed_run_ends_where_the_uninterrupted_run_ends", use_cpu=False),
    "sbatch_fsdp2": Launcher(
        'sbatch --nodes 2 recipes/launch.slurm dpo recipes/dpo/llama-2-7b/gmt.yaml fsdp2 --deepspeed ""',
        "tests/test_fsdp2_trainer.py::test_paper_dpo_recipe_under_fsdp2_on_two_nodes_through_launch_slurm",
        use_cpu=False),
    "gmt_align_zero2": Launcher(
        "gmt-align sft --config recipes/quickstart/sft.yaml --accelerate_config zero2 --num_processes 2",
        "tests/test_launch.py::test_named_accelerate_configs_train_on_two_ranks"),
    "gmt_align_zero3": Launcher(
        "gmt-align sft --config recipes/quickstart/sft.yaml --accelerate_config zero3 --num_processes 2",
        "tests/test_launch.py::test_named_accelerate_configs_train_on_two_ranks"),
    "gmt_align_fsdp2": Launcher(
        "gmt-align sft --config recipes/quickstart/sft.yaml --accelerate_config fsdp2 --num_processes 2",
        "tests/test_launch.py::test_named_accelerate_configs_train_on_two_ranks", use_cpu=False),
    "sbatch": Launcher(
        "sbatch --nodes 2 recipes/launch.slurm sft recipes/quickstart/sft.yaml zero2",
        "tests/test_multinode.py::test_launch_slurm_on_two_nodes_saves_what_one_node_saves"),
}

# A launcher at the start of a line, after any VAR=value assignments; DeepSpeed without a launcher; or
# a training command of gmt-align starting accelerate launch itself (--accelerate_config, --num_processes).
LAUNCHER_LINE = re.compile(r"^(?:\w+=\S*\s+)*(?:deepspeed|accelerate\s+launch|torchrun|sbatch)\s"
                           r"|^gmt-align\s+(?!validate\s|eval\s|report\s|env\s)\w+\s.*\s--(?:deepspeed|accelerate_config|num_processes)[\s=]")


def tokens(line: str) -> tuple[str, ...]:
    """The words of a shell line, as bash splits them (a trailing # comment left out)."""
    return tuple(shlex.split(line, comments=True))


def documented_lines(documents=DOCUMENTS) -> dict[tuple[str, ...], str]:
    """Every launcher line in the documents' bash code blocks (continuations joined), by its words,
    with the file it is in."""
    found = {}
    for document in documents:
        for block in re.findall(r"^```bash\n(.*?)^```", document.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                if LAUNCHER_LINE.match(line.strip()):
                    found[tokens(line)] = document.name
    return found


def launch(name: str, output_dir, *overrides: str, env: dict | None = None, timeout: float = 900) -> list[str]:
    """Run LAUNCHERS[name] as written, then ``--use_cpu true`` (but for FSDP2), ``--output_dir OUTPUT_DIR``, a short run's
    settings (quickstart_runs.SHORT_RUN) and ``OVERRIDES``; every node must succeed. Returns each
    node's output (stdout and stderr)."""
    launcher = LAUNCHERS[name]
    additions = [*(["--use_cpu", "true"] if launcher.use_cpu else []), "--output_dir", str(output_dir), *SHORT_RUN,
                 *overrides]
    command = f"{launcher.line} {shlex.join(additions)}"
    base = launcher_env(**(env or {}))
    with default_port_held(), launch_directory(base) as directory:
        nodes = [(["bash", "-c", command], {**base, "NODE_RANK": str(rank), "HEAD_ADDR": "127.0.0.1"})
                 for rank in range(launcher.nodes)]
        results = run_together(nodes, timeout, cwd=directory)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"{name}, node {rank}: {command}\n{result.stdout[-4000:]}"
    return [result.stdout for result in results]


def exit_threads_env() -> dict:
    """The environment under which each launched rank says which threads it still runs as Python shuts
    down (tests/exit_threads); read back with :func:`assert_no_group_threads_at_exit`."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "exit_threads"), cpu_env()["PYTHONPATH"]]),
            "GMT_TEST_EXIT_THREADS": "1"}


def assert_no_group_threads_at_exit(stdout: str, ranks: int = 2) -> None:
    """Every rank reported its threads at exit, and none is a process group's (gloo's): a group left
    alive into the interpreter's shutdown can abort a run that finished and saved."""
    reports = dict(re.findall(r"gmt-test: rank (\d+) threads at exit: ((?:(?!gmt-test:)[^\n])*)", stdout))
    assert sorted(map(int, reports)) == list(range(ranks)), stdout[-3000:]
    left = {rank: [name for name in names.split() if "gloo" in name] for rank, names in reports.items()}
    assert not any(left.values()), f"process-group threads alive at exit: {left}"


@contextmanager
def default_port_held(wait: float = 120):
    """The documented lines rendezvous on the launchers' default port, 29500, so two test sessions on
    one machine must not launch at once (a rank could join the other job): hold a machine-wide lock,
    and wait for the port to be free of the last job."""
    with open(Path(tempfile.gettempdir()) / "gmt-align-launch-29500.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", DEFAULT_PORT)) != 0:
                    break
            time.sleep(1)
        yield  # the lock goes with the file


def launcher_env(**extra: str) -> dict:
    """CPU ranks (multirank.launch.cpu_env), with this environment's launchers and the stand-ins on PATH."""
    path = os.pathsep.join([str(STAND_INS), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return cpu_env(PATH=path, **extra)


@contextmanager
def launch_directory(env: dict):
    """A scratch directory to launch from, with the repository's recipes/, ds_configs/ and .cache/ linked
    in, a ``hostfile`` and a ``.deepspeed_env`` (the variables that the nodes need); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="gmt-launch-"))
    try:
        for name in ("recipes", "ds_configs", ".cache"):
            (path / name).symlink_to(ROOT / name)
        (path / "hostfile").write_text(HOSTFILE)
        exported = [f"{name}={env[name]}" for name in NODE_VARIABLES if name in env]
        (path / ".deepspeed_env").write_text("\n".join(exported) + "\n")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
