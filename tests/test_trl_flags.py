"""What ``trl sft`` / ``trl dpo`` accept works with GMT, or is refused in one line before any model loads:
LoRA/PEFT (a real SmolLM2 run, its adapter scored by ``gmt-align eval``), evaluation during training,
TRL's dataset mixtures, and QLoRA / Liger / bf16 / peft where this machine cannot run them."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import messages, recipe_writer, run, validate, write_jsonl
from safetensors.torch import load_file

from gmt_align.cli import main
from gmt_align.training.machine import installed
from gmt_align.core.selection import keep_count
from gmt_align.cli.data import load_datasets
from gmt_align.cli.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "trl-options.md"
FAST = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_length", "64",
        "--per_device_eval_batch_size", "2"]
BF16_GPU = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
CUDA_AND_BNB = torch.cuda.is_available() and installed("bitsandbytes")


@pytest.fixture
def recipe(tmp_path):
    return recipe_writer(tmp_path)


def doc_command(prefix):
    """A command of docs/trl-options.md, continuation lines joined, as argv."""
    text = DOC.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return shlex.split(line)


# ----------------------------------------------------------------------------- LoRA on SmolLM2


@pytest.fixture(scope="module")
def lora_run(smollm2_dir, tmp_path_factory):
    """The documented LoRA command (2 steps, LoRA on q/v, eval on 2 held-out rows) with small batches."""
    from gmt_align.quickstart import prepare_quickstart

    prepare_quickstart(ROOT / ".cache" / "quickstart")
    out = tmp_path_factory.mktemp("lora")
    argv = doc_command("gmt-align sft --config recipes/quickstart/sft.yaml --max_steps 2 --logging_steps 1")
    argv[argv.index("--output_dir") + 1] = str(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "gmt_align.cli", *argv[1:], *FAST], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_lora_trains_the_adapters_and_logs_eval_loss(lora_run):
    out, stdout = lora_run
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in name or ".lora_B." in name for name in adapter)
    assert all(torch.count_nonzero(w) > 0 for name, w in adapter.items() if "lora_B" in name)  # B left zero
    eval_losses = [float(x) for x in re.findall(r"'eval_loss': '?([0-9.]+)", stdout)]
    assert len(eval_losses) == 1 and math.isfinite(eval_losses[0]) and eval_losses[0] > 0, stdout[-2000:]


def test_lora_first_step_keeps_no_entry_of_a(lora_run):
    """Step 1: B = 0, so A's gradient is exactly zero and none of A is kept (exact zeros never are);
    the kept fraction is B's share. Step 2: 1 - ratio, as for any tensor (docs/trl-options.md)."""
    out, _ = lora_run
    ratio = yaml.safe_load((ROOT / "recipes/quickstart/sft.yaml").read_text())["gmt_mask_ratio"]
    step1, step2 = [json.loads(line) for line in (out / "gmt_stats.jsonl").read_text().splitlines()]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    # Under tensor granularity the figures are over all masked (adapter) tensors: per-kind kept
    # fractions would be 1 - ratio by construction and are not logged (docs/telemetry.md).
    sizes = {part: [w.numel() for name, w in adapter.items() if part in name] for part in ("lora_A", "lora_B")}
    first = sum(keep_count(n, ratio) for n in sizes["lora_B"]) / (sum(sizes["lora_A"]) + sum(sizes["lora_B"]))
    assert step1["gmt/kept_fraction"] == pytest.approx(first, abs=1e-3)
    assert step1["gmt/kept_fraction"] < 0.5 < 1 - ratio == pytest.approx(step2["gmt/kept_fraction"], abs=1e-3)


def test_eval_takes_the_adapter_directory(lora_run, capsys, monkeypatch, smollm2_dir):
    from transformers import AutoModelForCausalLM

    from gmt_align.evaluation.evaluate import load

    out, _ = lora_run
    argv = doc_command("gmt-align eval --model outputs/quickstart-lora")
    argv[argv.index("--model") + 1], argv[argv.index("--n") + 1] = str(out), "1"
    monkeypatch.chdir(ROOT)  # the adapter names its base model as the recipe does, relative to the repository
    assert main([*argv[1:], "--max_new_tokens", "4"]) == 0
    assert "accuracy" in capsys.readouterr().out
    merged, _ = load(out)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])  # B @ A merged in
    name = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged.state_dict()[name], base.state_dict()[name])  # no adapter there


def test_gmt_exclude_matches_peft_names_and_base_weights_are_not_masked(smollm2_dir, tmp_path):
    """PEFT names (``...q_proj.lora_B.default.weight``) are what gmt_exclude patterns see; frozen base
    weights are not GMT tensors at all."""
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gmt_align import GMTSFTConfig, GMTSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    from datasets import Dataset

    args = GMTSFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, bf16=False,
                        report_to="none", save_strategy="no", disable_tqdm=True, gmt_exclude=["lora_B"])
    trainer = GMTSFTTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list([messages(i) for i in range(4)]),
                            peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    trainer.train()
    engine = trainer.mask_hooks.engine
    names = [t.names[0] for t in engine.tensors]
    assert len(names) == 4 and all(".q_proj.lora_" in name for name in names), names
    assert [m for m in engine.maskable] == ["lora_A" in name for name in names]


