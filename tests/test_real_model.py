"""End to end on the real SmolLM2-135M-Instruct, through the command users run."""

import pytest
import torch

from gmt_align.quickstart import prepare_quickstart
from multirank.launch import ROOT
from quickstart_runs import assert_unchanged_fraction_is_the_ratio, run_recipe, saved_weights


@pytest.fixture(scope="module")
def quickstart(smollm2_dir):
    return prepare_quickstart(ROOT / ".cache" / "quickstart")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_quickstart_recipe_trains_and_saves_a_loadable_model(quickstart, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stdout = run_recipe(method, tmp_path / method)
    assert stdout.count("'gmt/kept_fraction'") == 2  # one per logging step
    model = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    AutoTokenizer.from_pretrained(tmp_path / method)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    base, tuned = saved_weights(quickstart["model"]), saved_weights(tmp_path / method)
    assert any(not torch.equal(base[name], tuned[name]) for name in base)


def test_update_mode_on_the_real_model_keeps_exactly_the_masked_fraction(quickstart, tmp_path):
    run_recipe("sft", tmp_path, "--max_steps", "1", "--gmt_mode", "update", "--gmt_mask_ratio", "0.3",
               "--weight_decay", "0.1", "--learning_rate", "1e-4")
    assert_unchanged_fraction_is_the_ratio(saved_weights(quickstart["model"]), saved_weights(tmp_path), 0.3)
