"""gmt-align eval --metric nll / preference: the arithmetic by hand, the teacher-forced log-probabilities
against an unbatched forward of the real SmolLM2, a model trained on its references (NLL drops,
preference moves), and the documented commands."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gmt_align.cli.evaluate import main as eval_command
from gmt_align.evaluation import evaluate as ev
from gmt_align.evaluation import likelihood as lk
from gmt_align import quickstart as qs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "evaluation.md"
BASE = ".cache/quickstart/SmolLM2-135M-Instruct"


def test_nll_summary_by_hand():
    # example 1: two answer tokens with log p summing to -2.0 -> 1.0 per token; example 2: one token, -3.0
    s = lk.nll_summary([(-2.0, 2), (-3.0, 1)])
    assert s["per_example"] == [1.0, 3.0] and s["nll"] == 2.0
    assert s["nll_tokens"] == pytest.approx(5 / 3) and s["tokens"] == 3
    # sd of (1, 3) = sqrt(2); half-width 1.96 * sqrt(2) / sqrt(2) = 1.96
    assert s["nll_ci95"] == pytest.approx([2.0 - lk.Z95, 2.0 + lk.Z95])


def test_preference_summary_by_hand():
    # rewards (beta 0.1): chosen 0.1*(-1+1.5)=0.05, 0.1*(-2+1.5)=-0.05, 0; rejected -0.05, 0.05, 0
    s = lk.preference_summary([-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0], [-1.5, -1.5, -3.0], [-1.5, -1.5, -3.0], 0.1)
    assert s["margins"] == pytest.approx([0.1, -0.1, 0.0])
    assert s["preferred"] == 1 and s["preference_accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert s["reward_margin"] == pytest.approx(0.0, abs=1e-12)
    assert s["preference_ci95"] == list(ev.wilson_interval(1, 3))
    # ranking: the model puts chosen first on pair 0 only; the reference on none (ties)
    assert s["ranking_accuracy"] == pytest.approx(1 / 3) and s["reference_ranking_accuracy"] == 0.0
    assert lk.preference_summary([-1.0], [-2.0], [0.0], [0.0], beta=0.5)["reward_margin"] == pytest.approx(0.5)


def test_preference_pairs_are_wrong_near_misses_and_stable():
    problems = [e.problem for e in ev.reasoning_gym_set("chain_sum", 12, qs.EVAL_SEED).examples]
    rejected = lk.preference_pairs(problems, qs.EVAL_SEED)
    for p, wrong in zip(problems, rejected):
        assert p.score(wrong) < 1.0 and int(wrong) - int(p.answer) in (-10, -2, -1, 1, 2, 10)
    assert lk.preference_pairs(problems[:5], qs.EVAL_SEED) == rejected[:5]  # prefix-stable


# ------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory):
    """SmolLM2 after 4 AdamW steps on the reference answers of the first 4 held-out chain_sum problems
    (loss on the answer tokens alone), saved; and the figures before and after."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    examples = ev.reasoning_gym_set("chain_sum", 4, qs.EVAL_SEED).examples
    prompts, answers = [e.prompt for e in examples], [e.expected for e in examples]
    before = lk.answer_logprobs(model.eval(), tokenizer, prompts, answers, batch_size=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(4):
        loss = 0.0
        for prompt, answer in zip(prompts, answers):
            p, a = lk.answer_ids(tokenizer, prompt, answer)
            logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1:-1]
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(a))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer, prompts, answers, before


def test_batched_logprobs_equal_an_unpadded_forward(trained):
    import torch

    _, model, tokenizer, prompts, answers, _ = trained
    batched = lk.answer_logprobs(model, tokenizer, prompts, answers, batch_size=3)  # 3 + 1: padding in the first
    for (total, count), prompt, answer in zip(batched, prompts, answers):
        p, a = lk.answer_ids(tokenizer, prompt, answer)
        assert tokenizer.decode(a).startswith(answer) and tokenizer.decode(a).endswith("<|im_end|>")
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)
        by_hand = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
        assert count == len(a) and total == pytest.approx(by_hand, abs=1e-3)


def _eval(*args):
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    import os

    run = subprocess.run([sys.executable, "-m", "gmt_align.cli", "eval", *args], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, json.loads(run.stdout.split("summary ", 1)[1])


def doc_line(*words: str) -> list[str]:
    """The `gmt-align eval` line of docs/evaluation.md that holds ``words``, as argv after ``eval``."""
    text = DOC.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines()
               if line.startswith("gmt-align eval ") and all(w in shlex.split(line) for w in words)]
    return shlex.split(line)[2:]


