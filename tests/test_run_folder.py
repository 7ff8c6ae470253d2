"""One live run per output_dir, nothing half-saved, nothing of an old run mixed in (issue 30): the folder's
lock (real processes, a holder killed with SIGKILL), temporaries of a killed save, overwrite_output_dir,
checkpoints whose optimizer state a run cannot load, SIGTERM; then all of it on a real 2-rank ZeRO-2 run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gmt_align.testing import ROOT, cpu_env, free_port, rank_env
from gmt_align.training.run_lock import LOCK_FILE, RunInUseError, claim_run_folder, in_use, release_run_folder
from gmt_align.training.runs import (RunFolderError, clear_previous_run, newest_complete_checkpoint,
                                     optimizer_state_problem, prepare_run_folder, remove_stale_temporaries,
                                     saved_optimizer)

HOLD = textwrap.dedent("""
    import sys, time
    from types import SimpleNamespace
    from gmt_align.training.run_lock import claim_run_folder
    claim_run_folder(SimpleNamespace(output_dir=sys.argv[1], process_index=0))
    print("held", flush=True)
    time.sleep(600)
""")


def start_holder(folder):
    """A real process that takes ``folder``'s lock and keeps it until it dies."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=cpu_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def run_args(folder, **overrides):
    """The fields the run-folder checks read, as a parsed recipe has them."""
    fields = dict(output_dir=str(folder), process_index=0, resume_from_checkpoint=None, overwrite_output_dir=False,
                  gmt_resume_changed_settings=False, gmt_resume_reset_optimizer=False, deepspeed=None,
                  deepspeed_plugin=None, fsdp_plugin_args=None, seed=0, gmt_mask_ratio=0.1, gmt_granularity="tensor",
                  gmt_mode="gradient", gmt_selection="magnitude", gmt_exclude=[], gmt_seed=None)
    return SimpleNamespace(**{**fields, **overrides})


