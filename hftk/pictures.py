"""The pictures of runs: training_curves.png of one run, and the picture `hftk report` draws of several.

Series are read back from metrics.jsonl; the learning rate of every step is recomputed from the run's
recipe.yaml with the run's own scheduler and drawn only where it equals every logged value. Drawing
uses matplotlib's object API (no pyplot: no global backend, no GUI, safe in any process) and returns
the Figure, whose axes hold what was drawn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hftk.logs import METRICS_FILE

CURVES_FILE = "training_curves.png"
REPORT_FILE = "report.png"
RECIPE_FILE = "recipe.yaml"
# Eval figures that are not quality metrics: counts, and loss shown on its own panel.
NOT_METRICS = {"eval_loss", "eval_samples", "eval_perplexity"}
LOG_SPAN = 10.0  # a panel whose values span more than this factor gets a log axis
MARKED = 30  # series with fewer points show a marker at each
DPI = 100

Series = dict[str, tuple[list[int], list[float]]]
LOSS_ORDER = ["training loss", "validation loss"]
LOSS_LIKE = {*LOSS_ORDER, "perplexity"}  # panels drawn on a log axis when they span more than LOG_SPAN


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Short names that tell the runs apart: the folder name, or the whole path when names repeat."""
    names = [Path(d).name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


# --- series: what metrics.jsonl holds, by panel ---

def curve_series(rows: list[dict[str, Any]]) -> dict[str, Series]:
    """The panels of training_curves.png: {panel: {label: (steps, values)}}; non-finite values
    (logged as strings) are left out."""
    panels: dict[str, Series] = {"loss": {}, "learning rate": {}, "eval metrics": {}}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "epoch", "tokens_per_second") or not _number(value):
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    points = [(row["step"], float(row[key])) for row in rows if _number(row.get(key))]
    return {key: ([s for s, _ in points], [v for _, v in points])} if points else {}


def intervals_of(rows: list[dict[str, Any]], key: str) -> dict[int, tuple[float, float]]:
    """{step: (low, high)} of the `KEY_ci95` figures logged beside a metric, where there are any."""
    found = {}
    for row in rows:
        interval = row.get(f"{key}_ci95")
        if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(map(_number, interval)):
            found[row["step"]] = (float(interval[0]), float(interval[1]))
    return found


def short_name(key: str) -> str:
    return key.removeprefix("eval_")


def merge_identical(series: Series) -> Series:
    """Series with the same steps and values become one, named after all of them: 'rouge1 = rougeL'."""
    groups: dict[tuple, list[str]] = {}
    for label, (steps, values) in series.items():
        groups.setdefault((tuple(steps), tuple(values)), []).append(label)
    return {" = ".join(labels): (list(steps), list(values)) for (steps, values), labels in groups.items()}


# --- the learning rate of every step ---

def schedule_series(run_dir: Path, rows: list[dict[str, Any]],
                    total_steps: int | None = None) -> tuple[list[int], list[float]] | None:
    """The rate after each optimizer step 0..the last one logged (the value at s is what metrics.jsonl logs
    at step s, and what step s + 1 trains with), recomputed from the run's recipe.yaml with the run's
    scheduler; None when the recipe is gone or unreadable, or when the recomputed rates miss a logged one
    (a run resumed with other settings, fp16 steps skipped). total_steps: the run's planned optimizer
    steps; without it, train.max_steps, or the last step logged."""
    logged = {row["step"]: float(row["learning_rate"]) for row in rows if _number(row.get("learning_rate"))}
    if not logged:
        return None
    settings = _train_settings(Path(run_dir))
    if settings is None:
        return None
    from hftk.train.optim import learning_rates

    last = max(logged)
    rates = learning_rates(settings, total_steps or settings.max_steps or last, last)
    if any(not math.isclose(rates[step], rate, rel_tol=1e-6, abs_tol=1e-12) for step, rate in logged.items()):
        return None
    return list(range(last + 1)), rates


def _train_settings(run_dir: Path) -> Any:
    """The run's train section, or None without a recipe this version can read (then only what was logged
    is drawn)."""
    import yaml

    from hftk.errors import HftkError
    from hftk.recipe import validate_recipe

    try:
        return validate_recipe(yaml.safe_load((run_dir / RECIPE_FILE).read_text())).train
    except (OSError, ValueError, yaml.YAMLError, HftkError, AttributeError, TypeError):
        return None


# --- panels and drawing ---

@dataclass
class Line:
    label: str
    steps: list[int]
    values: list[float]
    colour: str | None = None
    width: float = 1.5  # wider lines drawn first show through identical ones drawn over them
    samples: bool = False  # logged values of a line drawn in full beside them: small dots, no line
    marked: bool = True  # a marker at each point of a short series (not on a schedule of every step)
    intervals: list[tuple[float, float]] | None = None  # a 95% interval per point: a band, or a bar on one point


@dataclass
class Panel:
    title: str
    lines: list[Line]
    from_zero: bool = False  # the level matters and cannot be negative (a learning rate, a one-time score)
    log_when_wide: bool = False  # a loss: a log axis when its values span more than LOG_SPAN


