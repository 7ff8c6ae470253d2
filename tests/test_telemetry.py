"""Mask telemetry: figures against a hand computation, across 'ranks', on the console, in the Trainer's
logs, gmt_stats.jsonl, W&B (offline, read back), the report, checkpoint + resume, and 2 real ranks."""

import ast
import contextlib
import io
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from gmt_align.training.runs import RunFolderError
import torch
from transformers import AutoTokenizer

from gmt_align import GMTSFTConfig, GMTSFTTrainer
from gmt_align.cli import main as cli
from gmt_align.core.engine import Fragment, MaskEngine, MaskOptions, TensorInfo
import gmt_align.training.telemetry as telemetry_module
from gmt_align.quickstart import prepare_quickstart
from gmt_align.training.figures import HEADLINE
from gmt_align.cli.report import load_stats
from gmt_align.training.stats_file import TelemetryStateError
from gmt_align.training.telemetry import (
    MaskTelemetry,
    pack_bits,
    pack_bits_torch,
    popcount,
    popcounts,
    popcounts_torch,
    squared_norms,
)
from multirank.launch import ROOT
from multirank.recording import record_masks
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
STEP0 = [[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8], [3, 0, 0, 0, 0, 0, 0, 0], [1] * 8, [4, 3, 2, 1], [1, 2, 3, 4]]
STEP1 = [[1, 2, 3, 4, 5, 6, 7, 8], [-1, 2, -3, 4, -5, 6, -7, 8], [0, -3, 0, 0, 0, 0, 0, 0], [8, 7, 6, 5, 4, 3, 2, 1],
         [1, 2, 3, 4], [4, 3, 2, 1]]
