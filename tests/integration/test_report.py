"""training_curves.png and `hftk report`, read back from what was drawn."""

from __future__ import annotations

import json

import pytest

from hftk.report import comparison_series, curve_series, read_metrics, write_training_curves
from tests.conftest import run_hftk, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = []
    for name, rate in (("slow", 1e-4), ("fast", 3e-3)):
        folder = tmp_path_factory.mktemp(name)
        recipe = tiny_recipe(folder, train={"output_dir": str(folder / name), "learning_rate": rate,
                                            "eval_steps": 2, "logging_steps": 1})
        result = run_hftk("finetune", str(write_recipe(folder, recipe)))
        assert result.returncode == 0, result.stderr
        runs.append(folder / name)
    return runs


def _lines(figure):
    return {(axes.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
            for axes in figure.axes for line in axes.get_lines()}


@pytest.mark.slow
def test_training_curves_draw_metrics_jsonl(two_runs):
    run = two_runs[0]
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(run)
    lines = _lines(write_training_curves(run))
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert lines[("loss", "training loss")] == ([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
    assert lines[("loss", "validation loss")] == ([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows])
    # the logged rates, and beside them the rate of every step from step 0 (pictures.schedule_series)
    assert lines[("learning rate", "logged")][1] == [r["learning_rate"] for r in train_rows]
    assert lines[("learning rate", "every step (recipe's schedule)")][0] == list(range(5))
    # equal metrics share one line named after all of them ("rouge1 = rougeL")
    rouge1 = next(label for title, label in lines if title == "eval metrics" and "rouge1" in label.split(" = "))
    assert lines[("eval metrics", rouge1)][1] == [r["eval_rouge1"] for r in eval_rows]
    assert [r["step"] for r in eval_rows] == [2, 4]  # during training at step 2, and the final one
    assert ("eval metrics", "eval_samples") not in lines


def test_curve_series_skips_non_finite_and_counts():
    rows = [{"step": 1, "epoch": 0.1, "loss": 2.0, "learning_rate": 1e-3, "tokens_per_second": 9.0},
            {"step": 2, "epoch": 0.2, "loss": "nan", "learning_rate": 5e-4, "tokens_per_second": 9.0},
            {"step": 2, "eval_loss": 1.5, "eval_perplexity": 4.48, "eval_samples": 16}]
    panels = curve_series(rows)
    assert panels["loss"] == {"training loss": ([1], [2.0]), "validation loss": ([2], [1.5])}
    assert panels["eval metrics"] == {"eval_perplexity": ([2], [4.48])}  # no other metric to show
    assert panels["learning rate"]["learning rate"] == ([1, 2], [1e-3, 5e-4])


@pytest.mark.slow
def test_report_compares_two_runs(two_runs, tmp_path):
    picture = tmp_path / "cmp" / "report.png"
    result = run_hftk("report", *map(str, two_runs), "--output", str(picture), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    slow, fast = (json.loads((run / "all_results.json").read_text()) for run in two_runs)
    table_row = next(line for line in result.stdout.splitlines() if "eval_loss" in line)
    assert f"{slow['eval_loss']:.4f}" in table_row and f"{fast['eval_loss']:.4f}" in table_row
    assert table_row.index(f"{slow['eval_loss']:.4f}") < table_row.index(f"{fast['eval_loss']:.4f}")
    assert picture.read_bytes()[:4] == b"\x89PNG"
    panels = comparison_series(two_runs)
    slow_eval = [r["eval_loss"] for r in read_metrics(two_runs[0]) if "eval_loss" in r]
    assert panels["validation loss"]["slow"][1] == slow_eval
    assert set(next(runs for title, runs in panels.items() if "rougeL" in title.split(" = "))) == {"slow", "fast"}


def test_report_refuses_an_unfinished_run(tmp_path):
    result = run_hftk("report", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"hftk: error: {tmp_path} is not a finished hftk run (no all_results.json)"
