"""``gmt-align grpo``: TRL's GRPOTrainer with GMT from a recipe. Rewards named as ``trl grpo`` names
them (gmt-align's arithmetic_accuracy, TRL's, a dotted path or module:function), refused in one line
before any model loads when they resolve to nothing; the documented lines run on the tiny model; under
ZeRO-2, ZeRO-3 and FSDP2 on 2 ranks one GRPO step masks what one process masks."""

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import UNLOADABLE, run, validate
from launchers import launch, launcher_env
from multirank.launch import free_port, run_ranks, run_together
from test_fsdp2_trainer import fsdp_on_cpu
from quickstart_runs import assert_unchanged_fraction_is_the_ratio, mask_agreement, saved_weights, unchanged_masks

from gmt_align.cli.rewards import RewardError, resolve_reward, reward_problems
from gmt_align.evaluation.evaluate import extract_answer
from gmt_align.evaluation.problems import TRAIN_SEED, make_problems, near_miss
from gmt_align.evaluation.rewards import arithmetic_accuracy
from gmt_align.testing import ROOT, distinct_characters
from gmt_align.training.machine import installed

RECIPE = "recipes/quickstart/grpo.yaml"
DATA = ROOT / ".cache" / "quickstart" / "data" / "grpo_train.jsonl"
DOCUMENTED = "gmt-align grpo --config recipes/quickstart/grpo.yaml --max_steps 2"


@pytest.fixture(scope="module")
def grpo_data():
    from gmt_align.quickstart import prepare_quickstart

    return prepare_quickstart(ROOT / ".cache" / "quickstart")["grpo_train"]


def test_arithmetic_accuracy_is_the_task_scorer_on_the_extracted_answer():
    """Right answers, phrased answers and near misses, as text and as chat turns: 1.0 exactly where the
    reasoning-gym scorer gives the extracted number full marks."""
    problems = make_problems(60, seed=TRAIN_SEED)
    rng = random.Random(0)
    texts = [text for p in problems for text in (p.answer, f"The answer is {p.answer}.", near_miss(p, rng), "no idea")]
    answers = [p.answer for p in problems for _ in range(4)]
    tasks = [p.task for p in problems for _ in range(4)]
    expected = [float(p.score(extract_answer(text)) == 1.0) for p in problems
                for text in texts[4 * problems.index(p): 4 * problems.index(p) + 4]]
    assert arithmetic_accuracy(texts, answer=answers, task=tasks) == expected
    chats = [[{"role": "assistant", "content": text}] for text in texts]
    assert arithmetic_accuracy(chats, answer=answers, task=tasks) == expected
    assert expected.count(1.0) == 120  # the right and the phrased answers; no near miss, no "no idea"
    assert arithmetic_accuracy(["12.0", "13"], answer=["12", "12"]) == [1.0, 0.0]  # no task column