# Ratio 0.5, tensor granularity: keeps 4 of 8 and 2 of 4 (|g| >= the k-th largest; ties all kept; zeros
# never kept, T at least the smallest positive float).
# kept at step 0: t0 {0-3}, t1 {4-7}, t2 {0}, t3 all 8 (ties), t4 {0,1}      -> 4+4+1+8+2 = 19 of 36
# kept at step 1: t0 {4-7}, t1 {4-7}, t2 {1}, t3 {0-3}, t4 {2,3}             -> 4+4+1+4+2 = 15 of 36
# changed 0 -> 1: t0 8, t1 0, t2 2, t3 4, t4 4 = 18; covered after 1: 8+4+2+8+4 = 26
# energy (sum of g^2) kept / total: step 0: t0 174/204, t1 174/204, t2 9/9, t3 8/8, t4 25/30;
#                                   step 1: t0 174/204, t1 174/204, t2 9/9, t3 174/204, t4 25/30
# thresholds at step 1: t0 5, t1 5, t2 TINY (1 non-zero of 4 to keep), t3 5, t4 3
TINY = float(torch.tensor([1], dtype=torch.int32).view(torch.float32))  # the smallest positive float
FIRST_LOG = {  # after steps 0 and 1 (2 steps: kept-fraction denominators are entries x 2)
    "gmt/kept_fraction": 34 / 72, "gmt/masked_fraction_target": 0.5,
    "gmt/retained_energy": (390 + 556) / (455 + 651), "gmt/churn": 18 / 36, "gmt/coverage": 26 / 36,
    "gmt/threshold_min": TINY, "gmt/threshold_median": 5.0, "gmt/threshold_max": 5.0,
    "gmt/retained_energy/block_00": (183 + 183) / (213 + 213), "gmt/retained_energy/block_01": (33 + 199) / (38 + 234),
    "gmt/retained_energy/q_proj": (182 + 348) / (212 + 408), "gmt/retained_energy/down_proj": 1.0,
    "gmt/retained_energy/embed": 348 / 408, "gmt/retained_energy/norm": 50 / 60,
    "gmt/churn/block_00": 2 / 16, "gmt/churn/block_01": 8 / 12, "gmt/churn/q_proj": 4 / 16,
    "gmt/churn/down_proj": 2 / 8, "gmt/churn/embed": 8 / 8, "gmt/churn/norm": 4 / 4,
    "gmt/coverage/block_00": 6 / 16, "gmt/coverage/block_01": 12 / 12, "gmt/coverage/q_proj": 12 / 16,
    "gmt/coverage/down_proj": 2 / 8, "gmt/coverage/embed": 8 / 8, "gmt/coverage/norm": 4 / 4,
    "gmt/threshold/block_00": (5 + TINY) / 2, "gmt/threshold/block_01": (5 + 3) / 2, "gmt/threshold/q_proj": 5.0,
    "gmt/threshold/down_proj": TINY, "gmt/threshold/embed": 5.0, "gmt/threshold/norm": 3.0,
}
SECOND_LOG = {  # after step 2 = step 1 again: nothing changes, nothing newly covered
    **FIRST_LOG, "gmt/kept_fraction": 15 / 36, "gmt/retained_energy": 556 / 651,
    "gmt/retained_energy/block_00": 183 / 213, "gmt/retained_energy/block_01": 199 / 234,
    "gmt/retained_energy/q_proj": 348 / 408, "gmt/retained_energy/embed": 174 / 204,
    "gmt/retained_energy/norm": 25 / 30, **{key: 0.0 for key in FIRST_LOG if key.startswith("gmt/churn")},
}
# Global granularity: one threshold over the 36 entries, keep 18. Step 0: T = 2 (exactly 18 >= 2):
# t0 7, t1 7, t2 1, t3 0, t4 3 kept; step 1: T = 3 (21 >= 3, ties kept): t0 6, t1 6, t2 1, t3 6, t4 2.
# changed: t0 3, t1 1, t2 2, t3 6, t4 3 = 15; covered: t0 8, t1 7, t2 2, t3 6, t4 4 = 27
# energy kept: step 0: t0 203, t1 203, t2 9, t3 0, t4 29; step 1: t0 199, t1 199, t2 9, t3 199, t4 25
GLOBAL_FIRST_LOG = {
    "gmt/kept_fraction": 39 / 72, "gmt/retained_energy": (444 + 631) / (455 + 651),
    "gmt/churn": 15 / 36, "gmt/coverage": 27 / 36, "gmt/threshold_min": 3.0, "gmt/threshold_max": 3.0,
    "gmt/kept_fraction/block_00": 15 / 32, "gmt/kept_fraction/block_01": 11 / 24,
    "gmt/kept_fraction/q_proj": 19 / 32, "gmt/kept_fraction/down_proj": 2 / 16,
    "gmt/kept_fraction/embed": 13 / 16, "gmt/kept_fraction/norm": 5 / 8,
    "gmt/retained_energy/block_00": 420 / 426, "gmt/retained_energy/block_01": 253 / 272,
    "gmt/churn/block_00": 3 / 16, "gmt/churn/block_01": 9 / 12, "gmt/coverage/block_00": 9 / 16,
    "gmt/coverage/block_01": 10 / 12,
}
# What each of two 'ranks' holds: (tensor, start, stop), splitting tensors inside, like ZeRO.
SHARDS = [[(0, 0, 5), (1, 0, 8), (2, 0, 3), (4, 0, 1)], [(0, 5, 8), (2, 3, 8), (3, 0, 8), (4, 1, 4), (5, 0, 4)]]


def run_engine(shards, reduce=None, per_entry=True, granularity="tensor"):
    """Steps 0, 1 (log), 2 (log) on the fragments ``shards``; returns the two logged figure dicts."""
    engine = MaskEngine(MaskOptions(0.5, granularity=granularity, exclude=(r"^model\.norm",)), TENSORS, reduce)
    telemetry = MaskTelemetry(engine, per_entry=per_entry)
    logs = []
    for step, grads in enumerate([STEP0, STEP1, STEP1]):
        fragments = []
        for tensor, start, stop in shards:
            grad = torch.tensor(grads[tensor], dtype=torch.float32)[start:stop].clone()
            fragments.append(Fragment(tensor, start, grad, torch.zeros_like(grad)))
        engine.apply(fragments, step)
        if step >= 1:
            logs.append(telemetry.pop_figures())
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
    """Counts are exact; energies come from float32 norms (squared in float64): 1e-7 relative."""
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-12 if "energy" not in key else 2e-7), key


