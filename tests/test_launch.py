"""``gmt-align sft|dpo --accelerate_config NAME|PATH --num_processes N``, as ``trl sft`` takes them: the
command starts itself again under accelerate's own launcher with the named config shipped in the package.

The fast tests hand accelerate's parsed arguments to a stand-in for ``launch_command`` (as TRL's tests
do); the slow ones run docs/distributed.md's lines on 2 CPU ranks (ZeRO-2, ZeRO-3, FSDP2) and check
what the ranks masked. tests/test_wheel.py runs a named config from an installed wheel.
"""

import os
from pathlib import Path

import pytest
from launchers import launch
from multirank.launch import ROOT
from quickstart_runs import assert_unchanged_fraction_is_the_ratio, saved_weights

from gmt_align.cli import main
from gmt_align.cli.launch import launch as launch_command_line
from gmt_align.cli.launch import named_configs
from gmt_align.cli.recipe import fields
from gmt_align.quickstart import prepare_quickstart

PACKAGE = ROOT / "gmt_align"


def run_main(capsys, *argv):
    status = main(list(argv))
    return status, [line for line in capsys.readouterr().err.splitlines() if "error" in line]


@pytest.fixture
def recipe(tmp_path):
    from cli_helpers import recipe_writer

    return recipe_writer(tmp_path)


def launched(command, options, rest):
    """accelerate's parsed arguments for the line, from a stand-in for launch_command."""
    seen = []
    assert launch_command_line(command, options, rest, launch_command_fn=seen.append) == 0
    (args,) = seen
    return args


def test_the_named_configs_are_the_repositorys_and_ship_in_the_package():
    assert named_configs() == ["fsdp2", "multi_gpu", "zero2", "zero3"]
    assert sorted(p.name for p in (ROOT / "recipes" / "accelerate_configs").glob("*.yaml")) == \
        [f"{name}.yaml" for name in named_configs()]
    assert (PACKAGE / "ds_configs" / "zero3.json").read_text() == (ROOT / "ds_configs" / "zero3.json").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"accelerate_configs/*.yaml", "ds_configs/*.json"' in pyproject


