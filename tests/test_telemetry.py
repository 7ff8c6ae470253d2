"""Mask telemetry: figures against a hand computation, across 'ranks', in the Trainer's logs,
gmt_stats.jsonl, W&B (offline, read back), the report, checkpoint + resume, and 2 real ranks."""

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from gmt_align import GMTSFTConfig, GMTSFTTrainer
from gmt_align.cli import main as cli
from gmt_align.engine import Fragment, MaskEngine, MaskOptions, TensorInfo
from gmt_align.quickstart import prepare_quickstart
from gmt_align.report import load_stats
from gmt_align.telemetry import MaskTelemetry, pack_bits, popcount
from multirank.launch import ROOT
from quickstart_runs import run_recipe
from test_trainers import COMMON, sft_data, tiny_llama

# --- hand computation -------------------------------------------------------------------------------
TENSORS = [
    TensorInfo(("model.embed_tokens.weight", "lm_head.weight"), 8),  # tied: kind "embed", no block
    TensorInfo(("model.layers.0.self_attn.q_proj.weight",), 8),
    TensorInfo(("model.layers.0.mlp.down_proj.weight",), 8),
    TensorInfo(("model.layers.1.self_attn.q_proj.weight",), 8),
    TensorInfo(("model.layers.1.input_layernorm.weight",), 4),
    TensorInfo(("model.norm.weight",), 4),  # excluded below: never counted
]
# Ratio 0.5 keeps 4 of 8 and 2 of 4 (|g| >= the k-th largest; ties all kept; zeros never kept).
STEP0 = [[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8], [3, 0, 0, 0, 0, 0, 0, 0], [1] * 8, [4, 3, 2, 1], [1, 2, 3, 4]]
STEP1 = [[1, 2, 3, 4, 5, 6, 7, 8], [-1, 2, -3, 4, -5, 6, -7, 8], [0, -3, 0, 0, 0, 0, 0, 0], [8, 7, 6, 5, 4, 3, 2, 1],
         [1, 2, 3, 4], [4, 3, 2, 1]]
# kept at step 0: t0 {0-3}, t1 {4-7}, t2 {0}, t3 all 8 (ties), t4 {0,1}      -> 4+4+1+8+2 = 19 of 36
# kept at step 1: t0 {4-7}, t1 {4-7}, t2 {1}, t3 {0-3}, t4 {2,3}             -> 4+4+1+4+2 = 15 of 36
# changed 0 -> 1: t0 8, t1 0, t2 2, t3 4, t4 4 = 18; covered after 1: 8+4+2+8+4 = 26
FIRST_LOG = {  # after steps 0 and 1 (2 steps: denominators are entries x 2)
    "gmt/kept_fraction": 34 / 72,
    "gmt/kept_fraction/block_00": (8 + 2) / 32, "gmt/kept_fraction/block_01": (12 + 4) / 24,
    "gmt/kept_fraction/q_proj": (8 + 12) / 32, "gmt/kept_fraction/down_proj": 2 / 16,
    "gmt/kept_fraction/embed": 8 / 16, "gmt/kept_fraction/norm": 4 / 8,
    "gmt/churn": 18 / 36, "gmt/coverage": 26 / 36,
}
SECOND_LOG = {  # after step 2 = step 1 again: nothing changes, nothing newly covered
    "gmt/kept_fraction": 15 / 36,
    "gmt/kept_fraction/block_00": 5 / 16, "gmt/kept_fraction/block_01": 6 / 12,
    "gmt/kept_fraction/q_proj": 8 / 16, "gmt/kept_fraction/down_proj": 1 / 8,
    "gmt/kept_fraction/embed": 4 / 8, "gmt/kept_fraction/norm": 2 / 4,
    "gmt/churn": 0.0, "gmt/coverage": 26 / 36,
}
# What each of two 'ranks' holds: (tensor, start, stop), splitting tensors inside, like ZeRO.
SHARDS = [[(0, 0, 5), (1, 0, 8), (2, 0, 3), (4, 0, 1)], [(0, 5, 8), (2, 3, 8), (3, 0, 8), (4, 1, 4), (5, 0, 4)]]


def run_engine(shards, reduce=None, per_entry=True):
    """Steps 0, 1 (log), 2 (log) on the fragments ``shards``; returns the two logged figure dicts."""
    engine = MaskEngine(MaskOptions(0.5, exclude=(r"^model\.norm",)), TENSORS, reduce)
    telemetry = MaskTelemetry(engine, per_entry=per_entry)
    logs = []
    for step, grads in enumerate([STEP0, STEP1, STEP1]):
        fragments = []
        for tensor, start, stop in shards:
            grad = torch.tensor(grads[tensor], dtype=torch.float32)[start:stop].clone()
            fragments.append(Fragment(tensor, start, grad, torch.zeros_like(grad)))
        engine.apply(fragments, step)
        if step >= 1:
            logs.append(telemetry.pop_stats()[0])
    return logs