# ----------------------------------------------------------------------------- evaluation and mixtures


def test_eval_split_from_a_second_file_or_held_out(recipe, tmp_path):
    second = write_jsonl(tmp_path / "eval.jsonl", [messages(i) for i in range(100, 103)])
    script, args, _ = parse_recipe("sft", ["--config", recipe(eval_strategy="steps", dataset_test_split=second)])
    train, evaluation = load_datasets(script, args, "sft")
    assert (len(train), len(evaluation)) == (10, 3)
    for split, held in (("0.25", 3), ("4", 4)):  # a fraction (rounded up) or a count of the training rows
        script, args, _ = parse_recipe("sft", ["--config", recipe(eval_strategy="steps", dataset_test_split=split)])
        train, evaluation = load_datasets(script, args, "sft")
        assert (len(train), len(evaluation)) == (10 - held, held)
        assert sorted(row["messages"][0]["content"] for row in [*train, *evaluation]) == sorted(
            f"{i}+1" for i in range(10))
        assert load_datasets(script, args, "sft")[1]["messages"] == evaluation["messages"]  # seeded: every rank
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}+1", "chosen": str(i + 1), "rejected": "0"}
                                                   for i in range(4)])
    script, args, _ = parse_recipe("dpo", ["--config", recipe(dataset_name=pairs, eval_strategy="steps",
                                                              dataset_test_split="1")])
    assert [len(split) for split in load_datasets(script, args, "dpo")] == [3, 1]


@pytest.mark.parametrize("overrides,drop,needle", [
    ({"eval_strategy": "steps"}, [], "set dataset_test_split to a second file"),
    ({"dataset_test_split": "0.1"}, [], "eval_strategy is 'no'"),
    ({"eval_strategy": "steps", "dataset_test_split": "./no-eval.jsonl"}, [], "dataset_test_split: no such file"),
    ({"datasets": [{"path": "trl-lib/tldr"}]}, [], "dataset_name and datasets are both set"),
    ({"datasets": [{"path": "trl-lib/tldr"}], "eval_strategy": "steps"}, ["dataset_name"],
     "the mixture has no 'test' split (set test_split_size"),
    ({"datasets": [{"path": "trl-lib/tldr", "fractoin": 0.5}]}, ["dataset_name"], "datasets[0]: unknown key(s) fractoin"),
])
def test_eval_and_mixture_settings_that_cannot_work(capsys, recipe, overrides, drop, needle):
    path = recipe(drop=drop, **overrides)
    status, lines = run(capsys, "sft", "--config", path)
    assert status == 2 and len(lines) == 1 and needle in lines[0], lines
    status, out = validate(capsys, path)
    assert status == 1 and len(out) == 1 and needle in out[0], out


def test_dataset_mixture_as_trl_reads_it(recipe, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [messages(i) for i in range(8)])
    b = write_jsonl(tmp_path / "b.jsonl", [{**messages(i), "extra": 1} for i in range(100, 104)])
    mixture = [{"path": a, "fraction": 0.5}, {"path": "json", "data_files": b, "columns": ["messages"],
                                                "fraction": 0.5}]
    path = recipe(drop=["dataset_name"], datasets=mixture, test_split_size=2, eval_strategy="steps")
    script, args, _ = parse_recipe("sft", ["--config", path])
    train, evaluation = load_datasets(script, args, "sft")
    assert len(train) + len(evaluation) == 8 and len(evaluation) == 2  # 4 + 4: b caps the mixture
    contents = {row["messages"][0]["content"] for row in [*train, *evaluation]}
    assert contents == {f"{i}+1" for i in [0, 1, 2, 3, 100, 101, 102, 103]}
    assert train.column_names == ["messages"]


