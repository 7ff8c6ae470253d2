"""GMT inside DeepSpeed's ZeRO step, on 2 real ranks (gloo, DS_ACCELERATOR=cpu): exact per rank.

One launch of tests/multirank/zero_worker.py runs every case (deepspeed.initialize per case) so
the JIT-compiled extensions and the process start are paid once; each case is one test here.
"""

import itertools
import json

import pytest

from multirank.launch import run_ranks

pytestmark = pytest.mark.multirank

MATRIX = [
    dict(stage=stage, offload=offload, dtype=dtype, granularity=granularity, mode=mode, ratio=0.3)
    for stage, offload, dtype, granularity, mode in itertools.product(
        [1, 2, 3], [False, True], ["fp32", "bf16"], ["tensor", "global"], ["gradient", "update"]
    )
    if not (stage == 1 and offload)  # ZeRO-1 offload is ZeRO-2 offload in DeepSpeed
]
EXTRA = [
    dict(stage=3, sub_group_size=300, granularity="tensor", mode="update", ratio=0.4),  # 4 sub-groups
    dict(stage=3, sub_group_size=300, offload=True, granularity="tensor", mode="gradient", ratio=0.4),
    dict(stage=2, two_groups=True, granularity="tensor", mode="update", ratio=0.4),  # HF-style param groups
    dict(stage=1, two_groups=True, dtype="bf16", granularity="tensor", mode="gradient", ratio=0.2),
    dict(stage=1, dtype="bf16", bf16_optimizer=True, granularity="global", mode="update", ratio=0.4),
    dict(stage=1, dtype="bf16", bf16_optimizer=True, two_groups=True, granularity="global", mode="gradient", ratio=0.4),
    dict(stage=2, ds_optimizer=True, granularity="tensor", mode="update", ratio=0.3),
    dict(stage=2, offload=True, ds_optimizer=True, granularity="global", mode="update", ratio=0.3),  # DeepSpeedCPUAdam
    dict(stage=3, offload=True, ds_optimizer=True, dtype="bf16", granularity="tensor", mode="update", ratio=0.3),
    dict(stage=2, selection="random", granularity="tensor", mode="update", ratio=0.5),
    dict(stage=3, selection="random", granularity="global", mode="update", ratio=0.5),
    dict(stage=2, clip=1e-3, granularity="tensor", mode="update", ratio=0.3),  # clipping active
    # A global threshold over (sub-)groups that ZeRO steps one at a time: held back, then replayed.
    dict(stage=2, two_groups=True, granularity="global", mode="update", ratio=0.4),
    dict(stage=1, two_groups=True, dtype="bf16", granularity="global", mode="gradient", ratio=0.4),
    dict(stage=2, two_groups=True, offload=True, clip=1e-3, granularity="global", mode="update", ratio=0.4),
    dict(stage=3, sub_group_size=300, offload=True, ds_optimizer=True, granularity="global", mode="update", ratio=0.4),
    dict(stage=3, sub_group_size=300, granularity="global", mode="update", ratio=0.4),
    dict(stage=3, sub_group_size=300, two_groups=True, dtype="bf16", granularity="global", mode="gradient", ratio=0.4),
    dict(stage=3, sub_group_size=300, offload=True, granularity="global", mode="update", ratio=0.3),
    # Partial offload: DeepSpeed builds backup_optimizer (on a CPU accelerator every sub-group still
    # steps through the offloaded optimizer), which GMT hooks too.
    dict(stage=3, sub_group_size=300, offload=True, ds_optimizer=True,
         zero_extra={"offload_optimizer": {"device": "cpu", "ratio": 0.5}}, granularity="tensor", mode="update",
         ratio=0.3),
    dict(stage=3, sub_group_size=300, selection="random", granularity="global", mode="update", ratio=0.5),
    # Excluded tensors: a whole group without units (stepped last), and sub-groups without units.
    dict(stage=2, two_groups=True, exclude=["bias", "scale"], granularity="global", mode="update", ratio=0.4),
    dict(stage=3, sub_group_size=300, exclude=["^up", "scale"], granularity="global", mode="update", ratio=0.4),
    dict(stage=3, sub_group_size=300, exclude=["mid"], granularity="tensor", mode="update", ratio=0.4),
]
OVERFLOW = [
    dict(stage=2, dtype="fp16", granularity="tensor", mode="update", ratio=0.3),
    dict(stage=3, dtype="fp16", granularity="tensor", mode="update", ratio=0.3),
]
REFUSED = [
    (dict(stage=2, zero_extra={"round_robin_gradients": True}, granularity="tensor", mode="gradient", ratio=0.3),
     "round_robin_gradients"),
]
CASES = MATRIX + EXTRA + OVERFLOW + [case for case, _ in REFUSED]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items() if k != "ratio")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero")
    (folder / "cases.json").write_text(json.dumps(CASES))
    # One launch runs the whole matrix: a few minutes on an idle machine, far more on a shared one.
    ranks = run_ranks(["tests/multirank/zero_worker.py", str(folder / "cases.json"), str(folder / "out.jsonl")],
                      timeout=2400)
    for rank in ranks:
        assert rank.returncode == 0, rank.stdout[-4000:]
    lines = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
    return {json.dumps(line["case"], sort_keys=True): line for line in lines}


