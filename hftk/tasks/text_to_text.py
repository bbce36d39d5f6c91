"""Shared encoding for tasks that map a source text to a target text.

Two model families are served by the same functions:
- encoder-decoder: source -> input_ids, target -> labels;
- decoder-only: prompt + target in one sequence, loss on the target only; evaluation feeds the
  prompt alone, left-padded, so batched generation continues every row from its last token.

Tasks hand the source as PromptParts: a source too long for data.max_source_length is cut from its
end and the template around it (an instruction, a question, the cue to answer) stays whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from hftk.errors import UserError
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, EXAMPLE_INDEX, IGNORE_INDEX, Encoding

TEXT_TO_TEXT_ENCODINGS = {
    ENCODER_DECODER: Encoding(ENCODER_DECODER, "AutoModelForSeq2SeqLM"),
    DECODER_ONLY: Encoding(DECODER_ONLY, "AutoModelForCausalLM"),
}


class PromptParts(NamedTuple):
    """A source text and the template around it. Only the source is ever cut, from its end.

    For a byte-level BPE (GPT-2 style) a space before a word belongs to that word's token: a space
    where the source meets the template goes at the start of the source or of the tail, never at the
    end of the head, so the parts tokenize as the joined text does."""

    head: str
    source: str
    tail: str = ""

    @property
    def text(self) -> str:
        return self.head + self.source + self.tail

    @property
    def template(self) -> str:
        return self.head + self.tail


def as_parts(source: str | PromptParts) -> PromptParts:
    return source if isinstance(source, PromptParts) else PromptParts("", source)


def encode_pairs(
    sources: Sequence[str | PromptParts], targets: list[str], tokenizer: Any, family: str,
    max_source_length: int, max_target_length: int, training: bool, source_name: str = "source text",
) -> dict[str, list[list[int]]]:
    """`source_name` ("document", "context") names the source when the template leaves it no room."""
    prompts = [as_parts(s) for s in sources]
    if family == ENCODER_DECODER:
        check_encoder_room(prompts, tokenizer, max_source_length, source_name)
        # The tokenizer cuts the joined text from its end: an encoder-decoder template belongs in the head.
        features = tokenizer([p.text for p in prompts], max_length=max_source_length, truncation=True)
        labels = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)["input_ids"]
        return {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"], "labels": labels}
    return encode_prompt_completion(prompts, targets, tokenizer, max_source_length, max_target_length, training,
                                    source_name)


def encode_prompt_completion(
    prompts: Sequence[str | PromptParts], completions: list[str], tokenizer: Any,
    max_prompt_length: int, max_completion_length: int, training: bool, source_name: str = "source text",
) -> dict[str, list[list[int]]]:
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    prefix = [bos] if bos is not None and bos != eos else []
    prompt_ids = prompt_token_ids([as_parts(p) for p in prompts], tokenizer, max_prompt_length, prefix, source_name)
    completion_ids = token_ids(completions, tokenizer)
    features: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    if not training:
        features["prompt_input_ids"] = []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        completion = completion[: max_completion_length - 1] + [eos]
        features["input_ids"].append(prompt + completion)
        features["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
        if not training:
            features["prompt_input_ids"].append(prompt)
    return features


def prompt_token_ids(prompts: list[PromptParts], tokenizer: Any, max_length: int, prefix: list[int],
                     source_name: str) -> list[list[int]]:
    """`prefix` + each prompt's ids, at most `max_length` in all.

    A prompt that fits is tokenized as one text, so its ids are the joined text's for any tokenizer.
    A longer one keeps its head and tail whole and cuts its source to the room they leave."""
    limit = max_length - len(prefix)
    ids = token_ids([p.text for p in prompts], tokenizer)
    too_long = [i for i, row in enumerate(ids) if len(row) > limit]
    cut = [prompts[i] for i in too_long]
    pieces = template_token_ids(cut, tokenizer)
    for i, prompt, source in zip(too_long, cut, token_ids([p.source for p in cut], tokenizer), strict=True):
        head, tail = pieces[prompt.head], pieces[prompt.tail]
        room = limit - len(head) - len(tail)
        if room <= 0:
            raise no_room_error(max_length, max_length - room, source_name)
        ids[i] = head + source[:room] + tail
    return [prefix + row for row in ids]


def template_token_ids(prompts: list[PromptParts], tokenizer: Any) -> dict[str, list[int]]:
    """Ids of every distinct head and tail (most tasks share one template across rows)."""
    texts = sorted({p.head for p in prompts} | {p.tail for p in prompts})
    return dict(zip(texts, token_ids(texts, tokenizer), strict=True))


def token_ids(texts: list[str], tokenizer: Any) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def check_encoder_room(prompts: list[PromptParts], tokenizer: Any, max_length: int, source_name: str) -> None:
    templates = sorted({p.template for p in prompts if p.template})
    lengths = [len(ids) for ids in tokenizer(templates)["input_ids"]] if templates else []
    longest = max(lengths, default=0)
    if longest >= max_length:
        raise no_room_error(max_length, longest, source_name)


def no_room_error(max_length: int, template_length: int, source_name: str) -> UserError:
    return UserError(f"data.max_source_length={max_length} leaves no room for the {source_name} after a prompt "
                     f"template of {template_length} tokens; raise it")


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
    """Greedy or beam generation, padded so every process's tensor has the same width for gather; with
    an encoder-decoder, also the loss per example from the same encoder run ("loss")."""
    from hftk import generation

    if "decoder_input_ids" in batch and generation.shares_encoder_run(accelerator, model, family):
        losses, tokens = generation.losses_and_generate(accelerator, model, batch, settings, tokenizer)
        return {"tokens": tokens, "loss": losses}
    return {"tokens": generation.generate(accelerator, model, batch, family, settings, tokenizer)}


def decode_generated(collected: dict[str, list[torch.Tensor]], rows: dict[str, list[Any]], tokenizer: Any,
                     data: Any) -> dict[int, str]:
    predictions: dict[int, str] = {}
    for indices, tokens in zip(collected[EXAMPLE_INDEX], collected["tokens"]):
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        predictions.update(zip(indices.tolist(), (t.strip() for t in texts)))
    return predictions
