"""Which evaluation was best, and when to stop for lack of improvement: the decisions of Trainer's
load_best_model_at_end and EarlyStoppingCallback, kept in TrainState so a resume makes the same ones."""

from __future__ import annotations

from hftk.errors import RunError
from hftk.recipe import TrainSection
from hftk.train.state import TrainState


def improves(value: float, best: float | None, greater: bool, threshold: float = 0.0) -> bool:
    if best is None:
        return True
    return value > best + threshold if greater else value < best - threshold


def record_evaluation(state: TrainState, settings: TrainSection, scores: dict[str, float], checkpointed: bool) -> None:
    """Note an evaluation at state.optimizer_step. Only one with a checkpoint at its step can become the
    best when load_best_model_at_end is on: that checkpoint's weights are what the run ends with. The
    step-0 evaluation (train.eval_on_start) is never noted: no checkpoint holds its weights."""
    key = settings.metric_for_best_model
    if key not in scores:
        shown = ", ".join(sorted(k for k in scores if k != "eval_samples" and not k.endswith("_ci95")))
        raise RunError(f"train.metric_for_best_model: the evaluation has no {key}; it has {shown}")
    value, greater = float(scores[key]), settings.best_is_greater()
    if improves(value, state.stop_best_metric, greater, settings.early_stopping_threshold):
        state.stop_best_metric, state.evaluations_without_improvement = value, 0
    else:
        state.evaluations_without_improvement += 1
    if (checkpointed or not settings.load_best_model_at_end) and improves(value, state.best_metric, greater):
        state.best_metric, state.best_step = value, state.optimizer_step


def patience_ran_out(state: TrainState, settings: TrainSection) -> bool:
    patience = settings.early_stopping_patience
    return bool(patience) and state.evaluations_without_improvement >= patience


def best_figures(state: TrainState) -> dict[str, float | int]:
    """What all_results.json says about the best evaluation (nothing when there was none)."""
    return {} if state.best_metric is None else {"best_step": state.best_step, "best_metric": state.best_metric}