def test_pack_bits_and_popcount_agree_with_numpy():
    mask = torch.rand(64 * 257, generator=torch.Generator().manual_seed(0)) < 0.3
    words = pack_bits(mask)
    assert np.array_equal(words.view(torch.uint8).numpy(), np.packbits(mask.numpy(), bitorder="little"))
    other = torch.rand(64 * 257, generator=torch.Generator().manual_seed(1)) < 0.6
    assert popcount(words) == int(mask.sum())
    assert popcount(words ^ pack_bits(other)) == int((mask != other).sum())
    assert popcount(pack_bits(torch.ones(640, dtype=torch.bool))) == 640  # sign bit of every word set
    assert torch.equal(pack_bits_torch(mask), words)  # the code for other devices gives the same words
    assert torch.equal(popcounts_torch(words), popcounts(words).to(torch.int64))


def test_squared_norms_are_accurate_at_any_length():
    """A plain float32 sum of 3 M squares is off by ~1e-4; rows summed in float64 are not."""
    g = torch.randn(3_000_017, generator=torch.Generator().manual_seed(0))
    pieces = [g[:5], g[5:2_000_000], g[2_000_000:]]
    exact = [float(p.double().square().sum()) for p in pieces]
    assert squared_norms(pieces).tolist() == pytest.approx(exact, rel=1e-7)


def test_figures_match_a_hand_computation():
    whole = [(t, 0, info.numel) for t, info in enumerate(TENSORS)]
    first, second = run_engine(whole)
    assert set(first) == set(FIRST_LOG)  # tensor granularity: no per-group kept fraction (it is 1 - ratio)
    assert_figures(first, FIRST_LOG)
    assert_figures(second, SECOND_LOG)
    off = run_engine(whole, per_entry=False)[0]
    assert set(off) == {"gmt/kept_fraction", "gmt/masked_fraction_target", "gmt/threshold_min",
                        "gmt/threshold_median", "gmt/threshold_max", *(k for k in FIRST_LOG if "threshold/" in k)}
    assert off["gmt/kept_fraction"] == first["gmt/kept_fraction"]
    global_first, _ = run_engine(whole, granularity="global")
    assert_figures(global_first, GLOBAL_FIRST_LOG)
    assert not any(key.startswith("gmt/threshold/") for key in global_first)  # one threshold: no group's own


