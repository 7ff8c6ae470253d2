"""Mistakes and dying machines: a reused output_dir, a resume under other settings or from a checkpoint
cut short, non-finite gradients anywhere, exclude patterns that leave nothing to mask (issue 12)."""

import json
import math
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from gmt_align import GMTSFTConfig, GMTSFTTrainer
from gmt_align.cli import main as cli_main
from gmt_align.training.config import GMTSettingError
from gmt_align.training.runs import RunFolderError, complete_checkpoint, prepare_run_folder, saved_record
from gmt_align.core.selection import NonFiniteGradientError
from gmt_align.training.stats_file import read_run_id
from multirank.launch import ROOT, run_ranks
from quickstart_runs import recipe_argv
from test_trainers import COMMON, sft_data, tiny_llama


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def quickstart_files(smollm2_dir):
    """The quickstart recipe's model and data, which the command checks before anything else."""
    from gmt_align.quickstart import prepare_quickstart
    from multirank.launch import ROOT

    return prepare_quickstart(ROOT / ".cache" / "quickstart")


def config(out, **overrides):
    settings = dict(COMMON, output_dir=str(out), per_device_train_batch_size=4, max_steps=2,
                    gmt_mask_ratio=0.2, logging_steps=1)
    settings.update(overrides)
    return GMTSFTConfig(**settings)


def trainer(tokenizer, out, **overrides):
    return GMTSFTTrainer(model=tiny_llama(tokenizer), args=config(out, **overrides), train_dataset=sft_data(),
                         processing_class=tokenizer)


@pytest.fixture(scope="module")
def checkpointed(tokenizer, tmp_path_factory):
    """Two GMT steps of the tiny model with a checkpoint after each: checkpoint-1, checkpoint-2."""
    out = tmp_path_factory.mktemp("checkpointed")
    trainer(tokenizer, out, save_strategy="steps", save_steps=1).train()
    return out


