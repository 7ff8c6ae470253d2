"""Run the quickstart recipes (1 process, or 2 ranks started directly) and read the results; the
README's launcher lines run through launchers.launch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from gmt_align.core.selection import keep_count
from multirank.launch import ROOT, run_ranks

# Two GMT steps on 2 ranks x batch 1; cosine, so that a resumed run must also restore the scheduler.
TWO_STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "1", "--lr_scheduler_type", "cosine",
             "--gmt_mask_ratio", "0.3"]
SAVE_EACH_STEP = ["--save_strategy", "steps", "--save_steps", "1"]  # DeepSpeed checkpoints: checkpoint-1, -2
# What the tests append to a quickstart line to make it a short run (--output_dir and these first).
SHORT_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
             "--logging_steps", "1", "--disable_tqdm", "false"]


TINY_DIRNAME = "tiny-SmolLM2"  # under .cache/quickstart, beside the real model


def make_tiny_model(real_model: Path, out: Path) -> Path:
    """A random-weight model of the real model's architecture (SmolLM2: Llama, tied embeddings) and its
    tokenizer and chat template, 2 layers of width 64 (3.2M parameters, almost all the embedding): for
    the tests where ranks, launchers, saves and resumes are the point, not what the model knows.
    Made once, seeded, and moved into place whole."""
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(real_model)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(real_model).save_pretrained(tmp)
        tmp.rename(out)
    except OSError:  # another session made it meanwhile
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def recipe_argv(method, output_dir, *overrides):
    """``-m gmt_align.cli METHOD --config recipes/quickstart/METHOD.yaml`` with small, fast settings."""
    return ["-m", "gmt_align.cli", method, "--config", f"recipes/quickstart/{method}.yaml",
            "--output_dir", str(output_dir), *SHORT_RUN, *overrides]


def run_recipe(method, output_dir, *overrides, deepspeed=None, ranks=1):
    """``gmt-align METHOD --config recipes/quickstart/METHOD.yaml`` with small, fast settings: one
    process, or ``ranks`` processes started directly (the launcher lines of the README run through
    launchers.launch instead)."""
    argv = recipe_argv(method, output_dir, *overrides)
    if deepspeed:
        argv += ["--deepspeed", f"ds_configs/{deepspeed}.json", "--use_cpu", "true"]
    if ranks > 1:
        results = run_ranks(argv, world=ranks)
        for rank, result in enumerate(results):
            assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
        return results[0].stdout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def same_weights(a, b):
    """Bit for bit, tensor by tensor (names included)."""
    a, b = saved_weights(a), saved_weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def saved_weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


def unchanged_masks(base, tuned):
    return {name: tuned[name] == before for name, before in base.items()}


def assert_unchanged_fraction_is_the_ratio(base, tuned, ratio):
    """In update mode, after one step each tensor keeps exactly floor(ratio*n) entries unchanged,
    up to a handful: ties at the threshold (all kept) and kept entries whose update rounds away."""
    exact = 0
    for name, unchanged in unchanged_masks(base, tuned).items():
        count, masked = int(unchanged.sum()), unchanged.numel() - keep_count(unchanged.numel(), ratio)
        assert abs(count - masked) <= max(2, unchanged.numel() // 100_000), (name, count, masked)
        exact += count == masked
    assert exact >= 0.9 * len(base), f"{exact} of {len(base)} tensors exact"


def mask_agreement(a, b):
    """Overall and worst per-tensor fraction of entries on which two runs agree about 'unchanged'."""
    same = {name: (a[name] == b[name]) for name in a}
    overall = sum(int(s.sum()) for s in same.values()) / sum(s.numel() for s in same.values())
    return overall, min(float(s.float().mean()) for s in same.values())

