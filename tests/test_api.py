"""The public Python API: with_gmt / gmt_config on any transformers Trainer, attach on a plain loop,
and docs/api.md's two examples, run as written."""

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmt_align
from gmt_align.core.selection import keep_count

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
KTO_EXAMPLE, LOOP_EXAMPLE = EXAMPLES


def test_the_loop_example_masks_as_it_says():
    """docs/api.md's plain PyTorch loop, as written: each step keeps ceil(0.1 n) entries of every
    tensor (mask ratio 0.9) and, in update mode, changes no other weight; detach() ends it."""
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(LOOP_EXAMPLE, "docs/api.md", "exec"), namespace)
    model, optimizer, x = namespace["model"], namespace["optimizer"], namespace["x"]
    expected = {name: (keep_count(p.numel(), 0.9), p.numel()) for name, p in model.named_parameters()}
    lines = printed.getvalue().splitlines()
    assert len(lines) == 3 and all(line.endswith(str(expected)) for line in lines), lines
    losses = [float(line.split()[1]) for line in lines]
    assert losses[2] < losses[1] < losses[0]

    def one_step(hooks=None):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer.zero_grad()
        (model(x) - x.sum(1, keepdim=True)).pow(2).mean().backward()
        optimizer.step()
        return {name: int((p != before[name]).sum()) for name, p in model.named_parameters()}

    hooks = gmt_align.attach(optimizer, model, gmt_align.MaskOptions(mask_ratio=0.9, mode="update"), lambda: 3)
    changed = one_step()
    assert all(changed[name] <= kept for name, (kept, _) in expected.items()), changed  # the rest unchanged
    assert hooks.kept() == expected
    hooks.detach()
    changed = one_step()
    assert changed["0.weight"] > expected["0.weight"][0]  # detached: AdamW moves every entry again


def test_with_gmt_on_a_plain_transformers_trainer(tmp_path):
    """GMT on transformers' own Trainer and TrainingArguments: one update-mode step leaves exactly the
    masked fraction of every tensor unchanged, and kept() says what was kept."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    GMTTrainer = gmt_align.with_gmt(Trainer)  # noqa: N806
    args = gmt_align.gmt_config(TrainingArguments)(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        gmt_mask_ratio=0.5, gmt_mode="update", report_to="none", save_strategy="no", use_cpu=True)
    trainer = GMTTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    kept = trainer.mask_hooks.kept()
    for name, p in model.named_parameters():
        n = p.numel()
        assert kept[name] == (keep_count(n, 0.5), n), name
        unchanged = int((p.detach() == before[name]).sum())
        assert n - keep_count(n, 0.5) <= unchanged <= n - keep_count(n, 0.5) + max(2, n // 1000), name
    assert type(trainer).__name__ == "GMTTrainer" and isinstance(trainer, gmt_align.GMTTrainerMixin)


def test_with_gmt_and_gmt_config_refuse_what_they_cannot_extend():
    from trl import SFTTrainer

    assert gmt_align.with_gmt(gmt_align.GMTSFTTrainer) is gmt_align.GMTSFTTrainer  # GMT once, not twice
    assert issubclass(gmt_align.GMTSFTTrainer, SFTTrainer) and gmt_align.GMTSFTTrainer.__name__ == "GMTSFTTrainer"
    with pytest.raises(TypeError, match="transformers.Trainer subclass"):
        gmt_align.with_gmt(torch.optim.AdamW)
    with pytest.raises(TypeError, match="TrainingArguments dataclass"):
        gmt_align.gmt_config(dict)


def test_a_trainer_with_gmt_needs_the_gmt_fields(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(TypeError, match=r"needs args with the gmt_\* fields .* got TrainingArguments"):
        gmt_align.with_gmt(Trainer)(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_the_kto_example_runs_as_written(smollm2_dir, tmp_path):
    """docs/api.md's KTO lines, as written, from a folder that holds the repository's .cache: two GMT
    steps of TRL's KTOTrainer on the quickstart model keep half the embedding's entries."""
    (tmp_path / ".cache").symlink_to(ROOT / ".cache")
    result = subprocess.run([sys.executable, "-c", KTO_EXAMPLE], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    n = 49152 * 576
    assert result.stdout.strip().splitlines()[-1] == str((keep_count(n, 0.5), n))
    assert (tmp_path / "outputs" / "kto-gmt").is_dir()
