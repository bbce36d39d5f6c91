"""load_best_model_at_end, metric_for_best_model, greater_is_better and early stopping on tiny runs."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from hftk.checkpoint import check_compatible
from hftk.errors import UserError
from hftk.recipe import validate_recipe
from tests.conftest import run_hftk, tiny_recipe, write_recipe


def _eval_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]


@pytest.mark.slow
def test_final_model_is_the_best_checkpoint(tmp_path):
    # The highest validation loss is "best" here: the first evaluation, so the best is not the last step.
    recipe = tiny_recipe(tmp_path, train={"max_steps": 6, "eval_steps": 2, "save_steps": 2, "save_total_limit": 1,
                                          "load_best_model_at_end": True, "greater_is_better": True,
                                          "metric_for_best_model": "loss"})
    result = run_hftk("finetune", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    losses = {row["step"]: row["eval_loss"] for row in _eval_rows(run)}
    assert sorted(losses) == [2, 4, 6]
    best_step = max(losses, key=losses.get)
    assert best_step == 2
    results = json.loads((run / "all_results.json").read_text())
    assert results["best_step"] == best_step and results["best_metric"] == losses[best_step]
    assert results["eval_loss"] == pytest.approx(losses[best_step], rel=1e-6)  # the saved model is evaluated
    # save_total_limit=1 keeps the newest checkpoint and the best one
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    final, best, last = (load_file(p / "model.safetensors") for p in (run, run / "checkpoint-2", run / "checkpoint-6"))
    shared = sorted(set(final) & set(best))
    assert shared and all((final[k] == best[k]).all() for k in shared)
    assert any(not (final[k] == last[k]).all() for k in shared)


@pytest.mark.slow
def test_early_stopping_counts_evaluations_without_improvement(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 12, "eval_steps": 2, "early_stopping_patience": 1,
                                          "greater_is_better": True})
    result = run_hftk("finetune", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["train_steps"] == 4  # step 2 was best, step 4 did not improve: patience 1 is spent
    assert results["best_step"] == 2
    assert "early stopping at optimizer step 4" in result.stderr


@pytest.mark.parametrize("train, message", [
    ({"eval_steps": 2, "save_steps": 3, "load_best_model_at_end": True},
     "train.load_best_model_at_end needs train.save_steps (3) to be a multiple of train.eval_steps (2)"),
    ({"save_steps": 2, "load_best_model_at_end": True}, "needs train.eval_steps and train.save_steps"),
    ({"early_stopping_patience": 2}, "train.early_stopping_patience needs train.eval_steps"),
])
def test_best_settings_are_checked_before_anything_runs(tmp_path, train, message):
    result = run_hftk("validate", str(write_recipe(tmp_path, tiny_recipe(tmp_path, train=train))))
    assert result.returncode == 2
    assert message in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("metric, greater", [("eval_loss", False), ("perplexity", False), ("rougeL", True),
                                             ("eval_bleu", True)])
def test_greater_is_better_follows_the_metric(tmp_path, metric, greater):
    settings = validate_recipe(tiny_recipe(tmp_path, train={"metric_for_best_model": metric})).train
    assert settings.metric_for_best_model.startswith("eval_")
    assert settings.best_is_greater() is greater


def test_settings_that_do_not_move_weights_never_refuse_a_resume(tmp_path):
    saved = validate_recipe(tiny_recipe(tmp_path))
    (tmp_path / "recipe.yaml").write_text(saved.dump_yaml())
    changed = validate_recipe(tiny_recipe(tmp_path, train={
        "report_to": ["tensorboard"], "load_best_model_at_end": True, "eval_steps": 2, "save_steps": 2,
        "metric_for_best_model": "rougeL", "greater_is_better": True, "early_stopping_patience": 3,
        "logging_steps": 1}))
    check_compatible(tmp_path, changed)
    with pytest.raises(UserError, match="train.learning_rate"):
        check_compatible(tmp_path, validate_recipe(tiny_recipe(tmp_path, train={"learning_rate": 0.5})))
