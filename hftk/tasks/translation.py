"""Translation: WMT rows {"translation": {"en": ..., "fr": ...}} or plain source/target columns,
scored with sacreBLEU and chrF."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import intervals, metrics
from hftk.errors import UserError
from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY, TaskDefaults, first_problem, has_text, renamed_columns, text_problem
from hftk.tasks.text_to_text import (
    TEXT_TO_TEXT_ENCODINGS,
    PromptParts,
    TextToTextCollator,
    decode_generated,
    encode_pairs,
    predict_by_generation,
)

LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "ro": "Romanian", "es": "Spanish",
                  "it": "Italian", "pt": "Portuguese", "cs": "Czech", "ru": "Russian", "zh": "Chinese",
                  "ja": "Japanese", "fi": "Finnish", "tr": "Turkish", "et": "Estonian", "lv": "Latvian"}


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


class Translation(TaskDefaults):
    name = "translation"
    headline_metric = "bleu"

    def encodings(self):
        return TEXT_TO_TEXT_ENCODINGS

    @staticmethod
    def _nested(data: DataSection) -> bool:
        """WMT schema unless the recipe names plain source/target columns."""
        return not (data.source_column and data.target_column)

    def columns(self, data: DataSection) -> list[str]:
        if self._nested(data):
            if not (data.source_lang and data.target_lang):
                raise UserError("translation needs data.source_lang and data.target_lang (e.g. en and fr) "
                                "for WMT-style rows, or data.source_column and data.target_column")
            return [data.translation_column or "translation"]
        return [data.source_column, data.target_column]

    def to_recipe_columns(self, dataset: Any, own: DataSection, data: DataSection, where: str) -> Any:
        """Plain columns and {language: text} pairs map onto each other, and so do pairs in other languages."""
        if self._nested(own) == self._nested(data) and (
                not self._nested(data) or (own.source_lang, own.target_lang) == (data.source_lang, data.target_lang)):
            return renamed_columns(dataset, self.columns(own), self.columns(data), where)
        return dataset.map(_as_recipe_pairs, batched=True, remove_columns=dataset.column_names,
                           fn_kwargs={"task": self, "own": own, "data": data}, desc="mapping columns")

    def pairs(self, rows: dict[str, list[Any]], data: DataSection) -> tuple[list[str], list[str]]:
        if self._nested(data):
            pairs = rows[data.translation_column or "translation"]
            return [p[data.source_lang] for p in pairs], [p[data.target_lang] for p in pairs]
        return list(rows[data.source_column]), list(rows[data.target_column])

    def row_problems(self, rows: dict[str, list[Any]], data: DataSection) -> list[str | None]:
        if not self._nested(data):
            return [first_problem(text_problem(data.source_column, s), text_problem(data.target_column, t))
                    for s, t in zip(rows[data.source_column], rows[data.target_column])]
        column = data.translation_column or "translation"
        return [self._pair_problem(pair, column, data) for pair in rows[column]]

    @staticmethod
    def _pair_problem(pair: Any, column: str, data: DataSection) -> str | None:
        if pair is None:
            return f"'{column}' is missing or null"
        if not isinstance(pair, dict):
            return f"column '{column}' must hold {{language: text}} objects, found {type(pair).__name__}"
        # A struct column gives every row every language seen in the file: absent ones read as null.
        missing = [lang for lang in (data.source_lang, data.target_lang) if pair.get(lang) is None]
        if missing:
            present = sorted(lang for lang, text in pair.items() if text is not None)
            return (f"'{column}' has no language {', '.join(repr(m) for m in missing)} "
                    f"(it has: {', '.join(present) or 'none'})")
        return first_problem(*(text_problem(f"{column}.{lang}", pair[lang])
                               for lang in (data.source_lang, data.target_lang)))

    def has_source(self, rows: dict[str, list[Any]], data: DataSection) -> list[bool]:
        if not self._nested(data):
            return [has_text(s) for s in rows[data.source_column]]
        column = data.translation_column or "translation"
        return [isinstance(p, dict) and has_text(p.get(data.source_lang)) for p in rows[column]]

    def source_label(self, data: DataSection) -> str:
        return f"'{data.source_column}'" if not self._nested(data) else f"'{data.source_lang}' text"

    def pipeline_task(self, data: DataSection) -> str | None:
        return f"translation_{data.source_lang}_to_{data.target_lang}" if data.source_lang and data.target_lang else None

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        sources, targets = self.pairs(rows, data)
        yield from sources
        yield from targets

    def prompts(self, rows: dict[str, list[Any]], data: DataSection, family: str) -> list[PromptParts]:
        sources = [(data.source_prefix or "") + s for s in self.pairs(rows, data)[0]]
        if family != DECODER_ONLY:
            return [PromptParts("", s) for s in sources]
        # A decoder reads the instruction, the source, then the target language's name as its cue.
        src, tgt = language_name(data.source_lang or "source"), language_name(data.target_lang or "target")
        return [PromptParts(f"Translate {src} to {tgt}:\n", s, f"\n{tgt}:") for s in sources]

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        targets = self.pairs(rows, data)[1]
        if family == DECODER_ONLY:
            targets = [" " + t for t in targets]
        return encode_pairs(self.prompts(rows, data, family), targets, tokenizer, family, data.max_source_length,
                            data.max_target_length, training, source_name="source text")

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    predict = staticmethod(predict_by_generation)
    decode = staticmethod(decode_generated)

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[list[str]]:
        return [[t] for t in self.pairs(rows, data)[1]]  # sacreBLEU: a list of references per prediction

    def compute_metrics(self, predictions: list[str], references: list[list[str]], source: str) -> dict[str, float]:
        return metrics.bleu_chrf(predictions, references, source)

    def corpus_statistics(self, predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
        return intervals.sacrebleu_statistics(predictions, references)


def _as_recipe_pairs(rows: dict[str, list[Any]], task: Translation, own: DataSection,
                     data: DataSection) -> dict[str, list[Any]]:
    sources, targets = task.pairs(rows, own)
    if task._nested(data):
        return {data.translation_column or "translation": [{data.source_lang: s, data.target_lang: t}
                                                            for s, t in zip(sources, targets)]}
    return {data.source_column: sources, data.target_column: targets}
