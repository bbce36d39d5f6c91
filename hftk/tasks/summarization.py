"""Summarization: a document to its summary (XSum schema: document / summary), scored with ROUGE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import metrics
from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY, TaskDefaults, first_problem, has_text, text_problem
from hftk.tasks.text_to_text import (
    TEXT_TO_TEXT_ENCODINGS,
    PromptParts,
    TextToTextCollator,
    decode_generated,
    encode_pairs,
    predict_by_generation,
)

# Decoder-only models see the document followed by this cue and continue with the summary.
PROMPT_CUE = "\nSummary:"


class Summarization(TaskDefaults):
    name = "summarization"
    headline_metric = "rougeL"

    def encodings(self):
        return TEXT_TO_TEXT_ENCODINGS

    @staticmethod
    def _source(data: DataSection) -> str:
        return data.source_column or "document"

    @staticmethod
    def _target(data: DataSection) -> str:
        return data.target_column or "summary"

    def columns(self, data: DataSection) -> list[str]:
        return [self._source(data), self._target(data)]

    def row_problems(self, rows: dict[str, list[Any]], data: DataSection) -> list[str | None]:
        source, target = self._source(data), self._target(data)
        return [first_problem(text_problem(source, d), text_problem(target, s))
                for d, s in zip(rows[source], rows[target])]

    def has_source(self, rows: dict[str, list[Any]], data: DataSection) -> list[bool]:
        return [has_text(d) for d in rows[self._source(data)]]

    def source_label(self, data: DataSection) -> str:
        return f"'{self._source(data)}'"

    def pipeline_task(self, data: DataSection) -> str | None:
        return "summarization"

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        for column in self.columns(data):
            yield from rows[column]

    def prompts(self, rows: dict[str, list[Any]], data: DataSection, family: str) -> list[PromptParts]:
        # The prefix stays glued to the document so their token boundary is the joined text's.
        prefix = data.source_prefix or ""
        tail = PROMPT_CUE if family == DECODER_ONLY else ""
        return [PromptParts("", prefix + (d or ""), tail) for d in rows[self._source(data)]]

    def sources(self, rows: dict[str, list[Any]], data: DataSection, family: str) -> list[str]:
        """The text each model reads, before any truncation."""
        return [p.text for p in self.prompts(rows, data, family)]

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        targets = [t or "" for t in rows[self._target(data)]]
        if family == DECODER_ONLY:
            targets = [" " + t for t in targets]
        return encode_pairs(
            self.prompts(rows, data, family), targets, tokenizer, family,
            data.max_source_length, data.max_target_length, training, source_name="document",
        )

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    predict = staticmethod(predict_by_generation)
    decode = staticmethod(decode_generated)

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[str]:
        return list(rows[self._target(data)])

    def compute_metrics(self, predictions: list[str], references: list[str], source: str) -> dict[str, float]:
        return metrics.rouge(predictions, references, source)

    def example_scores(self, predictions: list[str], references: list[str]) -> list[dict[str, float]]:
        return metrics.rouge_per_example(predictions, references)
