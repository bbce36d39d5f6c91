"""Text generation: a causal LM on a text column, documents joined with eos and cut into blocks of
data.max_source_length tokens; evaluation reports perplexity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY, EXAMPLE_INDEX, Encoding, TaskDefaults, has_text, text_problem
from hftk.tasks.text_to_text import TextToTextCollator


class TextGeneration(TaskDefaults):
    name = "text_generation"
    uses_target_length = False  # blocks of max_source_length tokens; no separate target
    headline_metric = "perplexity"  # lower is better

    def encodings(self):
        return {DECODER_ONLY: Encoding(DECODER_ONLY, "AutoModelForCausalLM")}

    @staticmethod
    def _column(data: DataSection) -> str:
        return data.text_column or "text"

    def columns(self, data: DataSection) -> list[str]:
        return [self._column(data)]

    def row_problems(self, rows: dict[str, list[Any]], data: DataSection) -> list[str | None]:
        column = self._column(data)
        return [text_problem(column, text) for text in rows[column]]

    def has_source(self, rows: dict[str, list[Any]], data: DataSection) -> list[bool]:
        return [has_text(text) for text in rows[self._column(data)]]

    def source_label(self, data: DataSection) -> str:
        return f"'{self._column(data)}'"

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        yield from rows[self._column(data)]

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        stream: list[int] = []
        starts: list[int] = []  # the row each block begins in
        for row, ids in enumerate(tokenizer(rows[self._column(data)], add_special_tokens=False)["input_ids"]):
            starts.extend([row] * (len(ids) + 1))
            stream.extend(ids + [tokenizer.eos_token_id])
        size = data.max_source_length
        # Whole blocks only (as run_clm does): the tail of each map batch is dropped.
        blocks = [stream[i:i + size] for i in range(0, len(stream) - size + 1, size)]
        features = {"input_ids": blocks, "labels": [list(b) for b in blocks]}
        if not training:
            features[EXAMPLE_INDEX] = [starts[i] for i in range(0, len(blocks) * size, size)]
        return features

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    def predict(self, accelerator, model, batch, tokenizer, settings, family):
        return {}  # perplexity only; `hftk eval --prompt` samples continuations

    def decode(self, collected, rows, tokenizer, data) -> dict[int, str]:
        return {}

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[str]:
        return list(rows[self._column(data)])

    def compute_metrics(self, predictions: list[str], references: list[str], source: str) -> dict[str, float]:
        return {}
