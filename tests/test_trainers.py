"""GMTSFTTrainer / GMTDPOTrainer on a tiny random Llama (with SmolLM2's real tokenizer)."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from gmt_align import GMTDPOConfig, GMTDPOTrainer, GMTSFTConfig, GMTSFTTrainer
from gmt_align.core.engine import MaskEngine
from gmt_align.core.selection import keep_count

COMMON = dict(
    bf16=False,
    report_to="none",
    save_strategy="no",
    gradient_checkpointing=False,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    max_length=96,
    seed=0,
    disable_tqdm=True,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def sft_data(n=16):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                      {"role": "assistant", "content": str(2 * i + 1)}]}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def dpo_data(n=16):
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
         "chosen": [{"role": "assistant", "content": str(2 * i + 1)}],
         "rejected": [{"role": "assistant", "content": str(2 * i + 2)}]}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ratio_zero_is_vanilla_bit_for_bit(tokenizer, tmp_path):
    kwargs = dict(COMMON, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    vanilla = tiny_llama(tokenizer)
    SFTTrainer(model=vanilla, args=SFTConfig(output_dir=str(tmp_path / "a"), **kwargs),
               train_dataset=sft_data(), processing_class=tokenizer).train()
    gmt = tiny_llama(tokenizer)
    GMTSFTTrainer(model=gmt, args=GMTSFTConfig(output_dir=str(tmp_path / "b"), gmt_mask_ratio=0.0, **kwargs),
                  train_dataset=sft_data(), processing_class=tokenizer).train()
    for (name, p), q in zip(vanilla.named_parameters(), gmt.parameters()):
        assert torch.equal(p, q), name


def test_masks_once_per_optimizer_step_on_the_accumulated_gradient(tokenizer, tmp_path, monkeypatch):
    calls = []
    original = MaskEngine.apply

    def spy(self, fragments, step, *args, **kwargs):
        calls.append(step)
        return original(self, fragments, step, *args, **kwargs)

    monkeypatch.setattr(MaskEngine, "apply", spy)
    args = GMTSFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1,
                        gradient_accumulation_steps=4, gmt_mask_ratio=0.3, **COMMON)
    GMTSFTTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=sft_data(),
                  processing_class=tokenizer).train()
    assert calls == [0, 1]  # 8 micro-batches, 2 optimizer steps, 2 masks


@pytest.mark.parametrize("trainer_class,config_class,data", [
    (GMTSFTTrainer, GMTSFTConfig, sft_data), (GMTDPOTrainer, GMTDPOConfig, dpo_data),
])
def test_update_mode_unchanged_fraction_equals_the_ratio(tokenizer, tmp_path, trainer_class, config_class, data):
    ratio = 0.3
    model = tiny_llama(tokenizer)
    before = weights(model)
    args = config_class(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, gmt_mask_ratio=ratio, gmt_mode="update",
                        weight_decay=0.1, logging_steps=1, **COMMON)
    extra = {"ref_model": tiny_llama(tokenizer)} if trainer_class is GMTDPOTrainer else {}
    trainer = trainer_class(model=model, args=args, train_dataset=data(), processing_class=tokenizer, **extra)
    trainer.train()
    dense = 0
    for name, p in model.named_parameters():
        unchanged = int((p.detach() == before[name]).sum())
        masked = p.numel() - keep_count(p.numel(), ratio)
        assert unchanged >= masked, name  # exact zeros (unused embedding rows) stay masked too
        if "proj" in name:  # dense gradients: no zeros, no ties, every kept entry moves
            assert unchanged == masked, name
            dense += 1
    assert dense == 14
    logged = [entry for entry in trainer.state.log_history if "gmt/kept_fraction" in entry]
    sizes = [p.numel() for p in model.parameters()]
    most = sum(keep_count(n, ratio) for n in sizes) / sum(sizes)
    assert len(logged) == 1 and 0.5 < logged[0]["gmt/kept_fraction"] <= most


def test_random_selection_trains_and_is_reproducible(tokenizer, tmp_path):
    def run(seed):
        model = tiny_llama(tokenizer)
        args = GMTSFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                            gmt_mask_ratio=0.5, gmt_selection="random", gmt_mode="update", gmt_seed=seed, **COMMON)
        GMTSFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tokenizer).train()
        return weights(model)

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_trainer_refuses_a_plain_trl_config(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="GMTSFTConfig"):
        GMTSFTTrainer(model=tiny_llama(tokenizer), args=SFTConfig(output_dir=str(tmp_path), bf16=False),
                      train_dataset=sft_data(), processing_class=tokenizer)
    with pytest.raises(TypeError, match="GMTDPOConfig"):
        GMTDPOTrainer(tiny_llama(tokenizer), None, SFTConfig(output_dir=str(tmp_path), bf16=False))


def test_gmt_fields_are_saved_with_the_training_args(tokenizer, tmp_path):
    args = GMTSFTConfig(output_dir=str(tmp_path), gmt_mask_ratio=0.4, gmt_exclude=["norm"], **COMMON)
    saved = json.loads(args.to_json_string())
    assert saved["gmt_mask_ratio"] == 0.4 and saved["gmt_exclude"] == ["norm"]
