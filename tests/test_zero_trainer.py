"""The quickstart recipes on 2 real ranks through the README's launcher lines (ZeRO-2 with CPU offload
under torchrun, ZeRO-3 and DDP under accelerate, DPO under ZeRO-2 and ZeRO-3), and under ZeRO-2 on one
process without a launcher, against 1 plain process; on the tiny random-weight SmolLM2
(conftest.tiny_model): the ranks and launchers are the point (tests/test_real_model.py trains the real one)."""

import pytest
from launchers import assert_no_group_threads_at_exit, exit_threads_env, launch
from multirank.launch import ROOT
from quickstart_runs import (
    assert_unchanged_fraction_is_the_ratio,
    mask_agreement,
    run_recipe,
    saved_weights,
    unchanged_masks,
)

from gmt_align.core.selection import keep_count
from gmt_align.quickstart import prepare_quickstart

pytestmark = [pytest.mark.multirank, pytest.mark.launcher]

RATIO = 0.3
ONE_STEP = ["--max_steps", "1", "--gmt_mode", "update", "--gmt_mask_ratio", str(RATIO)]
PER_RANK = ["--per_device_train_batch_size", "1"]  # 2 ranks x 1: the global batch of 1 process x 2


@pytest.fixture(scope="module")
def quickstart(tiny_model):
    """The quickstart's data, and the model every run here starts from (the tiny one)."""
    return {**prepare_quickstart(ROOT / ".cache" / "quickstart"), "model": tiny_model[1]}


@pytest.fixture(scope="module")
def single_process_sft(quickstart, tiny_model, tmp_path_factory):
    """1 process x batch 2: the same global batch as 2 ranks x batch 1."""
    out = tmp_path_factory.mktemp("single")
    run_recipe("sft", out, *ONE_STEP, *tiny_model, "--per_device_train_batch_size", "2")
    return unchanged_masks(saved_weights(quickstart["model"]), saved_weights(out))


@pytest.mark.parametrize("launcher", ["torchrun_cpu", "accelerate_zero3", "accelerate_ddp"])
def test_sft_masks_what_one_process_masks(quickstart, tiny_model, single_process_sft, tmp_path, launcher):
    (stdout,) = launch(launcher, tmp_path, *ONE_STEP, *PER_RANK, *tiny_model, env=exit_threads_env())
    assert "'gmt/kept_fraction': '0.7'" in stdout  # reduced over both ranks
    assert_no_group_threads_at_exit(stdout)
    base, tuned = saved_weights(quickstart["model"]), saved_weights(tmp_path)
    assert_unchanged_fraction_is_the_ratio(base, tuned, RATIO)
    # Same global batch, same mask, up to reduction-order rounding of gradients near the threshold.
    overall, worst = mask_agreement(unchanged_masks(base, tuned), single_process_sft)
    assert overall >= 0.99999 and worst >= 0.9999, (overall, worst)


def test_one_process_under_zero2_without_a_launcher(quickstart, tiny_model, single_process_sft, tmp_path):
    """``gmt-align sft --deepspeed ...`` with no launcher runs as a 1-rank DeepSpeed job."""
    (stdout,) = launch("one_process", tmp_path, *ONE_STEP, "--per_device_train_batch_size", "2", *tiny_model)
    assert "'gmt/kept_fraction': '0.7'" in stdout
    base, tuned = saved_weights(quickstart["model"]), saved_weights(tmp_path)
    overall, worst = mask_agreement(unchanged_masks(base, tuned), single_process_sft)
    assert overall >= 0.99999 and worst >= 0.9999, (overall, worst)


@pytest.mark.parametrize("launcher", ["accelerate_zero2_dpo", "accelerate_use_deepspeed_dpo"])
def test_dpo_under_zero(quickstart, tiny_model, tmp_path, launcher):
    (stdout,) = launch(launcher, tmp_path, *ONE_STEP, *PER_RANK, "--learning_rate", "1e-4", *tiny_model,
                       env=exit_threads_env())
    assert "'gmt/kept_fraction'" in stdout
    assert_no_group_threads_at_exit(stdout)
    assert_unchanged_fraction_is_the_ratio(saved_weights(quickstart["model"]), saved_weights(tmp_path), RATIO)


def test_global_threshold_under_zero3_matches_one_process(quickstart, tiny_model, tmp_path):
    """The Trainer's two param groups (decay / no decay) are stepped apart by ZeRO: GMT holds the
    first back until the global threshold over both is known."""
    glob = [*ONE_STEP, "--gmt_granularity", "global"]
    run_recipe("sft", tmp_path / "one", *glob, *tiny_model, "--per_device_train_batch_size", "2")
    launch("accelerate_zero3", tmp_path / "two", *glob, *PER_RANK, *tiny_model)
    base = saved_weights(quickstart["model"])
    one, two = saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two")
    total = sum(w.numel() for w in base.values())
    masked = total - keep_count(total, RATIO)
    unchanged = sum(int(m.sum()) for m in unchanged_masks(base, two).values())
    assert abs(unchanged - masked) <= total // 100_000, (unchanged, masked)
    overall, worst = mask_agreement(unchanged_masks(base, two), unchanged_masks(base, one))
    assert overall >= 0.99999 and worst >= 0.999, (overall, worst)
