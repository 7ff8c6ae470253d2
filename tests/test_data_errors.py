"""Bad data and a DeepSpeed config DeepSpeed rejects: one line naming the file, the row (and line) and
what is wrong, exit status 2, before any model loads (docs/trl-options.md#data-errors)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import messages, recipe_writer, run, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe(tmp_path):
    return recipe_writer(tmp_path)


def test_zero_stage_4_is_one_line(capsys, recipe, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    status, lines = run(capsys, "sft", "--config", recipe(), "--deepspeed", str(config))
    assert (status, lines) == (2, ["gmt-align sft: error: zero_optimization.stage: 4 is not a ZeRO stage (0, 1, 2 or 3)"])


def test_a_deepspeed_json_or_recipe_that_does_not_parse_names_file_line_and_column(capsys, recipe, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')
    status, lines = run(capsys, "sft", "--config", recipe(), "--deepspeed", str(config))
    assert (status, lines) == (2, [f"gmt-align sft: error: deepspeed: {config} line 4 column 3: not valid JSON "
                                   "(Expecting property name enclosed in double quotes)"])
    status, lines = run(capsys, "sft", "--config", recipe(deepspeed=str(config)))  # named by the recipe
    assert status == 2 and lines[0].endswith(f"deepspeed: {config} line 4 column 3: not valid JSON (Expecting "
                                             "property name enclosed in double quotes)"), lines
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlearning_rate: [1\noutput_dir: y\n")
    status, lines = run(capsys, "sft", "--config", str(bad))
    assert (status, lines) == (2, [f"gmt-align sft: error: {bad} line 3 column 11: not valid YAML (while parsing a "
                                   "flow sequence; expected ',' or ']', but got ':')"])
    assert run(capsys, "validate", str(bad))[0] == 1


DPO_ROW = {"prompt": "1+1", "chosen": "2", "rejected": "3"}


@pytest.mark.parametrize("method,content,needle", [
    ("sft", '{"messages": []}\n{"messages": [oops\n', "{file} line 2: not valid JSON (Expecting value, column 15)"),
    ("sft", '{"question": "1+1", "answer": "2"}\n', "{file}: no SFT column: TRL's SFT reads 'messages'"),
    ("sft", json.dumps(messages(1)) + '\n\n{"text": "2"}\n', "{file} row 2 (line 3): no 'messages'"),
    ("sft", json.dumps(messages(1)) + '\n{"messages": []}\n', "{file} row 2 (line 2): an empty 'messages'"),
    ("sft", "", "{file}: empty file (no rows)"),
    ("sft", b'{"text": "caf\xe9"}\n', "{file} line 1: not UTF-8 text (byte 0xe9 at column 14)"),
    ("sft", '[1, 2]\n', "{file} line 1: a JSON object per line is expected, got list"),
    ("dpo", '{"prompt": "1+1", "chosen": "2"}\n', "{file}: DPO needs 'chosen' and 'rejected' columns, and 'rejected' is missing"),
    ("dpo", json.dumps(DPO_ROW) + '\n{"prompt": "1+2", "chosen": "3"}\n', "{file} row 2 (line 2): no 'rejected'"),
    ("sft", json.dumps(messages(1)) + "\n" + json.dumps({"messages": [{"role": "wizard", "content": "1+1"},
                                                                       {"role": "assistant", "content": "2"}]}) + "\n",
     "{file} row 2 (line 2): 'messages' has the role 'wizard'; TRL takes system, user, assistant, tool"),
    ("sft", json.dumps({"conversations": [{"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"}]}) + "\n",
     "{file} row 1 (line 1): 'conversations' has the role 'human'; TRL takes system, user, assistant, tool"),
    ("dpo", json.dumps({"prompt": [{"role": "user", "content": "1+1"}],
                        "chosen": [{"role": "assistant", "content": "2"}],
                        "rejected": [{"role": "bot", "content": "3"}]}) + "\n",
     "{file} row 1 (line 1): 'rejected' has the role 'bot'; TRL takes system, user, assistant, tool"),
])
def test_bad_data_is_one_line_naming_file_and_row(capsys, recipe, tmp_path, method, content, needle):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    status, lines = run(capsys, method, "--config", recipe(dataset_name=str(data)))
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"gmt-align {method}: error: {needle.format(file=data)}"), lines


@pytest.mark.process
def test_bad_data_in_a_real_process(recipe, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(messages(1)) + "\n{oops}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "gmt_align.cli", "sft", "--config", recipe(dataset_name=str(data))],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"gmt-align sft: error: {data} line 2: not valid JSON (Expecting property name enclosed in double quotes, "
        "column 2)"]


# --- answers cut away by max_length: counted on the rows TRL tokenized, before training (issue 30) -----------
def long_rows(method, count, prompt_words):
    """Rows whose prompt alone is about ``prompt_words`` tokens (the quickstart's max_length is 128)."""
    if method == "dpo":
        return [{"prompt": "word " * prompt_words, "chosen": "2", "rejected": "3"}] * count
    return [{"prompt": [{"role": "user", "content": "word " * prompt_words}],
             "completion": [{"role": "assistant", "content": "2"}]}] * count


def cli_run(method, data, out, *extra):
    from gmt_align.testing import cpu_env
    from quickstart_runs import recipe_argv

    argv = recipe_argv(method, out, "--dataset_name", str(data), "--max_steps", "1", *extra)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.process
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_data_whose_every_answer_is_truncated_away_is_refused(tiny_model, tmp_path, method):
    data = tmp_path / "long.jsonl"
    write_jsonl(data, long_rows(method, 4, 300))
    result = cli_run(method, data, tmp_path / "out", *tiny_model)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"gmt-align {method}: error: train data: every one of its 4 rows loses all of its answer (the tokens the loss "
        "covers) to max_length=128 truncation (keep_start): nothing would be learnt; raise max_length or shorten "
        "the rows"]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.process
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_partial_loss_to_truncation_is_counted_in_one_line(tiny_model, tmp_path, method):
    """A 100,000-character answer is cut (part of it kept), a long prompt loses its whole answer: the run
    trains on the rest and says how many rows lose what."""
    short = [{"prompt": f"{i}+1", "chosen": str(i + 1), "rejected": "0"} for i in range(6)] if method == "dpo" else \
        [{"prompt": [{"role": "user", "content": f"{i}+1"}], "completion": [{"role": "assistant", "content": str(i)}]}
         for i in range(6)]
    huge = dict(short[0], **({"chosen": "x" * 100_000} if method == "dpo" else
                             {"completion": [{"role": "assistant", "content": "x" * 100_000}]}))
    data = tmp_path / "some.jsonl"
    write_jsonl(data, short + [huge] + long_rows(method, 1, 300))
    result = cli_run(method, data, tmp_path / "out", *tiny_model)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "cuts answers" in line]
    assert len(said) == 1 and said[0].startswith("gmt-align: warning: ") and said[0].endswith(
        "train data: max_length=128 (keep_start) cuts answers (the tokens the loss covers): 1 of 8 rows lose all of "
        "theirs (TRL drops them) and 1 lose part; raise max_length or shorten the rows"), said


