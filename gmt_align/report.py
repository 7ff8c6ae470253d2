"""``gmt-align report OUTPUT_DIR [--out DIR]``: the mask telemetry of a run, without W&B.

Reads ``OUTPUT_DIR/gmt_stats.jsonl`` (one line per logging step, written by the trainers) and
writes into ``--out`` (default ``OUTPUT_DIR``):

* ``gmt_kept_heatmap.png`` — kept fraction per transformer block (rows) and logging step (columns);
* ``gmt_churn_coverage.png`` — churn, coverage and the overall kept fraction against the step;
* ``gmt_summary.txt`` — a short text summary, also printed.

A resumed run appends to the same file, so a step may appear twice: the last line of a step wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["load_stats", "main", "render", "summary"]

STATS_FILE = "gmt_stats.jsonl"


def load_stats(path: str | Path) -> list[dict]:
    """The records of a ``gmt_stats.jsonl``, one per step (the last written wins), by step."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def summary(records: list[dict]) -> str:
    """A few lines: steps, kept fraction, churn, coverage, and the least / most updated blocks."""
    steps = [r["step"] for r in records]
    lines = [f"gmt telemetry: {len(records)} logging steps, steps {steps[0]}..{steps[-1]}"]
    for key, label in (("gmt/kept_fraction", "kept fraction"), ("gmt/churn", "churn"), ("gmt/coverage", "coverage")):
        _, values = _series(records, key)
        if values:
            lines.append(f"{label:14s} first {values[0]:.4f}  last {values[-1]:.4f}  "
                         f"min {min(values):.4f}  max {max(values):.4f}")
    layers = [r["gmt/kept_fraction_by_block"] for r in records if r.get("gmt/kept_fraction_by_block")]
    if layers:
        width = len(layers[0])
        mean = [sum(row[b] for row in layers) / len(layers) for b in range(width)]
        order = sorted(range(width), key=mean.__getitem__)
        lines.append(f"blocks         least updated {order[0]} ({mean[order[0]]:.4f}), "
                     f"most updated {order[-1]} ({mean[order[-1]]:.4f}), mean over logging steps")
    return "\n".join(lines)


def render(records: list[dict], out: Path) -> list[Path]:
    """Write the two PNGs (Agg backend: no display needed); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with_blocks = [r for r in records if r.get("gmt/kept_fraction_by_block")]
    if with_blocks:
        grid = [[r["gmt/kept_fraction_by_block"][b] for r in with_blocks] for b in range(len(with_blocks[0]["gmt/kept_fraction_by_block"]))]
        steps = [r["step"] for r in with_blocks]
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(steps) + 3), max(3, 0.2 * len(grid) + 1.5)))
        image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90 if len(steps) > 12 else 0)
        ax.set_xlabel("step")
        ax.set_ylabel("block")
        ax.set_title("GMT kept fraction per block")
        fig.colorbar(image, ax=ax, label="kept fraction")
        fig.tight_layout()
        written.append(out / "gmt_kept_heatmap.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("gmt/churn", "churn"), ("gmt/coverage", "coverage"), ("gmt/kept_fraction", "kept fraction")):
        steps, values = _series(records, key)
        if values:
            ax.plot(steps, values, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of maskable entries")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("GMT churn and coverage")
    fig.tight_layout()
    written.append(out / "gmt_churn_coverage.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gmt-align report", description="Plots and a summary of gmt_stats.jsonl.")
    parser.add_argument("output_dir", help="a training output_dir holding gmt_stats.jsonl")
    parser.add_argument("--out", help="where to write the PNGs and gmt_summary.txt (default: output_dir)")
    args = parser.parse_args(argv)
    path = Path(args.output_dir) / STATS_FILE
    if not path.is_file():
        print(f"gmt-align report: error: no {STATS_FILE} in {args.output_dir} (written by training runs with GMT)",
              file=sys.stderr)
        return 2
    records = load_stats(path)
    if not records:
        print(f"gmt-align report: error: {path} holds no logging step", file=sys.stderr)
        return 2
    out = Path(args.out or args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = summary(records)
    (out / "gmt_summary.txt").write_text(text + "\n")
    written = render(records, out)
    print(text)
    print("wrote " + ", ".join(str(p) for p in [*written, out / "gmt_summary.txt"]))
    return 0