def test_documented_nll_line_and_training_lowers_the_nll(trained, smollm2_dir, tmp_path):
    out, *_, before = trained
    argv = doc_line("--metric", "nll")  # as written, on the base model, then --n 4 (the last --n wins)
    assert shlex.join(["gmt-align", "eval", *argv]) in (ROOT / "docs" / "results.md").read_text()  # shown there too
    stdout, base = _eval(*argv, "--n", "4", "--output", str(tmp_path / "nll.jsonl"))
    assert base["metric"] == "nll" and base["n"] == 4 and "teacher-forced" in stdout
    assert argv[argv.index("--model") + 1] == BASE and argv[argv.index("--task") + 1] == "chain_sum"
    assert base["nll"] == pytest.approx(lk.nll_summary(before)["nll"], abs=1e-4)
    rows = [json.loads(line) for line in (tmp_path / "nll.jsonl").read_text().splitlines()]
    assert [r["nll"] for r in rows] == pytest.approx(lk.nll_summary(before)["per_example"], abs=1e-4)
    argv[argv.index("--model") + 1] = str(out)
    _, after = _eval(*argv, "--n", "4")
    assert after["nll"] < base["nll"] - 0.1  # trained on exactly these answers


def test_documented_preference_line(trained, smollm2_dir):
    out, model, tokenizer, prompts, answers, before = trained
    argv = doc_line("--metric", "preference")
    argv[argv.index("--model") + 1] = str(out)  # the line names a DPO run's output; ours is the trained model
    assert argv[argv.index("--ref_model") + 1] == BASE
    _, s = _eval(*argv, "--n", "4")
    rejected = lk.preference_pairs([e.problem for e in ev.reasoning_gym_set("chain_sum", 4, qs.EVAL_SEED).examples],
                                   qs.EVAL_SEED)
    policy_r = lk.answer_logprobs(model, tokenizer, prompts, rejected)
    policy_c = lk.answer_logprobs(model, tokenizer, prompts, answers)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    ref_r = lk.answer_logprobs(base, tokenizer, prompts, rejected)
    want = lk.preference_summary(*[[x for x, _ in v] for v in (policy_c, policy_r, before, ref_r)], beta=0.1)
    assert s["preferred"] == want["preferred"] and s["reward_margin"] == pytest.approx(want["reward_margin"], abs=1e-4)
    assert (s["ranking_accuracy"], s["reference_ranking_accuracy"]) == (want["ranking_accuracy"],
                                                                        want["reference_ranking_accuracy"])
    assert s["reward_chosen"] > 0  # the trained model raised the chosen answers' likelihood
    _, same = _eval("--model", BASE, "--task", "chain_sum", "--n", "2", "--metric", "preference", "--ref_model", BASE)
    assert same["preferred"] == 0 and same["reward_margin"] == 0.0  # against itself every reward is 0: no wins
    assert same["ranking_accuracy"] == same["reference_ranking_accuracy"]  # ...but it ranks the pairs


@pytest.mark.parametrize("args, needle", [
    (["--task", "humaneval", "--metric", "nll"], "reasoning-gym task"),
    (["--task", "chain_sum", "--metric", "nll", "--max_new_tokens", "4"], "generates nothing"),
    (["--task", "chain_sum", "--metric", "nll", "--timeout", "3"], "generates nothing"),
    (["--task", "chain_sum", "--metric", "preference"], "needs --ref_model"),
    (["--task", "chain_sum", "--metric", "preference", "--ref_model", "/nowhere"], "not a saved model"),
    (["--task", "chain_sum", "--metric", "preference", "--ref_model", "{model}", "--beta", "0"], "--beta"),
    (["--task", "chain_sum", "--beta", "0.1"], "option of --metric preference"),
    (["--task", "chain_sum", "--metric", "nll", "--ref_model", "{model}"], "option of --metric preference"),
    (["--task", "chain_sum", "--metric", "bleu"], "invalid choice"),
])
def test_metric_bad_input_is_one_line(args, needle, capsys, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    monkeypatch.setattr(ev, "load", lambda *a: pytest.fail("loaded the model"))
    assert eval_command(["--model", str(model), *[a.format(model=model) for a in args]]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gmt-align eval: error: ") and needle in lines[0], lines
