"""Quickstart assets: deterministic, correctly scored data and an exact model conversion."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from gmt_align import quickstart as qs

REPO_ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("make", [qs.make_sft_dataset, qs.make_dpo_dataset])
def test_datasets_are_deterministic_per_seed(tmp_path: Path, make) -> None:
    a = make(tmp_path / "a.jsonl", n=100, seed=qs.TRAIN_SEED).read_bytes()
    b = make(tmp_path / "b.jsonl", n=100, seed=qs.TRAIN_SEED).read_bytes()
    c = make(tmp_path / "c.jsonl", n=100, seed=qs.TRAIN_SEED + 1).read_bytes()
    assert a == b
    assert a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_nearby_seeds_are_not_shifted_copies() -> None:
    # reasoning_gym seeds item idx with seed + idx; without hashing, seed 1235
    # would replay seed 1234's problems shifted by one.
    a = [p.prompt for p in qs.make_problems(50, seed=qs.TRAIN_SEED)]
    b = [p.prompt for p in qs.make_problems(50, seed=qs.TRAIN_SEED + 1)]
    assert len(set(a[2:]) & set(b)) < 25


def test_sft_answers_score_with_generator_scorer(tmp_path: Path) -> None:
    n = 400
    rows = _lines(qs.make_sft_dataset(tmp_path / "sft.jsonl", n=n, seed=qs.TRAIN_SEED))
    problems = qs.make_problems(n, seed=qs.TRAIN_SEED)
    assert len(rows) == n
    assert {p.task for p in problems} == set(qs.DEFAULT_TASKS)
    for row, problem in zip(rows, problems):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"] == problem.prompt
        assert user["content"].endswith(qs.ANSWER_INSTRUCTION)
        assert problem.score(assistant["content"]) == 1.0
        assert len(assistant["content"]) <= 5


def test_dpo_pairs_are_verified(tmp_path: Path) -> None:
    n = 400
    rows = _lines(qs.make_dpo_dataset(tmp_path / "dpo.jsonl", n=n, seed=qs.TRAIN_SEED))
    problems = qs.make_problems(n, seed=qs.TRAIN_SEED)
    assert len(rows) == n
    for row, problem in zip(rows, problems):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] == [{"role": "user", "content": problem.prompt}]
        [chosen], [rejected] = row["chosen"], row["rejected"]
        assert chosen["role"] == rejected["role"] == "assistant"
        assert problem.score(chosen["content"]) == 1.0
        assert problem.score(rejected["content"]) < 1.0
        assert 0 < abs(int(rejected["content"]) - int(chosen["content"])) <= 10


# ---------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def converted(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


def test_prepare_model_is_idempotent(smollm2_dir: Path) -> None:
    start = time.perf_counter()
    assert qs.prepare_model(smollm2_dir) == smollm2_dir
    assert time.perf_counter() - start < 1.0  # marker hit: nothing is loaded
    leftovers = [p for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_converted_model_is_plain_and_trainable(converted, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert getattr(converted, "hf_quantizer", None) is None
    assert not getattr(converted, "is_quantized", False)
    assert "quantization_config" not in converted.config.to_dict()
    params = list(converted.parameters())
    assert sum(p.numel() for p in params) == 134_515_008  # tied embeddings
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


def test_converted_model_equals_gguf_dequantized(converted, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    gguf_model = qs.load_gguf_model().eval()
    ours, theirs = converted.state_dict(), gguf_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    inputs = tok("What is 2+3? Answer with the number only.", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(converted(**inputs).logits, gguf_model(**inputs).logits)


def test_prepare_quickstart_fills_shared_cache(smollm2_dir: Path) -> None:
    paths = qs.prepare_quickstart(REPO_ROOT / ".cache" / "quickstart")
    assert paths["model"] == smollm2_dir
    assert len(_lines(paths["sft_train"])) == 2000
    assert len(_lines(paths["dpo_train"])) == 1000
