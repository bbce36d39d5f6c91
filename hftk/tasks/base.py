"""The Task protocol: everything that differs between tasks sits behind it.

The loop, the data pipeline and evaluation call these methods and never branch on a task name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from hftk.recipe import DataSection

# Model families, read off a model config (see hftk.models.family_of).
ENCODER_DECODER = "encoder-decoder"
DECODER_ONLY = "decoder-only"
ENCODER_ONLY = "encoder-only"

# The column every processed eval row carries so predictions map back to raw rows.
EXAMPLE_INDEX = "example_idx"

# Label positions the loss skips (prompt, padding), as transformers and torch name it.
IGNORE_INDEX = -100

# Batch key: 1 where a packed row holds an example's token, 0 on padding. Never a model input: the
# model must see no attention mask, or it would not look for example boundaries.
TOKEN_MASK = "token_mask"
# A packed encoder-decoder batch's masks and positions (hftk.train.packing builds them; the model's own
# hooks, hftk.train.packed_forward, take them out of its inputs and route them to the layers).
ENCODER_MASK = "packed_encoder_mask"  # [rows, 1, source, source]: source tokens of one example see each other
DECODER_MASK = "packed_decoder_mask"  # [rows, 1, target, target]: causal, within one example
CROSS_MASK = "packed_cross_mask"  # [rows, 1, target, source]: a target token sees its own example's source
SOURCE_POSITIONS = "packed_positions"  # [rows, source]: positions restart at 0 for each example
TARGET_POSITIONS = "packed_decoder_positions"  # [rows, target]
PACKED_SEQ2SEQ_INPUTS = (ENCODER_MASK, DECODER_MASK, CROSS_MASK, SOURCE_POSITIONS, TARGET_POSITIONS)


@dataclass(frozen=True)
class Encoding:
    """How a task turns raw rows into model features for one model family."""

    family: str
    auto_class: str  # name of the transformers Auto class, e.g. "AutoModelForSeq2SeqLM"


class Task(Protocol):
    name: str
    uses_target_length: bool  # False where data.max_target_length bounds nothing (text_generation's blocks)
    headline_metric: str  # what a push gate and a comparison lead with (no eval_ prefix)

    def encodings(self) -> dict[str, Encoding]:
        """The model families this task supports, with the Auto class each uses."""

    def columns(self, data: DataSection) -> list[str]:
        """Columns (top-level keys) each raw row must have, with the public schema's defaults applied."""

    def row_problems(self, rows: dict[str, list[Any]], data: DataSection) -> list[str | None]:
        """Batched: for each row, None when the task can use it, else a short description of what is
        wrong ("'summary' is missing or null"). Runs on every row before any model loads."""

    def has_source(self, rows: dict[str, list[Any]], data: DataSection) -> list[bool]:
        """Batched: whether each row gives the model any non-blank text to read."""

    def source_label(self, data: DataSection) -> str:
        """What has_source looks at, for the message when no row has any ("'document'")."""

    def repair(self, dataset: Any, data: DataSection, where: str) -> Any:
        """The checked split with what real-world data gets wrong mended (QA answer offsets), logged."""

    def to_recipe_columns(self, dataset: Any, own: DataSection, data: DataSection, where: str) -> Any:
        """One source of a list, checked under its own column keys (`own`), in the recipe's columns only."""

    def texts(self, rows: dict[str, list[Any]], data: DataSection) -> Iterable[str]:
        """Raw text to train a scratch tokenizer on."""

    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        """The tokenizer as this task needs it (a chat template for dialogue)."""

    def pipeline_task(self, data: DataSection) -> str | None:
        """The key of a pretrained config's task_specific_params for this task ("summarization",
        "translation_en_to_fr"), whose prefix applies when data.source_prefix is unset; None: no prefix."""

    def preprocess(
        self, rows: dict[str, list[Any]], tokenizer: Any, data: DataSection, family: str, training: bool,
    ) -> dict[str, list[Any]]:
        """Batched datasets.map function: raw rows to features (pure: no hidden state)."""

    def collator(
        self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None
    ) -> Callable[[list[dict]], dict]:
        """Pads a list of features into a batch; decoder_inputs shifts labels for encoder-decoders."""

    def predict(self, accelerator: Any, model: Any, batch: dict, tokenizer: Any, settings: Any,
                family: str) -> dict[str, Any]:
        """Per-example outputs of one eval batch (B first), padded across processes for gathering."""

    def decode(self, collected: dict[str, list[Any]], rows: dict[str, list[Any]], tokenizer: Any,
               data: DataSection) -> dict[int, str]:
        """Gathered outputs (with EXAMPLE_INDEX) to one prediction text per raw example index."""

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[Any]:
        """The reference each raw row is scored against."""

    def compute_metrics(self, predictions: list[str], references: list[Any], source: str) -> dict[str, float]:
        """Metric values named as `evaluate` names them, without the eval_ prefix."""

    def example_scores(self, predictions: list[str], references: list[Any]) -> list[dict[str, float]]:
        """Each example's own score for every metric that is a mean over examples (ROUGE, exact match,
        F1), named as compute_metrics names them; empty where the metric is corpus-level."""

    def corpus_statistics(self, predictions: list[str], references: list[Any]) -> dict[str, Any]:
        """Corpus-level metrics (BLEU, chrF) as per-sentence statistics to resample (hftk.intervals)."""


