"""Pictures and tables of finished runs: training_curves.png at the end of a run, and `hftk report`
comparing runs side by side. Everything is read back from metrics.jsonl and all_results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hftk.errors import UserError
from hftk.logs import METRICS_FILE

CURVES_FILE = "training_curves.png"
RESULTS_FILE = "all_results.json"
# Eval figures that are not quality metrics: counts, and loss shown on its own panel.
NOT_METRICS = {"eval_loss", "eval_samples", "eval_perplexity"}

Series = dict[str, tuple[list[int], list[float]]]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_series(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """The panels of training_curves.png: {panel: {label: (steps, values)}}; non-finite values
    (logged as strings) are left out."""
    panels: dict[str, Series] = {"loss": {}, "learning rate": {}, "eval metrics": {}}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "epoch", "tokens_per_second") or not isinstance(value, (int, float)):
                continue
            panel = _panel_of(key)
            if panel is None:
                continue
            steps, values = panels[panel].setdefault(_label_of(key), ([], []))
            steps.append(row["step"])
            values.append(float(value))
    if not panels["eval metrics"]:  # text generation has no metric but perplexity
        panels["eval metrics"] = {_label_of(k): v for k, v in _only(rows, "eval_perplexity").items()}
    return {name: series for name, series in panels.items() if series}


def _panel_of(key: str) -> str | None:
    if key in ("loss", "eval_loss"):
        return "loss"
    if key == "learning_rate":
        return "learning rate"
    if key.startswith("eval_") and key not in NOT_METRICS:
        return "eval metrics"
    return None


def _label_of(key: str) -> str:
    return {"loss": "training loss", "eval_loss": "validation loss", "learning_rate": "learning rate"}.get(key, key)


def _only(rows: list[dict[str, Any]], key: str) -> Series:
    points = [(row["step"], float(row[key])) for row in rows if isinstance(row.get(key), (int, float))]
    return {key: ([s for s, _ in points], [v for _, v in points])} if points else {}


def draw_series(panels: dict[str, Series], title: str) -> Any:
    """One figure, a panel per entry; returns the matplotlib Figure (its lines hold the data drawn)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in any process

    figure = Figure(figsize=(5 * max(len(panels), 1), 4), layout="constrained")
    figure.suptitle(title)
    for axes, (name, series) in zip(figure.subplots(1, max(len(panels), 1), squeeze=False)[0], panels.items()):
        for label, (steps, values) in series.items():
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        axes.set_title(name)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def write_training_curves(run_dir: Path) -> Any | None:
    """training_curves.png from the run's metrics.jsonl; returns the figure, or None with no rows."""
    run_dir = Path(run_dir)
    panels = curve_series(read_metrics(run_dir))
    if not panels:
        return None
    figure = draw_series(panels, run_dir.name)
    figure.savefig(run_dir / CURVES_FILE, dpi=100)
    return figure


def read_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a finished hftk run (no {RESULTS_FILE})")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def comparison_series(run_dirs: list[Path]) -> dict[str, Series]:
    """Panels of the report picture: each run's training loss, validation loss and eval metrics."""
    names = run_labels(run_dirs)
    panels: dict[str, Series] = {}
    for run_dir, name in zip(run_dirs, names):
        for panel, series in curve_series(read_metrics(run_dir)).items():
            if panel == "learning rate":
                continue
            for label, points in series.items():
                title = label if panel == "eval metrics" else panel
                panels.setdefault(title, {})[f"{name}: {label}" if panel == "loss" else name] = points
    return panels


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Short names that tell the runs apart: the folder name, or the whole path when names repeat."""
    names = [Path(d).name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def results_table(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """Rows of the report table: one per figure any run has, eval metrics first; a run without it shows '-'."""
    results = [read_results(d) for d in run_dirs]
    keys = sorted({k for r in results for k in r}, key=lambda k: (not k.startswith("eval_"), k))
    rows = [[key, *(_shown(r.get(key)) for r in results)] for key in keys]
    return run_labels(run_dirs), rows


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def compare_runs(run_dirs: list[Path], output: Path | None) -> Any:
    """Print the table of all_results.json figures side by side, and draw the picture to `output`.
    Returns the figure (None without `output`)."""
    from rich.console import Console
    from rich.table import Table

    run_dirs = [Path(d) for d in run_dirs]
    header, rows = results_table(run_dirs)
    table = Table(title="hftk runs")
    table.add_column("figure")
    for name in header:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if output is None:
        return None
    figure = draw_series(comparison_series(run_dirs), "runs compared")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return figure
