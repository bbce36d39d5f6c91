"""Summarization: a document to its summary (XSum schema: document / summary), scored with ROUGE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import metrics
from hftk.errors import UserError
from hftk.recipe import DataSection
from hftk.tasks.text_to_text import (
    TEXT_TO_TEXT_ENCODINGS,
    TextToTextCollator,
    decode_generated,
    encode_pairs,
    predict_by_generation,
)

# Decoder-only models see the document followed by this cue and continue with the summary.
PROMPT_CUE = "\nSummary:"


class Summarization:
    name = "summarization"

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

    def check_rows(self, rows: dict[str, list[Any]], data: DataSection, where: str) -> None:
        for column in self.columns(data):
            bad = next((v for v in rows[column] if not isinstance(v, str)), None)
            if bad is not None:
                raise UserError(f"{where}: column '{column}' must hold text, found {type(bad).__name__}")

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        for column in self.columns(data):
            yield from rows[column]

    def sources(self, rows: dict[str, list[Any]], data: DataSection, family: str) -> list[str]:
        prefix = data.source_prefix or ""
        documents = [prefix + (d or "") for d in rows[self._source(data)]]
        if family == "decoder-only":
            return [d + PROMPT_CUE for d in documents]
        return documents

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        targets = [t or "" for t in rows[self._target(data)]]
        if family == "decoder-only":
            targets = [" " + t for t in targets]
        return encode_pairs(
            self.sources(rows, data, family), targets, tokenizer, family,
            data.max_source_length, data.max_target_length, training,
        )

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    predict = staticmethod(predict_by_generation)
    decode = staticmethod(decode_generated)

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[str]:
        return list(rows[self._target(data)])

    def compute_metrics(self, predictions: list[str], references: list[str], source: str) -> dict[str, float]:
        return metrics.rouge(predictions, references, source)