class TaskDefaults:
    """What most tasks do for the optional hooks of Task; a task overrides what it needs."""

    uses_target_length = True

    def repair(self, dataset: Any, data: DataSection, where: str) -> Any:
        return dataset

    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        return tokenizer

    def pipeline_task(self, data: DataSection) -> str | None:
        return None

    def to_recipe_columns(self, dataset: Any, own: DataSection, data: DataSection, where: str) -> Any:
        return renamed_columns(dataset, self.columns(own), self.columns(data), where)

    def example_scores(self, predictions: list[str], references: list[Any]) -> list[dict[str, float]]:
        return [{} for _ in predictions]

    def corpus_statistics(self, predictions: list[str], references: list[Any]) -> dict[str, Any]:
        return {}


def renamed_columns(dataset: Any, own: list[str], wanted: list[str], where: str) -> Any:
    """The columns `own` of a datasets.Dataset, renamed one for one to `wanted`."""
    from hftk.errors import UserError

    if len(own) != len(wanted):
        raise UserError(f"{where}: its columns {', '.join(own)} do not map one for one onto the recipe's "
                        f"{', '.join(wanted)}; set the same kind of column keys on it as on data")
    dataset = dataset.select_columns(list(dict.fromkeys(own)))
    renames = {mine: theirs for mine, theirs in zip(own, wanted) if mine != theirs}
    return dataset.rename_columns(renames) if renames else dataset


# The public schema's column names, each with the data key that names another column instead.
DEFAULT_COLUMN_KEYS = {"document": "source_column", "summary": "target_column", "translation": "translation_column",
                       "question": "question_column", "context": "context_column", "answers": "answer_column",
                       "text": "text_column", "messages": "messages_column"}


def column_key(data: DataSection, column: str) -> str | None:
    """The data key that names this column: the one the recipe set to it, else the key whose default it is."""
    named = [key for key, value in data if key.endswith("_column") and value == column]
    return f"data.{named[0]}" if named else (f"data.{DEFAULT_COLUMN_KEYS[column]}" if column in DEFAULT_COLUMN_KEYS
                                             else None)


def text_problem(column: str, value: Any) -> str | None:
    """What is wrong with one cell that must hold text (None: nothing). Missing keys load as null."""
    if value is None:
        return f"'{column}' is missing or null"
    if not isinstance(value, str):
        return f"column '{column}' must hold text, found {type(value).__name__}"
    return None


def first_problem(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


def has_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
