"""TRL's RLOO, GRPO and reward trainers with GMT through with_gmt / gmt_config (docs/api.md): two steps
each on the tiny random-weight SmolLM2 (conftest.tiny_model), masking every step (KTO: test_api.py)."""

import json
from pathlib import Path

import pytest
import trl
from datasets import Dataset

from gmt_align import gmt_config, with_gmt
from gmt_align.core.selection import keep_count

pytestmark = pytest.mark.real_model  # the real model's tokenizer and data, a tiny model's weights

RATIO = 0.5
COMMON = dict(gmt_mask_ratio=RATIO, gmt_mode="update", max_steps=2, learning_rate=1e-4, bf16=False,
              report_to="none", save_strategy="no", logging_steps=1, use_cpu=True)
GMTRLOOTrainer = with_gmt(trl.RLOOTrainer)
GMTGRPOTrainer = with_gmt(trl.GRPOTrainer)
GMTRewardTrainer = with_gmt(trl.RewardTrainer)


def quickstart_pairs(n: int) -> Dataset:
    from gmt_align.quickstart import prepare_quickstart

    path = prepare_quickstart(Path(__file__).resolve().parents[1] / ".cache" / "quickstart")["dpo_train"]
    return Dataset.from_list([json.loads(line) for line in path.read_text().splitlines()[:n]])


def assert_masked_two_steps(trainer):
    """Two optimizer steps ran, both masked, and the second kept keep_count(n, ratio) entries of every
    tensor but the embedding, whose rows of tokens absent from the batch have a zero gradient (never
    kept: fewer than keep_count there)."""
    assert trainer.state.global_step == 2 and trainer.mask_hooks.engine.step == 1
    kept = trainer.mask_hooks.kept()
    named = dict(trainer.model.named_parameters())
    for name, (count, n) in kept.items():
        assert n == named[name].numel() and 0 < count <= keep_count(n, RATIO), name
        assert count == keep_count(n, RATIO) or name == "model.embed_tokens.weight", (name, count)
    logged = [entry["gmt/kept_fraction"] for entry in trainer.state.log_history if "gmt/kept_fraction" in entry]
    assert len(logged) == 2 and all(0 < value <= 1 - RATIO + 1e-3 for value in logged), logged


def longer_is_better(completions, **kwargs):
    return [float(len(str(completion))) for completion in completions]


@pytest.mark.parametrize("trainer_class, config_class", [(GMTRLOOTrainer, trl.RLOOConfig),
                                                         (GMTGRPOTrainer, trl.GRPOConfig)], ids=["rloo", "grpo"])
def test_online_trainers_with_gmt_train_two_masked_steps(tiny_model, tmp_path, trainer_class, config_class):
    """Generation with transformers on the CPU, TRL's reward_funcs; GMT masks the gradient of the loss
    accumulated over each optimizer step."""
    args = gmt_config(config_class)(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                                    max_completion_length=8, **COMMON)
    prompts = quickstart_pairs(8).select_columns(["prompt"])
    trainer = trainer_class(model=tiny_model[1], reward_funcs=longer_is_better, args=args, train_dataset=prompts)
    trainer.train()
    assert_masked_two_steps(trainer)


def test_reward_modelling_with_gmt_trains_two_masked_steps(tiny_model, tmp_path):
    args = gmt_config(trl.RewardConfig)(output_dir=str(tmp_path), per_device_train_batch_size=2, **COMMON)
    trainer = GMTRewardTrainer(model=tiny_model[1], args=args, train_dataset=quickstart_pairs(8))
    trainer.train()
    assert_masked_two_steps(trainer)
    assert "score.weight" in trainer.mask_hooks.kept()  # the new reward head is masked too
