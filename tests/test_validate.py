"""``gmt-align validate``: every shipped recipe and DeepSpeed config passes; broken ones are reported
whole (every problem, one line each), without loading a model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmt_align.cli import main
from gmt_align.quickstart import prepare_quickstart
from gmt_align.cli.validate import infer_method, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(ROOT) for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate_configs" not in p.parts)
DS_CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "ds_configs").glob("*.json"))
UNLOADABLE = "gmt-align-tests/no-such-model"  # a hub id: taken on trust, never loaded


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    """Recipes name paths relative to the repository root, where users launch from."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def quickstart(smollm2_dir):
    return prepare_quickstart(ROOT / ".cache" / "quickstart")


@pytest.fixture
def write(tmp_path):
    """A recipe (good unless told otherwise) and, optionally, a DeepSpeed JSON next to it."""

    def write(recipe_overrides=None, ds=None, drop=(), name="sft.yaml"):
        data = tmp_path / "train.jsonl"
        data.write_text('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n')
        fields = {"model_name_or_path": UNLOADABLE, "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
                  "bf16": False, "report_to": "none", **(recipe_overrides or {})}
        for key in drop:
            fields.pop(key)
        recipe = tmp_path / name
        recipe.write_text(yaml.safe_dump(fields))
        if ds is None:
            return str(recipe), None
        config = tmp_path / "ds.json"
        config.write_text(json.dumps(ds) if isinstance(ds, dict) else ds)
        return str(recipe), str(config)

    return write


def ds(**zero):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, **zero}}


# ----------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_every_shipped_recipe_validates(quickstart, recipe):
    report = validate_recipe(recipe)
    assert report.problems == []
    named = [method for method in ("dpo", "grpo") if method in recipe.parts[1:] or recipe.stem == method]
    assert report.method == (named[0] if named else "sft")


@pytest.mark.parametrize("config", DS_CONFIGS, ids=str)
@pytest.mark.parametrize("recipe", ["recipes/quickstart/sft.yaml", "recipes/quickstart/dpo.yaml",
                                    "recipes/general/llama-2-7b/gmt.yaml"])
def test_every_shipped_deepspeed_config_validates(quickstart, recipe, config):
    assert validate_recipe(recipe, deepspeed=str(config)).problems == []


# ----------------------------------------------------------------------------- broken recipes


def problems_of(recipe, config=None, method=None):
    report = validate_recipe(recipe, deepspeed=config, method=method)
    return report.problems


