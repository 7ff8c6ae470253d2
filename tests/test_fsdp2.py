"""GMT on FSDP2 (``fully_shard``) shards, on real ranks (gloo, CPU): every rank masks what one process masks.

One launch of tests/multirank/fsdp2_worker.py runs every 2-rank case (a fresh ``fully_shard`` model
and torch AdamW per case); a second, of 4 ranks, runs HSDP on a 2 x 2 mesh. Each case is one test.
"""

import itertools
import json
import sys

import pytest
import yaml
from multirank.launch import ROOT, free_port, rank_env, run_together

from gmt_align.backends.fsdp2 import FSDP1_REFUSAL, fsdp_problems

pytestmark = pytest.mark.multirank

MATRIX = [
    dict(dtype=dtype, granularity=granularity, mode=mode, ratio=0.3)
    for dtype, granularity, mode in itertools.product(["fp32", "bf16"], ["tensor", "global"], ["gradient", "update"])
]
EXTRA = [
    dict(offload=True, granularity="tensor", mode="update", ratio=0.3),  # CPUOffloadPolicy: steps on the CPU
    dict(offload=True, dtype="bf16", granularity="global", mode="update", ratio=0.4),
    dict(selection="random", granularity="tensor", mode="update", ratio=0.5),
    dict(selection="random", granularity="global", mode="update", ratio=0.5),
    dict(exclude=["^up", "scale"], granularity="global", mode="update", ratio=0.4),
    dict(exclude=["mid"], granularity="tensor", mode="update", ratio=0.4),
    dict(clip=1e-3, granularity="tensor", mode="update", ratio=0.3),  # clipping active
    dict(clip=1e-3, two_groups=True, granularity="global", mode="gradient", ratio=0.3),
    dict(two_groups=True, granularity="global", mode="update", ratio=0.4),  # HF-style param groups
    # HSDP on 2 ranks: one replica of 2 shards, and 2 replicas of one whole shard each.
    dict(mesh=[1, 2], granularity="tensor", mode="update", ratio=0.3),
    dict(mesh=[2, 1], granularity="global", mode="update", ratio=0.3),
]
HSDP4 = [  # 4 ranks: 2 replicas x 2 shards
    dict(world=4, mesh=[2, 2], granularity="tensor", mode="update", ratio=0.3),
    dict(world=4, mesh=[2, 2], selection="random", granularity="global", mode="gradient", ratio=0.5),
]
NONFINITE = [  # a NaN in one rank's shard only
    dict(nan=["scale", 0], exclude=["scale"], granularity="tensor", mode="update", ratio=0.3),  # not selected over
    dict(nan=["mid.weight", 1], selection="random", granularity="global", mode="update", ratio=0.3),
    dict(nan=["mid.weight", 1], granularity="tensor", mode="update", ratio=0.3),  # magnitude finds it
]
SKIPPED = [dict(nan=["mid.weight", 1], nonfinite="skip", granularity="global", mode="update", ratio=0.3)]
REFUSED = [
    (dict(fsdp1=True, refused=True, granularity="tensor", mode="update", ratio=0.3), FSDP1_REFUSAL),
    (dict(shard_dim1=True, refused=True, granularity="tensor", mode="update", ratio=0.3), "sharded on dim 0 only"),
]
RESUMED = [  # sharded checkpoints (torch.distributed.checkpoint); the Trainer's full ones: test_fsdp2_trainer.py
    dict(resume=True, granularity="tensor", mode="update", ratio=0.3),
    dict(resume=True, selection="random", granularity="global", mode="update", ratio=0.5),  # scores keyed by step
]
CASES = MATRIX + EXTRA + NONFINITE + SKIPPED + RESUMED + [case for case, _ in REFUSED]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items() if k != "ratio")


def _launch(folder, cases, world, **env):
    (folder / "cases.json").write_text(json.dumps(cases))
    argv = [sys.executable, "tests/multirank/fsdp2_worker.py", str(folder / "cases.json"), str(folder / "out.jsonl")]
    port = free_port()
    ranks = run_together([(argv, {**rank_env(rank, world, port), **env}) for rank in range(world)])
    for rank in ranks:
        assert rank.returncode == 0, rank.stdout[-4000:]
    lines = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
    return {json.dumps(line["case"], sort_keys=True): line for line in lines}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("fsdp2"), CASES, 2)


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    # Eager kernels (the same masks bit for bit): 4 processes loading the C++ ones on 2 busy cores cost
    # more than the cases; the 2-rank launch above runs the default kernels on shards.
    return _launch(tmp_path_factory.mktemp("hsdp4"), HSDP4, 4, GMT_ALIGN_COMPILE="0")


def result_of(results, case):
    result = results[json.dumps(case, sort_keys=True)]
    assert "error" not in result, result["error"]
    return result


def check_exact(result, case):
    assert result["contract_missing"] == [] and result["kind"] == "fsdp2"
    assert result["uneven"] >= 1  # a dim 0 that does not divide by the shard count
    assert not result["two_ranks_masked_one_entry"]
    assert result["replicas_agree"]  # HSDP: every replica picks the same mask
    for name, t in result["tensors"].items():
        if t.get("excluded"):
            assert t["untouched_by_gmt"] and t["all_moved"], name
            continue
        assert t["threshold_equal"], name
        assert t["all_entries_covered"], name  # each entry masked or kept by exactly one shard
        assert t["mask_equal"], name
        if case["mode"] == "update":
            assert t["unchanged_equals_masked"], name  # masked fp32 weights bit-for-bit unchanged
        assert t["moved_where_kept"], name
    # Telemetry reduced over the shards: the single-process kept fraction and coverage.
    kept = result["kept_fraction"]
    assert kept["reported"] == pytest.approx(kept["reference"], abs=1e-12) and kept["coverage"] == kept["reported"]
    if result["shard_group_size"] > 1:
        assert result["not_on_every_rank"] >= 1  # `scale` (1 element): one rank holds none of it
        assert 2 <= result["comm_calls"] <= 11  # small count all-reduces only
        if case["granularity"] == "tensor" and case.get("selection", "magnitude") == "magnitude":
            # Each shard's own threshold keeps another set: equality above rules that out.
            assert result["local_threshold_would_differ"]


