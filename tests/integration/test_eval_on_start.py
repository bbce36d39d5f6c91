"""train.eval_on_start: the checkpoint's own score as the step-0 row, its predictions kept for paired
comparisons, the card's before and after; and the intervals `finetune` and `hftk eval` write."""

from __future__ import annotations

import json
import shutil

import pytest

from hftk.comparison import START_PREDICTIONS
from hftk.report import read_metrics
from tests.conftest import results, run_hftk, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """A tiny scratch model, saved: the pretrained checkpoint the other runs start from."""
    folder = tmp_path_factory.mktemp("scratch")
    recipe = write_recipe(folder, tiny_recipe(folder))
    result = run_hftk("finetune", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, folder / "run"


def pretrained_recipe(tmp_path, model_dir, **train):
    recipe = tiny_recipe(tmp_path, train={"output_dir": str(tmp_path / "tuned"), "max_steps": 4, "save_steps": 2,
                                          **train})
    recipe["model"] = {"name_or_path": str(model_dir)}
    return write_recipe(tmp_path, recipe, "tuned.yaml")


@pytest.mark.slow
def test_a_scratch_model_has_no_step_zero_row(scratch_run):
    _, run = scratch_run
    assert [row["step"] for row in read_metrics(run)] == [2, 4, 4]
    assert not (run / START_PREDICTIONS).exists()
    assert "Before and after" not in (run / "README.md").read_text()


@pytest.mark.slow
def test_a_pretrained_start_is_scored_at_step_zero(scratch_run, tmp_path):
    _, model_dir = scratch_run
    result = run_hftk("finetune", str(pretrained_recipe(tmp_path, model_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "tuned"
    rows = read_metrics(run)
    start = rows[0]
    assert start["step"] == 0 and "eval_rougeL" in start and "loss" not in start
    # The saved scratch model, scored again: the same loss and the same predictions as at its own end.
    assert start["eval_loss"] == pytest.approx(results(model_dir)["eval_loss"], rel=1e-6)
    assert (run / START_PREDICTIONS).read_text() == (model_dir / "predictions.jsonl").read_text()
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4]
    final = results(run)
    assert final["best_step"] == 4  # step 0 has no checkpoint: never the best
    low, high = final["eval_loss_ci95"]
    assert low < final["eval_loss"] < high and start["eval_loss"] > high  # four steps on 64 rows: clearly lower
    card = (run / "README.md").read_text()
    section = card[card.index("## Before and after fine-tuning"):card.index("## Training\n")]
    loss_row = next(line for line in section.splitlines() if line.startswith("| eval_loss |"))
    assert f"| {start['eval_loss']:.4f} | {final['eval_loss']:.4f} |" in loss_row
    rouge_row = next(line for line in section.splitlines() if line.startswith("| eval_rougeL |"))
    assert rouge_row.count("|") == 8 and "[" in rouge_row  # the paired interval and p-value
    assert f"| eval_loss | {final['eval_loss']:.4f} | [{low:.4f}, {high:.4f}] |" in card


@pytest.mark.slow
def test_a_resumed_run_does_not_score_the_start_again(scratch_run, tmp_path):
    _, model_dir = scratch_run
    first = tmp_path / "first"
    first.mkdir()
    result = run_hftk("finetune", str(pretrained_recipe(first, model_dir)))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    (resumed / "tuned").mkdir(parents=True)
    shutil.copytree(first / "tuned" / "checkpoint-2", resumed / "tuned" / "checkpoint-2")
    shutil.copy(first / "tuned" / "metrics.jsonl", resumed / "tuned" / "metrics.jsonl")
    again = run_hftk("finetune", str(pretrained_recipe(resumed, model_dir, resume_from_checkpoint="latest")))
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [row["step"] for row in read_metrics(resumed / "tuned") if "eval_loss" in row]
    assert steps == [0, 4]  # the step-0 row of the interrupted run, once


@pytest.mark.slow
def test_a_scratch_model_is_scored_at_start_when_asked(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"eval_on_start": True, "max_steps": 2})
    result = run_hftk("finetune", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in read_metrics(tmp_path / "run") if "eval_loss" in row] == [0, 2]
    assert (tmp_path / "run" / START_PREDICTIONS).is_file()


@pytest.mark.slow
def test_eval_prints_intervals(scratch_run, tmp_path):
    recipe, run = scratch_run
    result = run_hftk("eval", str(recipe), "--output-dir", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    low, high = written["eval_loss_ci95"]
    assert f"eval_loss_ci95: [{low:.4f}, {high:.4f}]" in result.stdout.splitlines()
    assert written["eval_loss_ci95"] == results(run)["eval_loss_ci95"]  # seeded: the run's own interval again
    assert {f"{k}_ci95" for k in written if k.startswith("eval_") and k != "eval_samples"
            and not k.endswith("_ci95")} <= set(written)
    off = run_hftk("eval", str(recipe), "eval.bootstrap_samples=0", "--output-dir", str(tmp_path / "off"))
    assert off.returncode == 0 and "_ci95" not in off.stdout