def test_the_launch_options_are_not_recipe_keys():
    """Else a recipe field would be taken away from the trainer (and TRL hands them to accelerate too)."""
    for method in ("sft", "dpo"):
        assert not {"accelerate_config", "num_processes"} & fields(method)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_named_deepspeed_config_launches_with_its_json_from_the_package(recipe, method, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = recipe(**({"beta": 0.1} if method == "dpo" else {}))
    args = launched(method, {"accelerate_config": "zero2", "num_processes": "2"}, ["--config", path])
    assert Path(args.config_file) == PACKAGE / "accelerate_configs" / "zero2.yaml"
    assert Path(args.deepspeed_config_file) == PACKAGE / "ds_configs" / "zero2.json"
    assert args.num_processes == 2 and args.module
    assert [args.training_script, *args.training_script_args] == ["gmt_align.cli", method, "--config", path]


def test_a_config_file_is_taken_as_it_is_and_num_processes_alone_gets_ddp(recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    own = tmp_path / "mine.yaml"
    own.write_text((ROOT / "recipes" / "accelerate_configs" / "zero3.yaml").read_text())
    args = launched("sft", {"accelerate_config": str(own)}, ["--config", recipe()])
    assert Path(args.config_file) == own and args.deepspeed_config_file is None and args.num_processes is None
    # No accelerate default config (`accelerate config` not run): accelerate alone would start 1 process.
    import accelerate.commands.config as accelerate_config

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    args = launched("sft", {"num_processes": "2"}, ["--config", recipe()])
    assert Path(args.config_file) == PACKAGE / "accelerate_configs" / "multi_gpu.yaml" and args.num_processes == 2


@pytest.mark.parametrize("argv,needle", [
    (["--accelerate_config", "zero9"], "--accelerate_config: zero9 is neither a file nor a named config "
                                       "(fsdp2, multi_gpu, zero2, zero3)"),
    (["--num_processes", "two"], "--num_processes must be a whole number of processes (1 or more), got 'two'"),
    (["--num_processes", "0"], "--num_processes must be a whole number of processes (1 or more), got '0'"),
    (["--accelerate_config"], "--accelerate_config expects a value"),
    (["--accelerate_config", "zero2", "--max_step", "2"], "unknown key 'max_step' (did you mean 'max_steps'?)"),
])
def test_bad_launch_options_are_one_line_and_nothing_starts(capsys, recipe, argv, needle, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status, errors = run_main(capsys, "sft", "--config", recipe(), *argv)
    assert status == 2 and errors == [f"gmt-align sft: error: {needle}"]


def test_the_recipe_is_checked_once_before_any_process_starts(capsys, recipe, monkeypatch):
    """FSDP from the config next to the recipe's DeepSpeed JSON: refused here, as each rank would refuse it."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []
    from gmt_align.cli.common import RecipeError

    with pytest.raises(RecipeError, match="accelerate launched FSDP, but the recipe names a DeepSpeed config"):
        launch_command_line("sft", {"accelerate_config": "fsdp2"},
                            ["--config", recipe(deepspeed=str(ROOT / "ds_configs" / "zero2.json"))],
                            launch_command_fn=seen.append)
    assert seen == [] and "ACCELERATE_USE_FSDP" not in os.environ


def test_under_a_launcher_the_options_are_refused(capsys, recipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, errors = run_main(capsys, "sft", "--config", recipe(), "--num_processes", "2")
    assert status == 2
    assert errors == ["gmt-align sft: error: --num_processes start accelerate launch, and this process is already "
                      "one of 2 started by a launcher: drop them"]


def test_a_failed_rank_is_the_commands_exit_status(capsys, recipe, monkeypatch):
    import subprocess

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def failing(args):
        raise subprocess.CalledProcessError(3, ["python"])

    assert launch_command_line("sft", {"num_processes": "1"}, ["--config", recipe()], launch_command_fn=failing) == 3
    assert "a launched process failed (exit status 3); its output is above" in capsys.readouterr().err


@pytest.mark.multirank
@pytest.mark.launcher
@pytest.mark.parametrize("name", ["gmt_align_zero2", "gmt_align_zero3", "gmt_align_fsdp2"])
def test_named_accelerate_configs_train_on_two_ranks(tiny_model, tmp_path, name):
    """docs/distributed.md's lines, as written, on 2 CPU ranks: one GMT step, kept fraction reduced over both."""
    from test_fsdp2_trainer import fsdp_on_cpu

    prepare_quickstart(ROOT / ".cache" / "quickstart")
    env = fsdp_on_cpu() if name == "gmt_align_fsdp2" else {}
    (stdout,) = launch(name, tmp_path, "--max_steps", "1", "--gmt_mode", "update", "--gmt_mask_ratio", "0.3",
                       "--per_device_train_batch_size", "1", "--save_strategy", "steps", "--save_steps", "1",
                       *tiny_model, env=env)
    config = name.removeprefix("gmt_align_")
    assert f"accelerate launch --config_file {PACKAGE}/accelerate_configs/{config}.yaml" in stdout
    assert stdout.count("'gmt/kept_fraction': '0.7'") == 1, stdout[-3000:]
    checkpoint = tmp_path / "checkpoint-1"
    if config == "fsdp2":  # what the Trainer's FSDP branch writes
        assert (checkpoint / "pytorch_model_fsdp.bin").is_file()
    else:  # one ZeRO optimizer shard per rank
        assert len(list((checkpoint / "global_step1").glob("*optim_states.pt"))) == 2
    assert_unchanged_fraction_is_the_ratio(saved_weights(tiny_model[1]), saved_weights(tmp_path), 0.3)


def test_validate_checks_the_launch_options_as_the_command_does(capsys):
    recipe = "recipes/quickstart/sft.yaml"  # hub ids: the quickstart model and data need not be made
    assert main(["validate", recipe, "--model_name_or_path", "org/model", "--dataset_name", "org/data",
                 "--accelerate_config", "zero3",
                 "--num_processes", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {recipe} (sft)")
    assert main(["validate", recipe, "--accelerate_config", "zero9"]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (f"{recipe}: --accelerate_config: zero9 is neither a file nor "
                                                       "a named config (fsdp2, multi_gpu, zero2, zero3)")


def test_the_commands_help_names_the_launch_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--help"])
    assert exit_.value.code == 0
    assert "--accelerate_config NAME|PATH" in capsys.readouterr().out