def thread_sum(world):
    """A barrier 'all-reduce' over threads standing in for ranks."""
    barrier, slots = threading.Barrier(world), [None] * world

    def for_rank(rank):
        def reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()
            return tensor.copy_(total)
        return reduce
    return for_rank


def assert_figures(logged, expected):
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=1e-12), key


def test_pack_bits_and_popcount_agree_with_numpy():
    mask = torch.rand(64 * 257, generator=torch.Generator().manual_seed(0)) < 0.3
    words = pack_bits(mask)
    assert np.array_equal(words.view(torch.uint8).numpy(), np.packbits(mask.numpy(), bitorder="little"))
    other = torch.rand(64 * 257, generator=torch.Generator().manual_seed(1)) < 0.6
    assert popcount(words) == int(mask.sum())
    assert popcount(words ^ pack_bits(other)) == int((mask != other).sum())
    assert popcount(pack_bits(torch.ones(640, dtype=torch.bool))) == 640  # sign bit of every word set


def test_figures_match_a_hand_computation():
    whole = [(t, 0, info.numel) for t, info in enumerate(TENSORS)]
    first, second = run_engine(whole)
    assert_figures(first, FIRST_LOG)
    assert_figures(second, SECOND_LOG)
    assert not any("block_" in key and key[-2:] not in ("00", "01") for key in first)
    assert "gmt/kept_fraction/other" not in first and "gmt/kept_fraction/lm_head" not in first  # tied: counted once
    off = run_engine(whole, per_entry=False)[0]
    assert "gmt/churn" not in off and "gmt/coverage" not in off
    assert off["gmt/kept_fraction/block_01"] == first["gmt/kept_fraction/block_01"]


def test_two_ranks_holding_pieces_give_the_single_process_figures():
    reduce_for, results = thread_sum(2), [None, None]

    def run(rank):
        try:
            results[rank] = run_engine(SHARDS[rank], reduce_for(rank))
        except BaseException as error:  # surfaced below
            results[rank] = error

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for result in results:
        assert not isinstance(result, BaseException), result
        assert_figures(result[0], FIRST_LOG)
        assert_figures(result[1], SECOND_LOG)


# --- the Trainer: logs, gmt_stats.jsonl, W&B, report, checkpoint + resume ----------------------------------
TRAIN = dict(COMMON, max_steps=4, per_device_train_batch_size=2, gmt_mask_ratio=0.3, logging_steps=2,
             save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def train(tokenizer, output_dir, resume=None, **overrides):
    args = GMTSFTConfig(output_dir=str(output_dir), **{**TRAIN, **overrides})
    trainer = GMTSFTTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=sft_data(), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def wandb_run(tokenizer, tmp_path_factory):
    """Tiny Llama, 4 steps, logs at 2 and 4, checkpoints at 2 and 4, reported to W&B offline."""
    import wandb

    root = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(root))
        patch.setenv("WANDB_SILENT", "true")
        trainer = train(tokenizer, root / "out", report_to="wandb")
        wandb.finish()
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    return trainer, root / "out", run_dir


def test_trainer_logs_and_jsonl_hold_the_figures_at_the_logging_steps(wandb_run):
    trainer, out, _ = wandb_run
    records = [json.loads(line) for line in (out / "gmt_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    logged = [entry for entry in trainer.state.log_history if "gmt/kept_fraction" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed", "norm"]
    numel = {kind: 0 for kind in kinds}
    for name, p in trainer.model.named_parameters():
        numel[next(k for k in kinds if k in name)] += p.numel()
    for record, entry in zip(records, logged):
        for key, value in record.items():
            if key.startswith("gmt/") and key != "gmt/kept_fraction_by_block":
                assert entry[key] == value, key
        assert record["gmt/kept_fraction_by_block"] == [record["gmt/kept_fraction/block_00"],
                                                        record["gmt/kept_fraction/block_01"]]
        # The module kinds partition the tensors: their kept entries add up to the overall figure.
        total = sum(numel.values())
        assert sum(record[f"gmt/kept_fraction/{k}"] * numel[k] for k in kinds) == pytest.approx(
            record["gmt/kept_fraction"] * total, rel=1e-9)
        assert 0 < record["gmt/churn"] < 1 and record["gmt/kept_fraction"] <= record["gmt/coverage"] < 1
    assert records[1]["gmt/coverage"] > records[0]["gmt/coverage"]  # new entries got updated
    assert records[0]["gmt/threshold_min"] <= records[0]["gmt/threshold_median"] <= records[0]["gmt/threshold_max"]


def test_wandb_offline_run_holds_the_figures_the_histogram_and_the_config(wandb_run):
    _, out, run_dir = wandb_run
    wandb_cli = Path(__import__("sys").executable).with_name("wandb")
    lines = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                           text=True, check=True, timeout=120).stdout.splitlines()
    records = [json.loads(line) for line in lines]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    config = {k: v for r in records if r.get("type") == "config" for k, v in r["config"].get("update", {}).items()}
    for stats in load_stats(out / "gmt_stats.jsonl"):
        step = stats["step"]
        scalars = next(h for h in history if h.get("train/global_step") == step and "train/gmt/churn" in h)
        for key, value in stats.items():
            if key.startswith("gmt/") and key != "gmt/kept_fraction_by_block":
                assert scalars[f"train/{key}"] == pytest.approx(value, rel=1e-12), (step, key)
        hist = next(h for h in history if h.get("train/global_step") == step
                    and "train/gmt/kept_fraction_by_block.values" in h)
        assert hist["train/gmt/kept_fraction_by_block._type"] == "histogram"
        assert hist["train/gmt/kept_fraction_by_block.values"] == pytest.approx(stats["gmt/kept_fraction_by_block"])
    for key, value in {"gmt_mask_ratio": 0.3, "gmt_granularity": "tensor", "gmt_mode": "gradient",
                       "gmt_selection": "magnitude", "gmt_exclude": [], "gmt_telemetry": True}.items():
        assert config[key] == value, key


