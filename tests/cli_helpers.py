"""Recipes and command runs shared by the tests of TRL's options, data errors and the environment."""

import json

import yaml

from gmt_align.cli import main

UNLOADABLE = "gmt-align-tests/no-such-model"  # a hub id: if anything tried to load it, the error would be long


def messages(i):
    return {"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def recipe_writer(tmp_path):
    """``write(drop=(), **fields)``: a small SFT recipe (10 rows, a model that is never loaded) as a path."""
    data = write_jsonl(tmp_path / "train.jsonl", [messages(i) for i in range(10)])

    def write(drop=(), **overrides):
        fields = {"model_name_or_path": UNLOADABLE, "dataset_name": data, "output_dir": str(tmp_path / "out"),
                  "bf16": False, "report_to": "none", **overrides}
        for key in drop:
            fields.pop(key)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(fields))
        return str(path)

    return write


def run(capsys, *argv):
    """``gmt-align ARGV`` in this process: its status and the stderr lines that say "error"
    (not progress bars or warnings)."""
    status = main(list(argv))
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if "error" in line]


def validate(capsys, *argv):
    """``gmt-align validate ARGV``: its status and stdout lines."""
    status = main(["validate", *argv])
    return status, capsys.readouterr().out.splitlines()