@pytest.mark.parametrize("chunk", [128, 1 << 20])
def test_per_group_figures_match_the_recorded_masks_across_chunk_boundaries(monkeypatch, chunk):
    """Tensors longer than a chunk, chunks holding pieces of several tensors: the per-tensor sums
    still land on the right tensor (checked against masks recorded by the engine)."""
    monkeypatch.setattr(telemetry_module, "CHUNK", chunk)
    tensors = [TensorInfo((f"model.layers.{i % 2}.mlp.{kind}.weight",), n)
               for i, (kind, n) in enumerate([("up_proj", 300), ("down_proj", 70), ("up_proj", 1000), ("gate_proj", 130)])]
    engine = MaskEngine(MaskOptions(0.5), tensors)
    telemetry = MaskTelemetry(engine)
    recorded = record_masks(engine)
    generator = torch.Generator().manual_seed(0)
    energy, energy_kept = torch.zeros(len(tensors), dtype=torch.float64), torch.zeros(len(tensors), dtype=torch.float64)
    for step in range(3):
        grads = [torch.randn(t.numel, generator=generator) for t in tensors]
        for t, g in enumerate(grads):
            energy[t] += g.double().square().sum()
        engine.apply([Fragment(t, 0, g, torch.zeros_like(g)) for t, g in enumerate(grads)], step)
        for t, g in enumerate(grads):
            energy_kept[t] += g.double().square().sum()  # masked in place: what is left was kept
    figures = telemetry.pop_figures()
    kept = [[m for tensor_id, _, m in recorded if tensor_id == t] for t in range(len(tensors))]
    changed = [sum(int((a != b).sum()) for a, b in zip(k, k[1:])) for k in kept]
    covered = [int((k[0] | k[1] | k[2]).sum()) for k in kept]
    for group, members in {"block_00": [0, 2], "block_01": [1, 3], "up_proj": [0, 2], "down_proj": [1],
                           "gate_proj": [3]}.items():
        n = sum(tensors[t].numel for t in members)
        assert figures[f"gmt/churn/{group}"] == sum(changed[t] for t in members) / (2 * n), group
        assert figures[f"gmt/coverage/{group}"] == sum(covered[t] for t in members) / n, group
        assert figures[f"gmt/retained_energy/{group}"] == pytest.approx(
            float(energy_kept[members].sum() / energy[members].sum()), rel=2e-7), group


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_two_ranks_holding_pieces_give_the_single_process_figures(granularity):
    reduce_for, results = thread_sum(2), [None, None]

    def run(rank):
        try:
            results[rank] = run_engine(SHARDS[rank], reduce_for(rank), granularity=granularity)
        except BaseException as error:  # surfaced below
            results[rank] = error

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    alone = run_engine([(t, 0, info.numel) for t, info in enumerate(TENSORS)], granularity=granularity)
    for result in results:
        assert not isinstance(result, BaseException), result
        for logged, expected in zip(result, alone):
            assert logged.keys() == expected.keys()
            assert_figures(logged, expected)


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
    """Tiny Llama, 4 steps, logs at 2 and 4, checkpoints at 2 and 4, reported to W&B offline; the
    console (transformers' PrinterCallback: disable_tqdm) captured."""
    import wandb

    root = tmp_path_factory.mktemp("wandb_run")
    console = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(console):
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(root))
        patch.setenv("WANDB_SILENT", "true")
        trainer = train(tokenizer, root / "out", report_to="wandb")
        wandb.finish()
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    return trainer, root / "out", run_dir, console.getvalue()