def test_rewards_resolve_as_trl_grpo_names_them(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def exact(completions, solution, **kwargs):\n"
                                            "    return [float(c == s) for c, s in zip(completions, solution)]\n")
    monkeypatch.chdir(tmp_path)  # trl grpo looks in the working directory first
    assert resolve_reward("arithmetic_accuracy") is arithmetic_accuracy
    assert resolve_reward("gmt_align.testing.distinct_characters") is distinct_characters
    assert resolve_reward("gmt_align.testing:distinct_characters") is distinct_characters
    dotted, from_file = resolve_reward("my_rewards.exact"), resolve_reward("my_rewards.py:exact")
    assert dotted(["1", "2"], solution=["1", "1"]) == from_file(["1", "2"], solution=["1", "1"]) == [1.0, 0.0]
    # a file is run once, as an import is: the checks, the data check and the trainer resolve it alike
    (tmp_path / "counted.py").write_text("import builtins\nbuiltins.counted_runs = getattr(builtins, 'counted_runs', 0) + 1\n"
                                         "def f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    assert resolve_reward("counted.py:f") is resolve_reward(str(tmp_path / "counted.py") + ":f")
    import builtins

    assert builtins.counted_runs == 1
    del builtins.counted_runs
    import trl.rewards

    assert resolve_reward("think_format_reward") is trl.rewards.think_format_reward


@pytest.mark.parametrize("name, message", [
    ("arithmetic_acuracy", "reward_funcs: unknown reward 'arithmetic_acuracy': one of arithmetic_accuracy, "),
    ("no_such_module.f", "reward_funcs: 'no_such_module.f': no module named 'no_such_module'"),
    ("gmt_align.testing:nothing", "reward_funcs: 'gmt_align.testing:nothing': gmt_align.testing has no function "
                                  "'nothing'"),
    ("missing.py:f", "reward_funcs: 'missing.py:f': no such file missing.py"),
])
def test_a_reward_that_resolves_to_nothing_is_one_line(name, message):
    with pytest.raises(RewardError) as error:
        resolve_reward(name)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_reward_problems_list_each_name_and_a_missing_reward():
    assert reward_problems({"reward_funcs": ["arithmetic_accuracy", "think_format_reward"]}, needs_one=True) == []
    assert reward_problems({"reward_model_name_or_path": "some/hub-model"}, needs_one=True) == []
    assert [line.split(":")[0] for line in reward_problems({"reward_funcs": ["x", "y.z"]}, needs_one=True)] == [
        "reward_funcs", "reward_funcs"]
    assert reward_problems({}, needs_one=True)[0].startswith("GRPO needs a reward")


def test_a_local_reward_model_must_exist_with_readable_weights(tmp_path):
    """reward_model_name_or_path, checked as model_name_or_path is: a local path must exist and its
    safetensors files be readable; a hub id is taken on trust."""
    from gmt_align.cli.recipe import source_problems

    def lines(path):
        recipe = {"reward_model_name_or_path": path, "model_name_or_path": "some/hub-model"}
        return [line for line in source_problems(recipe, recipe, recipe) if line.startswith("reward_model")]

    assert lines("./no/such/dir") == ["reward_model_name_or_path: no such directory ./no/such/dir"]
    assert lines("some/hub-reward-model") == []
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    [line] = lines(str(tmp_path))
    assert line.startswith(f"reward_model_name_or_path: {tmp_path / 'model.safetensors'} is not a readable "
                           "safetensors file"), line


def run_cli(*argv, cwd=ROOT, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "gmt_align.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# A hub id: were anything to load it offline, the error would be long, not one line.
NO_MODEL = ["--model_name_or_path", UNLOADABLE]


@pytest.mark.parametrize("overrides, message", [
    (["--reward_funcs", "nosuch"], "gmt-align grpo: error: reward_funcs: unknown reward 'nosuch'"),
    (["--use_vllm", "true"], "gmt-align grpo: error: use_vllm needs vLLM and a CUDA GPU, and this machine lacks "
                             "the vllm package"),
    (["--reward_funcs", "gmt_align.testing.distinct_characters", "gmt_align.testing.nothing"],
     "gmt-align grpo: error: reward_funcs: 'gmt_align.testing.nothing': gmt_align.testing has no function"),
    pytest.param(["--reward_funcs", "accuracy_reward"],
                 "gmt-align grpo: error: reward_funcs: TRL's accuracy_reward needs the math-verify package",
                 marks=pytest.mark.skipif(installed("math_verify"), reason="math-verify is installed here")),
])
def test_grpo_refuses_before_any_model_loads(capsys, grpo_data, tmp_path, overrides, message):
    status, lines = run(capsys, "grpo", "--config", RECIPE, "--output_dir", str(tmp_path / "out"), *NO_MODEL,
                        *overrides)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "out").exists()


def test_a_grpo_recipe_without_a_reward_or_without_the_column_its_reward_reads(capsys, grpo_data, tmp_path):
    recipe = (ROOT / RECIPE).read_text()
    (tmp_path / "none.yaml").write_text(recipe.replace("reward_funcs: [arithmetic_accuracy]", ""))
    status, lines = run(capsys, "grpo", "--config", str(tmp_path / "none.yaml"), *NO_MODEL)
    assert status == 2 and lines == ["gmt-align grpo: error: GRPO needs a reward: reward_funcs (e.g. "
                                     "[arithmetic_accuracy], a TRL reward or module:function) or "
                                     "reward_model_name_or_path"]
    rows = [json.loads(line) for line in grpo_data.read_text().splitlines()[:4]]
    with open(tmp_path / "prompts.jsonl", "w") as out:
        out.writelines(json.dumps({"prompt": row["prompt"]}) + "\n" for row in rows)
    (tmp_path / "no_answer.yaml").write_text(recipe.replace(str(DATA.relative_to(ROOT)), str(tmp_path / "prompts.jsonl")))
    status, lines = run(capsys, "grpo", "--config", str(tmp_path / "no_answer.yaml"), *NO_MODEL,
                        "--output_dir", str(tmp_path / "b"))
    assert status == 2 and lines == [
        "gmt-align grpo: error: datasets (the mixture): GRPO needs the column(s) 'answer' (the prompt, and what "
        "the reward functions read by name); it has: prompt"]


def test_validate_reads_grpo_recipes_as_grpo(capsys, grpo_data):
    status, lines = validate(capsys, RECIPE, "recipes/grpo/qwen2.5-1.5b/gmt.yaml")
    assert status == 0 and lines[0] == f"OK {RECIPE} (grpo)", lines
    assert "OK recipes/grpo/qwen2.5-1.5b/gmt.yaml (grpo, ds_configs/zero3.json: ZeRO-3)" in lines
    status, lines = validate(capsys, RECIPE, "--method", "sft")
    assert status == 1 and "reward_funcs is a GRPO field, not an SFT one (--method grpo?)" in "\n".join(lines), lines


def stats(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "gmt_stats.jsonl").read_text().splitlines()]


