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


@dataclass(frozen=True)
class Encoding:
    """How a task turns raw rows into model features for one model family."""

    family: str
    auto_class: str  # name of the transformers Auto class, e.g. "AutoModelForSeq2SeqLM"


class Task(Protocol):
    name: str

    def encodings(self) -> dict[str, Encoding]:
        """The model families this task supports, with the Auto class each uses."""

    def columns(self, data: DataSection) -> list[str]:
        """Columns (top-level keys) each raw row must have, with the public schema's defaults applied."""

    def check_rows(self, rows: dict[str, list[Any]], data: DataSection, where: str) -> None:
        """Raise UserError when sample rows do not have the shape the task needs."""

    def texts(self, rows: dict[str, list[Any]], data: DataSection) -> Iterable[str]:
        """Raw text to train a scratch tokenizer on."""

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
