"""``gmt-align report OUTPUT_DIR [--out DIR]``: the mask telemetry of a run, without W&B.

Reads ``OUTPUT_DIR/gmt_stats.jsonl`` (one record per logging step of one run, written by the
trainers; see :mod:`gmt_align.training.stats_file`) and writes into ``--out`` (default ``OUTPUT_DIR``):

* ``gmt_overall.png`` — kept fraction, 1 − retained energy (log), churn and coverage against the step,
  each in its own panel on its own range;
* ``gmt_FIGURE_heatmap.png`` — per block (rows) and step (columns), for each per-block figure the
  run logged: ``retained_energy``, ``churn``, ``coverage``, and ``kept_fraction`` under the global
  granularity. Each on a colour scale that shows its variation (:func:`colour_scale`: 1 − retained
  energy and 1 − coverage on a log scale, the others linear; each over its own range, printed in the
  title); the steps are binned
  into at most :data:`MAX_COLUMNS` columns (each the mean of its logging steps), so the image stays
  the same width at any run length; step ticks are whole steps;
* ``gmt_report.pdf`` — the same figures, the overall one first; each figure says in one line under
  it what to look for (:data:`LOOK_FOR`);
* ``gmt_summary.txt`` — a short text summary, also printed: the whole-model figures, and per
  figure the blocks that differ from the typical block by more than noise (:func:`standouts`).

A file that is empty, holds a malformed line, or holds more than one run is refused with one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from gmt_align.training.figures import is_group_key, split_group_key
from gmt_align.training.stats_file import STATS_FILE, TelemetryStateError, read_records, runs_of

__all__ = ["LOOK_FOR", "MAX_COLUMNS", "bin_columns", "block_grid", "colour_scale", "heatmap_figure", "load_stats",
           "main", "overall_figure", "render", "standouts", "summary"]

MAX_COLUMNS = 200  # heatmap columns at most, whatever the number of logging steps
HEATMAP_WIDTH_IN, DPI = 10.0, 100  # every heatmap is 1000 px wide
FLOOR = 2e-3  # differences of fractions below this (0.2 points) are never named, however steady
SIGMAS = 4  # named beyond 4 standard errors: with 30 blocks x 4 figures, a false name in < 1 % of reports
OVERALL = (("gmt/kept_fraction", "kept fraction"), ("gmt/retained_energy", "retained energy"),
           ("gmt/churn", "churn"), ("gmt/coverage", "coverage"))
HEATMAPS = ("retained_energy", "churn", "coverage", "kept_fraction")
COMPLEMENTED = ("retained_energy", "coverage")  # near 1: their heatmaps show 1 − figure, on a log scale


def load_stats(path: str | Path) -> list[dict]:
    """The records of a ``gmt_stats.jsonl`` of one run, one per step (the last written wins), by
    step. Raises :class:`TelemetryStateError` for an empty file, a malformed line or two runs."""
    records = read_records(path)
    if not records:
        raise TelemetryStateError(f"{path} holds no record (empty: the run logged no step yet?)")
    runs = runs_of(records)
    if len(runs) > 1:
        first_other = next(r for r in records if r.get("run_id") != records[0].get("run_id"))
        raise TelemetryStateError(
            f"{path} holds {len(runs)} runs ({', '.join(map(str, runs))}; the second from step "
            f"{first_other['step']}): a report covers one run")
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def block_grid(records: list[dict], figure: str) -> tuple[list[str], list[list[float]]]:
    """Blocks (in order) and, per block, the figure at each record (NaN where absent)."""
    blocks = sorted({split_group_key(k)[1] for r in records for k in r
                     if is_group_key(k) and k.startswith(f"gmt/{figure}/block_")})
    return blocks, [[r.get(f"gmt/{figure}/{b}", math.nan) for r in records] for b in blocks]


def bin_columns(values: Sequence[float], columns: int) -> list[float]:
    """``values`` in at most ``columns`` consecutive bins of equal count (the last may be shorter),
    each the mean of its non-NaN values (NaN if none)."""
    size = max(1, math.ceil(len(values) / columns))
    out = []
    for start in range(0, len(values), size):
        known = [v for v in values[start : start + size] if not math.isnan(v)]
        out.append(sum(known) / len(known) if known else math.nan)
    return out


def standouts(blocks: list[str], grid: list[list[float]]) -> tuple[float | None, list[tuple[str, float]]]:
    """The blocks whose mean over the logging steps differs from the typical block by more than
    noise; returns (noise, [(block, mean difference)]) — noise None below 3 complete logging steps.

    At each logging step a block's difference is taken from the median of all blocks at that step
    (which removes what blocks share, such as coverage growing, and is not pulled by one odd
    block). Noise is the standard error of a block's mean difference: the standard deviation of
    the differences across steps (the median over blocks), divided by √steps. A block is named
    when its mean difference exceeds :data:`SIGMAS` × noise and :data:`FLOOR`.
    """
    steps = [s for s in range(len(grid[0]) if grid else 0) if not any(math.isnan(row[s]) for row in grid)]
    if len(steps) < 3 or len(blocks) < 2:
        return None, []
    medians = [statistics.median(row[s] for row in grid) for s in steps]
    differences = [[row[s] - m for s, m in zip(steps, medians)] for row in grid]
    noise = statistics.median(statistics.stdev(d) for d in differences) / math.sqrt(len(steps))
    means = [(b, sum(d) / len(d)) for b, d in zip(blocks, differences)]
    return noise, [(b, d) for b, d in means if abs(d) > max(SIGMAS * noise, FLOOR)]


def summary(records: list[dict]) -> str:
    """Run, steps, the whole-model figures, and per figure the blocks that stand out from noise."""
    steps = [r["step"] for r in records]
    lines = [f"gmt telemetry: run {records[0].get('run_id')}, {len(records)} logging steps, steps {steps[0]}..{steps[-1]}"]
    for key, label in OVERALL:
        values = [r[key] for r in records if key in r]
        if values:
            lines.append(f"{label:16s} first {values[0]:.4f}  last {values[-1]:.4f}  "
                         f"min {min(values):.4f}  max {max(values):.4f}")
    for figure in HEATMAPS:
        blocks, grid = block_grid(records, figure)
        if not blocks:
            continue
        label = figure.replace("_", " ")
        noise, named = standouts(blocks, grid)
        if noise is None:
            lines.append(f"{label} by block: fewer than 3 complete logging steps, no noise estimate: no block named")
        elif not named:
            lines.append(f"{label} by block: no block differs from the others by more than noise "
                         f"({SIGMAS} x {noise:.2g}, at least {FLOOR:g})")
        else:
            parts = ", ".join(f"{b} {d:+.4f}" for b, d in sorted(named, key=lambda x: x[1]))
            lines.append(f"{label} by block, mean difference from the median block beyond noise "
                         f"({SIGMAS} x {noise:.2g}, at least {FLOOR:g}): {parts}")
    return "\n".join(lines)


# What each figure means and what to look for: one line under its title.
LOOK_FOR = {
    "overall": "Look for: retained energy near 1 with a fraction of the entries kept, churn settling, "
               "coverage rising toward 1; a jump in any line is where to look.",
    "retained_energy": "Look for: rows brighter than the others (blocks whose kept entries leave more gradient "
                       "energy behind); log scale, lower is better.",
    "churn": "Look for: rows or columns that stand out (blocks whose mask moves more, steps where all masks move).",
    "coverage": "Look for: rows brighter than the others (blocks with more entries never updated yet); "
                "all fall as training goes on.",
    "kept_fraction": "Look for: blocks the global threshold favours (high) or starves (low).",
}


def value_range(values: Sequence[float], log: bool) -> tuple[float, float]:
    """From the smallest to the largest of ``values`` (NaN, and on a log scale values <= 0, left out),
    widened around its middle to at least :data:`FLOOR` (linear) or a factor of 2 (log): differences
    below that are noise, and drawn flat (one colour, a level line) rather than across the whole scale."""
    known = [v for v in values if not math.isnan(v) and (v > 0 or not log)]
    if not known:
        return (1e-6, 1e-3) if log else (0.0, 1.0)
    low, high = min(known), max(known)
    if log and high / low < 2:
        middle = math.sqrt(low * high)
        return middle / math.sqrt(2), middle * math.sqrt(2)
    if not log and high - low < FLOOR:
        middle = (low + high) / 2
        return middle - FLOOR / 2, middle + FLOOR / 2
    return low, high


def colour_scale(figure: str, grid: list[list[float]]) -> tuple[list[list[float]], str, float, float, str]:
    """How a heatmap of ``figure`` shows ``grid``: (values drawn, "log" or "linear", low, high, label).

    Retained energy and coverage approach 1 (0.999...), so they are drawn as their complement on a log
    scale: 1 − retained energy, the gradient energy the mask leaves behind, and 1 − coverage, the
    entries not updated yet (0, fully covered, is drawn as the lowest colour). The other figures are
    drawn as they are, on a linear scale. Either way the colours span the data's own range
    (:func:`value_range`).
    """
    if figure in COMPLEMENTED:
        values = [[1.0 - v for v in row] for row in grid]
        low, high = value_range([v for row in values for v in row], log=True)
        values = [[max(v, low) if not math.isnan(v) else v for v in row] for row in values]
        return values, "log", low, high, f"1 − {figure.replace('_', ' ')} (log scale)"
    low, high = value_range([v for row in grid for v in row], log=False)
    return grid, "linear", low, high, figure.replace("_", " ")


def heatmap_figure(records: list[dict], figure: str):
    """The block × step heatmap of ``figure`` (a matplotlib Figure), or None if no block has it."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import MaxNLocator

    blocks, grid = block_grid(records, figure)
    if not blocks:
        return None
    steps = [r["step"] for r in records]
    values, scale, low, high, label = colour_scale(figure, grid)
    binned = [bin_columns(row, MAX_COLUMNS) for row in values]
    per_column = math.ceil(len(steps) / len(binned[0]))
    height = min(16.0, max(3.4, 0.18 * len(blocks) + 2.0))
    fig, ax = plt.subplots(figsize=(HEATMAP_WIDTH_IN, height))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # grey: no value (churn at first)
    norm = LogNorm(low, high) if scale == "log" else Normalize(low, high)
    image = ax.imshow(binned, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, norm=norm,
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(blocks) - 0.5))
    ax.set_yticks(range(len(blocks)), [b.removeprefix("block_") for b in blocks],
                  fontsize=7 if len(blocks) > 24 else 9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step" + (f" ({per_column} logging steps per column, mean)" if per_column > 1 else ""))
    ax.set_ylabel("block")
    ax.set_title(f"GMT {figure.replace('_', ' ')} per block — colours span {label.split(' (')[0]} "
                 f"{low:.3g} to {high:.3g}", fontsize=11)
    fig.colorbar(image, ax=ax, label=label)
    fig.text(0.01, 0.01, LOOK_FOR[figure], fontsize=8.5, style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def overall_figure(records: list[dict]):
    """The whole-model figures against the step, one panel each, each on its own range."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(HEATMAP_WIDTH_IN, 6), sharex=True)
    for ax, (key, label) in zip(axes.flat, OVERALL):
        points = [(r["step"], r[key]) for r in records if key in r]
        log = key == "gmt/retained_energy"
        if log:
            points = [(step, 1.0 - value) for step, value in points if value < 1.0]
            label = "1 − retained energy (log scale)"
        if not points:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(label, fontsize=10)
            continue
        ax.plot(*zip(*points), marker="o" if len(points) <= 50 else None, markersize=3)
        low, high = value_range([v for _, v in points], log)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(low / 1.1, high * 1.1)
        else:
            margin = 0.05 * (high - low)
            ax.set_ylim(low - margin, high + margin)
            ax.ticklabel_format(axis="y", useOffset=False)
        shown = [v for _, v in points]
        ax.set_title(f"{label}: {min(shown):.4g} to {max(shown):.4g}", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle("GMT: the whole model, each figure on its own range", fontsize=11)
    fig.text(0.01, 0.01, LOOK_FOR["overall"], fontsize=8.5, style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def render(records: list[dict], out: Path) -> list[Path]:
    """Write the overall plot and the heatmaps as PNGs, and all of them, the overall plot first, into
    ``gmt_report.pdf`` (Agg backend: no display needed); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    figures = [("gmt_overall.png", overall_figure(records))]
    figures += [(f"gmt_{figure}_heatmap.png", fig) for figure in HEATMAPS
                if (fig := heatmap_figure(records, figure)) is not None]
    written = []
    with PdfPages(out / "gmt_report.pdf") as pdf:
        for name, fig in figures:
            written.append(out / name)
            fig.savefig(written[-1], dpi=DPI)
            pdf.savefig(fig)
            plt.close(fig)
    return [*written, out / "gmt_report.pdf"]


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
    try:
        records = load_stats(path)
    except TelemetryStateError as error:
        print(f"gmt-align report: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = summary(records)
    (out / "gmt_summary.txt").write_text(text + "\n")
    written = render(records, out)
    print(text)
    print("wrote " + ", ".join(str(p) for p in [*written, out / "gmt_summary.txt"]))
    return 0
