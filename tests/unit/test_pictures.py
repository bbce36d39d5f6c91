"""training_curves.png and the report picture, read back from the matplotlib Figures drawn from constructed
run folders (metrics.jsonl, recipe.yaml, all_results.json): panels, scales, legends and markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from hftk.pictures import (
    comparison_series,
    draw_comparison,
    draw_training_curves,
    grid_shape,
    merge_identical,
    report_picture_path,
    write_training_curves,
)
from tests.conftest import run_hftk, tiny_recipe, write_recipe

RATE, WARMUP, STEPS = 1e-3, 10, 50


def linear_rate(step: int) -> float:
    """transformers' linear schedule with warm-up, written out: what the loop logs after `step` steps."""
    if step < WARMUP:
        return RATE * step / WARMUP
    return RATE * max(0.0, (STEPS - step) / (STEPS - WARMUP))


def make_run(folder: Path, losses: dict[int, float], evals: dict[int, dict[str, float]], rate=linear_rate,
             recipe: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in sorted({*losses, *evals}):
        if step in losses:
            rows.append({"step": step, "epoch": step / STEPS, "loss": losses[step], "learning_rate": rate(step),
                         "tokens_per_second": 100.0})
        if step in evals:
            rows.append({"step": step, **evals[step], "eval_samples": 16})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if recipe:
        write_recipe(folder, tiny_recipe(folder, train={"output_dir": str(folder), "max_steps": STEPS,
                                                         "learning_rate": RATE, "warmup_steps": WARMUP,
                                                         "logging_steps": 10}))
    (folder / "all_results.json").write_text(json.dumps({"eval_loss": 1.0}))
    return folder


def panels_of(figure) -> dict[str, object]:
    return {axes.get_title(): axes for axes in figure.axes}


def lines_of(axes) -> dict[str, object]:
    return {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}


TRAIN_LOSSES = {10: 4.26, 20: 1.2, 30: 0.6, 40: 0.4, 50: 0.31}


def test_loss_is_drawn_on_a_log_axis_when_it_spans_more_than_ten_times(tmp_path):
    wide = draw_training_curves(make_run(tmp_path / "wide", TRAIN_LOSSES, {50: {"eval_loss": 0.3}}))
    assert panels_of(wide)["loss"].get_yscale() == "log"  # 4.26 / 0.3 > 10
    narrow = draw_training_curves(make_run(tmp_path / "narrow", {10: 4.0, 50: 3.0}, {50: {"eval_loss": 3.1}}))
    assert panels_of(narrow)["loss"].get_yscale() == "linear"
    # scores stay linear whatever their span
    scores = draw_training_curves(make_run(tmp_path / "scores", TRAIN_LOSSES,
                                           {10: {"eval_bleu": 0.2}, 50: {"eval_bleu": 30.0}}))
    assert panels_of(scores)["eval metrics"].get_yscale() == "linear"


def test_learning_rate_is_drawn_for_every_step_from_the_start(tmp_path):
    figure = draw_training_curves(make_run(tmp_path / "run", TRAIN_LOSSES, {50: {"eval_loss": 0.3}}))
    lines = lines_of(panels_of(figure)["learning rate"])
    schedule = lines["every step (recipe's schedule)"]
    assert list(schedule.get_xdata()) == list(range(STEPS + 1))
    assert list(schedule.get_ydata()) == pytest.approx([linear_rate(s) for s in range(STEPS + 1)], rel=1e-9)
    assert max(schedule.get_ydata()[:WARMUP]) < RATE  # the warm-up the logged rows (every 10 steps) skip
    logged = lines["logged"]
    assert list(logged.get_xdata()) == list(TRAIN_LOSSES) and logged.get_linestyle() == "None"
    assert panels_of(figure)["learning rate"].get_ylim()[0] == 0


def test_a_schedule_that_misses_a_logged_rate_is_not_drawn(tmp_path):
    doubled = make_run(tmp_path / "resumed", TRAIN_LOSSES, {}, rate=lambda s: 2 * linear_rate(s))
    assert set(lines_of(panels_of(draw_training_curves(doubled))["learning rate"])) == {"logged"}
    unknown = make_run(tmp_path / "no_recipe", TRAIN_LOSSES, {}, recipe=False)
    assert set(lines_of(panels_of(draw_training_curves(unknown))["learning rate"])) == {"logged"}


def test_identical_series_are_drawn_once_with_every_name(tmp_path):
    same = {"eval_rouge1": 0.5, "eval_rougeL": 0.5, "eval_rougeLsum": 0.5}
    run = make_run(tmp_path / "run", TRAIN_LOSSES, {30: {**same, "eval_rouge2": 0.2},
                                                     50: {**{k: 0.6 for k in same}, "eval_rouge2": 0.3}})
    axes = panels_of(draw_training_curves(run))["eval metrics"]
    assert set(lines_of(axes)) == {"rouge1 = rougeL = rougeLsum", "rouge2"}
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["rouge1 = rougeL = rougeLsum", "rouge2"]
    assert merge_identical({"a": ([1], [2.0]), "b": ([1], [2.0]), "c": ([1], [3.0])}) == {
        "a = b": ([1], [2.0]), "c": ([1], [3.0])}


def test_one_point_series_are_labelled_markers_read_against_zero(tmp_path):
    run = make_run(tmp_path / "run", TRAIN_LOSSES, {50: {"eval_loss": 0.3, "eval_rouge1": 0.7233, "eval_rouge2": 0.6173}})
    panels = panels_of(draw_training_curves(run))
    validation = lines_of(panels["loss"])["validation loss"]
    assert validation.get_linestyle() == "None" and validation.get_marker() == "o"
    metrics = panels["eval metrics"]
    assert all(line.get_linestyle() == "None" for line in lines_of(metrics).values())
    assert sorted(text.get_text() for text in metrics.texts) == ["0.6173", "0.7233"]
    low, high = metrics.get_ylim()
    assert low == 0 and 0.7233 < high < 1
    # labels of points close together do not sit on one another
    first, second = (text.get_position()[1] for text in metrics.texts)
    assert abs(first - second) >= 0.07


def test_every_panel_shares_the_steps_of_the_run(tmp_path):
    figure = draw_training_curves(make_run(tmp_path / "run", TRAIN_LOSSES, {50: {"eval_loss": 0.3, "eval_f1": 20.0}}))
    assert {axes.get_xlim() for axes in figure.axes} == {(0, STEPS * 1.03)}


def test_intervals_logged_beside_a_metric_are_drawn(tmp_path):
    evals = {s: {"eval_bleu": b, "eval_bleu_ci95": [b - 2, b + 2]} for s, b in ((30, 10.0), (50, 20.0))}
    axes = panels_of(draw_training_curves(make_run(tmp_path / "run", TRAIN_LOSSES, evals)))["eval metrics"]
    band = axes.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(8.0) and band[:, 1].max() == pytest.approx(22.0)


def test_training_curves_png_is_written_in_the_run(tmp_path):
    run = make_run(tmp_path / "run", TRAIN_LOSSES, {50: {"eval_loss": 0.3}})
    assert write_training_curves(run, STEPS) is not None
    assert (run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert write_training_curves(tmp_path) is None and not (tmp_path / "training_curves.png").exists()


def two_runs(tmp_path: Path) -> list[Path]:
    a = make_run(tmp_path / "a", TRAIN_LOSSES, {30: {"eval_loss": 1.0, "eval_rouge1": 0.4, "eval_rougeL": 0.4,
                                                     "eval_rouge2": 0.1},
                                                50: {"eval_loss": 0.5, "eval_rouge1": 0.5, "eval_rougeL": 0.5,
                                                     "eval_rouge2": 0.2}})
    b = make_run(tmp_path / "b", {s: v * 1.1 for s, v in TRAIN_LOSSES.items()},
                 {30: {"eval_loss": 1.1, "eval_rouge1": 0.35, "eval_rougeL": 0.35, "eval_rouge2": 0.1},
                  50: {"eval_loss": 0.6, "eval_rouge1": 0.45, "eval_rougeL": 0.45, "eval_rouge2": 0.15}})
    return [a, b]


def test_report_picture_is_a_grid_with_one_colour_per_run(tmp_path):
    runs = two_runs(tmp_path)
    figure = draw_comparison(runs)
    panels = panels_of(figure)
    assert list(panels) == ["training loss", "validation loss", "learning rate", "rouge1 = rougeL", "rouge2"]
    rows, columns = grid_shape(len(panels))
    assert (rows, columns) == (2, 3)
    assert len({round(axes.get_position().y0, 3) for axes in figure.axes}) == rows  # a grid, not one row
    assert panels["training loss"].get_yscale() == "log"
    colours = {}
    for axes in figure.axes:
        for name, line in lines_of(axes).items():
            colours.setdefault(name, set()).add(to_hex(line.get_color()))
    assert set(colours) == {"a", "b"} and all(len(c) == 1 for c in colours.values())
    assert colours["a"] != colours["b"]
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    assert [to_hex(h.get_color()) for h in legend.legend_handles] == [*colours["a"], *colours["b"]]
    # the learning rate of every step, from each run's recipe
    assert len(lines_of(panels["learning rate"])["a"].get_xdata()) == STEPS + 1
    assert comparison_series(runs)["rouge2"]["b"] == ([30, 50], [0.1, 0.15])


def test_report_draws_next_to_the_first_run_and_says_where(tmp_path):
    runs = two_runs(tmp_path)
    assert report_picture_path(runs, None) == runs[0] / "report.png"
    assert report_picture_path(runs, tmp_path / "x.png") == tmp_path / "x.png"
    result = run_hftk("report", *map(str, runs), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"picture: {runs[0] / 'report.png'}" in result.stdout
    assert (runs[0] / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "report.png").exists()  # not in the current directory


def test_scores_of_zero_are_not_drawn_on_a_negative_axis(tmp_path):
    run = make_run(tmp_path / "run", TRAIN_LOSSES, {30: {"eval_rouge1": 0.0}, 50: {"eval_rouge1": 0.0}})
    low, high = panels_of(draw_training_curves(run))["eval metrics"].get_ylim()
    assert -0.05 < low < 0 and high == 1.0  # a line at 0 just above the axis, not a band around it
