"""Real 2-node jobs on this machine, through the README's multi-node lines: two node ranks of one
process each rendezvous on 127.0.0.1, train two quickstart steps under ZeRO-2 with GMT, and save bit
for bit what 1 node x 2 processes saves (the shared zero2_reference, from ``deepspeed --num_gpus 2``).

Three launchers: ``accelerate launch --num_machines 2`` run once per node; DeepSpeed's own launcher
with a hostfile of two nodes, reaching them through stand-ins for ``pdsh`` and ``ssh`` that run each
node's command as a local process in a login-like environment; and ``sbatch recipes/launch.slurm``
(gmt-align validate, then accelerate on every node) under stand-ins for ``sbatch``, ``srun`` and
``scontrol`` (tests/multirank/bin). Ranks, data shards, reduction order and the masks are those of the
1-node run, so equality is exact, not within a tolerance. The model is the tiny random-weight SmolLM2
(conftest.tiny_model): the launchers are the point.
"""

import subprocess

import pytest
from launchers import launch
from multirank.launch import ROOT, free_port
from quickstart_runs import TWO_STEPS, same_weights

pytestmark = [pytest.mark.multirank, pytest.mark.launcher]

LOGGED_STEP = "'gmt/kept_fraction': '0.7'"  # counted over both ranks


def test_launch_slurm_is_valid_bash_and_prints_its_usage():
    assert subprocess.run(["bash", "-n", "recipes/launch.slurm"], cwd=ROOT, check=False).returncode == 0
    result = subprocess.run(["bash", "recipes/launch.slurm", "--help"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2 and "sbatch --nodes 2 recipes/launch.slurm sft" in result.stdout


def test_accelerate_two_nodes_save_what_one_node_saves(zero2_reference, tiny_model, tmp_path):
    reference, _ = zero2_reference
    head, _ = launch("accelerate_two_nodes", tmp_path, *TWO_STEPS, *tiny_model)
    assert LOGGED_STEP in head
    assert same_weights(tmp_path, reference)


def test_deepspeed_hostfile_two_nodes_save_what_one_node_saves(zero2_reference, tmp_path, tiny_model):
    reference, _ = zero2_reference
    (stdout,) = launch("deepspeed_hostfile", tmp_path, *TWO_STEPS, *tiny_model)
    # pdsh prefixes each node's lines (tqdm's \r-separated updates stay on the prefixed line)
    lines = stdout.split("\n")
    assert any(line.startswith("node1: ") for line in lines)  # both nodes ran
    assert any(line.startswith("node0: ") for line in lines) and LOGGED_STEP in stdout  # the head logged
    assert same_weights(tmp_path, reference)
    assert not same_weights(tmp_path, tiny_model[1])  # it trained


def test_launch_slurm_on_two_nodes_saves_what_one_node_saves(zero2_reference, tmp_path, tiny_model):
    """recipes/launch.slurm as sbatch runs it (gmt-align validate, then srun of accelerate)."""
    reference, _ = zero2_reference
    (stdout,) = launch("sbatch", tmp_path, *TWO_STEPS, *tiny_model,
                       env={"GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port())})
    assert "OK recipes/quickstart/sft.yaml (sft)" in stdout  # validated before launching
    assert "on 2 nodes x 1 processes, head 127.0.0.1" in stdout
    assert stdout.count(LOGGED_STEP) == 2  # one per logging step, from the main process only
    assert same_weights(tmp_path, reference)
    assert not same_weights(tmp_path, tiny_model[1])  # it trained


@pytest.mark.parametrize("config", ["zero2", "zero3", "multi_gpu"])
def test_accelerate_configs_are_what_accelerate_reads(config, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    from gmt_align.cli.validate import validate_recipe

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