def result_of(results, case):
    result = results[json.dumps(case, sort_keys=True)]
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize("case", MATRIX + EXTRA, ids=case_id)
def test_mask_equals_the_single_process_mask(results, case):
    result = result_of(results, case)
    assert result["contract_missing"] == []
    assert result["straddling"] >= 1 and result["not_on_every_rank"] >= 1  # the layout is really tested
    for name, t in result["tensors"].items():
        if t.get("excluded"):
            assert t["untouched_by_gmt"] and t["all_moved"], name
            continue
        assert t["threshold_equal"], name
        assert t["all_entries_covered"], name  # each entry masked or kept by exactly one rank
        assert t["mask_equal"], name
        assert t["kept_reported"], name  # MaskHooks.kept(): the single process's kept count, over both ranks
        assert t["model_weights_published"], name  # DeepSpeed's copy back (or ours, after a held step)
        if case["mode"] == "update":
            assert t["unchanged_equals_masked"], name  # masked fp32 weights bit-for-bit unchanged, kept moved
    # Collectives: a few all-reduces of small int64 count matrices per selection (at most
    # [units, 4096]), whatever the sizes. ZeRO selects per stepped (sub-)group for tensor units; one
    # global threshold, or BF16_Optimizer, selects once. Random scores go through the same count and
    # radix rounds (their guesses need no all-reduce: uniform scores' quantiles are known), plus one
    # all-reduce of per-tensor inf/NaN flags (random scores do not read the gradient).
    selections = 1 if result["kind"] == "BF16_Optimizer" or case["granularity"] == "global" else result["partitions"]
    assert 2 * selections <= result["comm_calls"] <= 8 * selections
    assert result["comm_bytes"] <= result["comm_calls"] * 4096 * 8 * max(result["units"], len(result["tensors"]))


def test_the_matrix_reaches_every_optimizer_kind(results):
    kinds = {(r["kind"], r.get("inner")) for r in results.values() if "kind" in r}
    assert ("DeepSpeedZeroOptimizer", "AdamW") in kinds
    assert ("DeepSpeedZeroOptimizer_Stage3", "AdamW") in kinds
    assert ("DeepSpeedZeroOptimizer", "DeepSpeedCPUAdam") in kinds
    assert ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam") in kinds
    assert any(kind == "BF16_Optimizer" for kind, _ in kinds)
    partial = [r for r in results.values() if r["case"].get("sub_group_size") and "partitions" in r]
    assert partial and all(r["partitions"] == 4 for r in partial)
    assert any(r.get("has_hp_mapping") for r in results.values())
    # every conditional contract attribute was present on some real instance (and, where the
    # contract says it should not be, absent: contract_missing above)
    assert any("backup_optimizer" in r.get("conditional_present", ()) for r in results.values())


@pytest.mark.parametrize("case", OVERFLOW, ids=case_id)
def test_fp16_overflow_step_masks_nothing_on_every_rank(results, case):
    result = result_of(results, case)
    assert result["overflow"] is True
    assert result["masked_calls_per_rank"] == [0, 0]
    assert result["moved"] is False


@pytest.mark.parametrize("case,needle", REFUSED, ids=[case_id(c) for c, _ in REFUSED])
def test_unmappable_settings_are_refused_in_one_line(results, case, needle):
    error = results[json.dumps(case, sort_keys=True)]["error"]
    assert error.startswith("UnsupportedOptimizerError") and needle in error and "\n" not in error