def test_console_log_history_and_jsonl(wandb_run):
    """The console shows the headline figures; gmt_stats.jsonl (and the backends) every figure,
    log_history all but the per-group ones; per-block figures vary at the default granularity."""
    trainer, out, _, console = wandb_run
    records = [json.loads(line) for line in (out / "gmt_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and len({r["run_id"] for r in records}) == 1
    printed = [ast.literal_eval(line) for line in console.splitlines() if "'loss'" in line]
    assert len(printed) == 2
    for line in printed:
        assert {key for key in line if key.startswith("gmt/")} == set(HEADLINE), line
    logged = [entry for entry in trainer.state.log_history if "gmt/kept_fraction" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed", "norm"]
    for record, entry in zip(records, logged):
        assert {k for k in entry if k.startswith("gmt/")} == {k for k in record if k.startswith("gmt/") and k.count("/") == 1}
        for key, value in entry.items():
            if key.startswith("gmt/"):
                assert record[key] == value, key
        for figure in ("retained_energy", "churn", "coverage", "threshold"):
            blocks = [record[f"gmt/{figure}/block_{b:02d}"] for b in range(2)]
            assert all(f"gmt/{figure}/{kind}" in record for kind in kinds), figure
            assert blocks[0] != blocks[1], figure  # figures that say something at the default granularity
        assert not any(key.startswith("gmt/kept_fraction/") for key in record)  # tensor granularity: 1 - ratio
        assert 0 < record["gmt/churn"] < 1 and record["gmt/kept_fraction"] <= record["gmt/coverage"] < 1
        assert record["gmt/kept_fraction"] < record["gmt/retained_energy"] < 1  # the largest |g| are the ones kept
    assert records[1]["gmt/coverage"] > records[0]["gmt/coverage"]  # new entries got updated


def test_wandb_offline_run_holds_the_figures_the_panels_and_the_config(wandb_run):
    _, out, run_dir, _ = wandb_run
    assert json.loads((out / "wandb_run.json").read_text())["id"] == run_dir.name.rsplit("-", 1)[1]  # for gmt-align eval
    wandb_cli = Path(__import__("sys").executable).with_name("wandb")
    lines = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                           text=True, check=True, timeout=120).stdout.splitlines()
    records = [json.loads(line) for line in lines]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    config = {k: v for r in records if r.get("type") == "config" for k, v in r["config"].get("update", {}).items()}
    for stats in load_stats(out / "gmt_stats.jsonl"):
        step = stats["step"]
        (row,) = [h for h in history if h.get("train/global_step") == step and "train/gmt/churn" in h]
        assert not any(key.count("/") >= 3 for key in row if key.startswith("train/gmt/")), "no flat per-group lines"
        for key in stats:
            if key.startswith("gmt/") and key.count("/") == 1:
                assert row[f"train/{key}"] == pytest.approx(stats[key], rel=1e-12), (step, key)
        for figure in ("retained_energy", "churn", "coverage", "threshold"):
            assert row[f"train/gmt/{figure}_by_block._type"] == "histogram"
            assert row[f"train/gmt/{figure}_by_block.values"] == pytest.approx(
                [stats[f"gmt/{figure}/block_{b:02d}"] for b in range(2)], rel=1e-6)
        table = json.loads((run_dir / "files" / row["train/gmt/groups.path"]).read_text())
        assert table["columns"] == ["group", "churn", "coverage", "retained_energy", "threshold"]
        for group, *values in table["data"]:
            assert values == pytest.approx([stats[f"gmt/{c}/{group}"] for c in table["columns"][1:]], rel=1e-12)
        assert len(table["data"]) == 2 + 9  # blocks and module kinds
    for key, value in {"gmt_mask_ratio": 0.3, "gmt_granularity": "tensor", "gmt_mode": "gradient",
                       "gmt_selection": "magnitude", "gmt_exclude": [], "gmt_telemetry": True}.items():
        assert config[key] == value, key


def test_report_renders_plots_and_a_summary(wandb_run, tmp_path, capsys):
    _, out, _, _ = wandb_run
    assert cli(["report", str(out), "--out", str(tmp_path)]) == 0
    for figure in ("retained_energy", "churn", "coverage", "overall"):
        name = f"gmt_{figure}_heatmap.png" if figure != "overall" else "gmt_overall.png"
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (tmp_path / "gmt_kept_fraction_heatmap.png").exists()  # tensor granularity: nothing to show
    summary = (tmp_path / "gmt_summary.txt").read_text()
    assert "steps 2..4" in summary and "retained energy" in summary and summary in capsys.readouterr().out + "\n"
    assert "fewer than 3 complete logging steps" in summary  # two logging steps: no block named
    assert cli(["report", str(tmp_path / "nothing")]) == 2
    assert "no gmt_stats.jsonl" in capsys.readouterr().err


def test_resume_continues_the_run_and_its_coverage(wandb_run, tokenizer, tmp_path):
    _, out, _, _ = wandb_run
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "gmt_telemetry_rank0.pt").is_file()
    original = load_stats(out / "gmt_stats.jsonl")
    # Into the run's own output_dir (a copy): the records after step 2 go, step 4 is logged again.
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("checkpoint-4"))
    train(tokenizer, again, resume=str(again / "checkpoint-2"), report_to="none", save_strategy="no")
    continued = load_stats(again / "gmt_stats.jsonl")
    assert [r["step"] for r in continued] == [2, 4] and {r["run_id"] for r in continued} == {original[0]["run_id"]}
    for key in ("gmt/kept_fraction", "gmt/retained_energy", "gmt/churn", "gmt/coverage", "gmt/churn/block_01"):
        assert continued[1][key] == original[1][key], key  # the same run, interrupted: the same figures
    # A new run never appends to another run's file: the folder is refused before anything starts
    # (gmt_align.training.runs; stats_file.continue_run's own refusal is the second guard, tested in test_report).
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(tokenizer, again, report_to="none", save_strategy="no")
    assert load_stats(again / "gmt_stats.jsonl") == continued
    # No telemetry state in the checkpoint: a warning, and coverage counts from the resumed step.
    (checkpoint / "gmt_telemetry_rank0.pt").rename(tmp_path / "saved.pt")
    try:
        with pytest.warns(UserWarning, match="coverage starts afresh"):
            train(tokenizer, tmp_path / "fresh", resume=str(checkpoint), report_to="none", save_strategy="no")
        # A truncated one: one line naming the file, and nothing written.
        (checkpoint / "gmt_telemetry_rank0.pt").write_bytes((tmp_path / "saved.pt").read_bytes()[:300])
        with pytest.raises(TelemetryStateError, match=r"gmt_telemetry_rank0.pt: unreadable .*truncated") as error:
            train(tokenizer, tmp_path / "torn", resume=str(checkpoint), report_to="none", save_strategy="no")
        assert "\n" not in str(error.value) and not (tmp_path / "torn" / "gmt_stats.jsonl").exists()
    finally:
        (tmp_path / "saved.pt").replace(checkpoint / "gmt_telemetry_rank0.pt")
    (fresh,) = load_stats(tmp_path / "fresh" / "gmt_stats.jsonl")
    assert fresh["gmt/coverage"] < original[1]["gmt/coverage"]  # only steps 2 and 3 counted
    assert fresh["run_id"] == original[0]["run_id"]


