"""The real Trainer under FSDP2 on 2 CPU ranks, launched as docs/fsdp2.md says.

- ``accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml`` with the quickstart SFT
  recipe, 2 ranks x batch 1: after one step it masked what 1 process x batch 2 masks; a run resumed
  from its (full state dict) checkpoint-1 ends bit for bit where it ends.
- ``recipes/launch.slurm ... fsdp2`` with a paper DPO recipe on 2 "nodes" of one process each
  (stand-ins for ``srun``/``scontrol``, as in tests/test_multinode.py), its hub model and data
  swapped for the quickstart ones.

accelerate never turns FSDP on for CPU ranks; tests/fsdp2_on_cpu/sitecustomize.py replaces only its
backend choice (read it for what and why). The rest is the shipped path, and the checkpoints show
it: ``pytorch_model_fsdp.bin`` is what the Trainer's FSDP branch writes.

GMT runs its eager kernels here (``GMT_ALIGN_COMPILE=0``: the same masks bit for bit, see
gmt_align/core/kernels.py): loading the C++ kernels and compiling the others costs each process more
than the whole 2-step run on a busy 2-core machine. tests/test_fsdp2.py runs the default kernels on
FSDP2 shards.
"""

import os
import shutil

import pytest
from launchers import launch
from multirank.launch import ROOT, cpu_env, free_port
from quickstart_runs import (
    assert_unchanged_fraction_is_the_ratio,
    mask_agreement,
    run_recipe,
    same_weights,
    saved_weights,
    unchanged_masks,
)

from gmt_align.quickstart import prepare_quickstart

pytestmark = [pytest.mark.multirank, pytest.mark.launcher]

RATIO = 0.3
GMT = ["--gmt_mode", "update", "--gmt_mask_ratio", str(RATIO)]
# No --use_cpu: with it, transformers asks accelerate for CPU ranks, and accelerate gives plain DDP.
TWO_STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "1", "--lr_scheduler_type", "cosine",
             "--save_strategy", "steps", "--save_steps", "1", *GMT]
LOGGED_STEP = "'gmt/kept_fraction': '0.7'"  # one per optimizer step, counted over both shards


def fsdp_on_cpu(**extra):
    """What the launched ranks need on top of the CPU environment to run accelerate's FSDP path."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fsdp2_on_cpu"), cpu_env()["PYTHONPATH"]]),
            "GMT_TEST_FSDP_ON_CPU": "1", "GMT_ALIGN_COMPILE": "0", **extra}


@pytest.fixture(scope="module")
def quickstart(tiny_model):
    """The quickstart's data, and the model every run here starts from: the tiny random-weight SmolLM2
    (conftest.tiny_model), since FSDP2's sharding, saving and resuming are the point."""
    return {**prepare_quickstart(ROOT / ".cache" / "quickstart"), "model": tiny_model[1]}


@pytest.fixture(scope="module")
def fsdp2_checkpointed(quickstart, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_checkpointed")
    (stdout,) = launch("accelerate_fsdp2", out, *TWO_STEPS, *tiny_model, env=fsdp_on_cpu())
    yield out, stdout
    shutil.rmtree(out, ignore_errors=True)


def test_sft_under_fsdp2_masks_what_one_process_masks(quickstart, tiny_model, fsdp2_checkpointed, tmp_path,
                                                      monkeypatch):
    run, stdout = fsdp2_checkpointed
    assert stdout.count(LOGGED_STEP) == 2
    checkpoint = run / "checkpoint-1"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
    monkeypatch.setenv("GMT_ALIGN_COMPILE", "0")
    same_global_batch = ["--max_steps", "1", "--per_device_train_batch_size", "2"]
    run_recipe("sft", tmp_path, *same_global_batch, *GMT, *tiny_model)
    base = saved_weights(quickstart["model"])
    one, fsdp2 = unchanged_masks(base, saved_weights(tmp_path)), unchanged_masks(base, saved_weights(checkpoint))
    assert_unchanged_fraction_is_the_ratio(base, saved_weights(checkpoint), RATIO)
    # Same mask, up to reduction-order rounding of gradients near the threshold.
    overall, worst = mask_agreement(fsdp2, one)
    assert overall >= 0.99999 and worst >= 0.9999, (overall, worst)


def test_fsdp2_resumed_run_ends_where_the_uninterrupted_run_ends(fsdp2_checkpointed, tiny_model, tmp_path):
    reference, _ = fsdp2_checkpointed
    assert not same_weights(reference / "checkpoint-1", reference)  # step 2 changed the model
    resumed = tmp_path / "resumed"  # the run as a kill after step 1 leaves it: checkpoint-1 alone
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-1", resumed / "checkpoint-1")
    (stdout,) = launch("accelerate_fsdp2_resume", resumed, *TWO_STEPS, *tiny_model, env=fsdp_on_cpu())
    assert stdout.count(LOGGED_STEP) == 1  # only step 2 was trained
    assert same_weights(resumed, reference)


def test_paper_dpo_recipe_under_fsdp2_on_two_nodes_through_launch_slurm(quickstart, tmp_path):
    """docs/fsdp2.md's sbatch line, through the sbatch/srun/scontrol stand-ins (tests/multirank/bin)."""
    out = tmp_path / "dpo"
    local = [  # the hub model and data swapped for the quickstart ones; fp32 on the CPU; one GMT step
        "--model_name_or_path", str(quickstart["model"]), "--dataset_name", str(quickstart["dpo_train"]),
        "--dataset_train_split", "train", "--dtype", "float32", "--bf16", "false", "--max_length", "128",
        "--max_steps", "1", "--per_device_train_batch_size", "1", "--learning_rate", "1e-4", "--warmup_steps", "0",
        "--save_strategy", "no", *GMT,
    ]
    (stdout,) = launch("sbatch_fsdp2", out, *local, env=fsdp_on_cpu(GPUS_PER_NODE="1", MASTER_PORT=str(free_port())))
    assert "OK recipes/dpo/llama-2-7b/gmt.yaml (dpo)" in stdout  # validated before launching
    assert "on 2 nodes x 1 processes" in stdout and LOGGED_STEP in stdout
    assert_unchanged_fraction_is_the_ratio(saved_weights(quickstart["model"]), saved_weights(out), RATIO)