def test_every_recipe_problem_is_reported_at_once(write, tmp_path):
    recipe, _ = write({
        "gmt_mask_ration": 0.3, "gmt_mask_ratio": 1.0, "gmt_granularity": "layer", "gmt_mode": "weights",
        "gmt_selection": "topk", "gmt_exclude": ["(unclosed"], "gmt_seed": "abc", "beta": 0.1,
        "model_name_or_path": "./no-model-dir", "dataset_name": str(tmp_path / "gone.jsonl"),
        "chat_template_path": "./no-template.jinja", "resume_from_checkpoint": str(tmp_path / "checkpoint-9"),
        "dataset_prompt_column": "instruction", "bf16": True, "fp16": True, "env": ["A=1"],
    })
    problems = problems_of(recipe, method="sft")
    expected = [
        "env must be a mapping", "unknown key 'gmt_mask_ration' (did you mean 'gmt_mask_ratio'?)",
        "beta is a DPO field", "gmt_mask_ratio must be", "gmt_granularity must be", "gmt_mode must be",
        "gmt_selection must be", "gmt_exclude has an invalid regex", "gmt_seed must be",
        "bf16 and fp16 are both true", "dataset_name: no such file",
        "dataset_prompt_column and dataset_completion_column go together", "model_name_or_path: no such directory ./no-model-dir",
        "chat_template_path: no such file ./no-template.jinja", "resume_from_checkpoint: no such checkpoint",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    assert all(line.startswith(f"{recipe}: ") for line in problems)
    for needle in expected:
        assert sum(needle in line for line in problems) == 1, (needle, problems)


@pytest.mark.parametrize("content,needle", [
    ("model_name_or_path: [unclosed", "not valid YAML"),
    ("- a\n- list\n", "must be a YAML mapping"),
])
def test_unreadable_recipes(tmp_path, content, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    assert [needle in line for line in problems_of(recipe)] == [True]
    assert problems_of(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_a_value_trl_rejects_is_reported_with_the_rest(write):
    recipe, _ = write({"learning_rate": "fast", "model_name_or_path": "./no-model-dir"})
    problems = problems_of(recipe)
    assert len(problems) == 2
    assert any("model_name_or_path" in p for p in problems) and any("learning_rate" in p for p in problems)


# ----------------------------------------------------------------------------- broken DeepSpeed configs


@pytest.mark.parametrize("config,overrides,needles", [
    (ds(round_robin_gradients=True), {}, ["round_robin_gradients"]),
    (ds(stage=3, stage3_gather_16bit_weights_on_model_save=True, zenflow={"topk_ratio": 0.1}), {}, ["ZenFlow"]),
    (ds(offload_optimizer={"device": "nvme", "nvme_path": "/tmp"}, ), {}, ["NVMe"]),
    ({**ds(), "optimizer": {"type": "Muon", "params": {}}}, {}, ["Muon"]),
    (ds(stage3_gather_16bit_weights_on_model_sav=True), {}, ["zero_optimization.stage3_gather_16bit_weights_on_model_sav: unknown key"]),
    (ds(stage=7), {}, ["zero_optimization.stage:"]),
    (ds(stage=3), {}, ["ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save"]),
    (ds(offload_optimizer={"device": "cpu"}), {}, ["zero_force_ds_cpu_optimizer"]),
    (ds(offload_param={"device": "cpu"}), {}, ["offload_param has no effect at ZeRO stage 2"]),
    ({**ds(), "gradient_accumulation_steps": 8}, {"gradient_accumulation_steps": 2},
     ["gradient_accumulation_steps=8 contradicts the recipe's gradient_accumulation_steps=2"]),
    ({**ds(), "bf16": {"enabled": True}}, {}, ["bf16.enabled=True contradicts the recipe's bf16"]),
    ({**ds(), "fp16": {"enabled": True}, "bf16": {"enabled": True}}, {},
     ["fp16.enabled=True contradicts", "bf16.enabled=True contradicts", "fp16 and bf16 are both enabled"]),
    ({**ds(), "train_batch_size": 10}, {"per_device_train_batch_size": 4}, ["train_batch_size=10 is not a multiple"]),
    ({**ds(stage=0), "fp16": {"enabled": True}}, {"fp16": True}, ["fp16 without ZeRO"]),
    ({**ds(), "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, {"optim": "adamw_torch"},
     ["optimizer block replaces the recipe's optim"]),
    (ds(), {"optim": "adafactor"}, ["optim adafactor builds Adafactor, which ZeRO refuses"]),
])
def test_deepspeed_problems(write, config, overrides, needles):
    recipe, ds_path = write(overrides, ds=config)
    problems = problems_of(recipe, ds_path)
    assert len(problems) == len(needles), "\n".join(problems)
    for needle, line in zip(needles, problems):
        assert line.startswith(f"{ds_path}: ") and needle in line, (needle, line)


def test_deepspeed_from_the_recipe_and_from_the_command_line(write, tmp_path):
    recipe, ds_path = write({"deepspeed": "./no-such.json"}, ds=ds(stage=3))
    assert problems_of(recipe) == [f"{recipe}: deepspeed: no such file ./no-such.json"]
    assert "ZeRO-3 without" in problems_of(recipe, ds_path)[0]  # --deepspeed wins over the recipe's
    recipe, ds_path = write(ds='{\n  "zero_optimization": {"stage": 2,}\n}\n')
    assert problems_of(recipe, ds_path) == [
        f"{recipe}: deepspeed: {ds_path} line 2 column 36: not valid JSON (Expecting property name enclosed in double "
        "quotes)"]


def test_recipe_and_deepspeed_problems_together(write):
    recipe, ds_path = write({"gmt_mode": "sideways", "dataset_name": "./gone.jsonl"}, ds=ds(stage=3, round_robin_gradients=True))
    problems = problems_of(recipe, ds_path)
    assert [p.split(": ", 1)[0] for p in problems] == [recipe, recipe, ds_path, ds_path]


# ----------------------------------------------------------------------------- method and command line


def test_method_comes_from_the_keys_then_the_path():
    assert infer_method({"beta": 0.1}) == "dpo"
    assert infer_method({"packing": True}, "recipes/dpo/x.yaml") == "sft"
    assert infer_method({"learning_rate": 1e-5}, "recipes/dpo/x.yaml") == "dpo"
    assert infer_method({"learning_rate": 1e-5}, "recipes/x.yaml") == "sft"


def run_main(capsys, *argv):
    status = main(["validate", *argv])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def test_exit_status_and_output(capsys, write, quickstart):
    status, out, _ = run_main(capsys, "recipes/quickstart/sft.yaml", "--deepspeed", "ds_configs/zero3.json")
    assert (status, out) == (0, ["OK recipes/quickstart/sft.yaml (sft, ds_configs/zero3.json: ZeRO-3)"])
    recipe, _ = write({"gmt_mode": "sideways", "gmt_granularity": "layer"})
    status, out, _ = run_main(capsys, "recipes/quickstart/dpo.yaml", recipe)
    assert status == 1 and out[0] == "OK recipes/quickstart/dpo.yaml (dpo)" and len(out) == 3
    assert run_main(capsys)[0] == 2
    assert run_main(capsys, recipe, "--method", "ppo")[0] == 2


def test_command_line_overrides_are_read_as_the_training_command_reads_them(capsys, write):
    recipe, _ = write({"gmt_mode": "sideways"})
    status, out, _ = run_main(capsys, recipe, "--gmt_mode", "update", "--gmt_mask_ratio=0.3", "--bf16", "false")
    assert status == 0 and out[0].startswith("OK")
    status, out, _ = run_main(capsys, recipe, "--gmt_mode", "update", "--gmt_mask_ratio", "1.5", "--max_step", "3",
                              "--learning_rate", "fast", "--deepspeed", "ds_configs/zero3.json")
    assert status == 1 and len(out) == 3, out
    for needle in ("gmt_mask_ratio must be", "unknown argument --max_step", "--learning_rate: invalid value 'fast'"):
        assert sum(needle in line for line in out) == 1, (needle, out)


@pytest.mark.process
def test_real_process_loads_no_model_and_joins_no_job(write):
    """A hub id that cannot be loaded offline: validate never tries. And a launcher's variables in the
    environment (a job script, or validate run by mistake under torchrun) must not make it start a
    process group and wait for peers: before this was handled, it hung here. The variables users
    commonly set (WANDB_MODE=offline made transformers print a line on stdout) change nothing."""
    from multirank.launch import free_port

    recipe, _ = write({"gmt_mask_ratio": 2})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "gmt_align.cli", "validate", recipe, "--deepspeed",
                             "ds_configs/zero3.json"], check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines() == [f"{recipe}: gmt_mask_ratio must be a number with 0 <= ratio < 1, got 2"]
