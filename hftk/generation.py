"""generate() under every strategy, and the evaluation pass that reuses one encoder run for both the
loss and the generated text."""

from __future__ import annotations

from typing import Any

import torch

from hftk.objective import logits_loss_sums
from hftk.parallel.strategies import shards_parameters
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER


def prompt_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "prompt_input_ids" in batch:  # decoder-only: the left-padded prompt without its target
        return {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def generate(accelerator: Any, model: Any, batch: dict[str, torch.Tensor], family: str, settings: Any,
             tokenizer: Any, encoder_outputs: Any = None) -> torch.Tensor:
    """Token ids of the generated text (the continuation only), padded to the same width on every process.
    `encoder_outputs` (encoder-decoder) skips generate()'s own encoder run."""
    inputs = prompt_inputs(batch)
    model = accelerator.unwrap_model(model)
    if hasattr(model, "unshard"):
        # fully_shard gathers parameters in the root's forward; generate() first calls the encoder
        # alone, so gather the root group (embeddings, heads) up front.
        model.unshard()
    extra = {} if encoder_outputs is None else {"encoder_outputs": encoder_outputs}
    output = model.generate(
        **inputs, **extra, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, synced_gpus=shards_parameters(accelerator, model),
    )
    if family == DECODER_ONLY:
        output = output[:, inputs["input_ids"].shape[1]:]  # keep only the continuation
    return accelerator.pad_across_processes(output.contiguous(), dim=1, pad_index=tokenizer.pad_token_id)


def shares_encoder_run(accelerator: Any, model: Any, family: str) -> bool:
    """Whether the encoder can run once for both the loss and generate(). Sharded strategies keep the
    plain path: their parameter gathering hangs off the wrapped model's own forward."""
    return family == ENCODER_DECODER and not shards_parameters(accelerator, model) and \
        hasattr(accelerator.unwrap_model(model), "get_encoder")


def losses_and_generate(accelerator: Any, model: Any, batch: dict[str, torch.Tensor], settings: Any,
                        tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder-decoder evaluation with one encoder run: (summed loss per example, generated ids)."""
    unwrapped = accelerator.unwrap_model(model)
    encoder_outputs = unwrapped.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = unwrapped(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
    tokens = generate(accelerator, model, batch, ENCODER_DECODER, settings, tokenizer, encoder_outputs)
    return logits_loss_sums(logits, batch, ENCODER_DECODER), tokens
