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
