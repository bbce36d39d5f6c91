"""Evaluation that gives the same numbers on any number of processes.

generate -> pad across processes -> gather_for_metrics (drops the duplicates that pad the last
batch) -> decode -> the task's metric. Each example's loss and prediction is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hftk.recipe import EvalSection
from hftk.tasks.base import DECODER_ONLY, EXAMPLE_INDEX
from hftk.train.objective import token_counts, token_loss_sums, without_index


@dataclass
class EvalOutput:
    metrics: dict[str, float]  # eval_* names
    predictions: dict[int, str]  # example index -> generated text


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
def run_evaluation(accelerator: Any, model: Any, loader: Any, tokenizer: Any, family: str, generates: bool,
                   settings: EvalSection) -> tuple[float, dict[int, str]]:
    """Returns the token-weighted mean loss over the split and the decoded predictions by example index."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    predictions: dict[int, str] = {}
    for batch in loader:
        indices = batch[EXAMPLE_INDEX]
        features = without_index(batch)
        sums, counts = token_loss_sums(model, features, family), token_counts(features, family)
        gathered = [indices, sums, counts]
        if generates:
            gathered.append(generate(accelerator, model, features, family, settings, tokenizer))
        gathered = accelerator.gather_for_metrics(tuple(gathered))
        loss_sum += gathered[1].double().sum().cpu()
        count += gathered[2].double().sum().cpu()
        if generates:
            texts = tokenizer.batch_decode(gathered[3], skip_special_tokens=True)
            predictions.update(zip(gathered[0].tolist(), (t.strip() for t in texts)))
    model.train()
    return (loss_sum / count.clamp(min=1)).item(), predictions
