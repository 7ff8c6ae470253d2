"""DeepSpeed checkpoints under ZeRO-2 and ZeRO-3 on 2 ranks: a run resumed from checkpoint-1 ends bit for
bit where the uninterrupted run ends, and the final model is a plain HF model that transformers loads.

Exact is the right bar: the masks depend on the gradient and, for random selection, on the step
number, which the Trainer restores (``global_step``; GMT's telemetry also saves and restores its
coverage bits, which never touch the weights), and the Trainer restores all the rest: the DeepSpeed
engine (fp32 partitions and Adam moments, per rank), the cosine scheduler, the RNG states and the
data order (it skips the batches already seen). Both run through the README's launcher lines: ZeRO-2
``deepspeed --num_gpus 2 ...`` (the uninterrupted run is the shared zero2_reference), ZeRO-3
``accelerate launch --config_file recipes/accelerate_configs/zero3.yaml ...``, on the tiny random-weight
SmolLM2 (conftest.tiny_model): what is saved and restored is the point, not what the model knows.
"""

import json
import shutil

import pytest
import torch
from launchers import launch
from multirank.launch import ROOT
from quickstart_runs import SAVE_EACH_STEP, TWO_STEPS, same_weights, saved_weights

pytestmark = [pytest.mark.multirank, pytest.mark.launcher]

LOGGED_STEP = "'gmt/kept_fraction': '0.7'"  # one per optimizer step (logging_steps 1), over both ranks


def zero3_run(output_dir, *overrides):
    (stdout,) = launch("accelerate_zero3", output_dir, *TWO_STEPS, *overrides)
    return stdout


@pytest.fixture(scope="module")
def zero3_checkpointed(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_checkpointed")
    stdout = zero3_run(out, *SAVE_EACH_STEP, *tiny_model)
    yield out, stdout
    shutil.rmtree(out, ignore_errors=True)


def assert_checkpoint_at_step_1(run):
    checkpoint = run / "checkpoint-1"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    assert (checkpoint / "latest").read_text().strip() == "global_step1"
    shards = sorted(p.name for p in (checkpoint / "global_step1").glob("*optim_states.pt"))
    assert len(shards) == 2 and "pp_rank_0_" in shards[0] and "pp_rank_1_" in shards[1]  # one per rank
    assert not same_weights(checkpoint, run)  # step 2 changed the model: resuming must redo it


def test_zero2_resumed_run_ends_where_the_uninterrupted_run_ends(zero2_reference, tiny_model, tmp_path):
    reference, stdout = zero2_reference
    assert stdout.count(LOGGED_STEP) == 2
    assert_checkpoint_at_step_1(reference)
    resumed = tmp_path / "resumed"
    (stdout,) = launch("deepspeed", resumed, *TWO_STEPS, *tiny_model, "--resume_from_checkpoint",
                       str(reference / "checkpoint-1"))
    assert stdout.count(LOGGED_STEP) == 1  # only step 2 was trained
    assert same_weights(resumed, reference)


def test_zero3_resumed_run_ends_where_the_uninterrupted_run_ends(zero3_checkpointed, tiny_model, tmp_path):
    reference, stdout = zero3_checkpointed
    assert stdout.count(LOGGED_STEP) == 2
    assert_checkpoint_at_step_1(reference)
    resumed = tmp_path / "resumed"
    stdout = zero3_run(resumed, *tiny_model, "--resume_from_checkpoint", str(reference / "checkpoint-1"))
    assert stdout.count(LOGGED_STEP) == 1
    assert same_weights(resumed, reference)


def test_zero3_saves_a_whole_model_that_transformers_loads(zero3_checkpointed, tiny_model):
    """Under ZeRO-3 each rank holds a shard of every parameter; only with
    stage3_gather_16bit_weights_on_model_save are they gathered into a whole model at save time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = zero3_checkpointed
    zero = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_model[1])
    for directory in (run / "checkpoint-1", run):
        model = AutoModelForCausalLM.from_pretrained(directory)
        tuned, before = model.state_dict(), base.state_dict()
        assert tuned.keys() == before.keys()
        assert all(tuned[name].shape == before[name].shape for name in before)  # no empty ZeRO-3 placeholders
        saved = saved_weights(directory)
        assert all(torch.equal(tuned[name], tensor) for name, tensor in saved.items())
        assert any(not torch.equal(tuned[name], before[name]) for name in before)  # and it was trained
    tokenizer = AutoTokenizer.from_pretrained(run)
    batch = tokenizer("2 + 3 =", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