# --- 2 real ranks (DeepSpeed ZeRO-2) against 1 process --------------------------------------------------
# Global granularity: the per-group kept fractions vary there, and are reduced like every other sum.
THREE_STEPS = ["--max_steps", "3", "--gmt_mask_ratio", "0.3", "--gmt_granularity", "global"]


@pytest.fixture(scope="module")
def quickstart_stats(smollm2_dir, tmp_path_factory):
    prepare_quickstart(ROOT / ".cache" / "quickstart")
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_recipe("sft", one, *THREE_STEPS, "--per_device_train_batch_size", "2")
    run_recipe("sft", two, *THREE_STEPS, "--per_device_train_batch_size", "1", deepspeed="zero2", ranks=2)
    return load_stats(one / "gmt_stats.jsonl"), load_stats(two / "gmt_stats.jsonl")


@pytest.mark.multirank
def test_two_zero2_ranks_report_the_single_process_figures(quickstart_stats):
    """Same global batch. The masks may differ in a few entries whose gradients sit at the threshold,
    because ZeRO sums the two micro-batch gradients in another order than one process (rounding):
    figures agree to 1e-5 (measured: <= 3.1e-6, a block's churn) and the threshold to 1e-3 relative."""
    one, two = quickstart_stats
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    differences = {}
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        blocks = [a[f"gmt/kept_fraction/block_{n:02d}"] for n in range(30)]
        assert max(blocks) - min(blocks) > 0.01  # one global threshold: blocks keep different shares
        for key, value in a.items():
            if key.startswith("gmt/threshold"):
                assert b[key] == pytest.approx(value, rel=1e-3), key
            elif key.startswith("gmt/"):
                differences[key] = max(differences.get(key, 0), abs(b[key] - value))
                assert b[key] == pytest.approx(value, abs=1e-5), key
        assert a["gmt/kept_fraction"] < a["gmt/retained_energy"] < 1
    print("largest 2-rank vs 1-process difference:", max(differences.values()), max(differences, key=differences.get))
    assert "gmt/churn" not in one[0] and 0 < one[2]["gmt/churn"] < 1
    assert one[0]["gmt/coverage"] == pytest.approx(one[0]["gmt/kept_fraction"], abs=1e-12)  # one step so far
    assert one[0]["gmt/coverage"] < one[1]["gmt/coverage"] < one[2]["gmt/coverage"]