# --- weights cut short, a folder that cannot be written: one line before loading (issue 30) ---------------
def broken_model(tmp_path, how):
    """A model folder whose model.safetensors is cut short (``truncated``) or not safetensors (``garbage``)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / f"{how}-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weights = folder / "model.safetensors"
    save_file({"w": torch.zeros(1000, 10)}, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"<html>404 Not Found</html>" * 40)
    return folder


def cli(*argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "gmt_align.cli", *argv], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode, [line for line in result.stderr.splitlines() if "error" in line]


@pytest.mark.process
@pytest.mark.parametrize("how, reason", [("truncated", "incomplete metadata, file not fully covered"),
                                         ("garbage", "header too large")])
def test_weights_cut_short_are_one_line_in_sft_and_eval(recipe, tmp_path, how, reason):
    folder = broken_model(tmp_path, how)
    said = (f"{folder / 'model.safetensors'} is not a readable safetensors file ({reason}): a copy or download cut "
            "short? copy or save the model again")
    assert cli("sft", "--config", recipe(model_name_or_path=str(folder))) == (
        2, [f"gmt-align sft: error: model_name_or_path: {said}"])
    assert cli("eval", "--model", str(folder), "--task", "basic_arithmetic", "--n", "2") == (
        2, [f"gmt-align eval: error: --model: {said}"])


@pytest.mark.process
@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a folder nobody may write in")
def test_a_folder_that_cannot_be_written_is_one_line_before_loading(recipe, tmp_path):
    """/sys refuses new files even to root (chmod does not stop root): as a read-only mount would."""
    assert cli("sft", "--config", recipe(output_dir="/sys/gmt-align-out")) == (
        2, ["gmt-align sft: error: output_dir: cannot write in /sys (Permission denied): choose a folder you can "
            "write to"])
    model = broken_model(tmp_path, "truncated")
    (model / "model.safetensors").unlink()  # a model folder whose weights would load
    assert cli("eval", "--model", str(model), "--task", "basic_arithmetic", "--n", "2", "--output",
               "/sys/gmt-align-out/eval.jsonl") == (
        2, ["gmt-align eval: error: --output: cannot write in /sys (Permission denied): choose a folder you can "
            "write to"])
