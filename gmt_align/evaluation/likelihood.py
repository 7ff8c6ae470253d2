"""Teacher-forced metrics for ``gmt-align eval``: no generation, so no decoding noise.

* ``nll``: the mean per-token negative log-likelihood of the reference answers given their prompts
  (:func:`nll_summary`). Per example: the mean over its answer tokens; the metric is the mean over
  examples (each problem weighs the same), with a 95 % normal interval over problems. The
  token-pooled mean (sum over all answer tokens / their count) is reported beside it.
* ``preference``: DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of the correct
  answer (chosen) and of a near miss (rejected) on held-out pairs (:func:`preference_pairs`); the
  preference accuracy is the fraction with reward(chosen) > reward(rejected) (strictly, as TRL's
  ``rewards/accuracies``), with its Wilson interval, and the reward margin is the mean of
  reward(chosen) - reward(rejected), with a 95 % normal interval (:func:`preference_summary`).
  Against itself every reward is 0, so the reference has no preference accuracy of its own; the
  ranking accuracy is what compares a model with its reference: the fraction of pairs with
  log pi(chosen) > log pi(rejected) for the model, and the same for the reference.

The answer tokens are what the chat template renders after the generation prompt, trailing
whitespace removed: for SmolLM2 the answer's tokens and ``<|im_end|>``. Without a chat template:
the answer's tokens and the tokenizer's EOS. Prompt and answer are tokenized apart and joined, as
TRL's DPO trainer does, so the boundary never moves. Batches are right-padded, in input order, under
``torch.inference_mode``: the same model, set and batch size give the same figures.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scipy.stats import norm

from .evaluate import DEFAULT_N, load, reasoning_gym_set, wilson_interval
from .problems import EVAL_SEED, near_miss, write_jsonl

Z95 = float(norm.ppf(0.975))  # the standard normal's 0.975 quantile
DEFAULT_BETA = 0.1  # recipes/quickstart/dpo.yaml's


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` of one (user prompt, assistant answer) pair."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the answer after the generation prompt")
        tail = full[len(head):].rstrip()
        return (tokenizer(head, add_special_tokens=False)["input_ids"],
                tokenizer(tail, add_special_tokens=False)["input_ids"])
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer(prompt)["input_ids"], ids


def answer_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
                    batch_size: int = 16) -> list[tuple[float, int]]:
    """Per pair: (sum of log p(answer token | everything before it), number of answer tokens)."""
    import torch

    rows = [answer_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[tuple[float, int]] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, a) in enumerate(batch):
                ids[i, :len(p) + len(a)] = torch.tensor(p + a)
                mask[i, :len(p) + len(a)] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for i, (p, a) in enumerate(batch):
                # the token at position t is predicted by the logits at t - 1
                pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)
                picked = logp[i, pos, torch.tensor(a)]
                out.append((float(picked.double().sum()), len(a)))
    return out


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, list[float]]:
    """Mean and its 95 % normal interval (mean ± z·sd/√n); the interval is the mean alone for n = 1."""
    mean = statistics.fmean(values)
    half = z * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, [mean - half, mean + half]


def nll_summary(logprobs: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """The ``nll`` metric from :func:`answer_logprobs`'s pairs."""
    per_example = [-s / n for s, n in logprobs]
    nll, ci = mean_interval(per_example)
    tokens = sum(n for _, n in logprobs)
    return dict(nll=nll, nll_ci95=ci, nll_tokens=-sum(s for s, _ in logprobs) / tokens, tokens=tokens,
                per_example=per_example)


