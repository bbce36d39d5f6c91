"""Generative QA: question + context to the answer text (SQuAD schema), scored with SQuAD EM/F1.

The question is never cut: the context is truncated to whatever room the question leaves.
An unanswerable question (SQuAD v2) has an empty target, and is right when nothing is generated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import metrics
from hftk.errors import UserError
from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY
from hftk.tasks.squad_schema import answer_texts, check_answers, qa_columns
from hftk.tasks.text_to_text import (
    TEXT_TO_TEXT_ENCODINGS,
    TextToTextCollator,
    decode_generated,
    encode_pairs,
    predict_by_generation,
)


class GenerativeQA:
    name = "generative_qa"

    def encodings(self):
        return TEXT_TO_TEXT_ENCODINGS

    def columns(self, data: DataSection) -> list[str]:
        cols = qa_columns(data)
        return [cols.question, cols.context, cols.answers]

    def check_rows(self, rows: dict[str, list[Any]], data: DataSection, where: str) -> None:
        check_answers(rows, data, where)

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        cols = qa_columns(data)
        yield from rows[cols.question]
        yield from rows[cols.context]

    def sources(self, rows: dict[str, list[Any]], tokenizer: Any, data: DataSection, family: str) -> list[str]:
        cols = qa_columns(data)
        sources = []
        for question, context in zip(rows[cols.question], rows[cols.context]):
            # A decoder reads the question last, right before it answers (measured: better than first).
            head, tail = (f"question: {question} context: ", "") if family != DECODER_ONLY else \
                ("context: ", f"\nquestion: {question}\nanswer:")
            room = data.max_source_length - len(tokenizer(head + tail, add_special_tokens=True)["input_ids"])
            if room <= 0:
                raise UserError(f"data.max_source_length={data.max_source_length} leaves no room for the context "
                                f"after a question of {data.max_source_length - room} tokens; raise it")
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"][:room]
            sources.append(head + tokenizer.decode(context_ids, skip_special_tokens=True) + tail)
        return sources

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        targets = [texts[0] if texts else "" for texts in answer_texts(rows, data)]
        if family == DECODER_ONLY:
            targets = [" " + t if t else t for t in targets]
        return encode_pairs(self.sources(rows, tokenizer, data, family), targets, tokenizer, family,
                            data.max_source_length, data.max_target_length, training)

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    predict = staticmethod(predict_by_generation)
    decode = staticmethod(decode_generated)

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[list[str]]:
        return answer_texts(rows, data)

    def compute_metrics(self, predictions: list[str], references: list[list[str]], source: str) -> dict[str, float]:
        return metrics.squad(predictions, references)
