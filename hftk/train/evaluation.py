"""Evaluation that gives the same numbers on any number of processes.

generate -> pad across processes -> gather_for_metrics (drops the duplicates that pad the last
batch) -> decode -> the task's metric. Each example's loss and prediction is counted once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from hftk.recipe import EvalSection
from hftk.tasks.base import DECODER_ONLY, EXAMPLE_INDEX
from hftk.train.objective import token_counts, token_loss_sums, without_index


def needs_synced_generation(accelerator: Any, model: Any) -> bool:
    """With sharded parameters (ZeRO-3, FSDP) every process must run as many forward passes as the
    slowest one while generating, or the parameter all-gathers deadlock."""
    if accelerator.num_processes == 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return bool(plugin and plugin.zero_stage == 3) or isinstance(model, FSDPModule) or accelerator.is_fsdp2


def generate(accelerator: Any, model: Any, batch: dict[str, torch.Tensor], family: str, settings: EvalSection,
             tokenizer: Any) -> torch.Tensor:
    if "prompt_input_ids" in batch:
        inputs = {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = accelerator.unwrap_model(model)
    if hasattr(model, "unshard"):
        # fully_shard gathers parameters in the root's forward; generate() first calls the encoder
        # alone, so gather the root group (embeddings, heads) up front.
        model.unshard()
    output = model.generate(
        **inputs, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, synced_gpus=needs_synced_generation(accelerator, model),
    )
    if family == DECODER_ONLY:
        output = output[:, inputs["input_ids"].shape[1]:]  # keep only the continuation
    return accelerator.pad_across_processes(output.contiguous(), dim=1, pad_index=tokenizer.pad_token_id)


@torch.no_grad()
def run_evaluation(accelerator: Any, model: Any, loader: Any, tokenizer: Any, task: Any, family: str,
                   settings: EvalSection, rows: dict[str, list[Any]], data: Any) -> tuple[float, dict[int, str]]:
    """Returns the mean loss over the split (per target token, or per window for spans) and the
    task's prediction for every raw example index."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    collected: dict[str, list[torch.Tensor]] = defaultdict(list)
    for batch in loader:
        features = without_index(batch)
        outputs = task.predict(accelerator, model, features, tokenizer, settings, family)
        gathered = accelerator.gather_for_metrics({
            EXAMPLE_INDEX: batch[EXAMPLE_INDEX], "loss": token_loss_sums(model, features, family),
            "count": token_counts(features, family), **outputs,
        })
        loss_sum += gathered.pop("loss").double().sum().cpu()
        count += gathered.pop("count").double().sum().cpu()
        for key, value in gathered.items():
            collected[key].append(value.cpu())
    model.train()
    predictions = task.decode(collected, rows, tokenizer, data) if len(collected) > 1 else {}
    return (loss_sum / count.clamp(min=1)).item(), predictions