@pytest.mark.real_model
def test_the_documented_grpo_line_trains_two_masked_steps(grpo_data, tiny_model, tmp_path):
    """docs/recipes.md's line as written, on the tiny model with a reward that varies within a group
    (it answers no arithmetic): two steps, each keeping 1 - gmt_mask_ratio of the entries."""
    assert DOCUMENTED in (ROOT / "docs" / "recipes.md").read_text()
    result = run_cli(*DOCUMENTED.split()[1:], "--output_dir", str(tmp_path), *tiny_model,
                     "--reward_funcs", "gmt_align.testing.distinct_characters", "--max_completion_length", "8",
                     "--logging_steps", "1", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    logged = [entry for entry in stats(tmp_path) if "gmt/kept_fraction" in entry]
    assert [entry["step"] for entry in logged] == [1, 2], logged
    # 0.9 masked: ceil(0.1 n) kept of every tensor; fewer in the embedding, whose absent tokens have no gradient
    assert all(0.05 < entry["gmt/kept_fraction"] <= 0.1 + 1e-4 for entry in logged), logged
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.real_model
def test_grpo_steps_whose_rewards_are_all_equal_go_on(grpo_data, tiny_model, tmp_path):
    """The tiny model answers no arithmetic: every reward is 0, every advantage 0, the gradient exactly
    zero. Normal in GRPO (not a diverged run, which stops SFT): both steps run, nothing is kept."""
    result = run_cli(*DOCUMENTED.split()[1:], "--output_dir", str(tmp_path), *tiny_model,
                     "--max_completion_length", "4", "--logging_steps", "1", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    logged = [entry for entry in stats(tmp_path) if "gmt/kept_fraction" in entry]
    assert [(entry["step"], entry["gmt/kept_fraction"]) for entry in logged] == [(1, 0.0), (2, 0.0)], logged


@pytest.fixture(scope="module")
def one_process_grpo_step(grpo_data, tiny_model, tmp_path_factory):
    """1 process x 4 rows: the step every 2-rank run below must mask alike."""
    out = tmp_path_factory.mktemp("one")
    result = subprocess.run([sys.executable, WORKER, str(out), "none", "4"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


WORKER = str(ROOT / "tests" / "multirank" / "grpo_worker.py")


@pytest.mark.multirank
@pytest.mark.parametrize("backend", ["zero2", "zero3", "fsdp2"])
def test_grpo_on_two_ranks_masks_what_one_process_masks(one_process_grpo_step, tiny_model, tmp_path, backend):
    """One GRPO step (tests/multirank/grpo_worker.py): 2 ranks x 2 rows under ZeRO-2, ZeRO-3 or FSDP2
    against 1 process x 4 rows, the same completions (sampling seeded by each row's place), update
    mode: the same entries unchanged, exactly the mask ratio of each tensor, the same kept counts."""
    two = tmp_path / "two"
    if backend == "fsdp2":  # accelerate's FSDP path on CPU ranks, as tests/test_fsdp2_trainer.py runs it
        env = launcher_env(**fsdp_on_cpu(), MASTER_PORT=str(free_port()))
        command = ["accelerate", "launch", "--config_file", "recipes/accelerate_configs/fsdp2.yaml",
                   "--num_processes", "2", "--main_process_port", env["MASTER_PORT"], WORKER, str(two), "fsdp2", "2"]
        (result,) = run_together([(command, env)], timeout=600)
        assert result.returncode == 0, result.stdout[-4000:]
    else:
        for rank, result in enumerate(run_ranks([WORKER, str(two), f"ds_configs/{backend}.json", "2"], world=2)):
            assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    one_ran, two_ran = (json.loads((out / "kept.json").read_text()) for out in (one_process_grpo_step, two))
    assert two_ran["ran"] == {"world": 2, "deepspeed": backend != "fsdp2", "fsdp": backend == "fsdp2",
                              "backend": {"zero2": "zero12", "zero3": "zero3", "fsdp2": "fsdp2"}[backend]}, two_ran
    base = saved_weights(tiny_model[1])
    assert_unchanged_fraction_is_the_ratio(base, saved_weights(two), 0.3)
    overall, worst = mask_agreement(unchanged_masks(base, saved_weights(two)),
                                    unchanged_masks(base, saved_weights(one_process_grpo_step)))
    assert overall >= 0.99999 and worst >= 0.9999, (overall, worst)
    assert two_ran["kept"] == one_ran["kept"]


@pytest.mark.multirank
@pytest.mark.launcher
def test_grpo_launched_under_zero3(grpo_data, tiny_model, tmp_path):
    """docs/distributed.md's GRPO line, as written, on 2 CPU ranks: real sampling on each rank, GMT's
    kept fraction reduced over both."""
    launch("accelerate_zero3_grpo", tmp_path, *tiny_model, "--num_generations", "2",
                       "--reward_funcs", "gmt_align.testing.distinct_characters", "--max_completion_length", "8")
    logged = [entry for entry in stats(tmp_path) if "gmt/kept_fraction" in entry]
    assert len(logged) == 2 and all(0.05 < entry["gmt/kept_fraction"] <= 0.1 + 1e-4 for entry in logged), logged
    assert (tmp_path / "model.safetensors").is_file()


def test_the_grpo_study_plans_its_arms_paired_by_seed_and_refuses_a_mixed_folder(tmp_path, capsys):
    """benchmarks/grpo_study.py --plan: base once, every other arm at every seed; a folder holding runs
    of another regime is refused (the runs themselves: docs/results.md, once made)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import grpo_study

    grpo_study.main(["--out", str(tmp_path), "--seeds", "1", "2", "--plan"])
    planned = capsys.readouterr().out.partition(f"{tmp_path}: ")[2].strip().split(", ")
    assert planned[0] == "base-s1" and "base-s2" not in planned and len(planned) == 1 + 7 * 2
    assert {"gmt-0.99-s2", "random-0.99-s2", "grpo-s1"} <= set(planned)
    (tmp_path / "study.json").write_text(json.dumps({**grpo_study.REGIME, "lr": 1.0}))
    with pytest.raises(SystemExit, match="holds runs of another regime"):
        grpo_study.main(["--out", str(tmp_path), "--plan"])


def _documented_grpo_study_lines() -> list[list[str]]:
    """docs/results.md's benchmarks/grpo_study.py lines (code blocks), as written."""
    text = (ROOT / "docs" / "results.md").read_text().replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines()
            if line.startswith(".venv/bin/python benchmarks/grpo_study.py")]


@pytest.mark.benchmark
def test_documented_grpo_study_lines_rebuild_the_report_and_plan_only_what_is_missing(tmp_path):
    """docs/results.md's GRPO study lines as written: the report line rebuilds the table from a copy of the
    committed runs (every run in it, with its own figure); a training line plus --plan (which trains
    nothing) plans exactly the named runs that have no committed result file."""
    import shutil

    lines = _documented_grpo_study_lines()
    reports = [argv for argv in lines if "--report_only" in argv]
    trains = [argv for argv in lines if "--report_only" not in argv]
    assert reports and trains, lines
    committed = ROOT / "benchmarks" / "study_results" / "grpo"
    runs = [json.loads(f.read_text()) for f in sorted((committed / "runs").glob("*.json"))]
    assert len(runs) >= 1 + 7 * 3  # base, and every other arm at three seeds at least
    for i, argv in enumerate(reports):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(committed, copy)
        done = subprocess.run([*argv, "--out", str(copy)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        arms = json.loads((copy / "results.json").read_text())["arms"]
        for r in runs:
            reward = sum(t["reward"] for t in r["held_out"].values()) / len(r["held_out"])
            assert arms[r["arm"]]["per_seed"][str(r["seed"])]["reward"] == pytest.approx(reward)
            assert f"| {r['arm']} |" in (copy / "results.md").read_text()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import grpo_study

    for argv in trains:
        done = subprocess.run([*argv, "--plan"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        planned = [p for p in done.stdout.strip().rsplit(": ", 1)[1].split(", ") if p != "none"]
        args = grpo_study.make_parser().parse_args(argv[2:])
        out = ROOT / args.out
        named = [f"{a}-s{s}" for s in args.seeds for a in args.arms if not (a == "base" and s != args.seeds[0])]
        assert planned == [n for n in named if not (out / "runs" / f"{n}.json").is_file()], argv
