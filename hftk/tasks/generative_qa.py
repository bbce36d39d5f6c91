"""Generative QA: question + context to the answer text (SQuAD schema), scored with SQuAD EM/F1.

The question is never cut: the context is truncated to whatever room the question leaves.
An unanswerable question (SQuAD v2) has an empty target, and is right when nothing is generated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import metrics
from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY
from hftk.tasks.squad_schema import SquadRows, answer_texts, qa_columns
from hftk.tasks.text_to_text import (
    TEXT_TO_TEXT_ENCODINGS,
    PromptParts,
    TextToTextCollator,
    decode_generated,
    encode_pairs,
    predict_by_generation,
)


class GenerativeQA(SquadRows):
    name = "generative_qa"
    headline_metric = "f1"

    def encodings(self):
        return TEXT_TO_TEXT_ENCODINGS

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        cols = qa_columns(data)
        yield from rows[cols.question]
        yield from rows[cols.context]

    def prompts(self, rows: dict[str, list[Any]], data: DataSection, family: str) -> list[PromptParts]:
        cols = qa_columns(data)
        prompts = []
        for question, context in zip(rows[cols.question], rows[cols.context]):
            # The space before the context starts the context's first token, as in the joined text.
            # A decoder reads the question last, right before it answers (measured: better than first).
            head, tail = ("context:", f"\nquestion: {question}\nanswer:") if family == DECODER_ONLY else \
                (f"question: {question} context:", "")
            prompts.append(PromptParts(head, " " + context, tail))
        return prompts

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        targets = [texts[0] if texts else "" for texts in answer_texts(rows, data)]
        if family == DECODER_ONLY:
            targets = [" " + t if t else t for t in targets]
        return encode_pairs(self.prompts(rows, data, family), targets, tokenizer, family,
                            data.max_source_length, data.max_target_length, training, source_name="context")

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    predict = staticmethod(predict_by_generation)
    decode = staticmethod(decode_generated)

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[list[str]]:
        return answer_texts(rows, data)

    def compute_metrics(self, predictions: list[str], references: list[list[str]], source: str) -> dict[str, float]:
        return metrics.squad(predictions, references)

    def example_scores(self, predictions: list[str], references: list[list[str]]) -> list[dict[str, float]]:
        return metrics.squad_per_example(predictions, references)