def preference_summary(policy_chosen: Sequence[float], policy_rejected: Sequence[float],
                       ref_chosen: Sequence[float], ref_rejected: Sequence[float],
                       beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """Preference accuracy and reward margin from summed answer log-probabilities."""
    chosen = [beta * (p - r) for p, r in zip(policy_chosen, ref_chosen)]
    rejected = [beta * (p - r) for p, r in zip(policy_rejected, ref_rejected)]
    margins = [c - r for c, r in zip(chosen, rejected)]
    wins = sum(m > 0 for m in margins)
    margin, margin_ci = mean_interval(margins)
    ranked = sum(c > r for c, r in zip(policy_chosen, policy_rejected))
    ref_ranked = sum(c > r for c, r in zip(ref_chosen, ref_rejected))
    return dict(preference_accuracy=wins / len(margins), preferred=wins,
                ranking_accuracy=ranked / len(margins), reference_ranking_accuracy=ref_ranked / len(margins),
                preference_ci95=list(wilson_interval(wins, len(margins))), reward_margin=margin,
                reward_margin_ci95=margin_ci, reward_chosen=statistics.fmean(chosen),
                reward_rejected=statistics.fmean(rejected), beta=beta, margins=margins)


def preference_pairs(problems: Sequence[Any], seed: int) -> list[str]:
    """A rejected answer for each held-out problem, by the quickstart's rule for its training pairs
    (the correct number plus one of -10, -2, -1, 1, 2, 10, checked wrong by the task's scorer),
    drawn from a generator of its own: prefix-stable, and the same for every model."""
    rng = random.Random(f"dpo-eval/{seed}")
    return [near_miss(p, rng) for p in problems]


def evaluate_teacher_forced(model_dir: str | Path, task: str, metric: str, *, n: int | None = None,
                            seed: int | None = None, batch_size: int = 16, ref_model: str | Path | None = None,
                            beta: float | None = None, output: str | Path | None = None,
                            log: Callable[[str], None] = print) -> dict[str, Any]:
    """``--metric nll`` or ``preference`` (see :mod:`gmt_align.evaluation.likelihood`); returns the summary."""
    t0 = time.perf_counter()
    n = DEFAULT_N[task] if n is None else n
    seed = EVAL_SEED if seed is None else seed
    evalset = reasoning_gym_set(task, n, seed)
    examples = evalset.examples
    prompts, answers = [e.prompt for e in examples], [e.expected for e in examples]
    model, tokenizer = load(model_dir)
    chosen = answer_logprobs(model, tokenizer, prompts, answers, batch_size=batch_size)
    summary: dict[str, Any] = dict(task=task, model=str(model_dir), metric=metric, n=len(examples), seed=seed,
                                   dropped_train=evalset.dropped_train, dropped_repeat=evalset.dropped_repeat,
                                   batch_size=batch_size)
    rows = [{"id": e.id, "prompt": e.prompt, "expected": e.expected, "logprob": s, "tokens": k}
            for e, (s, k) in zip(examples, chosen)]
    head = (f"{task}: {len(examples)} problems (seed {seed}), teacher-forced; dropped {evalset.dropped_train} "
            f"whose prompt is in the quickstart training set and {evalset.dropped_repeat} repeats")
    if metric == "nll":
        result = nll_summary(chosen)
        for row, value in zip(rows, result["per_example"]):
            row["nll"] = value
        summary.update(result)
        per_example = summary.pop("per_example")  # in --output, not in the printed summary
        lo, hi = result["nll_ci95"]
        lines = [f"nll {result['nll']:.4f} (mean over problems of the per-token NLL of the reference answer), "
                 f"95% interval [{lo:.4f}, {hi:.4f}]; token-pooled {result['nll_tokens']:.4f} over "
                 f"{result['tokens']} tokens"]
    else:
        beta = DEFAULT_BETA if beta is None else beta
        rejected_answers = preference_pairs([e.problem for e in examples], seed)
        rejected = answer_logprobs(model, tokenizer, prompts, rejected_answers, batch_size=batch_size)
        del model
        reference, ref_tokenizer = load(ref_model)
        ref_chosen = answer_logprobs(reference, ref_tokenizer, prompts, answers, batch_size=batch_size)
        ref_rejected = answer_logprobs(reference, ref_tokenizer, prompts, rejected_answers, batch_size=batch_size)
        result = preference_summary([s for s, _ in chosen], [s for s, _ in rejected],
                                       [s for s, _ in ref_chosen], [s for s, _ in ref_rejected], beta)
        for row, wrong, margin in zip(rows, rejected_answers, result.pop("margins")):
            row.update(rejected=wrong, reward_margin=margin, preferred=margin > 0)
        summary.update(result, ref_model=str(ref_model))
        lo, hi = result["preference_ci95"]
        mlo, mhi = result["reward_margin_ci95"]
        lines = [f"preference accuracy {result['preference_accuracy']:.3f} ({result['preferred']}/{len(rows)}: "
                 f"reward(chosen) > reward(rejected), beta {beta:g}, reference {ref_model}), "
                 f"95% Wilson score interval [{lo:.3f}, {hi:.3f}]",
                 f"reward margin {result['reward_margin']:.4f}, 95% interval [{mlo:.4f}, {mhi:.4f}]",
                 f"ranking accuracy (log p(chosen) > log p(rejected)) {result['ranking_accuracy']:.3f}, "
                 f"the reference's {result['reference_ranking_accuracy']:.3f}"]
    if output is not None:
        write_jsonl(output, rows)
    summary.update(wall_s=round(time.perf_counter() - t0, 1), output=None if output is None else str(output))
    for line in (head, *lines, f"wall time {summary['wall_s']:.1f} s"
                 + (f"; per-example results: {output}" if output is not None else "")):
        log(line)
    log("summary " + json.dumps(summary))
    if metric == "nll":
        summary["per_example"] = per_example
    return summary
