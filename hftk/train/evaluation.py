"""Evaluation that gives the same numbers on any number of processes.

predict (generate, or span logits) -> pad across processes -> gather_for_metrics (drops the duplicates that pad the last
batch) -> decode -> the task's metric. Each example's loss and prediction is counted once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from hftk.objective import token_counts, token_loss_sums, without_index
from hftk.recipe import EvalSection
from hftk.tasks.base import EXAMPLE_INDEX
from hftk.train.progress import evaluation_progress


@torch.no_grad()
def run_evaluation(accelerator: Any, model: Any, loader: Any, tokenizer: Any, task: Any, family: str,
                   settings: EvalSection, rows: dict[str, list[Any]], data: Any) -> tuple[float, dict[int, str]]:
    """Returns the mean loss over the split (per target token, or per window for spans) and the
    task's prediction for every raw example index."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # [summed loss, target count] over the split
    collected: dict[str, list[torch.Tensor]] = defaultdict(list)
    with evaluation_progress(accelerator.is_main_process, len(loader)) as advance:
        for batch in loader:
            _evaluate_batch(accelerator, model, batch, tokenizer, task, family, settings, collected, totals)
            advance()
    model.train()
    predictions = task.decode(collected, rows, tokenizer, data) if len(collected) > 1 else {}
    return (totals[0] / totals[1].clamp(min=1)).item(), predictions


def _evaluate_batch(accelerator: Any, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any, task: Any,
                    family: str, settings: EvalSection, collected: dict[str, list[torch.Tensor]],
                    totals: torch.Tensor) -> None:
    features = without_index(batch)
    # generate() calls the unwrapped model's parts directly, outside the autocast Accelerate puts
    # around the prepared model's forward: evaluate in the precision training ran in.
    with accelerator.autocast():
        outputs = task.predict(accelerator, model, features, tokenizer, settings, family)
        losses = outputs.pop("loss", None)  # a task that ran the model for its prediction may give the loss too
        if losses is None:
            losses = token_loss_sums(model, features, family)
    gathered = accelerator.gather_for_metrics({
        EXAMPLE_INDEX: batch[EXAMPLE_INDEX], "loss": losses, "count": token_counts(features, family), **outputs,
    })
    totals[0] += gathered.pop("loss").double().sum().cpu()
    totals[1] += gathered.pop("count").double().sum().cpu()
    for key, value in gathered.items():
        collected[key].append(value.cpu())
