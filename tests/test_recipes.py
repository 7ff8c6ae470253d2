"""The recipes of the paper's setups and what they rely on: twins, headers, chat templates, the column
mapping for instruction/response datasets. (Whether they validate: tests/test_validate.py.)"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER_RECIPES = sorted(
    p.relative_to(ROOT) for p in (ROOT / "recipes").rglob("*.yaml")
    if "accelerate_configs" not in p.parts and "quickstart" not in p.parts
)
TEMPLATES = sorted((ROOT / "recipes" / "chat_templates").glob("*.jinja"))


def _body(path):
    return {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "output_dir"}


@pytest.mark.parametrize("gmt", [p for p in PAPER_RECIPES if p.stem == "gmt"], ids=lambda p: str(p.parent))
def test_paper_recipes_come_in_twins_identical_but_the_ratio(gmt):
    vanilla = gmt.with_name("vanilla.yaml")
    a, b = _body(ROOT / gmt), _body(ROOT / vanilla)
    assert a["gmt_mask_ratio"] > 0 and b["gmt_mask_ratio"] == 0
    assert {k: v for k, v in a.items() if k != "gmt_mask_ratio"} == {k: v for k, v in b.items() if k != "gmt_mask_ratio"}
    assert yaml.safe_load((ROOT / gmt).read_text())["output_dir"] != yaml.safe_load((ROOT / vanilla).read_text())["output_dir"]


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=str)
def test_paper_recipe_headers_cite_the_paper_and_own_their_hyperparameters(recipe):
    header = "\n".join(line for line in (ROOT / recipe).read_text().splitlines() if line.startswith("#"))
    assert "arXiv:2406.15330" in header
    assert "Hyper-parameters: ours" in header or "Hyper-parameters: the paper" in header
    assert f"gmt-align validate {recipe}" in header
    fields = yaml.safe_load((ROOT / recipe).read_text())
    assert fields["bf16"] is True and fields["deepspeed"] == "ds_configs/zero3.json"


def test_the_paper_setups_are_all_there():
    setups = {p.parent.relative_to("recipes").as_posix() for p in PAPER_RECIPES}
    assert setups == {"code/mistral-7b", "code/deepseek-coder-6.7b", "math/mistral-7b", "math/llama-3-8b",
                      "general/llama-2-7b", "general/llama-2-13b", "dpo/llama-2-7b", "dpo/llama-2-13b",
                      "grpo/qwen2.5-1.5b"}
    datasets = {yaml.safe_load((ROOT / p).read_text())["dataset_name"] for p in PAPER_RECIPES}
    assert datasets == {"ise-uiuc/Magicoder-Evol-Instruct-110K", "meta-math/MetaMathQA",
                        "allenai/tulu-v2-sft-mixture", "HuggingFaceH4/ultrafeedback_binarized",
                        "trl-lib/DeepMath-103K"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_chat_templates_fit_trl_prompt_completion(smollm2_dir, template):
    """TRL tokenizes the prompt (with the generation prompt) and the whole conversation apart: the
    first must be a prefix of the second, and the loss mask must cover the completion only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat_template = template.read_text()
    prompt = [{"role": "user", "content": "Add 2 and 3."}]
    conversation = [*prompt, {"role": "assistant", "content": "The sum is 5."}]
    head = tokenizer.apply_chat_template(prompt, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False)
    assert whole.startswith(head) and "Add 2 and 3." in head and "The sum is 5." not in head
    encoded = tokenizer.apply_chat_template(conversation, chat_template=chat_template, return_dict=True,
                                            return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(kept).strip() == "The sum is 5." + tokenizer.eos_token


@pytest.mark.parametrize("template", sorted({yaml.safe_load((ROOT / p).read_text()).get("chat_template_path")
                                             for p in PAPER_RECIPES} - {None}))
def test_recipes_name_shipped_templates(template):
    assert (ROOT / template).is_file()


def test_instruction_response_columns_become_trl_prompt_completion(tmp_path):
    from gmt_align.cli.data import load_train_dataset

    data = tmp_path / "code.jsonl"
    data.write_text('{"instruction": "Reverse a list.", "response": "xs[::-1]", "lang": "python"}\n')
    args = SimpleNamespace(dataset_name=str(data), dataset_prompt_column="instruction",
                           dataset_completion_column="response")
    (row,) = load_train_dataset(args)
    assert row == {"prompt": [{"role": "user", "content": "Reverse a list."}],
                   "completion": [{"role": "assistant", "content": "xs[::-1]"}]}
    args.dataset_prompt_column = args.dataset_completion_column = None
    assert set(load_train_dataset(args).column_names) == {"instruction", "response", "lang"}


@pytest.mark.launcher  # trl's CLI starts its script through accelerate launch
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_the_quickstart_recipes_run_under_trl_itself(method, tiny_model, tmp_path):
    """``trl sft|dpo --config`` on the quickstart recipe without its gmt_* keys, as it is: its data is named
    in TRL's own form (a mixture entry ``path: json`` + ``data_files``), which both commands load."""
    import subprocess
    import sys

    from gmt_align.quickstart import prepare_quickstart
    from gmt_align.testing import cpu_env

    prepare_quickstart(ROOT / ".cache" / "quickstart")
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart" / f"{method}.yaml").read_text())
    assert "dataset_name" not in recipe and recipe["datasets"][0]["path"] == "json"
    trl_recipe = tmp_path / f"{method}.yaml"
    trl_recipe.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if not k.startswith("gmt_")}))
    out = tmp_path / "out"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "trl"), method, "--config", str(trl_recipe), *tiny_model,
         "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "1",
         "--gradient_accumulation_steps", "1", "--max_length", "64"],
        cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


def test_a_dataset_name_on_the_command_line_replaces_the_recipes_mixture(tmp_path):
    """As any override: ``--dataset_name FILE`` on the quickstart recipe trains on FILE (validate reads it so too)."""
    from gmt_align.cli.recipe import parse_recipe
    from gmt_align.cli.validate import validate_recipe

    data = tmp_path / "mine.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n')
    fields = yaml.safe_load((ROOT / "recipes" / "quickstart" / "sft.yaml").read_text())
    fields["datasets"][0]["data_files"] = str(tmp_path / "sft_train.jsonl")  # the quickstart's, made here
    (tmp_path / "sft_train.jsonl").write_text(data.read_text())
    recipe = str(tmp_path / "sft.yaml")
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(fields))
    overrides = ["--model_name_or_path", "gmt-align-tests/no-such-model", "--output_dir", str(tmp_path / "out")]
    script_args, _, _ = parse_recipe("sft", ["--config", recipe, *overrides, "--dataset_name", str(data)])
    assert script_args.dataset_name == str(data) and script_args.datasets == []
    script_args, _, _ = parse_recipe("sft", ["--config", recipe, *overrides])
    assert script_args.dataset_name is None and script_args.datasets[0].data_files.endswith("sft_train.jsonl")
    report = validate_recipe(recipe, overrides={"dataset_name": str(data), "model_name_or_path": "x/y"})
    assert report.problems == []
