"""The arithmetic problems that the quickstart trains on and ``gmt-align eval`` scores.

The data come from ``reasoning_gym`` generators, so every example can be scored exactly by the
generator's own scorer.

Seeds: ``reasoning_gym`` generates item ``idx`` from ``Random(seed + idx)``, so
seeds 1234 and 1235 would give the same problems shifted by one. We therefore
hash ``(task, seed)`` into the generator seed; any two distinct seeds give
independent streams. Evaluation must use a seed other than ``TRAIN_SEED``
(e.g. ``EVAL_SEED``). Distinct seeds do not mean distinct problems, though: the
problem space is small, and about a fifth of ``EVAL_SEED`` prompts also occur in
the ``TRAIN_SEED`` set (mostly one-digit problems). Filter on ``Problem.prompt`` when
contamination matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAIN_SEED = 1234
EVAL_SEED = 98765  # any seed != TRAIN_SEED is disjoint; see module docstring
DEFAULT_TASKS: tuple[str, ...] = ("basic_arithmetic", "chain_sum")
ANSWER_INSTRUCTION = "Answer with the number only."
# Sizes of the training sets prepare_quickstart writes (the DPO and GRPO sets: prefixes of the SFT problems).
SFT_TRAIN_N = 2000
DPO_TRAIN_N = 1000
GRPO_TRAIN_N = 1000  # prompts with their answer (the reward scores samples); a prefix of the SFT problems

# Easy settings a 135M model can learn from a few thousand examples.
# basic_arithmetic evaluates its no-parentheses expressions left to right
# (it would call "6 + 10 * 0" zero), so we keep it at two terms, where
# left-to-right and normal precedence agree.
TASK_CONFIGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(
        min_terms=2, max_terms=2, min_digits=1, max_digits=2,
        operators=("+", "-", "*"), allow_parentheses=False,
        allow_negation=False, format_style="natural",
    ),
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
}
# Offsets for rejected answers: off-by-one/two and carry-style mistakes.
_WRONG_OFFSETS = (-10, -2, -1, 1, 2, 10)


def near_miss(problem, rng: random.Random) -> str:
    """A wrong answer close to the right one: the correct number plus one of ``_WRONG_OFFSETS``,
    checked wrong by the task's own scorer (so a scorer quirk never makes it right)."""
    for _ in range(100):
        wrong = str(int(problem.answer) + rng.choice(_WRONG_OFFSETS))
        if problem.score(wrong) < 1.0:
            return wrong
    raise ValueError(f"{problem.task}: no rejected answer found for {problem.prompt!r}")


@dataclass(frozen=True)
class Problem:
    """One generated problem, with what is needed to score answers to it."""

    task: str
    prompt: str
    answer: str
    entry: dict[str, Any]
    dataset: Any  # the reasoning_gym dataset, whose scorer knows the task

    def score(self, answer: str | None) -> float:
        """Score with the generator's own scorer (1.0 means correct)."""
        return float(self.dataset.score_answer(answer, self.entry))


def _task_seed(task: str, seed: int) -> int:
    """Decorrelate tasks and nearby seeds (see module docstring)."""
    digest = hashlib.sha256(f"{task}/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_prompt(question: str) -> str:
    """Add the answer-format instruction; the generators' questions lack one."""
    return f"{question}\n{ANSWER_INSTRUCTION}"


def make_problems(n: int, *, seed: int, tasks: Sequence[str] = DEFAULT_TASKS) -> list[Problem]:
    """``n`` problems interleaving ``tasks`` round-robin; prefix-stable in ``n``."""
    import reasoning_gym

    if n < 0 or not tasks:
        raise ValueError("need n >= 0 and at least one task")
    per_task = -(-n // len(tasks))
    datasets = [
        reasoning_gym.create_dataset(
            t, size=max(per_task, 1), seed=_task_seed(t, seed), **TASK_CONFIGS.get(t, {})
        )
        for t in tasks
    ]
    problems = []
    for i in range(n):
        task, ds = tasks[i % len(tasks)], datasets[i % len(tasks)]
        entry = ds[i // len(tasks)]
        problems.append(Problem(task, make_prompt(entry["question"]), entry["answer"], entry, ds))
    return problems


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write via a temp file + ``os.replace`` so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