def test_the_documented_mixture(recipe, tmp_path, smollm2_dir, monkeypatch):
    from gmt_align.quickstart import prepare_quickstart

    prepare_quickstart(ROOT / ".cache" / "quickstart")
    monkeypatch.chdir(ROOT)
    block = DOC.read_text().split("## Dataset mixtures", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    extra = write_jsonl(tmp_path / "my_extra.jsonl", [{"messages": [{"role": "user", "content": f"extra {i}"},
                                                                     {"role": "assistant", "content": "ok"}]}
                                                       for i in range(6)])
    mixture = yaml.safe_load(block.replace("my_extra.jsonl", extra))
    script, args, _ = parse_recipe("sft", ["--config", recipe(drop=["dataset_name"], eval_strategy="steps", **mixture)])
    train, evaluation = load_datasets(script, args, "sft")
    rows = [row["messages"][0]["content"] for row in [*train, *evaluation]]
    assert len(rows) == 20 and sum(r.startswith("extra ") for r in rows) == 6  # 14 + 6: 0.7 / 0.3, capped by extra
    assert len(evaluation) == 1  # test_split_size 0.05 of 20


# ----------------------------------------------------------------------------- refusals


def test_use_peft_without_peft_is_one_line(capsys, recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    status, lines = run(capsys, "sft", "--config", recipe(use_peft=True))
    assert status == 2 and len(lines) == 1 and "use_peft needs the peft package" in lines[0], lines
    status, out = validate(capsys, recipe(use_peft=True))
    assert status == 0 and out[0].startswith("OK ") and "on this machine: use_peft needs the peft" in out[1]
    assert validate(capsys, recipe(use_peft=True), "--here")[0] == 1


@pytest.mark.skipif(CUDA_AND_BNB, reason="QLoRA can run here")
@pytest.mark.parametrize("key", ["load_in_4bit", "load_in_8bit"])
def test_quantization_is_refused_without_bitsandbytes_or_cuda(capsys, recipe, key):
    status, lines = run(capsys, "sft", "--config", recipe(use_peft=True, **{key: True}))
    assert status == 2 and len(lines) == 1 and f"{key} (QLoRA) needs bitsandbytes and a CUDA GPU" in lines[0]
    status, out = validate(capsys, recipe(use_peft=True, **{key: True}), "--here")
    assert status == 1 and out == [f"{recipe(use_peft=True, **{key: True})}: on this machine: {lines[0].split(': error: ')[1]}"]


def test_quantization_without_lora_is_refused_anywhere(capsys, recipe):
    status, lines = run(capsys, "dpo", "--config", recipe(load_in_4bit=True))
    assert status == 2 and len(lines) == 1 and "load_in_4bit trains LoRA adapters" in lines[0], lines
    status, out = validate(capsys, recipe(load_in_4bit=True, load_in_8bit=True, use_peft=True))
    assert status == 1 and "load_in_4bit and load_in_8bit are both true" in out[0]


@pytest.mark.skipif(torch.cuda.is_available() and installed("liger_kernel"), reason="Liger can run here")
def test_liger_is_refused_where_it_cannot_run(capsys, recipe):
    status, lines = run(capsys, "sft", "--config", recipe(use_liger_kernel=True))
    assert status == 2 and len(lines) == 1 and "use_liger_kernel needs liger-kernel and a GPU" in lines[0], lines
    status, out = validate(capsys, recipe(use_liger_kernel=True), "--here")
    assert status == 1 and len(out) == 1 and "on this machine: use_liger_kernel needs" in out[0], out


@pytest.mark.skipif(BF16_GPU, reason="this machine has a bf16 GPU")
def test_bf16_without_a_gpu_names_the_fix(capsys, recipe):
    path = recipe(drop=["bf16"])  # TRL's default: bf16 true
    status, lines = run(capsys, "sft", "--config", path)
    assert status == 2 and lines == ["gmt-align sft: error: bf16 is true (TRL's default when the recipe does not set "
                                     "it), but this machine has no GPU with bf16: set --bf16 false (bf16: false in "
                                     "the recipe) to train in fp32 here"]
    status, out = validate(capsys, path)
    assert status == 0 and out[1] == f"{path}: on this machine: {lines[0].split(': error: ')[1]}"
    assert validate(capsys, path, "--here")[0] == 1
    assert validate(capsys, path, "--here", "--bf16", "false") == (0, [f"OK {path} (sft)"])
    assert parse_recipe("sft", ["--config", path, "--use_cpu", "true"])[1].bf16  # bf16 on the CPU: asked for


@pytest.mark.process
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 can run here")
def test_fp16_on_the_cpu_is_refused_like_bf16_not_trained_in_fp32(capsys, recipe):
    """accelerate turns fp16 autocast and its loss scaler on only off the CPU: the run used to train
    bit-identically to fp32. Refused in one line, in a real process, before any model loads."""
    path = recipe(fp16=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "gmt_align.cli", "sft", "--config", path], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        "gmt-align sft: error: fp16 is true, but this machine has no GPU, and fp16 mixed precision does not run on "
        "the CPU (the run would silently train in fp32): set --fp16 false (fp16: false in the recipe)"]
    status, lines = run(capsys, "sft", "--config", path, "--use_cpu", "true")
    assert status == 2 and len(lines) == 1 and "fp16 is true, but use_cpu is true" in lines[0], lines
    status, out = validate(capsys, path)  # a recipe for GPU nodes, checked here: a note
    assert status == 0 and out[1].startswith(f"{path}: on this machine: fp16 is true, but this machine has no GPU")
    assert validate(capsys, path, "--here")[0] == 1
    assert validate(capsys, path, "--here", "--fp16", "false") == (0, [f"OK {path} (sft)"])
