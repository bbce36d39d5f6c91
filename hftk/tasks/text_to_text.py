"""Shared encoding for tasks that map a source text to a target text.

Two model families are served by the same functions:
- encoder-decoder: source -> input_ids, target -> labels;
- decoder-only: prompt + target in one sequence, loss on the target only; evaluation feeds the
  prompt alone, left-padded, so batched generation continues every row from its last token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, EXAMPLE_INDEX, Encoding

IGNORE_INDEX = -100

TEXT_TO_TEXT_ENCODINGS = {
    ENCODER_DECODER: Encoding(ENCODER_DECODER, "AutoModelForSeq2SeqLM"),
    DECODER_ONLY: Encoding(DECODER_ONLY, "AutoModelForCausalLM"),
}


def encode_pairs(
    sources: list[str], targets: list[str], tokenizer: Any, family: str,
    max_source_length: int, max_target_length: int, training: bool,
) -> dict[str, list[list[int]]]:
    if family == ENCODER_DECODER:
        features = tokenizer(sources, max_length=max_source_length, truncation=True)
        labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)["input_ids"]
        return {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"], "labels": labels}
    return encode_prompt_completion(sources, targets, tokenizer, max_source_length, max_target_length, training)


def encode_prompt_completion(
    prompts: list[str], completions: list[str], tokenizer: Any,
    max_prompt_length: int, max_completion_length: int, training: bool,
) -> dict[str, list[list[int]]]:
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    prefix = [bos] if bos is not None and bos != eos else []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    features: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    if not training:
        features["prompt_input_ids"] = []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        # Keep the end of the prompt: it holds the instruction that asks for the completion.
        prompt = prefix + prompt[len(prompt) - max(max_prompt_length - len(prefix), 0):]
        completion = completion[: max_completion_length - 1] + [eos]
        features["input_ids"].append(prompt + completion)
        features["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
        if not training:
            features["prompt_input_ids"].append(prompt)
    return features


def pad(sequences: list[list[int]], value: int, left: bool = False, multiple: int = 1) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    width = -(-width // multiple) * multiple
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


class TextToTextCollator:
    """Dynamic padding to the longest row of the batch (never to the maximum length)."""

    def __init__(self, pad_token_id: int, decoder_inputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.decoder_inputs = decoder_inputs
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        batch = {
            "input_ids": pad(ids, self.pad_token_id, multiple=self.multiple),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, multiple=self.multiple),
        }
        if "labels" in rows[0]:
            batch["labels"] = pad([r["labels"] for r in rows], IGNORE_INDEX, multiple=self.multiple)
            if self.decoder_inputs is not None:
                batch["decoder_input_ids"] = self.decoder_inputs(batch["labels"])
        if "prompt_input_ids" in rows[0]:
            prompts = [r["prompt_input_ids"] for r in rows]
            batch["prompt_input_ids"] = pad(prompts, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = pad([[1] * len(p) for p in prompts], 0, left=True)
        if EXAMPLE_INDEX in rows[0]:
            batch[EXAMPLE_INDEX] = torch.tensor([r[EXAMPLE_INDEX] for r in rows], dtype=torch.long)
        return batch


def predict_by_generation(accelerator: Any, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any,
                          settings: Any, family: str) -> dict[str, torch.Tensor]:
    """Greedy or beam generation, padded so every process's tensor has the same width for gather."""
    from hftk.train.evaluation import generate

    return {"tokens": generate(accelerator, model, batch, family, settings, tokenizer)}


def decode_generated(collected: dict[str, list[torch.Tensor]], rows: dict[str, list[Any]], tokenizer: Any,
                     data: Any) -> dict[int, str]:
    predictions: dict[int, str] = {}
    for indices, tokens in zip(collected[EXAMPLE_INDEX], collected["tokens"]):
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        predictions.update(zip(indices.tolist(), (t.strip() for t in texts)))
    return predictions
