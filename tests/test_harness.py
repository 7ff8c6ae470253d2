"""gmt-align eval --tasks (lm-evaluation-harness): its refusals before any model loads, the recipes'
eval_tasks, and a task of our own (a YAML over quickstart data) run end to end on the real SmolLM2,
its accuracy checked against the log-likelihoods computed here with transformers, its figures in the
results file, on the console and in the training run's W&B run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmt_align.cli import main as cli_main
from gmt_align.cli.evaluate import build_parser, recipe_tasks
from gmt_align.evaluation import harness
from gmt_align.evaluation.evaluate import EvalUsageError

ROOT = Path(__file__).resolve().parents[1]
PAPER_TASKS = {"code": {"humaneval", "mbpp"}, "math": {"gsm8k", "minerva_math"},
               "general": {"mmlu", "gsm8k", "bbh_cot_fewshot", "tydiqa_goldp", "truthfulqa_mc2", "humaneval"}}
PAPER_TASKS["dpo"] = PAPER_TASKS["general"]  # docs/recipes.md: the DPO models are evaluated as general SFT
TASK = "qs_arith_mc"


def _err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("args, needle", [
    ([], "give --tasks (lm-evaluation-harness"),
    (["--tasks", "gsm8k", "--task", "chain_sum"], "two kinds of evaluation"),
    (["--tasks", "gsm8k", "--n", "3"], "--n is an option of the built-in --task"),
    (["--tasks", "gsm8k", "--metric", "nll"], "--metric is an option of the built-in"),
    (["--task", "chain_sum", "--num_fewshot", "2"], "--num_fewshot is an option of --tasks"),
    (["--task", "chain_sum", "--apply_chat_template"], "--apply_chat_template is an option of --tasks"),
    (["--tasks", "gsm8k", "--limit", "0"], "--limit 0"),
    (["--tasks", "gsm8k", "--limit", "2.5"], "--limit 2.5"),
    (["--tasks", "gsm8k", "--num_fewshot", "-1"], "--num_fewshot -1"),
    (["--tasks", "gsm8k", "--include_path", "/no/such/dir"], "--include_path /no/such/dir: no such directory"),
    (["--tasks", "gsm8k,,mbpp"], "give task names separated by commas"),
    (["--tasks", "gsm8k", "--report_to", "tensorboard"], "invalid choice"),
    (["--config", "{recipe}"], "the recipe has no eval_tasks"),
    (["--config", "{recipe}", "--task", "chain_sum"], "--config runs the recipe's eval_tasks"),
    (["--config", "/no/such/recipe.yaml"], "No such file"),
])
def test_bad_input_is_one_line_before_lm_eval_loads_anything(args, needle, capsys, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {model}\nmax_steps: 2\n")
    monkeypatch.setattr(harness, "task_manager", lambda *a: pytest.fail("built lm-eval's task index"))
    monkeypatch.setattr(harness, "run_harness", lambda *a, **k: pytest.fail("ran lm-eval"))
    args = [a.format(recipe=recipe) for a in args]
    assert cli_main(["eval", *([] if "--config" in args else ["--model", str(model)]), *args]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("gmt-align eval: error: ") and needle in lines[0], lines


@pytest.mark.parametrize("domain", sorted(PAPER_TASKS))
def test_paper_recipes_carry_their_benchmarks_and_eval_reads_them(domain):
    for recipe in sorted((ROOT / "recipes" / domain).rglob("*.yaml")):
        fields = yaml.safe_load(recipe.read_text())
        assert set(fields["eval_tasks"]) == PAPER_TASKS[domain], recipe
        args = build_parser().parse_args(["--config", str(recipe)])
        recipe_tasks(args)
        assert args.model == fields["output_dir"] and args.tasks.split(",") == fields["eval_tasks"]
        args = build_parser().parse_args(["--config", str(recipe), "--tasks", "gsm8k", "--model", "elsewhere"])
        recipe_tasks(args)  # the command line wins
        assert (args.tasks, args.model) == ("gsm8k", "elsewhere")


def test_an_adapter_goes_to_lm_eval_as_peft_on_its_base(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    assert harness.model_args(adapter) == {"pretrained": "/models/base", "peft": str(adapter), "dtype": "auto"}
    (adapter / "tokenizer_config.json").write_text("{}")  # as gmt-align sft --use_peft saves it
    assert harness.model_args(adapter)["tokenizer"] == str(adapter)
    assert harness.model_args(tmp_path) == {"pretrained": str(tmp_path), "dtype": "auto"}


def test_the_training_run_is_found_from_the_run_folder_or_a_checkpoint_in_it(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    assert harness.training_wandb_run(tmp_path) is None
    (tmp_path / "wandb_run.json").write_text(json.dumps({"id": "abc", "project": "p", "entity": None}))
    assert harness.training_wandb_run(tmp_path)["id"] == "abc"
    assert harness.training_wandb_run(tmp_path / "checkpoint-4")["id"] == "abc"


# ----------------------------------------------------------------- real model, end to end


def _task_files(folder: Path, n: int = 12) -> list[dict]:
    """A multiple-choice task over the first ``n`` quickstart SFT problems: the right answer and two
    near misses, the right one at position i % 3."""
    rows = [json.loads(line) for line in (ROOT / ".cache/quickstart/data/sft_train.jsonl").open()][:n]
    docs = []
    for i, row in enumerate(rows):
        answer = int(row["messages"][1]["content"])
        choices = [str(answer + 1), str(answer - 10)]
        choices.insert(i % 3, str(answer))
        docs.append({"question": row["messages"][0]["content"], "choices": choices, "gold": i % 3})
    (folder / "qs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "qs.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return docs


def _direct_accuracy(model_dir: Path, docs: list[dict]) -> list[bool]:
    """Per document: does the right answer have the largest summed log-probability after the prompt?
    (lm-eval's ``acc``; the continuation is " " + choice, its tokens those of the whole after the prompt's.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = []
    for doc in docs:
        context = doc["question"] + "\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            start = len(tokenizer(context, add_special_tokens=False).input_ids)
            ids = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids))))
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    return correct


