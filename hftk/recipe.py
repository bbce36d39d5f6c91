"""The recipe: typed, frozen settings loaded once from YAML plus dotted KEY=VALUE overrides.

Every problem found is reported together in one UserError line; unknown keys name their dotted
path and the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hftk.errors import UserError

TaskName = Literal[
    "translation", "summarization", "extractive_qa", "generative_qa", "text_generation", "dialogue"
]
SchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerTraining(Section):
    """Train a tokenizer on the training split (scratch models only)."""

    vocab_size: int = Field(2000, ge=64, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = False
    max_texts: int | None = Field(None, ge=1, description="Train on at most this many rows.")


class TokenizerSection(Section):
    name_or_path: str | None = None
    train: TokenizerTraining | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSection:
        if self.name_or_path and self.train:
            raise ValueError("give either tokenizer.name_or_path or tokenizer.train, not both")
        return self


class ModelSection(Section):
    name_or_path: str | None = Field(None, description="A Hub id or a local directory.")
    config: dict[str, Any] | None = Field(None, description="A scratch model: model_type and fields.")
    tokenizer: TokenizerSection | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if bool(self.name_or_path) == bool(self.config):
            raise ValueError("set exactly one of model.name_or_path (pretrained) or model.config (scratch)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (for example t5, bart, gpt2, bert)")
        if self.config is not None and not (self.tokenizer and (self.tokenizer.name_or_path or self.tokenizer.train)):
            raise ValueError("a scratch model needs model.tokenizer.name_or_path or model.tokenizer.train")
        return self


class DataSource(Section):
    """A local json/jsonl/csv/parquet file, or a Hub dataset {path, name, split}."""

    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None


def _source(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


class DataSection(Section):
    train: DataSource
    validation: DataSource | None = None
    test: DataSource | None = None
    # Column names; a task fills in the public schema's names where these are left out.
    id_column: str | None = None
    source_column: str | None = None
    target_column: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    translation_column: str | None = None
    question_column: str | None = None
    context_column: str | None = None
    answer_column: str | None = None
    text_column: str | None = None
    messages_column: str | None = None
    source_prefix: str | None = None
    max_source_length: int = Field(256, ge=1)
    max_target_length: int = Field(64, ge=1)
    doc_stride: int = Field(64, ge=1)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    preprocessing_num_workers: int | None = Field(None, ge=1)

    _as_source = field_validator("train", "validation", "test", mode="before")(_source)


class TrainSection(Section):
    output_dir: str
    seed: int = 42
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(5e-5, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: SchedulerName = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    ddp_timeout: int = Field(1800, ge=10, description="Seconds a collective may wait for a silent process.")

    @model_validator(mode="after")
    def _rerun_mode(self) -> TrainSection:
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ValueError("train.resume_from_checkpoint and train.overwrite_output_dir exclude each other")
        return self


class EvalSection(Section):
    per_device_eval_batch_size: int = Field(16, ge=1)
    num_beams: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    metric_source: Literal["local", "hub"] = Field(
        "local", description="local: the metric libraries installed here; hub: evaluate.load from the Hub."
    )


class ParallelSection(Section):
    """Settings Accelerate's YAML cannot express; the topology itself comes from the accelerate config."""

    comm_hook: Literal["none", "fp16", "bf16", "powersgd"] = Field(
        "none", description="DDP gradient compression: fp16/bf16 casts, or PowerSGD low-rank approximation."
    )
    powersgd_rank: int = Field(1, ge=1, description="PowerSGD matrix approximation rank.")
    powersgd_start_iter: int = Field(1000, ge=2, description="Plain all-reduce (with error feedback warm-up) before this step.")
    powersgd_min_compression_rate: float = Field(2.0, ge=1.0)


class Recipe(Section):
    task: TaskName
    model: ModelSection
    data: DataSection
    train: TrainSection
    eval: EvalSection = EvalSection()
    parallel: ParallelSection = ParallelSection()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads 3e-4 (no dot) as a float, as YAML 1.2 and users do."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: a recipe is data, never code


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["train.learning_rate=3e-4", ...] into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}' is not KEY=VALUE with a dotted key (e.g. train.learning_rate=3e-4)")
        try:
            value = _yaml(raw) if raw else ""
        except yaml.YAMLError as err:
            raise UserError(f"override '{item}': value is not valid YAML ({err.problem})") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' conflicts with another override of '{part}'")
        node[leaf] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        raw = _yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with task, model, data and train sections")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    raw = merge(read_yaml(path), parse_overrides(overrides or []))
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        raise UserError(f"{source}: " + "; ".join(problems)) from None


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    dotted = ".".join(loc) or "recipe"
    if error["type"] == "extra_forbidden":
        hint = _closest_key(loc)
        return f"unknown key '{dotted}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if error["type"] == "missing":
        return f"missing key '{dotted}'"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error":
        message = f"must be one of {error['ctx']['expected']}"
    return f"{dotted}: {message}" if loc else message


def _closest_key(loc: list[str]) -> str | None:
    section: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = section.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        models = [a for a in inner if issubclass(a, BaseModel)]
        if not models:
            return None
        section = models[0]
    match = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1, cutoff=0.6)
    return ".".join(loc[:-1] + match) if match else None
