"""A real 2-node job on this machine: two node ranks of one process each rendezvous on 127.0.0.1,
train two quickstart steps under ZeRO-2 with GMT, and save bit for bit what 1 node x 2 processes saves.

Two launchers: bare ``torchrun --nnodes 2``, and recipes/launch.slurm itself (accelerate with
recipes/accelerate_configs/zero2.yaml, --machine_rank from SLURM_PROCID) under stand-ins for ``srun``
and ``scontrol`` that start the "nodes" as local processes. Ranks, data shards, reduction order and
the masks are those of the 1-node run, so equality is exact, not within a tolerance.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from multirank.launch import ROOT, cpu_env, free_port
from quickstart_runs import TWO_STEPS, recipe_argv, run_launchers, same_weights

SRUN = """#!/bin/bash
# srun on one machine: the command once per "node" (--ntasks of them), SLURM_PROCID set, all at once.
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=* ]] && tasks=${1#--ntasks=}; shift; done
pids=()
for ((rank = 0; rank < tasks; rank++)); do SLURM_PROCID=$rank "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = """#!/bin/bash
# `scontrol show hostnames`: both "nodes" are this machine.
echo 127.0.0.1
echo 127.0.0.1
"""


def test_launch_slurm_is_valid_bash_and_prints_its_usage():
    assert subprocess.run(["bash", "-n", "recipes/launch.slurm"], cwd=ROOT, check=False).returncode == 0
    result = subprocess.run(["bash", "recipes/launch.slurm", "--help"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2 and "sbatch --nodes 2 recipes/launch.slurm sft" in result.stdout


def test_torchrun_two_nodes_save_what_one_node_saves(zero2_reference, tmp_path):
    reference, _ = zero2_reference
    port, out = free_port(), tmp_path / "torchrun"
    argv = recipe_argv("sft", out, *TWO_STEPS, "--deepspeed", "ds_configs/zero2.json")
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
              "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *argv]
             for rank in (0, 1)]
    node0, _ = run_launchers(nodes)
    assert "'gmt/kept_fraction': '0.7'" in node0  # counted over both ranks
    assert same_weights(out, reference)


def test_launch_slurm_on_two_nodes_saves_what_one_node_saves(zero2_reference, tmp_path, smollm2_dir):
    """recipes/launch.slurm as sbatch would run it (gmt-align validate, then srun of accelerate)."""
    reference, _ = zero2_reference
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    out = tmp_path / "slurm"
    overrides = recipe_argv("sft", out, *TWO_STEPS)[5:]  # after `-m gmt_align.cli sft --config RECIPE`
    env = cpu_env(
        PATH=f"{shims}:{Path(sys.executable).parent}:{cpu_env()['PATH']}",
        SLURM_NNODES="2", SLURM_JOB_NODELIST="node[0-1]", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
    )
    (stdout,) = run_launchers(
        [["bash", "recipes/launch.slurm", "sft", "recipes/quickstart/sft.yaml", "zero2", *overrides]], env
    )
    assert "OK recipes/quickstart/sft.yaml (sft)" in stdout  # validated before launching
    assert "on 2 nodes x 1 processes, head 127.0.0.1" in stdout
    assert stdout.count("'gmt/kept_fraction': '0.7'") == 2  # one per logging step, from the main process only
    assert same_weights(out, reference)
    assert not same_weights(out, smollm2_dir)  # it trained


@pytest.mark.parametrize("config", ["zero2", "zero3", "multi_gpu"])
def test_accelerate_configs_are_what_accelerate_reads(config, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    from gmt_align.validate import validate_recipe

    loaded = load_config_from_file(str(ROOT / "recipes" / "accelerate_configs" / f"{config}.yaml"))
    assert loaded.deepspeed_config.get("deepspeed_multinode_launcher", "standard") == "standard"
    if config == "multi_gpu":
        assert loaded.distributed_type == "MULTI_GPU" and not loaded.deepspeed_config
        return
    assert loaded.distributed_type == "DEEPSPEED"
    # accelerate refuses mixed_precision next to a DeepSpeed JSON: precision comes from the recipe.
    assert loaded.mixed_precision in (None, "no")
    ds_config = loaded.deepspeed_config["deepspeed_config_file"]
    assert ds_config == f"ds_configs/{config}.json" and (ROOT / ds_config).is_file()
    assert loaded.deepspeed_config["zero3_init_flag"] is (config == "zero3")
    monkeypatch.chdir(ROOT)  # recipes name paths relative to the repository root
    report = validate_recipe("recipes/general/llama-2-7b/gmt.yaml", deepspeed=ds_config)
    assert report.problems == []
