"""The quickstart recipes under DeepSpeed ZeRO-2 and ZeRO-3 on 2 real ranks, against 1 process."""

import pytest

from gmt_align.quickstart import prepare_quickstart
from gmt_align.selection import keep_count
from multirank.launch import ROOT
from quickstart_runs import (
    assert_unchanged_fraction_is_the_ratio,
    mask_agreement,
    run_recipe,
    saved_weights,
    unchanged_masks,
)

RATIO = 0.3
ONE_STEP = ["--max_steps", "1", "--gmt_mode", "update", "--gmt_mask_ratio", str(RATIO)]


@pytest.fixture(scope="module")
def quickstart(smollm2_dir):
    return prepare_quickstart(ROOT / ".cache" / "quickstart")


@pytest.fixture(scope="module")
def single_process_sft(quickstart, tmp_path_factory):
    """1 process x batch 2: the same global batch as 2 ranks x batch 1."""
    out = tmp_path_factory.mktemp("single")
    run_recipe("sft", out, *ONE_STEP, "--per_device_train_batch_size", "2")
    return unchanged_masks(saved_weights(quickstart["model"]), saved_weights(out))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_sft_under_zero_masks_what_one_process_masks(quickstart, single_process_sft, tmp_path, stage):
    stdout = run_recipe("sft", tmp_path, *ONE_STEP, "--per_device_train_batch_size", "1", deepspeed=stage, ranks=2)
    assert "'gmt/kept_fraction': '0.7'" in stdout  # reduced over both ranks
    base, tuned = saved_weights(quickstart["model"]), saved_weights(tmp_path)
    assert_unchanged_fraction_is_the_ratio(base, tuned, RATIO)
    # Same global batch, same mask, up to reduction-order rounding of gradients near the threshold.
    overall, worst = mask_agreement(unchanged_masks(base, tuned), single_process_sft)
    assert overall >= 0.99999 and worst >= 0.9999, (overall, worst)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_dpo_under_zero(quickstart, tmp_path, stage):
    stdout = run_recipe("dpo", tmp_path, *ONE_STEP, "--per_device_train_batch_size", "1", "--learning_rate", "1e-4",
                        deepspeed=stage, ranks=2)
    assert "'gmt/kept_fraction'" in stdout
    assert_unchanged_fraction_is_the_ratio(saved_weights(quickstart["model"]), saved_weights(tmp_path), RATIO)


def test_global_threshold_under_zero3_matches_one_process(quickstart, tmp_path):
    """The Trainer's two param groups (decay / no decay) are stepped apart by ZeRO: GMT holds the
    first back until the global threshold over both is known."""
    glob = [*ONE_STEP, "--gmt_granularity", "global"]
    run_recipe("sft", tmp_path / "one", *glob, "--per_device_train_batch_size", "2")
    run_recipe("sft", tmp_path / "two", *glob, "--per_device_train_batch_size", "1", deepspeed="zero3", ranks=2)
    base = saved_weights(quickstart["model"])
    one, two = saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two")
    total = sum(w.numel() for w in base.values())
    masked = total - keep_count(total, RATIO)
    unchanged = sum(int(m.sum()) for m in unchanged_masks(base, two).values())
    assert abs(unchanged - masked) <= total // 100_000, (unchanged, masked)
    overall, worst = mask_agreement(unchanged_masks(base, two), unchanged_masks(base, one))
    assert overall >= 0.99999 and worst >= 0.999, (overall, worst)
