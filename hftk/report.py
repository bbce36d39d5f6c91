"""Pictures and tables of finished runs: training_curves.png at the end of a run, and `hftk report`
comparing runs side by side. Everything is read back from metrics.jsonl and all_results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hftk import comparison
from hftk.errors import UserError

# The pictures live in hftk/pictures.py; these names stay importable from here.
from hftk.pictures import (  # noqa: F401
    CURVES_FILE,
    NOT_METRICS,
    Series,
    comparison_series,
    curve_series,
    draw_series,
    read_metrics,
    report_picture_path,
    run_labels,
    write_comparison,
    write_training_curves,
)

RESULTS_FILE = "all_results.json"


def read_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a finished hftk run (no {RESULTS_FILE})")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def results_table(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """Rows of the report table: one per figure any run has, eval metrics first; a run without it shows '-'."""
    results = [read_results(d) for d in run_dirs]
    keys = sorted({k for r in results for k in r}, key=lambda k: (not k.startswith("eval_"), k))
    rows = [[key, *(_shown(r.get(key)) for r in results)] for key in keys]
    return run_labels(run_dirs), rows


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{value[0]:.4f}, {value[1]:.4f}]"  # an eval_<metric>_ci95 interval
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def comparison_report(run_dirs: list[Path]) -> dict[str, Any]:
    """`hftk report --json`: the runs, every recipe value that differs between them, and each later run
    against the first on the examples they share (hftk.comparison)."""
    run_dirs = [Path(d) for d in run_dirs]
    for run_dir in run_dirs:
        read_results(run_dir)  # each must be a finished run
    return comparison.compare_run_dirs(run_dirs, run_labels(run_dirs))


def comparison_tables(report: dict[str, Any]) -> list[Any]:
    """The recipe values that differ and the paired comparisons, as rich tables (none for one run)."""
    from rich.table import Table

    tables = []
    runs = report["runs"]
    if report["differences"]:
        table = Table(title="recipe values that differ")
        table.add_column("recipe key")
        for name in runs:
            table.add_column(name, justify="right")
        for key, values in report["differences"].items():
            table.add_row(key, *(_shown(v) for v in values))
        tables.append(table)
    if report["comparisons"]:
        table = Table(title=f"each run (b) against {runs[0]} (a) on the examples they share: b - a, its 95% paired "
                            f"bootstrap interval, p from approximate randomization")
        for column in ("metric", "run", f"{runs[0]} (a)", "run (b)", "b - a", "95% interval", "p", "significant",
                       "examples"):
            table.add_column(column, justify="left" if column in ("metric", "run") else "right")
        for c in report["comparisons"]:
            table.add_row(c["metric"], c["run"], _shown(float(c["a"])), _shown(float(c["b"])), f"{c['delta']:+.4f}",
                          _shown(c["ci95"]), f"{c['p_value']:.3g}", "yes" if c["significant"] else "no",
                          str(c["examples"]))
        tables.append(table)
    return tables


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
    if len(run_dirs) > 1:
        for extra in comparison_tables(comparison_report(run_dirs)):
            Console().print(extra)
    if output is None:
        return None
    return write_comparison(run_dirs, output)