def copy_run(source, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


# --- resuming ----------------------------------------------------------------------------------
def test_every_checkpoint_records_the_gmt_settings_it_was_trained_with(checkpointed):
    for step in (1, 2):
        record = saved_record(checkpointed / f"checkpoint-{step}")
        assert record["settings"]["gmt_mask_ratio"] == 0.2 and record["settings"]["gmt_mode"] == "gradient"
        assert record["settings"]["gmt_seed"] == 0 and record["world_size"] == 1
    assert complete_checkpoint(checkpointed / "checkpoint-2") is None


def test_resume_under_other_gmt_settings_is_refused_naming_each_difference(checkpointed, tmp_path):
    run = copy_run(checkpointed, tmp_path)
    args = config(run, resume_from_checkpoint=str(run / "checkpoint-2"), gmt_mask_ratio=0.5, gmt_mode="update",
                  gmt_granularity="global")
    with pytest.raises(RunFolderError) as error:
        prepare_run_folder(args, first_on_node=True)
    message = str(error.value)
    assert "\n" not in message and "--gmt_resume_changed_settings true" in message
    for change in ("gmt_mask_ratio: 0.2 -> 0.5", "gmt_granularity: 'tensor' -> 'global'",
                   "gmt_mode: 'gradient' -> 'update'"):
        assert change in message
    args.gmt_resume_changed_settings = True  # the opt-in: resumes
    assert prepare_run_folder(args, first_on_node=True) == str(run / "checkpoint-2")


def test_opted_in_resume_under_new_settings_restarts_telemetry(tokenizer, checkpointed, tmp_path):
    run = copy_run(checkpointed, tmp_path)
    resumed = trainer(tokenizer, run, max_steps=3, gmt_mask_ratio=0.5, gmt_resume_changed_settings=True,
                      save_strategy="steps", save_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert resumed._gmt_restart_telemetry  # coverage gathered under 0.2 is not carried on under 0.5
    assert any("GMT coverage starts afresh at step 2: coverage restart requested" in str(w.message) for w in caught)
    assert saved_record(run / "checkpoint-3")["settings"]["gmt_mask_ratio"] == 0.5
    assert read_run_id(run / "checkpoint-3") == read_run_id(run / "checkpoint-2")  # the same run goes on


def test_resume_true_from_the_command_line_takes_the_newest_complete_checkpoint(quickstart_files, checkpointed,
                                                                               tmp_path, capsys):
    """A kill while saving leaves checkpoint-2 with the model but no trainer_state.json."""
    from gmt_align.cli.recipe import parse_recipe

    run = copy_run(checkpointed, tmp_path)
    (run / "checkpoint-2" / "trainer_state.json").unlink()
    assert "trainer_state.json" in complete_checkpoint(run / "checkpoint-2")
    argv = ["--config", "recipes/quickstart/sft.yaml", "--output_dir", str(run), "--gmt_mask_ratio", "0.2",
            "--seed", "0", "--resume_from_checkpoint", "true"]
    with pytest.warns(UserWarning, match="passing over .*checkpoint-2: no readable trainer_state.json"):
        _, training_args, _ = parse_recipe("sft", argv)
    assert training_args.resume_from_checkpoint == str(run / "checkpoint-1")
    (run / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1, "trunc')  # cut short too
    with pytest.warns(UserWarning):
        assert cli_main(["sft", *argv]) == 2
    assert "holds no complete checkpoint (2 incomplete)" in capsys.readouterr().err


def test_resume_true_then_trains_on_from_the_complete_checkpoint(tokenizer, checkpointed, tmp_path):
    run = copy_run(checkpointed, tmp_path)
    (run / "checkpoint-2" / "trainer_state.json").unlink()
    resumed = trainer(tokenizer, run, max_steps=2)
    with pytest.warns(UserWarning, match="passing over"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed._gmt_resume == str(run / "checkpoint-1") and resumed.state.global_step == 2


def test_resume_true_without_any_checkpoint_is_one_line(quickstart_files, tmp_path, capsys):
    argv = ["sft", "--config", "recipes/quickstart/sft.yaml", "--output_dir", str(tmp_path),
            "--resume_from_checkpoint", "true"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no checkpoint-N folder" in err


# --- a reused output_dir -----------------------------------------------------------------------------
def test_a_new_run_into_a_folder_holding_another_is_refused(quickstart_files, checkpointed, tmp_path, capsys):
    run = copy_run(checkpointed, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    assert cli_main(["sft", "--config", "recipes/quickstart/sft.yaml", "--output_dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run (checkpoint-1, checkpoint-2" in err
    assert "--overwrite_output_dir true" in err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing touched


def test_overwrite_output_dir_removes_the_earlier_run_before_training(tokenizer, checkpointed, tmp_path):
    run = copy_run(checkpointed, tmp_path)
    (run / "gmt_stats.jsonl").write_text(json.dumps({"step": 1, "run": "earlier"}) + "\n")
    assert (run / "README.md").is_file()  # TRL's model card, written with each checkpoint
    with pytest.raises(RunFolderError, match="already holds a run"):
        trainer(tokenizer, run).train()  # the Python API refuses it too
    fresh = trainer(tokenizer, run, max_steps=1, overwrite_output_dir=True)
    fresh.train()  # saves nothing: whatever is left in the folder is the earlier run's
    assert not (run / "checkpoint-2").exists() and not (run / "checkpoint-1").exists()
    assert not (run / "README.md").exists()
    lines = (run / "gmt_stats.jsonl").read_text().splitlines() if (run / "gmt_stats.jsonl").exists() else []
    assert all(json.loads(line).get("run") != "earlier" for line in lines)


# --- non-finite gradients ----------------------------------------------------------------------------
def poison(model, name_part):
    """Make the gradient of the first parameter whose name holds ``name_part`` NaN at every backward."""
    name, param = next((n, p) for n, p in model.named_parameters() if name_part in n)
    param.register_hook(lambda grad: torch.full_like(grad, math.nan))
    return name, param


@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_nan_in_an_excluded_tensor_raises_and_writes_nothing(tokenizer, tmp_path, selection):
    # No clipping: a NaN norm would spread NaN to every gradient, which the selection then sees itself.
    gmt = trainer(tokenizer, tmp_path, gmt_exclude=["norm"], gmt_selection=selection, max_steps=1, max_grad_norm=0)
    name, param = poison(gmt.model, "input_layernorm")
    before = {n: p.detach().clone() for n, p in gmt.model.named_parameters()}
    with pytest.raises(NonFiniteGradientError, match=r"step 1: gradient has inf/NaN entries in") as error:
        gmt.train()
    if selection == "magnitude":  # found by the check on excluded tensors, before any selection
        assert name in str(error.value) and "proj" not in str(error.value)
    assert all(torch.equal(before[n], p) for n, p in gmt.model.named_parameters())


def test_nan_in_a_masked_tensor_under_random_selection_raises(tokenizer, tmp_path):
    gmt = trainer(tokenizer, tmp_path, gmt_selection="random", max_steps=1, max_grad_norm=0)
    poison(gmt.model, "q_proj")
    with pytest.raises(NonFiniteGradientError, match=r"entries in .*q_proj.weight"):
        gmt.train()


def test_skip_leaves_weights_and_optimizer_state_untouched_and_counts_the_step(tokenizer, tmp_path):
    gmt = trainer(tokenizer, tmp_path, gmt_exclude=["norm"], gmt_nonfinite="skip", max_steps=2, max_grad_norm=0)
    _, param = poison(gmt.model, "input_layernorm")
    before = {n: p.detach().clone() for n, p in gmt.model.named_parameters()}
    gmt.train()
    assert all(torch.equal(before[n], p) for n, p in gmt.model.named_parameters())  # both steps skipped
    assert all(not state for state in gmt.optimizer.optimizer.state.values())  # AdamW never stepped
    logged = [entry for entry in gmt.state.log_history if "gmt/skipped_steps" in entry]
    assert [entry["gmt/skipped_steps"] for entry in logged] == [1, 2]


# --- exclude patterns --------------------------------------------------------------------------------
@pytest.mark.parametrize("patterns, needle", [
    ([".*"], "excludes every trainable parameter"),
    (["embed", "layers", "norm"], "excludes every trainable parameter"),
    (["no_such_module"], "'no_such_module' matches no parameter"),
])
def test_exclude_patterns_that_mask_nothing_are_refused(tokenizer, tmp_path, patterns, needle):
    with pytest.raises(GMTSettingError, match=needle):
        trainer(tokenizer, tmp_path, gmt_exclude=patterns)


def test_exclude_everything_is_one_line_from_the_command(quickstart_files, tmp_path, capsys):
    argv = ["sft", "--config", "recipes/quickstart/sft.yaml", "--output_dir", str(tmp_path / "out"),
            "--gmt_exclude", ".*"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()  # after the model's loading bar: one line, no traceback
    assert err.splitlines()[-1].startswith("gmt-align sft: error: gmt_exclude ['.*'] excludes every trainable")
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --- a diverging run under ZeRO-2 (fp32), on 2 real ranks ---------------------------------------------
@pytest.mark.multirank
def test_a_diverging_zero2_run_stops_every_rank_with_one_line(quickstart_files, smollm2_dir, tmp_path):
    """DeepSpeed skips a step whose gradient norm is inf/NaN before GMT's hooks run ("OVERFLOW!
    Skipping step"); GMT turns that into the same error as on one process, on every rank."""
    argv = recipe_argv("sft", tmp_path, "--max_steps", "3", "--per_device_train_batch_size", "1",
                       "--learning_rate", "1e30", "--deepspeed", "ds_configs/zero2.json", "--use_cpu", "true")
    results = run_ranks(argv, world=2)
    for result in results:
        assert result.returncode == 1, result.stdout[-3000:]
        assert "error: step 2: the gradient norm is inf/NaN and DeepSpeed skipped the step" in result.stdout
        assert "Traceback" not in result.stdout
    assert not (tmp_path / "model.safetensors").exists()
    first = load_file(str(smollm2_dir / "model.safetensors"))
    assert first  # the base model is untouched by the failed run (it never saves)


# --- a diverged run: the gradient exactly zero everywhere (issue 30) ---------------------------------
DIVERGE = ["--per_device_train_batch_size", "1", "--learning_rate", "1e6"]


def test_a_diverged_run_stops_with_one_line_instead_of_saving_a_ruined_model(quickstart_files, tiny_model, tmp_path):
    """The user's run: learning_rate 1e6 leaves the loss at ln(vocabulary) and the gradient exactly
    zero in every tensor from step 2; nothing is inf/NaN. It used to exit 0 with four checkpoints."""
    from gmt_align.testing import cpu_env

    argv = recipe_argv("sft", tmp_path, *DIVERGE, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1",
                       *tiny_model)
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                            timeout=600)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 1, result.stderr[-3000:]
    assert errors == ["gmt-align sft: error: step 2: the gradient is exactly zero in every tensor (the model no longer "
                      "learns: did the run diverge? check learning_rate) (gmt_nonfinite: skip would skip such steps)"]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.multirank
@pytest.mark.parametrize("stage, rule", [("zero2", "raise"), ("zero3", "skip")])
def test_a_diverged_run_on_2_zero_ranks_follows_the_nonfinite_rule(quickstart_files, tiny_model, tmp_path, stage,
                                                                   rule):
    """ZeRO steps parameter groups apart: raise decides at the step's end, skip holds the groups and
    skips the step whole; the count is reduced over both ranks."""
    argv = recipe_argv("sft", tmp_path, *DIVERGE, "--max_steps", "3", *tiny_model, "--deepspeed",
                       f"ds_configs/{stage}.json", "--use_cpu", "true", "--gmt_nonfinite", rule)
    results = run_ranks(argv, world=2)
    for result in results:
        assert "Traceback" not in result.stdout
        if rule == "raise":
            assert result.returncode == 1, result.stdout[-3000:]
            assert "error: step 2: the gradient is exactly zero in every tensor" in result.stdout
        else:
            assert result.returncode == 0, result.stdout[-3000:]
            assert "GMT skips step 2: the gradient is exactly zero in every tensor" in result.stdout
    if rule == "skip":
        assert "'gmt/skipped_steps': 2" in results[0].stdout  # steps 2 and 3, on rank 0's console


def test_ignore_bias_buffers_is_applied_as_trl_dpo_applies_it():
    """TRL's ScriptArguments field is honoured, not accepted and dropped: boolean buffers are left out
    of DDP's synchronisation (``_ddp_params_and_buffers_to_ignore``)."""
    from gmt_align.cli.train import ignore_bool_buffers

    model = torch.nn.Linear(2, 2)
    model.register_buffer("causal_mask", torch.ones(2, 2, dtype=torch.bool))
    model.register_buffer("scale", torch.ones(2))
    assert ignore_bool_buffers(model) == ["causal_mask"]
    assert model._ddp_params_and_buffers_to_ignore == ["causal_mask"]
