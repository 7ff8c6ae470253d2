"""End to end on the real SmolLM2-135M-Instruct, through the command users run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gmt_align.quickstart import prepare_quickstart
from gmt_align.selection import keep_count

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart(smollm2_dir):
    return prepare_quickstart(ROOT / ".cache" / "quickstart")


def run_cli(method, output_dir, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "gmt_align.cli", method, "--config", f"recipes/quickstart/{method}.yaml",
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--disable_tqdm", "false", *overrides,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def saved_weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_quickstart_recipe_trains_and_saves_a_loadable_model(quickstart, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli(method, tmp_path / method)
    assert result.stdout.count("'gmt/kept_fraction'") == 2  # one per logging step
    model = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    AutoTokenizer.from_pretrained(tmp_path / method)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    base, tuned = saved_weights(quickstart["model"]), saved_weights(tmp_path / method)
    assert any(not torch.equal(base[name], tuned[name]) for name in base)


def test_update_mode_on_the_real_model_keeps_exactly_the_masked_fraction(quickstart, tmp_path):
    ratio = 0.3
    run_cli("sft", tmp_path, "--max_steps", "1", "--gmt_mode", "update", "--gmt_mask_ratio", str(ratio),
            "--weight_decay", "0.1", "--learning_rate", "1e-4")
    base, tuned = saved_weights(quickstart["model"]), saved_weights(tmp_path)
    exact = 0
    for name, before in base.items():
        unchanged = int((tuned[name] == before).sum())
        masked = before.numel() - keep_count(before.numel(), ratio)
        # Equality breaks only where several |g| tie at the threshold (all kept: fewer unchanged) or a
        # kept entry's update is too small to change its value (more unchanged): a handful at most.
        assert abs(unchanged - masked) <= max(2, before.numel() // 100_000), (name, unchanged, masked)
        exact += unchanged == masked
    assert exact >= 0.9 * len(base), f"{exact} of {len(base)} tensors"
