"""Verifiable rewards for GRPO, in TRL's reward-function form: ``f(completions, **columns) -> list[float]``.

```yaml
reward_funcs: [arithmetic_accuracy]   # a recipe of gmt-align grpo (recipes/quickstart/grpo.yaml)
```

:func:`arithmetic_accuracy` scores the quickstart's arithmetic problems as ``gmt-align eval`` does:
the answer is taken from the completion by :func:`~gmt_align.evaluation.evaluate.extract_answer` and
scored by the reasoning-gym task's own scorer (the row's ``task`` column), so a GRPO reward of 1.0 is
a correct answer by the same rule as the evaluation's accuracy. The data carry ``answer`` and ``task``
columns (``python -m gmt_align.quickstart`` writes them); TRL hands every column but ``prompt`` to the
reward function by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from .evaluate import extract_answer

__all__ = ["REWARDS", "arithmetic_accuracy", "completion_text"]


def completion_text(completion: Any) -> str:
    """A completion's text: a plain string, or (conversational data) the content of its turns."""
    if isinstance(completion, str):
        return completion
    return "".join(str(turn.get("content") or "") for turn in completion)


@cache
def _scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def arithmetic_accuracy(completions: Sequence[Any], answer: Sequence[str], task: Sequence[str] | None = None,
                        **kwargs) -> list[float]:
    """1.0 for a completion whose final number is the right answer, else 0.0 (reasoning-gym's scorer
    of ``task`` where the data name one; without a ``task`` column, the numbers must be equal)."""
    tasks = task if task is not None else [None] * len(completions)
    scores = []
    for completion, expected, name in zip(completions, answer, tasks, strict=True):
        found = extract_answer(completion_text(completion))
        if name is None:
            scores.append(float(found is not None and found == extract_answer(str(expected))))
        else:
            scores.append(float(_scorer(name)(found, {"answer": str(expected)}) == 1.0))
    return scores


# gmt-align's own reward functions, by the name a recipe gives them (TRL's own names work too:
# gmt_align.cli.rewards).
REWARDS = {"arithmetic_accuracy": arithmetic_accuracy}
