"""Every launcher line that README.md and docs/*.md show is in tests/launchers.py's registry, every
registry line is still shown, and each one is run, as written, by the test it names.

The runs themselves live with the assertions they serve (tests/conftest.py, test_zero_trainer.py,
test_checkpoint.py, test_multinode.py): each 2-rank run costs 30-90 s on 2 cores, so one run both
exercises its launcher line and checks what the trained model holds.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

from launchers import (DOCUMENTS, LAUNCHERS, assert_no_group_threads_at_exit, documented_lines,
                       exit_threads_env, tokens)
from multirank.launch import ROOT


def test_every_documented_launcher_line_is_in_the_registry_and_every_registry_line_is_documented():
    documented = documented_lines()
    registered = {tokens(launcher.line): name for name, launcher in LAUNCHERS.items()}
    unregistered = [f"{where}: {' '.join(line)}" for line, where in documented.items() if line not in registered]
    undocumented = [name for line, name in registered.items() if line not in documented]
    assert not unregistered, "documented but run by no test (add them to tests/launchers.py):\n" + "\n".join(
        unregistered)
    assert not undocumented, f"in tests/launchers.py but no longer in {[d.name for d in DOCUMENTS]}: {undocumented}"


def test_the_extraction_finds_continued_prefixed_and_commented_lines(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text(
        "```bash\n"
        "DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m gmt_align.cli sft \\\n"
        "    --config a.yaml   # a comment\n"
        "gmt-align sft --config a.yaml\n"  # no launcher, no DeepSpeed: not a launcher line
        "gmt-align dpo --config a.yaml --deepspeed z.json\n"
        "```\n"
        "```python\ndeepspeed --num_gpus 2 x.py\n```\n"  # not a shell block
    )
    assert list(documented_lines([document])) == [
        ("DS_ACCELERATOR=cpu", "torchrun", "--nproc_per_node", "2", "-m", "gmt_align.cli", "sft", "--config",
         "a.yaml"),
        ("gmt-align", "dpo", "--config", "a.yaml", "--deepspeed", "z.json"),
    ]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_each_line_is_run_by_the_test_it_names(name):
    """The named test (or fixture) exists and passes the line's name to launchers.launch."""
    path, _, function = LAUNCHERS[name].tested_by.partition("::")
    tree = ast.parse((ROOT / path).read_text())
    definitions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function]
    assert definitions, f"{LAUNCHERS[name].tested_by} does not exist"
    (definition,) = definitions
    names = {node.value for node in ast.walk(definition) if isinstance(node, ast.Constant)}  # decorators included
    assert name in names, f"{LAUNCHERS[name].tested_by} does not name {name!r}"
    assert re.search(r"\blaunch\(", ast.get_source_segment((ROOT / path).read_text(), definition))


def test_exit_reports_are_read_when_two_ranks_share_one_pipe():
    """As CI saw it: one rank's report ran into the other's on the launcher's shared output."""
    interleaved = ("saved\ngmt-test: rank 1 threads at exit: jemalloc_bg_thd python"
                   "gmt-test: rank 0 threads at exit: jemalloc_bg_thd python python\n\n")
    assert_no_group_threads_at_exit(interleaved)
    with pytest.raises(AssertionError, match="gloo"):
        assert_no_group_threads_at_exit(interleaved.replace("python python", "python gloo_thread"))
    with pytest.raises(AssertionError):  # a rank that never reported
        assert_no_group_threads_at_exit("gmt-test: rank 0 threads at exit: python\n")


def test_each_rank_reports_its_exit_threads_on_a_line_of_its_own(tmp_path):
    env = {**os.environ, **exit_threads_env(), "RANK": "1"}
    result = subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('no newline')"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    assert re.search(r"^no newline\ngmt-test: rank 1 threads at exit: .*python.*\n$", result.stderr), result.stderr
