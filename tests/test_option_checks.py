"""TRL options that would fail only once the model has loaded (a traceback, minutes in) are refused in one
line before anything loads (gmt_align/cli/option_checks.py): the four a TRL user reported, each run as they
ran it (a real ``gmt-align sft`` process on the quickstart recipe), and the others found by trying more."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmt_align.cli import main
from gmt_align.cli.option_checks import RENAMED
from gmt_align.cli.recipe import fields
from gmt_align.training.machine import installed

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / ".cache" / "quickstart" / "tiny-SmolLM2")


@pytest.fixture(scope="module")
def quickstart(tiny_model):
    from gmt_align.quickstart import prepare_quickstart

    prepare_quickstart(ROOT / ".cache" / "quickstart")
    return ["--config", "recipes/quickstart/sft.yaml", *tiny_model, "--max_steps", "1"]


REPORTED = {
    "--assistant_only_loss true": "assistant_only_loss needs {% generation %} markers in the chat template, and the "
    f"chat template of {TINY} has none (nor is it one TRL can patch): set chat_template_path to a .jinja template "
    "with them, or drop assistant_only_loss",
    "--push_to_hub true": "push_to_hub needs the Hugging Face Hub, and HF_HUB_OFFLINE is set: drop push_to_hub (push "
    "the saved output_dir later), or unset HF_HUB_OFFLINE",
    "--fsdp full_shard": "fsdp shards the model across processes, and this is one process: launch several "
    "(--accelerate_config fsdp2 --num_processes N), or drop fsdp",
    "--torch_dtype float32": "unknown key 'torch_dtype' (TRL and transformers renamed it 'dtype')",
}


@pytest.mark.process
def test_the_reported_options_are_one_line_from_a_real_process(quickstart, tmp_path):
    """``gmt-align sft --config recipes/quickstart/sft.yaml ... OPTION`` as the user ran each, all at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = {option: subprocess.Popen(
        [sys.executable, "-m", "gmt_align.cli", "sft", *quickstart, "--output_dir", str(tmp_path / str(i)),
         *option.split()], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, option in enumerate(REPORTED)}
    for option, process in runs.items():
        _, err = process.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line
                 and "warnings.warn" not in line and not line.startswith("[transformers]")]
        assert process.returncode == 2 and lines == [f"gmt-align sft: error: {REPORTED[option]}"], (option, err)
    assert not any((tmp_path / str(i)).exists() for i in range(len(REPORTED)))  # nothing written: nothing ran


def errors(capsys, argv):
    status = main(argv)
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if "error" in line], "Loading weights" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs some of these")
@pytest.mark.parametrize("option,absent,needle", [
    ("--report_to tensorboard", "tensorboard", "report_to tensorboard needs the tensorboard package, which is not installed"),
    ("--optim adamw_bnb_8bit", "bitsandbytes", "optim adamw_bnb_8bit needs the bitsandbytes package, which is not installed"),
    ("--optim galore_adamw", "galore_torch", "optim galore_adamw needs the galore-torch package"),
    ("--attn_implementation flash_attention_2", "flash_attn", "attn_implementation flash_attention_2 needs the "
                                                              "flash-attn package and a CUDA GPU"),
    ("--activation_offloading true", None, "activation_offloading moves activations from the GPU to the CPU, and this "
                                           "machine has no GPU"),
    ("--padding_free true", None, "padding_free without packing does not enforce max_length, which TRL refuses"),
    ("--use_peft true --lora_target_modules nope q_proj", None, "lora_target_modules nope: no module of the model is "
     "named so (its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"),
    ("--eval_on_start true", None, "eval_on_start evaluates before the first step, but eval_strategy is 'no'"),
    ("--max_seq_length 64", None, "unknown key 'max_seq_length' (TRL and transformers renamed it 'max_length')"),
])
def test_more_options_that_failed_after_loading_are_one_line(capsys, quickstart, tmp_path, option, absent, needle):
    if absent and installed(absent):
        pytest.skip(f"{absent} is installed here")
    status, lines, loaded = errors(capsys, ["sft", *quickstart, "--output_dir", str(tmp_path / "out"), *option.split()])
    assert status == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not loaded and not (tmp_path / "out").exists()


def test_a_template_with_generation_markers_passes(capsys, quickstart, tmp_path):
    """The check refuses only what TRL would refuse: a .jinja template with {% generation %} gets past it."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                        "<|im_end|>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    from gmt_align.cli.recipe import parse_recipe

    _, args, _ = parse_recipe("sft", [*quickstart, "--output_dir", str(tmp_path / "out"), "--assistant_only_loss",
                                      "true", "--chat_template_path", str(template)])
    assert args.assistant_only_loss


def test_validate_reports_them_too(capsys, quickstart):
    status = main(["validate", "recipes/quickstart/sft.yaml", "--model_name_or_path", TINY, "--assistant_only_loss",
                   "true", "--push_to_hub", "true"])
    out = capsys.readouterr().out.splitlines()
    assert status == 1 and out[0].startswith("recipes/quickstart/sft.yaml: assistant_only_loss needs {% generation %}")
    assert out[1].startswith("recipes/quickstart/sft.yaml: on this machine: push_to_hub needs the Hugging Face Hub")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_renamed_keys_are_gone_and_their_new_names_are_fields(method):
    assert {old for old in RENAMED if old in fields(method)} == set()
    assert {new for new in RENAMED.values() if new not in fields(method)} == set()
