"""``gmt-align report`` on synthetic stats files, and gmt_stats.jsonl's one-run rule (gmt_align.training.stats_file)."""

import json
import random
import re
import struct

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gmt_align.cli import main as cli  # noqa: E402
from gmt_align.cli.report import (FLOOR, LOOK_FOR, MAX_COLUMNS, bin_columns, block_grid, colour_scale,  # noqa: E402
                                  heatmap_figure, load_stats, overall_figure, render, standouts)
from gmt_align.training.stats_file import TelemetryStateError, continue_run, read_records  # noqa: E402

BLOCKS = 30


def synthetic(path, steps=1000, every=1, run_id="run-a", odd_block=None, spread=0.01, seed=0):
    """A stats file of ``steps`` logging steps: per block energy ~0.95, churn ~0.3, coverage growing;
    ``odd_block`` keeps 0.05 less energy than the others; ``spread``: step-to-step noise."""
    rng = random.Random(seed)
    with open(path, "w") as file:
        for n in range(1, steps + 1):
            record = {"run_id": run_id, "step": n * every, "gmt/kept_fraction": 0.9, "gmt/retained_energy": 0.95,
                      "gmt/churn": 0.3, "gmt/coverage": 1 - 0.5 / n}
            for b in range(BLOCKS):
                record[f"gmt/retained_energy/block_{b:02d}"] = 0.95 - 0.05 * (b == odd_block) + rng.gauss(0, spread)
                record[f"gmt/churn/block_{b:02d}"] = 0.3 + rng.gauss(0, spread)
                record[f"gmt/coverage/block_{b:02d}"] = 1 - 0.5 / n
            file.write(json.dumps(record) + "\n")


def png_size(path):
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


def test_a_long_run_gives_bounded_heatmaps_and_names_the_odd_block(tmp_path, capsys):
    synthetic(tmp_path / "gmt_stats.jsonl", odd_block=7)
    assert cli(["report", str(tmp_path)]) == 0
    for figure in ("retained_energy", "churn", "coverage"):
        width, height = png_size(tmp_path / f"gmt_{figure}_heatmap.png")
        assert width == 1000 and height <= 800, figure
    summary = (tmp_path / "gmt_summary.txt").read_text()
    assert "1000 logging steps, steps 1..1000" in summary
    (energy,) = [line for line in summary.splitlines() if line.startswith("retained energy by block")]
    assert re.search(r"block_07 -0\.0(49|50|51)", energy) and energy.count("block_") == 1, energy
    assert "churn by block: no block differs" in summary and "coverage by block: no block differs" in summary
    assert summary in capsys.readouterr().out + "\n"


def _figure_values(records, figure):
    return [r[k] for r in records for k in r if k.startswith(f"gmt/{figure}/block_")]


def _integer_ticks(ax):
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return len(ticks) >= 2 and all(t == int(t) for t in ticks)


def test_each_heatmap_spans_its_own_data_with_whole_step_ticks(tmp_path):
    """Retained energy (0.999...) and coverage as 1 − figure on a log scale from its smallest to its
    largest value, churn linear over its own range; the range is in the title; ticks are whole steps."""
    from matplotlib.colors import LogNorm

    path = tmp_path / "gmt_stats.jsonl"
    synthetic(path, steps=37, spread=0.01)
    records = load_stats(path)
    for record in records:  # retained energy as GMT logs it: a hair below 1
        for key in [k for k in record if k.startswith("gmt/retained_energy/")]:
            record[key] = 1 - abs(1 - record[key]) / 50
    for figure, log in (("retained_energy", True), ("coverage", True), ("churn", False)):
        values = _figure_values(records, figure)
        drawn = [1 - v for v in values] if log else values
        fig = heatmap_figure(records, figure)
        ax = fig.axes[0]
        norm = ax.images[0].norm
        assert isinstance(norm, LogNorm) == log, figure
        assert (norm.vmin, norm.vmax) == pytest.approx((min(drawn), max(drawn)), rel=1e-12), figure
        assert f"{min(drawn):.3g} to {max(drawn):.3g}" in ax.get_title(), ax.get_title()
        assert _integer_ticks(ax), ax.get_xticks()
        assert any(LOOK_FOR[figure] == t.get_text() for t in fig.texts), figure
        plt.close(fig)


def test_noise_is_drawn_flat_not_across_the_whole_scale(tmp_path):
    """Blocks that differ by 1e-7 get a range FLOOR wide (linear) or a factor of 2 (log), not the colour bar."""
    synthetic(tmp_path / "gmt_stats.jsonl", steps=20, spread=1e-7)
    records = load_stats(tmp_path / "gmt_stats.jsonl")
    _, scale, low, high, _ = colour_scale("churn", block_grid(records, "churn")[1])
    assert scale == "linear" and high - low == pytest.approx(FLOOR)
    assert low < min(_figure_values(records, "churn")) and max(_figure_values(records, "churn")) < high
    _, scale, low, high, _ = colour_scale("retained_energy", block_grid(records, "retained_energy")[1])
    assert scale == "log" and high / low == pytest.approx(2) and low < 0.05 < high