@pytest.mark.parametrize("case", MATRIX + EXTRA, ids=case_id)
def test_mask_equals_the_single_process_mask(results, case):
    result = result_of(results, case)
    check_exact(result, case)
    if case.get("clip"):
        assert result["clip"] == {"norm_is_unmasked_norm": True, "clipped": True}


@pytest.mark.parametrize("case", HSDP4, ids=case_id)
def test_hsdp_on_a_2x2_mesh(results4, case):
    result = result_of(results4, case)
    assert result["shard_group_size"] == 2
    check_exact(result, case)


@pytest.mark.parametrize("case", NONFINITE, ids=case_id)
def test_nonfinite_gradient_is_refused_on_every_rank_together(results, case):
    raised = result_of(results, case)["raised"]
    assert len(raised) == 2 and raised[0] == raised[1] and "inf/NaN" in raised[0]
    assert case["nan"][0] in raised[0]


@pytest.mark.parametrize("case", SKIPPED, ids=case_id)
def test_nonfinite_skip_leaves_weights_and_optimizer_untouched(results, case):
    result = result_of(results, case)
    assert result["skipped"] == [0] and result["moved"] is False and result["optimizer_state"] == 0


@pytest.mark.parametrize("case", RESUMED, ids=case_id)
def test_sharded_checkpoint_resumes_bit_for_bit(results, case):
    result = result_of(results, case)
    assert result["second_step_moved"] and result["same_masks_on_every_rank"] and result["resumed_equals_uninterrupted"]


@pytest.mark.parametrize("case,needle", REFUSED, ids=[case_id(c) for c, _ in REFUSED])
def test_unmappable_layouts_are_refused_in_one_line(results, case, needle):
    error = results[json.dumps(case, sort_keys=True)]["error"]
    assert error.startswith("UnsupportedOptimizerError") and needle in error and "\n" not in error


@pytest.mark.parametrize("args,environ,refused", [
    (dict(fsdp_plugin_args={"fsdp_version": 1}), {}, True),  # recipe: fsdp_config: {version: 1}
    (dict(fsdp_plugin_args={"fsdp_version": 2}), {"ACCELERATE_USE_FSDP": "true"}, False),  # the recipe decides
    (dict(fsdp_plugin_args=None), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, True),
    (dict(fsdp_plugin_args=None), {"ACCELERATE_USE_FSDP": "true"}, True),  # accelerate's default version is 1
    (dict(fsdp_plugin_args=None), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, False),
    (dict(fsdp_plugin_args=None), {}, False),
])
def test_fsdp1_is_refused_at_parse_time(args, environ, refused):
    from types import SimpleNamespace

    assert fsdp_problems(SimpleNamespace(deepspeed=None, **args), environ) == ([FSDP1_REFUSAL] if refused else [])


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n')

    def write(**overrides):
        fields = {"model_name_or_path": "gmt-align-tests/no-such-model", "dataset_name": str(data),
                  "output_dir": str(tmp_path / "out"), "bf16": False, "report_to": "none", **overrides}
        path = tmp_path / "sft.yaml"
        path.write_text(yaml.safe_dump(fields))
        return str(path)

    return write


def one_line_refusal(capsys, *argv):
    from gmt_align.cli import main

    status = main(list(argv))
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and "Warning" not in line and not line.startswith("[transformers]")]  # its deprecations
    assert status == 2 and len(lines) == 1, lines
    return lines[0]


def test_fsdp1_in_the_recipe_is_refused_by_validate_and_before_loading(capsys, recipe):
    from gmt_align.cli.validate import validate_recipe

    path = recipe(fsdp=True, fsdp_config={"version": 1})
    assert [p for p in validate_recipe(path).problems if "FSDP" in p] == [f"{path}: {FSDP1_REFUSAL}"]
    assert FSDP1_REFUSAL in one_line_refusal(capsys, "sft", "--config", path)
    assert validate_recipe(recipe(fsdp=True, fsdp_config={"version": 2})).problems == []


def test_what_accelerate_launch_exports_is_checked_before_loading(capsys, monkeypatch, recipe):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with fsdp_version: 1
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert FSDP1_REFUSAL in one_line_refusal(capsys, "sft", "--config", recipe())


def test_fsdp_launch_next_to_a_recipes_deepspeed_is_refused():
    """A paper recipe (``deepspeed: ds_configs/zero3.json``) under the FSDP2 accelerate config."""
    from types import SimpleNamespace

    args = SimpleNamespace(fsdp_plugin_args=None, deepspeed="ds_configs/zero3.json")
    (problem,) = fsdp_problems(args, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert 'add --deepspeed ""' in problem and "ds_configs/zero3.json" in problem
    assert fsdp_problems(SimpleNamespace(fsdp_plugin_args=None, deepspeed=""), {"ACCELERATE_USE_FSDP": "true",
                                                                             "FSDP_VERSION": "2"}) == []


def test_the_accelerate_config_is_fsdp2_as_accelerate_reads_it():
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(ROOT / "recipes" / "accelerate_configs" / "fsdp2.yaml"))
    assert loaded.distributed_type == "FSDP" and loaded.fsdp_config["fsdp_version"] == 2
    assert loaded.mixed_precision in (None, "no")  # precision comes from the recipe
    assert loaded.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the final model saved whole
