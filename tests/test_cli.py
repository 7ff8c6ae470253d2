"""Bad input: exit status 2 and one line naming the key, before any model is loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmt_align.cli import main
from gmt_align.cli.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
# A hub id that cannot be loaded offline: if a bad recipe got as far as loading it, the error
# would be a long traceback about the hub, not the one line these tests expect.
UNLOADABLE = "gmt-align-tests/no-such-model"


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n')

    def write(method="sft", **overrides):
        fields = {
            "model_name_or_path": UNLOADABLE,
            "dataset_name": str(data),
            "output_dir": str(tmp_path / "out"),
            "bf16": False,
            "report_to": "none",
        }
        fields.update(overrides)
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(fields))
        return str(path)

    return write


def run_main(capsys, *argv):
    status = main(list(argv))
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip() and "Warning" not in line]


BAD_VALUES = [
    ("gmt_mask_ratio", 1.0),
    ("gmt_mask_ratio", -0.1),
    ("gmt_mask_ratio", True),
    ("gmt_mask_ratio", "lots"),
    ("gmt_granularity", "layer"),
    ("gmt_mode", "weights"),
    ("gmt_selection", "topk"),
    ("gmt_exclude", ["(unclosed"]),
    ("gmt_seed", "abc"),
]


@pytest.mark.parametrize("method", ["sft", "dpo"])
@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_gmt_value_in_recipe(capsys, recipe, method, key, value):
    status, lines = run_main(capsys, method, "--config", recipe(method, **{key: value}))
    assert status == 2
    assert len(lines) == 1 and key in lines[0], lines


@pytest.mark.parametrize(
    "key,value",
    [("gmt_mask_ratio", "1.5"), ("gmt_mask_ratio", "x"), ("gmt_granularity", "layer"), ("gmt_mode", "w"),
     ("gmt_selection", "topk"), ("gmt_seed", "1.5")],
)
def test_bad_gmt_value_on_command_line(capsys, recipe, key, value):
    status, lines = run_main(capsys, "sft", "--config", recipe(), f"--{key}", value)
    assert status == 2
    assert len(lines) == 1 and key in lines[0], lines


def test_unknown_recipe_key_is_named(capsys, recipe):
    status, lines = run_main(capsys, "sft", "--config", recipe(gmt_mask_ration=0.3))
    assert status == 2
    assert lines == ["gmt-align sft: error: unknown key 'gmt_mask_ration' (did you mean 'gmt_mask_ratio'?)"]


def test_unknown_command_line_flag_is_named(capsys, recipe):
    status, lines = run_main(capsys, "sft", "--config", recipe(), "--gmt_ratio", "0.3")
    assert status == 2
    assert len(lines) == 1 and "gmt_ratio" in lines[0], lines


def test_a_shortened_flag_is_refused_not_taken_for_the_field_it_begins(capsys, recipe):
    # argparse would read --max_step as --max_steps, and --gmt_mask as --gmt_mask_ratio
    status, lines = run_main(capsys, "sft", "--config", recipe(), "--max_step", "3")
    assert status == 2
    assert lines == ["gmt-align sft: error: unknown key 'max_step' (did you mean 'max_steps'?)"]


def test_a_dpo_field_in_an_sft_command_says_so(capsys, recipe):
    status, lines = run_main(capsys, "sft", "--config", recipe(beta=0.1))
    assert status == 2
    assert lines == ["gmt-align sft: error: beta is a DPO field, not an SFT one"]


def test_a_json_optimizer_next_to_the_recipes_optim_is_refused_before_loading(capsys, recipe, tmp_path):
    # what validate reports is what the training command refuses: the JSON block would override optim
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    status, lines = run_main(capsys, "sft", "--config", recipe(optim="adamw_torch", deepspeed=str(tmp_path / "ds.json")))
    assert status == 2
    assert lines == ["gmt-align sft: error: the JSON's optimizer block replaces the recipe's optim: adamw_torch "
                     "(remove one of them)"], lines


def test_missing_files_are_named(capsys, recipe, tmp_path):
    status, lines = run_main(capsys, "sft", "--config", str(tmp_path / "nope.yaml"))
    assert status == 2 and "nope.yaml" in lines[0] and len(lines) == 1
    status, lines = run_main(capsys, "sft", "--config", recipe(dataset_name=str(tmp_path / "gone.jsonl")))
    assert status == 2 and "dataset_name" in lines[0] and len(lines) == 1
    status, lines = run_main(capsys, "sft", "--config", recipe(model_name_or_path="./no-model-dir"))
    assert status == 2 and "model_name_or_path" in lines[0] and len(lines) == 1


@pytest.mark.parametrize("zero,needle", [
    ({"stage": 2, "round_robin_gradients": True}, "round_robin_gradients"),
    ({"stage": 3, "zenflow": {"topk_ratio": 0.1}}, "ZenFlow"),
    ({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, "NVMe"),
])
def test_unmappable_deepspeed_settings_are_refused_before_loading(capsys, recipe, tmp_path, zero, needle):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": zero}))
    status, lines = run_main(capsys, "sft", "--config", recipe(), "--deepspeed", str(config))
    assert status == 2 and len(lines) == 1 and needle in lines[0], lines


def test_missing_deepspeed_config_is_named(capsys, recipe, tmp_path):
    status, lines = run_main(capsys, "sft", "--config", recipe(), "--deepspeed", str(tmp_path / "nope.json"))
    assert status == 2 and len(lines) == 1 and "nope.json" in lines[0], lines


def test_shipped_deepspeed_configs_pass_the_check(recipe):
    for config in sorted((ROOT / "ds_configs").glob("*.json")):
        _, args, _ = parse_recipe("sft", ["--config", recipe(), "--deepspeed", str(config), "--use_cpu", "true"])
        assert args.deepspeed == str(config)


def test_unknown_command(capsys):
    status, lines = run_main(capsys, "ppo")
    assert status == 2 and len(lines) == 1 and "ppo" in lines[0]


def test_command_line_overrides_recipe(recipe):
    _, args, model_args = parse_recipe(
        "sft", ["--config", recipe(gmt_mask_ratio=0.1, max_steps=7), "--gmt_mask_ratio", "0.3", "--gmt_mode", "update"]
    )
    assert (args.gmt_mask_ratio, args.gmt_mode, args.max_steps) == (0.3, "update", 7)
    assert model_args.model_name_or_path == UNLOADABLE


def test_shipped_recipes_parse():
    for method in ("sft", "dpo"):
        recipe = ROOT / "recipes" / "quickstart" / f"{method}.yaml"
        overrides = ["--model_name_or_path", UNLOADABLE, "--dataset_name", "hub/data"]  # made by make quickstart
        _, args, _ = parse_recipe(method, ["--config", str(recipe), *overrides])
        assert args.gmt_mask_ratio == yaml.safe_load(recipe.read_text())["gmt_mask_ratio"]


@pytest.mark.process
def test_real_process_exits_2_without_traceback(recipe):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gmt_align.cli", "dpo", "--config", recipe("dpo", gmt_mode="sideways")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["gmt-align dpo: error: gmt_mode must be one of gradient, update; got 'sideways'"]


def test_checking_the_deepspeed_config_leaves_zero3_on_for_model_loading(smollm2_dir, tmp_path):
    """The DeepSpeed checks build their own transformers DeepSpeed config; the run's must stay the one
    that decides ``zero.Init`` when the model loads (else ZeRO-3 would load whole models on each rank)."""
    script = (
        "import os, sys\n"
        "from gmt_align.core.distributed import single_process_environment\n"
        "os.environ.update(single_process_environment())\n"
        "from gmt_align.cli.recipe import parse_recipe\n"
        "from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled\n"
        "_, args, _ = parse_recipe('sft', sys.argv[1:])\n"
        "print('zero3', is_deepspeed_zero3_enabled(), args.hf_deepspeed_config.is_zero3())\n"
    )
    from gmt_align.quickstart import prepare_quickstart

    prepare_quickstart(ROOT / ".cache" / "quickstart")
    argv = ["--config", "recipes/quickstart/sft.yaml", "--deepspeed", "ds_configs/zero3.json",
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert "zero3 True True" in done.stdout, done.stdout + done.stderr[-3000:]


def test_a_library_without_an_internal_that_gmt_align_reads_is_refused_before_loading(capsys, recipe, monkeypatch):
    """A torch/DeepSpeed/transformers release that renamed a name some module reads (its CONTRACT):
    one line naming the module and the name, before any model loads (the model here cannot load)."""
    from gmt_align.core.contract import Contract
    from gmt_align.training import telemetry

    monkeypatch.setattr(telemetry, "CONTRACT", Contract(checked_with="torch 2.13", names=("torch:_foreach_norm_v0",)))
    status, lines = run_main(capsys, "sft", "--config", recipe())
    assert status == 2
    assert lines == ["gmt-align sft: error: gmt_align.training.telemetry reads torch:_foreach_norm_v0 (as in torch "
                     "2.13), which this installation lacks"], lines
