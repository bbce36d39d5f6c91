"""Translation: WMT rows {"translation": {"en": ..., "fr": ...}} or plain source/target columns,
scored with sacreBLEU and chrF."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import metrics
from hftk.errors import UserError
from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY
from hftk.tasks.text_to_text import (
    TEXT_TO_TEXT_ENCODINGS,
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


class Translation:
    name = "translation"

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

    def pairs(self, rows: dict[str, list[Any]], data: DataSection) -> tuple[list[str], list[str]]:
        if self._nested(data):
            pairs = rows[data.translation_column or "translation"]
            return [p[data.source_lang] for p in pairs], [p[data.target_lang] for p in pairs]
        return list(rows[data.source_column]), list(rows[data.target_column])

    def check_rows(self, rows: dict[str, list[Any]], data: DataSection, where: str) -> None:
        if self._nested(data):
            column = data.translation_column or "translation"
            for row in rows[column]:
                if not isinstance(row, dict):
                    raise UserError(f"{where}: column '{column}' must hold {{language: text}} objects")
                missing = [lang for lang in (data.source_lang, data.target_lang) if lang not in row]
                if missing:
                    raise UserError(f"{where}: a '{column}' row has no language {', '.join(repr(m) for m in missing)} "
                                    f"(it has: {', '.join(sorted(row))})")
        sources, targets = self.pairs(rows, data)
        if any(not isinstance(t, str) for t in sources + targets):
            raise UserError(f"{where}: translation texts must be strings")

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        sources, targets = self.pairs(rows, data)
        yield from sources
        yield from targets

    def prompt(self, source: str, data: DataSection) -> str:
        src, tgt = language_name(data.source_lang or "source"), language_name(data.target_lang or "target")
        return f"Translate {src} to {tgt}:\n{source}\n{tgt}:"

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        sources, targets = self.pairs(rows, data)
        prefix = data.source_prefix or ""
        sources = [prefix + s for s in sources]
        if family == DECODER_ONLY:
            sources, targets = [self.prompt(s, data) for s in sources], [" " + t for t in targets]
        return encode_pairs(sources, targets, tokenizer, family, data.max_source_length, data.max_target_length, training)

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    predict = staticmethod(predict_by_generation)
    decode = staticmethod(decode_generated)

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[list[str]]:
        return [[t] for t in self.pairs(rows, data)[1]]  # sacreBLEU: a list of references per prediction

    def compute_metrics(self, predictions: list[str], references: list[list[str]], source: str) -> dict[str, float]:
        return metrics.bleu_chrf(predictions, references, source)
