"""Per-example loss sums and counts, so a loss can be normalised by the whole optimizer step.

A mean taken per micro-batch weights tokens differently depending on how a global batch is split
over processes and accumulation steps; summing here and dividing by the step's global count makes
2 processes x B, 1 process x 2B and 1 process x B x 2 accumulation steps give the same loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hftk.tasks.base import (
    DECODER_ONLY,
    ENCODER_MASK,
    ENCODER_ONLY,
    EXAMPLE_INDEX,
    IGNORE_INDEX,
    PACKED_SEQ2SEQ_INPUTS,
    TOKEN_MASK,
)

MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "token_type_ids", "position_ids",
                *PACKED_SEQ2SEQ_INPUTS)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "position_ids" in inputs or ENCODER_MASK in batch:
        # A packed batch: transformers looks for example boundaries in position_ids only without a
        # cache, and a decoder builds one by default (use_cache), even in training.
        inputs["use_cache"] = False
    return inputs


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 on the positions that hold an example's token, 0 on padding: the attention mask, or a packed
    batch's TOKEN_MASK (it has no attention mask)."""
    return batch["attention_mask"] if "attention_mask" in batch else batch[TOKEN_MASK]


def _target_labels(batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    labels = batch["labels"]
    # A decoder predicts token t+1 from tokens up to t.
    return labels[:, 1:] if family == DECODER_ONLY else labels


def token_counts(batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    """Target tokens per example (one per window for span extraction): the denominator of the loss."""
    if family == ENCODER_ONLY:
        return torch.ones_like(batch["start_positions"])
    return (_target_labels(batch, family) != IGNORE_INDEX).sum(dim=1)


def token_loss_sums(model: Any, batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    """Summed cross-entropy per row, shape [rows]: per example, unless the batch is packed."""
    if family == ENCODER_ONLY:
        return span_losses(model, batch)
    return logits_loss_sums(model(**model_inputs(batch)).logits, batch, family)


def logits_loss_sums(logits: torch.Tensor, batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    """Summed cross-entropy per example of a text model's logits against the batch's labels."""
    if family == DECODER_ONLY:
        logits = logits[:, :-1]
    labels = _target_labels(batch, family)
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view(labels.shape).sum(dim=1)


def span_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the start and end cross-entropies, per window."""
    return span_loss_of(model(**model_inputs(batch)), batch)


def span_loss_of(outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    start = F.cross_entropy(outputs.start_logits.float(), batch["start_positions"], reduction="none")
    end = F.cross_entropy(outputs.end_logits.float(), batch["end_positions"], reduction="none")
    return (start + end) / 2


def without_index(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != EXAMPLE_INDEX}


def padding_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[padded positions, all positions] of a collated batch: the encoder (or decoder-only) inputs, and
    for an encoder-decoder model the labels too. `hftk plan` counts with this same function."""
    mask = token_mask(batch)
    padded, total = (mask == 0).sum(), torch.tensor(mask.numel(), device=mask.device)
    if "decoder_input_ids" in batch:  # decoder labels are -100 only where padded
        padded = padded + (batch["labels"] == IGNORE_INDEX).sum()
        total = total + batch["labels"].numel()
    return torch.stack([padded, total])