def test_report_renders_plots_and_a_summary(wandb_run, tmp_path, capsys):
    _, out, _ = wandb_run
    assert cli(["report", str(out), "--out", str(tmp_path)]) == 0
    for name in ("gmt_kept_heatmap.png", "gmt_churn_coverage.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = (tmp_path / "gmt_summary.txt").read_text()
    assert "steps 2..4" in summary and "coverage" in summary and summary in capsys.readouterr().out + "\n"
    assert cli(["report", str(tmp_path / "nothing")]) == 2
    assert "no gmt_stats.jsonl" in capsys.readouterr().err


def test_resume_keeps_coverage(wandb_run, tokenizer, tmp_path):
    _, out, _ = wandb_run
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "gmt_telemetry_rank0.pt").is_file()
    original = load_stats(out / "gmt_stats.jsonl")[-1]
    train(tokenizer, tmp_path / "resumed", resume=str(checkpoint), report_to="none", save_strategy="no")
    (resumed,) = load_stats(tmp_path / "resumed" / "gmt_stats.jsonl")
    assert resumed["step"] == 4
    for key in ("gmt/kept_fraction", "gmt/churn", "gmt/coverage", "gmt/kept_fraction/block_01"):
        assert resumed[key] == original[key], key  # the same run, interrupted: the same figures
    (checkpoint / "gmt_telemetry_rank0.pt").rename(tmp_path / "saved.pt")
    try:
        with pytest.warns(UserWarning, match="coverage starts afresh"):
            train(tokenizer, tmp_path / "fresh", resume=str(checkpoint), report_to="none", save_strategy="no")
    finally:
        (tmp_path / "saved.pt").rename(checkpoint / "gmt_telemetry_rank0.pt")
    (fresh,) = load_stats(tmp_path / "fresh" / "gmt_stats.jsonl")
    assert fresh["gmt/coverage"] < original["gmt/coverage"]  # only steps 2 and 3 counted


# --- 2 real ranks (DeepSpeed ZeRO-2) against 1 process --------------------------------------------------
THREE_STEPS = ["--max_steps", "3", "--gmt_mask_ratio", "0.3"]


@pytest.fixture(scope="module")
def quickstart_stats(smollm2_dir, tmp_path_factory):
    prepare_quickstart(ROOT / ".cache" / "quickstart")
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_recipe("sft", one, *THREE_STEPS, "--per_device_train_batch_size", "2")
    run_recipe("sft", two, *THREE_STEPS, "--per_device_train_batch_size", "1", deepspeed="zero2", ranks=2)
    return load_stats(one / "gmt_stats.jsonl"), load_stats(two / "gmt_stats.jsonl")


def test_two_zero2_ranks_report_the_single_process_figures(quickstart_stats):
    """Same global batch. The masks may differ in a few entries whose gradients sit at the threshold,
    because ZeRO sums the two micro-batch gradients in another order than one process (rounding):
    fractions agree to 1e-5 (measured: <= 5e-7) and thresholds to 1e-3 relative (measured: <= 4e-5)."""
    one, two = quickstart_stats
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        assert sum(key.startswith("gmt/kept_fraction/block_") for key in a) == 30
        assert b["gmt/kept_fraction/block_29"] > 0
        for key, value in a.items():
            if key.startswith("gmt/threshold"):
                assert b[key] == pytest.approx(value, rel=1e-3), key
            elif key == "gmt/kept_fraction_by_block":
                assert b[key] == pytest.approx(value, abs=1e-5)
            else:
                assert b[key] == pytest.approx(value, abs=1e-5), key
    assert "gmt/churn" not in one[0] and 0 < one[2]["gmt/churn"] < 1
    assert one[0]["gmt/coverage"] == pytest.approx(one[0]["gmt/kept_fraction"], abs=1e-12)  # one step so far
    assert one[0]["gmt/coverage"] < one[1]["gmt/coverage"] < one[2]["gmt/coverage"]