def grid_shape(count: int) -> tuple[int, int]:
    """Rows and columns: one row up to three panels, two by two for four, three wide beyond."""
    if count <= 3:
        return 1, max(count, 1)
    columns = 2 if count == 4 else 3
    return math.ceil(count / columns), columns


def draw_panels(panels: list[Panel], title: str, runs: dict[str, str] | None = None) -> Any:
    """One figure, a panel per entry on a shared step axis; `runs` ({name: colour}) puts one legend of
    the runs above the panels instead of a legend in each. Returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    rows, columns = grid_shape(len(panels))
    figure = Figure(figsize=(5.2 * columns, 3.6 * rows + (0.5 if runs else 0)), layout="constrained")
    figure.suptitle(title)
    grid = figure.subplots(rows, columns, squeeze=False).ravel()
    last_step = max((s for p in panels for line in p.lines for s in line.steps), default=1)
    for axes, panel in zip(grid, panels):
        draw_panel(axes, panel, last_step, legend=runs is None)
    for axes in grid[len(panels):]:
        axes.remove()
    if runs:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colour, marker="o", label=name) for name, colour in runs.items()]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    return figure


def draw_series(panels: dict[str, Series], title: str) -> Any:
    """A figure of {panel: {label: (steps, values)}}, a panel per entry; returns the Figure."""
    return draw_panels([Panel(name, [Line(label, *points) for label, points in series.items()])
                        for name, series in panels.items()], title)


def draw_panel(axes: Any, panel: Panel, last_step: int, legend: bool = True) -> None:
    singles = []
    for line in panel.lines:
        steps, values = line.steps, line.values
        if line.samples:
            axes.plot(steps, values, linestyle="none", marker=".", markersize=5, color=line.colour, label=line.label)
        elif len(steps) == 1:  # one evaluation: a marker with its value, not a line on a stretched axis
            drawn = axes.plot(steps, values, linestyle="none", marker="o", markersize=2 * line.width + 4,
                              color=line.colour, label=line.label)[0]
            singles.append((steps[0], values[0], drawn.get_color()))
        else:
            marker = "o" if line.marked and len(steps) < MARKED else None
            axes.plot(steps, values, marker=marker, markersize=line.width + 1.5, linewidth=line.width,
                      color=line.colour, label=line.label)
        if line.intervals:
            _draw_intervals(axes, line, axes.get_lines()[-1].get_color())
    _set_range(axes, panel)
    axes.set_xlim(0, max(last_step, 1) * 1.03)  # every panel on the same steps
    axes.xaxis.get_major_locator().set_params(integer=True)
    _label_points(axes, singles, last_step)
    axes.set_title(panel.title)
    axes.set_xlabel("optimizer step")
    axes.grid(alpha=0.3)
    if legend:
        axes.legend(fontsize="small")


def _label_points(axes: Any, points: list[tuple[int, float, str]], last_step: int) -> None:
    """Each single point's value beside it, moved up where it would cover the label of a point near it."""
    axes.get_ylim()  # settle the autoscaled limits the transform below reads
    to_axes = axes.transData + axes.transAxes.inverted()
    placed: list[tuple[float, float]] = []
    for step, value, colour in sorted(points, key=lambda p: (p[0], p[1])):
        x, y = to_axes.transform((step, value))
        while any(abs(x - px) < 0.2 and abs(y - py) < 0.07 for px, py in placed):
            y += 0.07
        placed.append((x, y))
        left = step > last_step / 2  # a label inside the panel: left of a point on its right half
        axes.annotate(f"{value:.4g}", (step, value), xytext=(x - 0.025 if left else x + 0.025, y),
                      textcoords="axes fraction", ha="right" if left else "left", va="center",
                      fontsize="small", color=colour)


def _draw_intervals(axes: Any, line: Line, colour: str) -> None:
    """95% intervals: a band along a curve, an error bar on a single point."""
    low, high = [lo for lo, _ in line.intervals], [hi for _, hi in line.intervals]
    if len(line.steps) > 1:
        axes.fill_between(line.steps, low, high, color=colour, alpha=0.2, linewidth=0)
    else:
        axes.errorbar(line.steps, line.values, yerr=[[line.values[0] - low[0]], [high[0] - line.values[0]]],
                      fmt="none", capsize=0, color=colour, alpha=0.6)


def _set_range(axes: Any, panel: Panel) -> None:
    values = [v for line in panel.lines for v in line.values]
    values += [bound for line in panel.lines for interval in line.intervals or [] for bound in interval]
    if not values:
        return
    low, high = min(values), max(values)
    if panel.log_when_wide and low > 0 and high / low > LOG_SPAN:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1, 0.2, 0.5, 1, 2, 5
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.2, not 2 x 10^-1
        axes.yaxis.set_minor_formatter(NullFormatter())
    elif panel.from_zero or high == low or all(len(line.steps) == 1 for line in panel.lines):
        # read against zero, with room above for the labels of single points (and no band around a flat 0)
        top = high * 1.15 if high > 0 else 1.0
        axes.set_ylim(min(0.0, low * 1.1) - (0.03 * top if high == low == 0 else 0.0), top)  # a flat 0 off the spine
    elif low >= 0 and axes.get_ylim()[0] < 0:  # losses, rates and scores are never negative
        axes.set_ylim(bottom=0)


