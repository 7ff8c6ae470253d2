"""The documents' shape: a short README, docs pages that open with a short summary, CHANGELOG entries of
one or two lines, no test counts or CI timings in prose, and relative links (and their #anchors) that
resolve. Part of the fast tier: it reads files only."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *PAGES]
README_LIMIT = 10_000  # bytes: "at most 10 KB"
SUMMARY_LIMIT = 15  # non-blank lines between a page's "# " title and its first "## " heading


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept),
    spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text()):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = anchor(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image in prose, inline code left out."""
    found = []
    for number, line in prose_lines(path.read_text()):
        line = re.sub(r"`[^`]*`", "", line)
        found += [(number, target) for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", line)]
    return found


def test_readme_is_at_most_10_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to a docs/ page (limit {README_LIMIT})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_docs_page_opens_with_a_short_summary(page):
    headings = [(number, line) for number, line in prose_lines(page.read_text()) if line.startswith(("# ", "## "))]
    assert headings and headings[0][1].startswith("# "), f"{page.name}: does not open with a '# ' title"
    title = headings[0][0]
    section = next((number for number, line in headings if line.startswith("## ")), None)
    assert section, f"{page.name}: no '## ' section after the summary"
    # the summary: every non-blank line between the title and the first section, code included
    summary = [line for line in page.read_text().splitlines()[title:section - 1] if line.strip()]
    assert summary, f"{page.name}: nothing between the title and the first '## ' section"
    assert len(summary) <= SUMMARY_LIMIT, (
        f"{page.name}: the summary before the first '## ' is {len(summary)} lines (at most {SUMMARY_LIMIT})")


def test_changelog_entries_are_one_or_two_lines():
    long = []
    entry, length = None, 0
    for number, line in enumerate((ROOT / "CHANGELOG.md").read_text().splitlines() + [""], 1):
        if line.startswith("- ") or not line.strip() or line.startswith("#"):
            if entry is not None and length > 2:
                long.append(f"line {entry}: {length} lines")
            entry, length = (number, 1) if line.startswith("- ") else (None, 0)
        elif entry is not None:
            length += 1
    assert not long, "CHANGELOG entries longer than two lines:\n" + "\n".join(long)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_no_test_counts_or_ci_timings_in_prose(document):
    problems = []
    text = " ".join(line for _, line in prose_lines(document.read_text()))
    for count in re.finditer(r"\b\d+ (passed|failed|skipped)\b|\b\d{2,} tests\b", text):
        problems.append(f"a test count: ...{text[max(0, count.start() - 60):count.end() + 20]}...")
    for sentence in re.split(r"(?<=[.;])\s", text):
        if re.search(r"\bCI\b", sentence) and re.search(r"\b\d+(\.\d+)?\s*(minutes?|min)\b", sentence):
            problems.append(f"a CI timing: {sentence.strip()[:160]}")
    assert not problems, f"{document.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(document):
    broken = []
    for number, target in links(document):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"line {number}: {target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"line {number}: {target}: no heading with that anchor in {file.name}")
    assert not broken, f"{document.name}:\n" + "\n".join(broken)


def test_the_anchor_rule_matches_githubs():
    assert anchor("Teacher-forced metrics: `--metric nll` and `--metric preference`") == \
        "teacher-forced-metrics---metric-nll-and---metric-preference"
    assert anchor("LoRA / PEFT") == "lora--peft"
    assert anchor("Precision: bf16 is TRL's default") == "precision-bf16-is-trls-default"


@pytest.mark.process
def test_the_readme_recipe_runs_as_its_lines_say(tmp_path):
    """README's recipe, saved as my.yaml beside a my_data.jsonl, with its two command lines as written:
    validate says OK (bf16, TRL's default, is a note on this machine), and the training line is refused
    in one line before any model loads where bf16 cannot run (a CPU), or gets past every check."""
    import os
    import shlex
    import subprocess
    import sys

    import torch

    text = README.read_text()
    (tmp_path / "my.yaml").write_text(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    (tmp_path / "my_data.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n')
    block = text.split("```yaml", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    validate, train = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert validate[:2] == ["gmt-align", "validate"] and train[:2] == ["gmt-align", "sft"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "gmt_align.cli"]
    result = subprocess.run([*cli, *validate[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("OK my.yaml (sft)"), result.stdout + result.stderr
    if torch.cuda.is_available():
        return  # the training line would load the hub model: nothing more to check offline
    result = subprocess.run([*cli, *train[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert result.returncode == 2 and errors == [
        "gmt-align sft: error: bf16 is true, but this machine has no GPU with bf16: set --bf16 false (bf16: false "
        "in the recipe) to train in fp32 here"], result.stderr