# --- the lock: real processes ------------------------------------------------------------------------------
@pytest.mark.process
def test_a_live_run_holds_its_folder_and_a_killed_one_does_not(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunInUseError) as error:
            claim_run_folder(run_args(tmp_path))
        message = str(error.value)
        assert "\n" not in message and f"output_dir {tmp_path} is in use by another run" in message
        assert f"pid {holder.pid} on host " in message
        assert in_use(tmp_path) == message  # what gmt-align validate notes
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).is_file() and in_use(tmp_path) is None
    assert claim_run_folder(run_args(tmp_path)) is True  # taken by the next run at once
    assert claim_run_folder(run_args(tmp_path)) is False  # the same process again: held already
    release_run_folder(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.process
def test_the_command_refuses_a_folder_in_use_before_loading_anything(tmp_path, capsys):
    from gmt_align.cli import main as cli_main

    from gmt_align.cli.validate import validate_recipe

    holder = start_holder(tmp_path)
    try:
        status = cli_main(["sft", "--config", "recipes/quickstart/sft.yaml", "--output_dir", str(tmp_path),
                           "--model_name_or_path", "no/such-model-is-ever-loaded"])
        report = validate_recipe("recipes/quickstart/sft.yaml", overrides={"output_dir": str(tmp_path)})
        assert any(f"on this machine: output_dir {tmp_path} is in use by another run (pid {holder.pid}" in line
                   for line in report.machine), report.machine
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith(f"gmt-align sft: error: output_dir {tmp_path} is in use by another run "
                                              f"(pid {holder.pid} on host ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing of the refused run written


# --- what a killed save leaves ------------------------------------------------------------------------------
KILLED_SAVE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    print("saving", flush=True)
    save_file({"w": torch.ones(50_000_000)}, sys.argv[1])
""")


def killed_safetensors_save(target: Path) -> Path:
    """Kill a real safetensors save into ``target`` while it writes: it leaves its temporary, ``.tmpXXXXXX``."""
    writer = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], env=cpu_env(), stdout=subprocess.PIPE)
    writer.stdout.readline()
    deadline = time.monotonic() + 120
    while not (left := [p for p in target.parent.iterdir() if p.name.startswith(".tmp")]):
        assert writer.poll() is None and time.monotonic() < deadline, "the save ended before it could be killed"
        time.sleep(0.002)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert not target.exists()
    return left[0]


@pytest.mark.process
def test_temporaries_of_a_killed_save_are_removed_in_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    temporary = killed_safetensors_save(checkpoint / "model.safetensors")
    (checkpoint / "gmt_telemetry_rank0.pt.partial").write_bytes(b"torn")
    (tmp_path / ".tmp-notes").write_text("not a safetensors temporary")  # another name: kept
    assert saved_optimizer(checkpoint) == ("none", None)  # a temporary is no state
    assert remove_stale_temporaries(str(tmp_path)) == [temporary, checkpoint / "gmt_telemetry_rank0.pt.partial"]
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "removed 2 temporary file(s) left by an interrupted save" in err
    assert str(temporary) in err
    assert sorted(p.name for p in checkpoint.iterdir()) == ["trainer_state.json"]
    assert (tmp_path / ".tmp-notes").is_file() and remove_stale_temporaries(str(tmp_path)) == []


# --- overwrite_output_dir ------------------------------------------------------------------------------------
def test_overwrite_removes_everything_the_earlier_run_wrote_and_keeps_the_rest(tmp_path, capsys):
    written = ["README.md", "config.json", "model.safetensors", "tokenizer.json", "training_args.bin",
               "gmt_stats.jsonl", "gmt_overall.png", "gmt_churn_heatmap.png", "gmt_summary.txt", "all_results.json"]
    for name in written:
        (tmp_path / name).write_text("old run")
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "runs" / "Dec07_13-00-00_vm").mkdir(parents=True)  # TensorBoard's logging_dir
    (tmp_path / "my-notes.txt").write_text("mine")
    args = run_args(tmp_path, overwrite_output_dir=True)
    with pytest.raises(RunFolderError, match="already holds a run"):
        prepare_run_folder(run_args(tmp_path), first_on_node=True)
    assert prepare_run_folder(args, first_on_node=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-notes.txt"]
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "overwrite_output_dir: removed the earlier run from" in err
    assert ", ... 12 in all); kept what it did not write: my-notes.txt" in err
    assert clear_previous_run(str(tmp_path)) == []


# --- resuming what the run cannot load ---------------------------------------------------------------------
def zero_checkpoint(folder: Path, ranks: int, weights: bool = True) -> Path:
    """The files by which a DeepSpeed ZeRO checkpoint says how it was saved (names as test_checkpoint's
    real ZeRO-2/3 checkpoints have them); the contents are not read."""
    step = folder / "global_step1"
    step.mkdir(parents=True)
    (folder / "latest").write_text("global_step1")
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    for rank in range(ranks):
        (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_a_zero_checkpoint_without_deepspeed_is_refused_naming_what_would_be_lost(tmp_path):
    checkpoint = zero_checkpoint(tmp_path / "checkpoint-1", ranks=2)
    assert saved_optimizer(checkpoint) == ("deepspeed", 2)
    problem = optimizer_state_problem(str(checkpoint), run_args(tmp_path), world_size=1)
    assert "as DeepSpeed ZeRO state on 2 processes, which a run without DeepSpeed cannot load" in problem
    assert "moments and step count and the learning-rate schedule would start afresh" in problem
    assert "--gmt_resume_reset_optimizer true" in problem and "--deepspeed on 2 processes" in problem
    assert optimizer_state_problem(str(checkpoint), run_args(tmp_path, gmt_resume_reset_optimizer=True), 1) is None
    (checkpoint / "model.safetensors").unlink()  # ZeRO-3 without gathered weights: nothing to load at all
    assert "holds its weights only as DeepSpeed ZeRO shards" in optimizer_state_problem(
        str(checkpoint), run_args(tmp_path, gmt_resume_reset_optimizer=True), 1)


def test_a_zero_checkpoint_on_another_number_of_processes_is_one_line(tmp_path):
    checkpoint = zero_checkpoint(tmp_path / "checkpoint-1", ranks=2)
    under_zero = run_args(tmp_path, deepspeed="ds_configs/zero2.json")
    assert optimizer_state_problem(str(checkpoint), under_zero, world_size=2) is None
    problem = optimizer_state_problem(str(checkpoint), under_zero, world_size=4)
    assert "partitioned over 2 processes and this run has 4; DeepSpeed cannot re-partition it" in problem
    assert f"resume on 2 processes, or start a new run from its weights (--model_name_or_path {checkpoint}" in problem
    assert optimizer_state_problem(str(checkpoint), under_zero, world_size=None) is None  # validate: not known


def test_a_checkpoint_without_deepspeed_state_under_deepspeed_or_without_any_state(tmp_path):
    plain = tmp_path / "checkpoint-1"
    plain.mkdir()
    (plain / "optimizer.pt").write_bytes(b"")
    assert saved_optimizer(plain) == ("torch", None)
    assert optimizer_state_problem(str(plain), run_args(tmp_path), 1) is None
    problem = optimizer_state_problem(str(plain), run_args(tmp_path, deepspeed="ds_configs/zero2.json"), 2)
    assert "was saved without DeepSpeed (torch)" in problem and "resume without --deepspeed" in problem
    (plain / "optimizer.pt").unlink()  # save_only_model
    assert "holds no optimizer state" in optimizer_state_problem(str(plain), run_args(tmp_path), 1)
    (plain / "optimizer.bin").write_bytes(b"")  # FSDP (accelerate's names)
    assert "was saved under FSDP" in optimizer_state_problem(str(plain), run_args(tmp_path), 1)


def test_resume_checks_run_after_the_settings_check_and_before_anything_loads(tmp_path):
    checkpoint = zero_checkpoint(tmp_path / "checkpoint-1", ranks=2)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    with pytest.raises(RunFolderError, match="--gmt_resume_reset_optimizer true"):
        prepare_run_folder(run_args(tmp_path, resume_from_checkpoint="true"), first_on_node=True, world_size=1)
    assert newest_complete_checkpoint(str(tmp_path)) == str(checkpoint)


# --- SIGTERM -------------------------------------------------------------------------------------------------
SIGTERM_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from types import SimpleNamespace
    from gmt_align.training.preemption import StopOnSigterm
    with StopOnSigterm("gmt-align sft", SimpleNamespace(output_dir=sys.argv[1])) as stop:
        stop.step = 7
        with stop.saving():
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-save: the save finishes first
            with open(sys.argv[2], "w") as file:
                file.write("whole")
        print("never reached", flush=True)
""")


@pytest.mark.process
def test_sigterm_during_a_save_lets_it_finish_then_stops_with_one_line(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    result = subprocess.run([sys.executable, "-c", SIGTERM_DURING_SAVE, str(tmp_path), str(tmp_path / "saved")],
                            env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGTERM and "never reached" not in result.stdout
    assert (tmp_path / "saved").read_text() == "whole"
    assert result.stderr.strip().splitlines()[-1] == (
        f"gmt-align sft: stopped by SIGTERM after step 7, after finishing the save in progress; last complete "
        f"checkpoint: {tmp_path}/checkpoint-5 (resume with --resume_from_checkpoint true)")


# --- all of it on a real 2-rank ZeRO-2 run ---------------------------------------------------------------
def start_ranks(argv, world=2):
    port = free_port()
    return [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=rank_env(rank, world, port), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True) for rank in range(world)]


def complete(checkpoint: Path) -> bool:
    return (checkpoint / "trainer_state.json").is_file() and (checkpoint / "gmt_run.json").is_file()


@pytest.mark.multirank
def test_a_live_zero2_run_holds_its_folder_and_stops_cleanly_on_sigterm(tiny_model, tmp_path):
    from quickstart_runs import recipe_argv

    out = tmp_path / "run"
    zero2 = ["--deepspeed", "ds_configs/zero2.json", "--use_cpu", "true", *tiny_model, "--per_device_train_batch_size",
             "1", "--save_strategy", "steps", "--save_steps", "1"]
    ranks = start_ranks(recipe_argv("sft", out, *zero2, "--max_steps", "500"))
    try:
        deadline = time.monotonic() + 600
        while not complete(out / "checkpoint-2"):
            assert all(rank.poll() is None for rank in ranks) and time.monotonic() < deadline
            time.sleep(0.2)
        # A second run into the folder, while the first lives: one line naming it, before anything loads.
        second = subprocess.run([sys.executable, *recipe_argv("sft", out, *tiny_model)], cwd=ROOT, env=cpu_env(),
                                capture_output=True, text=True, timeout=600)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"gmt-align sft: error: output_dir {out} is in use by another run (pid {ranks[0].pid} on host ")
        # The scheduler's SIGTERM, to every rank, whenever it comes (here: at once).
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        results = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)
    assert [rank.returncode for rank in ranks] == [-signal.SIGTERM] * 2
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and all(complete(checkpoint) for checkpoint in checkpoints)  # nothing half-saved
    stderr = results[0][1].strip().splitlines()
    assert stderr[-1].startswith("gmt-align sft: stopped by SIGTERM after step ") and "Traceback" not in results[0][1]
    assert stderr[-1].endswith(f"; last complete checkpoint: {checkpoints[-1]} (resume with --resume_from_checkpoint true)")
    assert "stopped by SIGTERM" not in results[1][1]  # one line, from rank 0

    # The lock went with the run. One process cannot resume ZeRO state of two: one line, not DeepSpeed's traceback.
    one = subprocess.run([sys.executable, *recipe_argv("sft", out, *zero2, "--resume_from_checkpoint", "true")],
                         cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 2 and "Traceback" not in one.stderr
    assert one.stderr.strip().splitlines()[-1] == (
        f"gmt-align sft: error: {checkpoints[-1]} holds DeepSpeed ZeRO optimizer state partitioned over 2 processes and "
        f"this run has 1; DeepSpeed cannot re-partition it: resume on 2 processes, or start a new run from its "
        f"weights (--model_name_or_path {checkpoints[-1]}; optimizer and schedule start afresh)")

    # A kill while saving leaves safetensors' temporary in the checkpoint: the resumed run removes it, in one line.
    temporary = killed_safetensors_save(checkpoints[-1] / "model.safetensors.next")
    last = int(checkpoints[-1].name.split("-")[1])
    resumed = start_ranks(recipe_argv("sft", out, *zero2, "--resume_from_checkpoint", "true", "--max_steps",
                                      str(last + 1)))
    outputs = [rank.communicate(timeout=900) for rank in resumed]
    assert [rank.returncode for rank in resumed] == [0, 0], outputs[0][1][-3000:]
    assert "removed 1 temporary file(s) left by an interrupted save" in outputs[0][1] and not temporary.exists()
    assert complete(out / f"checkpoint-{last + 1}") and (out / "model.safetensors").is_file()


@pytest.mark.multirank
def test_a_zero2_checkpoint_resumed_in_one_process_without_deepspeed(zero2_reference, tiny_model, tmp_path):
    """Refused in one line naming what would be lost; with the opt-in the run goes on, and the optimizer
    has indeed started afresh (AdamW's step count 1 at global step 2)."""
    import torch
    from quickstart_runs import TWO_STEPS, recipe_argv

    reference, _ = zero2_reference
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-1", run / "checkpoint-1")
    argv = recipe_argv("sft", run, *TWO_STEPS, *tiny_model, "--resume_from_checkpoint", "true", "--save_strategy",
                       "steps", "--save_steps", "1")
    refused = subprocess.run([sys.executable, *argv], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"gmt-align sft: error: {run / 'checkpoint-1'} holds its optimizer state as DeepSpeed ZeRO state on 2 processes, "
        "which a run without DeepSpeed cannot load: the optimizer's moments and step count and the learning-rate "
        "schedule would start afresh; resume with --deepspeed on 2 processes, or pass --gmt_resume_reset_optimizer "
        "true to accept that")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "checkpoint-1"]
    accepted = subprocess.run([sys.executable, *argv, "--gmt_resume_reset_optimizer", "true"], cwd=ROOT,
                              env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    steps = {float(state["step"]) for state in torch.load(run / "checkpoint-2" / "optimizer.pt")["state"].values()}
    assert steps == {1.0}