# --- training_curves.png ---

def curve_panels(run_dir: Path, rows: list[dict[str, Any]], total_steps: int | None = None) -> list[Panel]:
    series = curve_series(rows)
    panels = []
    if "loss" in series:
        losses = sorted(series["loss"].items(), key=lambda item: LOSS_ORDER.index(item[0]))
        panels.append(Panel("loss", [Line(label, *points) for label, points in losses], log_when_wide=True))
    if "learning rate" in series:
        logged = series["learning rate"]["learning rate"]
        schedule = schedule_series(run_dir, rows, total_steps)
        lines = [Line("logged", *logged, samples=True)]
        if schedule is not None:
            lines.insert(0, Line("every step (recipe's schedule)", *schedule, marked=False))
            lines[1].colour = "C1"
        panels.append(Panel("learning rate", lines, from_zero=True))
    if "eval metrics" in series:
        merged = merge_identical({short_name(k): v for k, v in series["eval metrics"].items()})
        lines = []
        for label, points in merged.items():
            bands = intervals_of(rows, "eval_" + label.split(" = ")[0])
            lines.append(Line(label, *points, intervals=[bands[s] for s in points[0]] if
                              bands and all(s in bands for s in points[0]) else None))
        panels.append(Panel("eval metrics", lines, log_when_wide=set(merged) == {"perplexity"}))
    return panels


def draw_training_curves(run_dir: Path, total_steps: int | None = None) -> Any | None:
    """The figure of training_curves.png, or None when metrics.jsonl has no rows to draw."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    panels = curve_panels(run_dir, rows, total_steps)
    return draw_panels(panels, run_dir.name) if panels else None


def write_training_curves(run_dir: Path, total_steps: int | None = None) -> Any | None:
    """training_curves.png from the run's metrics.jsonl; returns the figure, or None with no rows.
    total_steps: the optimizer steps the run planned (what its learning-rate schedule was built for)."""
    figure = draw_training_curves(run_dir, total_steps)
    if figure is not None:
        figure.savefig(Path(run_dir) / CURVES_FILE, dpi=DPI)
    return figure


# --- the report picture ---

def comparison_series(run_dirs: list[Path]) -> dict[str, Series]:
    """Panels of the report picture, {panel: {run name: (steps, values)}}: training loss, validation loss,
    learning rate (every step where the recipe gives it), then each eval metric, metrics with the same
    values in every run on one panel ('rouge1 = rougeL')."""
    names = run_labels(run_dirs)
    panels: dict[str, Series] = {}
    metrics: dict[str, Series] = {}
    for run_dir, name in zip(run_dirs, names):
        rows = read_metrics(run_dir)
        series = curve_series(rows)
        for label, points in series.get("loss", {}).items():
            panels.setdefault(label, {})[name] = points
        if "learning rate" in series:
            panels.setdefault("learning rate", {})[name] = (schedule_series(Path(run_dir), rows)
                                                            or series["learning rate"]["learning rate"])
        for key, points in series.get("eval metrics", {}).items():
            metrics.setdefault(short_name(key), {})[name] = points
    panels = {title: panels[title] for title in [*LOSS_ORDER, "learning rate"] if title in panels}
    by_values: dict[tuple, list[str]] = {}
    for metric, runs in metrics.items():
        key = tuple((name, tuple(s), tuple(v)) for name, (s, v) in sorted(runs.items()))
        by_values.setdefault(key, []).append(metric)
    for same in by_values.values():
        panels[" = ".join(same)] = metrics[same[0]]
    return panels


def draw_comparison(run_dirs: list[Path]) -> Any:
    """The report picture: a grid of panels, one colour per run in every panel, one legend of the runs."""
    run_dirs = [Path(d) for d in run_dirs]
    names = run_labels(run_dirs)
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    # the first run widest: where runs draw the same curve, every colour still shows
    widths = {name: max(1.2, 1.2 + 0.8 * (len(names) - 1 - i)) for i, name in enumerate(names)}
    panels = [Panel(title, [Line(name, *points, colour=colours[name], width=min(widths[name], 4.0),
                                 marked=title != "learning rate")
                            for name, points in runs.items()],
                    from_zero=title == "learning rate", log_when_wide=title in LOSS_LIKE)
              for title, runs in comparison_series(run_dirs).items()]
    return draw_panels(panels, "runs compared", runs=colours)


def report_picture_path(run_dirs: list[Path], output: Path | None) -> Path:
    """Where `hftk report` draws: --output, or report.png in the first run's folder."""
    return Path(output) if output is not None else Path(run_dirs[0]) / REPORT_FILE


def write_comparison(run_dirs: list[Path], output: Path) -> Any:
    figure = draw_comparison(run_dirs)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=DPI)
    return figure