def test_overall_panels_each_on_its_own_range_and_the_report_opens_with_what_to_look_for(tmp_path):
    path = tmp_path / "gmt_stats.jsonl"
    synthetic(path, steps=12, every=5)
    records = load_stats(path)
    fig = overall_figure(records)
    panels = {ax.get_title().split(":")[0]: ax for ax in fig.axes}
    assert set(panels) == {"kept fraction", "1 − retained energy (log scale)", "churn", "coverage"}
    energy = panels["1 − retained energy (log scale)"]
    assert energy.get_yscale() == "log" and energy.get_ylim()[0] < 0.05 < energy.get_ylim()[1]
    kept = panels["kept fraction"]  # constant 0.9: a level line, not noise blown up
    assert kept.get_ylim()[1] - kept.get_ylim()[0] >= FLOOR and kept.get_ylim()[0] < 0.9 < kept.get_ylim()[1]
    coverage = [r["gmt/coverage"] for r in records]
    low, high = panels["coverage"].get_ylim()
    assert low < min(coverage) and max(coverage) < high and high - low < 1.11 * (max(coverage) - min(coverage))
    assert all(_integer_ticks(ax) for ax in fig.axes)
    assert LOOK_FOR["overall"] in [t.get_text() for t in fig.texts]
    plt.close(fig)
    written = render(records, tmp_path)
    assert [p.name for p in written] == ["gmt_overall.png", "gmt_retained_energy_heatmap.png", "gmt_churn_heatmap.png",
                                         "gmt_coverage_heatmap.png", "gmt_report.pdf"]
    pdf = (tmp_path / "gmt_report.pdf").read_bytes()
    assert pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") == 4  # the overall page first, then the maps


def test_binning_and_noise():
    assert bin_columns(list(range(10)), 4) == [1.0, 4.0, 7.0, 9.0]  # bins of 3, the last shorter
    assert len(bin_columns([0.5] * 12345, MAX_COLUMNS)) <= MAX_COLUMNS
    rows = [[0.5, 0.6, 0.7], [0.5, 0.6, 0.7], [0.6, 0.7, 0.8]]  # the common trend is not noise
    noise, named = standouts(["a", "b", "c"], rows)
    assert noise == pytest.approx(0, abs=1e-12) and [(b, round(d, 9)) for b, d in named] == [("c", 0.1)]
    assert standouts(["a", "b"], [[0.5, 0.6], [0.7, 0.8]]) == (None, [])  # 2 steps: no noise estimate


@pytest.mark.parametrize("content, message", [
    ("", "holds no record"),
    ('{"run_id": "a", "step": 1}\n{"run_id": "a", "step": 2}\n{"run_id": "a", "st', "gmt_stats.jsonl:3: not a JSON record"),
    ('{"run_id": "a", "step": 1}\n[1, 2]\n', "gmt_stats.jsonl:2: not a gmt telemetry record"),
    ('{"run_id": "a", "step": 1}\n{"run_id": "b", "step": 1}\n', "holds 2 runs (a, b; the second from step 1)"),
])
def test_report_refuses_what_is_not_one_run(tmp_path, capsys, content, message):
    (tmp_path / "gmt_stats.jsonl").write_text(content)
    assert cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "gmt_summary.txt").exists()


def test_continue_run_keeps_one_run_per_file(tmp_path):
    path = tmp_path / "gmt_stats.jsonl"
    synthetic(path, steps=6, every=2, run_id="run-a")
    with pytest.raises(TelemetryStateError, match="already holds the figures of run run-a \\(steps 2..12"):
        continue_run(path, "run-b", None)  # a new run
    with open(path, "a") as file:
        file.write('{"run_id": "run-a", "step": 14, "gmt/chu')  # killed while writing
    with pytest.raises(TelemetryStateError, match=r"gmt_stats.jsonl:7: not a JSON record"):
        read_records(path)
    with pytest.raises(TelemetryStateError, match="holds the figures of run run-a, not of run run-b"):
        continue_run(path, "run-b", 6)  # another run's checkpoint
    with pytest.warns(UserWarning, match="dropped a truncated last record"):
        assert continue_run(path, "run-a", 6) == "run-a"  # resumed from checkpoint-6: 8..12 are logged again
    assert [r["step"] for r in read_records(path)] == [2, 4, 6]
    assert continue_run(path, None, 4) == "run-a"  # a checkpoint without a run id continues the file's run
    path.write_text("")
    assert continue_run(path, "run-c", None) == "run-c" and not path.exists()  # an empty file: nothing to keep
