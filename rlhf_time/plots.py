"""PNG charts of one or several runs' metrics.jsonl: losses, learning rate, grad norm, throughput, stage metrics.

matplotlib is optional (`pip install 'rlhf_time[plots]'`); only `draw_charts` needs it. Charts are drawn on a
bare `Figure` (no pyplot), so no GUI backend is touched and nothing global changes in the user's process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf_time.errors import RlhfTimeError

# chart name -> (title, metric stems) for the charts every run has; every other train/* or eval/* stem gets its
# own chart (reward accuracy and margins for rm/dpo, perplexity and token accuracy for sft, ...).
FIXED_CHARTS = {
    "loss": ("loss", ("loss",)),
    "learning_rate": ("learning rate", ("lr",)),
    "grad_norm": ("gradient norm (before clipping)", ("grad_norm",)),
    "throughput": ("tokens / second", ("tokens_per_sec",)),
}
# Bookkeeping that is not worth a chart.
SKIPPED_STEMS = ("epoch", "runtime", "tokens", "mfu", "padding_fraction", "peak_memory_gb", "target_tokens_per_sec")
Series = dict[str, tuple[list[int], list[float]]]  # label -> (steps, values)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl (a RlhfTimeError naming the path when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RlhfTimeError(f"{run_dir}: no metrics.jsonl (not a run folder, or the run logged nothing yet)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RlhfTimeError(f"{path} line {number}: not JSON ({error.msg})") from None
    return rows


def chart_data(runs: dict[str, list[dict]]) -> dict[str, Series]:
    """{chart name: {series label: (steps, values)}} for runs given as {run name: metrics rows}.

    A series is one metric of one split (train/eval) of one run; labels carry the run name only when there are
    several runs. A step logged twice keeps its last value.
    """
    charts: dict[str, Series] = {}
    stem_to_chart = {stem: name for name, (_, stems) in FIXED_CHARTS.items() for stem in stems}
    for run, rows in runs.items():
        points: dict[str, dict[int, float]] = {}
        for row in rows:
            for key, value in row.items():
                split, _, stem = key.partition("/")
                if split not in ("train", "eval") or not stem or stem in SKIPPED_STEMS:
                    continue
                points.setdefault(key, {})[int(row["step"])] = float(value)
        for key in sorted(points, key=lambda key: (key.startswith("eval/"), key)):  # train before eval
            split, _, stem = key.partition("/")
            chart = stem_to_chart.get(stem, _file_name(stem))
            label = f"{run} {split}" if len(runs) > 1 else split
            steps = sorted(points[key])
            charts.setdefault(chart, {})[label] = (steps, [points[key][step] for step in steps])
    ordered = [name for name in FIXED_CHARTS if name in charts] + sorted(set(charts) - set(FIXED_CHARTS))
    return {name: charts[name] for name in ordered}


def chart_title(chart: str) -> str:
    return FIXED_CHARTS[chart][0] if chart in FIXED_CHARTS else chart.replace("_", " ")


def draw_charts(charts: dict[str, Series], out_dir: str | Path, *, log_scale_loss: bool = False) -> list[Path]:
    """One PNG per chart in out_dir (created); returns the written paths in chart order."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RlhfTimeError("charts need matplotlib: pip install matplotlib (or pip install 'rlhf_time[plots]')") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chart, series in charts.items():
        figure = Figure(figsize=(6.4, 3.6), dpi=100)
        figure.subplots_adjust(left=0.11, right=0.97, bottom=0.14, top=0.9)  # fixed margins: constrained layout doubled the time
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for label, (steps, values) in series.items():
            # A single point (e.g. one evaluation) would be invisible as a line.
            axes.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None, markersize=3)
        axes.set_title(chart_title(chart))
        axes.set_xlabel("optimiser step")
        axes.grid(alpha=0.3)
        if chart == "loss" and log_scale_loss and all(v > 0 for _, values in series.values() for v in values):
            axes.set_yscale("log")
        if len(series) > 1:
            axes.legend()
        path = out_dir / f"{chart}.png"
        figure.savefig(path)
        written.append(path)
    return written


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Charts comparing the given run folders (one run: its own charts) written to out_dir."""
    runs: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        name = Path(run_dir).resolve().name
        while name in runs:  # two runs with the same folder name in different output dirs
            name += "'"
        runs[name] = read_metrics(run_dir)
    return draw_charts(chart_data(runs), out_dir)


def _file_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)