def doc_line(*words: str) -> list[str]:
    """The `gmt-align eval` line of docs/evaluation.md that holds ``words``, as argv after ``eval``."""
    import shlex

    text = (ROOT / "docs" / "evaluation.md").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines()
               if line.startswith("gmt-align eval ") and all(w in shlex.split(line) for w in words)]
    return shlex.split(line)[2:]


def test_the_documented_task_yaml_is_the_one_the_test_runs(tmp_path):
    text = (ROOT / "docs" / "evaluation.md").read_text()
    documented = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    _task_files(tmp_path)
    ours = yaml.safe_load((tmp_path / f"{TASK}.yaml").read_text())
    assert documented["dataset_kwargs"]["data_files"] == {"test": "my_tasks/qs.jsonl"}
    assert {**documented, "dataset_kwargs": None} == {**ours, "dataset_kwargs": None}
    assert doc_line("--include_path")[doc_line("--include_path").index("--tasks") + 1] == TASK


def _eval(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "gmt_align.cli", "eval", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


def _offline_history(run_dir: Path) -> list[dict]:
    wandb_cli = Path(sys.executable).with_name("wandb")
    lines = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                           text=True, check=True, timeout=120).stdout.splitlines()
    return [r["history"]["item"] for r in map(json.loads, lines) if r.get("type") == "history"]


def test_own_task_end_to_end_matches_transformers_and_logs_to_the_training_run(smollm2_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = _task_files(tasks)
    # A training run's folder: the model's files, and the W&B run training started (offline).
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    for file in smollm2_dir.iterdir():
        (run_folder / file.name).symlink_to(file)
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    # In a process of its own, as training is: wandb's settings, once set up in a process, outlive
    # wandb.finish() and would move the offline runs of every later test of this one.
    training_id = subprocess.run(
        [sys.executable, "-c", "import wandb; run = wandb.init(project='gmt-test'); run.log({'train/loss': 1.0}); "
                               "print(run.id); wandb.finish()"],
        env={**os.environ, **wandb_env}, capture_output=True, text=True, check=True, timeout=300).stdout.split()[-1]
    (run_folder / "wandb_run.json").write_text(json.dumps({"id": training_id, "project": "gmt-test", "entity": None}))

    # Before the model: an unknown name, and a task that runs code without consent, are one line.
    bad = _eval("--model", str(run_folder), "--tasks", f"{TASK},qs_arith_nope", "--include_path", str(tasks))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "gmt-align eval: error: --tasks: qs_arith_nope: not an lm-eval task"), bad.stderr[-2000:]
    assert "Loading weights" not in bad.stderr
    for domain, names in PAPER_TASKS.items():  # every recipe's benchmark is one lm-eval knows
        harness.check_tasks(sorted(names), None, confirm_unsafe=True)
    with pytest.raises(EvalUsageError, match="humaneval, mbpp executes the code the model writes; add "
                       "--confirm_run_unsafe_code"):
        harness.check_tasks(["humaneval", "mbpp", "gsm8k"], None, confirm_unsafe=False)

    argv = doc_line("--include_path")  # as documented, our folders in place of outputs/ and my_tasks/
    argv[argv.index("--model") + 1], argv[argv.index("--include_path") + 1] = str(run_folder), str(tasks)
    run = _eval(*argv, "--num_fewshot", "0", env=wandb_env)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = (run_folder / "lm_eval").glob("results_*.json")
    results = json.loads(results_file.read_text())["results"][TASK]
    correct = _direct_accuracy(smollm2_dir, docs)
    n, k = len(correct), sum(correct)
    assert results["acc,none"] == pytest.approx(k / n, abs=1e-12)
    p = k / n  # lm-eval's standard error of a mean: the sample standard deviation over sqrt(n)
    assert results["acc_stderr,none"] == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n), rel=1e-9)
    (row,) = [line for line in run.stdout.splitlines() if line.startswith(f"|{TASK}")]
    assert f"{p:.4f}" in row and f"{results['acc_stderr,none']:.4f}" in row, row
    # The same W&B run as training: a second offline piece with the training run's id.
    pieces = sorted((tmp_path / "wandb").glob(f"offline-run-*-{training_id}"))
    assert len(pieces) == 2, pieces
    history = _offline_history(pieces[-1])
    logged = [h for h in history if f"{TASK}/acc" in h]
    assert logged and logged[0][f"{TASK}/acc"] == pytest.approx(p) and \
        logged[0][f"{TASK}/acc_stderr"] == pytest.approx(results["acc_stderr,none"])
    assert f"logged to W&B run {training_id} (the training run)" in run.stdout
