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
                   settings: EvalSection, rows: dict[str, list[Any]], data: Any
                   ) -> tuple[float, dict[int, str], dict[int, list[float]]]:
    """Returns the mean loss over the split (per target token, or per window for spans), the task's
    prediction for every raw example index, and each index's [summed loss, target count] (the
    intervals resample them)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # [summed loss, target count] over the split
    collected: dict[str, list[torch.Tensor]] = defaultdict(list)
    with evaluation_progress(accelerator.is_main_process, len(loader)) as advance:
        for batch in loader:
            _evaluate_batch(accelerator, model, batch, tokenizer, task, family, settings, collected, totals)
            advance()
    model.train()
    example_losses = _by_example(collected.pop("example_loss", []), collected.pop("example_count", []),
                                 collected.get(EXAMPLE_INDEX, []))
    predictions = task.decode(collected, rows, tokenizer, data) if len(collected) > 1 else {}
    return (totals[0] / totals[1].clamp(min=1)).item(), predictions, example_losses


def _by_example(losses: list[torch.Tensor], counts: list[torch.Tensor], indices: list[torch.Tensor]
                ) -> dict[int, list[float]]:
    """Summed loss and target count per raw example (an example's windows or blocks added up)."""
    found: dict[int, list[float]] = {}
    for batch_losses, batch_counts, batch_indices in zip(losses, counts, indices, strict=True):
        for loss, count, index in zip(batch_losses.tolist(), batch_counts.tolist(), batch_indices.tolist()):
            entry = found.setdefault(index, [0.0, 0.0])
            entry[0] += loss
            entry[1] += count
    return found


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
    losses, counts = gathered.pop("loss").double().cpu(), gathered.pop("count").double().cpu()
    totals[0] += losses.sum()
    totals[1] += counts.sum()
    collected["example_loss"].append(losses)
    collected["example_count"].append(counts)
    for key, value in gathered.items():
        collected[key].append(value.cpu())
