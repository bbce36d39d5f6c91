"""The recipe: typed, frozen settings loaded once from YAML plus dotted KEY=VALUE overrides.

Every problem found is reported together in one UserError line; unknown keys name their dotted
path and the closest valid key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from hftk.errors import UserError
from hftk.recipe_yaml import merge, parse_overrides, read_yaml

TaskName = Literal[
    "translation", "summarization", "extractive_qa", "generative_qa", "text_generation", "dialogue"
]
SchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt",
]

TrackerName = Literal["tensorboard", "wandb", "trackio", "mlflow"]


# Upper bounds far past any real run, low enough that numpy, torch and the tokenizers never overflow.
MAX_TOKENS = 1_000_000  # a sequence length, in tokens
MAX_BATCH = 1_000_000  # examples per batch, beams, accumulation steps, vocabulary entries
MAX_STEPS = 1_000_000_000  # optimizer steps
MAX_COUNT = 1_000_000_000  # rows, texts, checkpoints kept
MAX_EPOCHS = 1_000_000
MAX_WORKERS = 1024
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding refuse more
MAX_TIMEOUT_S = 365 * 24 * 3600


class Section(BaseModel):
    # inf/nan would pass every bound and only fail once training runs.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _expand_home(value: str | None) -> str | None:
    """`~/runs` means the home folder, as in a shell; kept literally it would make a folder named `~`."""
    if value is None or not value.startswith("~"):
        return value  # a Hub id never starts with `~`
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        raise ValueError(f"cannot expand '{value}': no such user, or no home folder")
    return expanded


class TokenizerTraining(Section):
    """Train a tokenizer on the training split (scratch models only)."""

    vocab_size: int = Field(2000, ge=64, le=MAX_BATCH, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, le=MAX_COUNT, description="Merge only pairs seen at least this often.")
    lowercase: bool = Field(False, description="Lowercase all text before learning and encoding.")
    max_texts: int | None = Field(None, ge=1, le=MAX_COUNT, description="Train on at most this many rows.")


class TokenizerSection(Section):
    """Where the tokenizer comes from when it is not the model's own (a scratch model needs one)."""

    name_or_path: str | None = Field(None, description="A Hub id or local directory to load the tokenizer from.")
    train: TokenizerTraining | None = None

    _home_expanded = field_validator("name_or_path")(_expand_home)

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSection:
        if self.name_or_path and self.train:
            raise ValueError("give either tokenizer.name_or_path or tokenizer.train, not both")
        return self


class ModelSection(Section):
    """The model: pretrained (name_or_path) or built from scratch (config); exactly one of the two."""

    name_or_path: str | None = Field(None, description="A pretrained model: a Hub id or a saved model's directory.")
    config: dict[str, Any] | None = Field(
        None, description="A scratch model: model_type plus any fields of that transformers config (misspelt ones "
                          "are rejected).")
    tokenizer: TokenizerSection | None = None
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (auto_map); only "
                                                       "for sources you trust.")
    revision: str | None = Field(None, description="A Hub branch, tag or commit of name_or_path.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                                            "memory, about a third more compute.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights' dtype passed to from_pretrained (auto: the checkpoint's); default float32.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = Field(
        None, description="Attention kernel passed to transformers (default: its choice, SDPA where the family has it).")

    _home_expanded = field_validator("name_or_path")(_expand_home)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if bool(self.name_or_path) == bool(self.config):
            raise ValueError("set exactly one of model.name_or_path (pretrained) or model.config (scratch)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (for example t5, bart, gpt2, bert)")
        if self.config is not None and not (self.tokenizer and (self.tokenizer.name_or_path or self.tokenizer.train)):
            raise ValueError("a scratch model needs model.tokenizer.name_or_path or model.tokenizer.train")
        return self


# The data keys that name where a row's fields are; a source in a list may set its own (mapped to the
# recipe's on load).
COLUMN_KEYS = ("id_column", "source_column", "target_column", "source_lang", "target_lang", "translation_column",
               "question_column", "context_column", "answer_column", "text_column", "messages_column")


class DataSource(Section):
    """A local json/jsonl/csv/parquet file, or a Hub dataset {path, name, split}; in a list of sources, also
    its own column keys, weight and label."""

    path: str = Field(description="A local .json/.jsonl/.csv/.parquet file, or a Hub dataset id.")
    name: str | None = Field(None, description="A Hub dataset's configuration name.")
    split: str | None = Field(None, description="A Hub dataset's split (default: the key's name, e.g. validation); "
                                                "a local file has none.")
    revision: str | None = Field(None, description="A Hub dataset's branch, tag or commit.")
    label: str | None = Field(None, description="The source's name in train_examples_by_source and in "
                                                "eval_<label>_<metric> (default: the file's stem or the Hub id).")
    weight: float | None = Field(None, gt=0, le=1e9, description="Several training sources: the share of drawn "
                                                                 "examples from this one (relative to the others' "
                                                                 "weights); unset on all: the sources are "
                                                                 "concatenated.")
    id_column: str | None = Field(None, description="This source's data.id_column, if its name differs.")
    source_column: str | None = Field(None, description="This source's data.source_column, if its name differs.")
    target_column: str | None = Field(None, description="This source's data.target_column, if its name differs.")
    source_lang: str | None = Field(None, description="This source's data.source_lang, if it differs.")
    target_lang: str | None = Field(None, description="This source's data.target_lang, if it differs.")
    translation_column: str | None = Field(None, description="This source's data.translation_column, if it differs.")
    question_column: str | None = Field(None, description="This source's data.question_column, if it differs.")
    context_column: str | None = Field(None, description="This source's data.context_column, if it differs.")
    answer_column: str | None = Field(None, description="This source's data.answer_column, if it differs.")
    text_column: str | None = Field(None, description="This source's data.text_column, if it differs.")
    messages_column: str | None = Field(None, description="This source's data.messages_column, if it differs.")

    _home_expanded = field_validator("path")(_expand_home)

    def default_label(self) -> str:
        """The file's stem (`news` for data/news.jsonl), or the Hub id (with its config name)."""
        if self.label:
            return self.label
        suffixes = "".join(Path(self.path).suffixes)
        if suffixes and suffixes.lstrip(".").split(".")[0] in ("json", "jsonl", "csv", "parquet"):
            return Path(self.path).name.removesuffix(suffixes)
        return self.path + (f"/{self.name}" if self.name else "")

    def columns(self) -> dict[str, str]:
        """The column keys this source sets itself."""
        return {key: getattr(self, key) for key in COLUMN_KEYS if getattr(self, key) is not None}


def _source(value: Any) -> Any:
    if isinstance(value, list):
        return [_source(item) for item in value]
    return {"path": value} if isinstance(value, str) else value


# One source or a list of them; the tags keep pydantic from reporting a mistake under both shapes.
ONE, MANY = "one source", "list of sources"
Sources = Annotated[Annotated[DataSource, Tag(ONE)] | Annotated[list[DataSource], Tag(MANY)],
                    Discriminator(lambda value: MANY if isinstance(value, list | tuple) else ONE)]


def as_sources(value: DataSource | list[DataSource] | None) -> list[DataSource]:
    """A split's sources as a list (one for a single source, none for an unset split)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


class DataSection(Section):
    """The splits, their columns and token lengths. Column names default to the task's public schema."""

    train: Sources = Field(
        description="The training rows: a file path, or {path, name, split} for a Hub dataset; or a list of them, "
                    "each with its own column keys, weight and label.")
    validation: Sources | None = Field(
        None, description="Rows evaluated during and after training (a list: each source is also scored alone).")
    test: Sources | None = Field(None, description="Rows for `hftk eval --split test`.")
    streaming: bool = Field(False, description="Read data.train as a stream (datasets' IterableDataset), in order: "
                                               "nothing loaded or tokenized whole; needs train.max_steps.")
    stream_check_rows: int = Field(1000, ge=1, le=MAX_COUNT, description="Streaming: validate and plan judge this "
                                                                         "many first rows; a bad row met later is "
                                                                         "skipped and counted.")
    # Column names; a task fills in the public schema's names where these are left out.
    id_column: str | None = Field(None, description="Column whose value names each row in predictions.jsonl "
                                                    "(default: id, else the row number).")
    source_column: str | None = Field(None, description="Input text column (summarization: document; translation: "
                                                        "with target_column, instead of a translation column).")
    target_column: str | None = Field(None, description="Output text column (summarization: summary).")
    source_lang: str | None = Field(None, description="Translation: the key of the source text in each "
                                                      "translation row, e.g. en.")
    target_lang: str | None = Field(None, description="Translation: the key of the target text, e.g. fr.")
    translation_column: str | None = Field(None, description="Translation: the column of {lang: text} pairs "
                                                             "(default: translation).")
    question_column: str | None = Field(None, description="QA: the question column (default: question).")
    context_column: str | None = Field(None, description="QA: the context column (default: context).")
    answer_column: str | None = Field(None, description="QA: the SQuAD-style answers column (default: answers).")
    text_column: str | None = Field(None, description="text_generation: the text column (default: text).")
    messages_column: str | None = Field(None, description="dialogue: the column of [{role, content}] turns "
                                                          "(default: messages).")
    source_prefix: str | None = Field(None, description="Text put before every source, e.g. \"summarize: \" for "
                                                        "pretrained T5.")
    max_source_length: int = Field(256, ge=1, le=MAX_TOKENS, description="Tokens of input kept per example (QA: "
                                                                         "per context window; longer is cut).")
    max_target_length: int = Field(64, ge=1, le=MAX_TOKENS, description="Tokens of target kept per example "
                                                                        "(longer is cut).")
    doc_stride: int = Field(64, ge=1, le=MAX_TOKENS, description="Extractive QA: tokens shared by consecutive "
                                                                 "windows of a long context.")
    version_2_with_negative: bool | None = Field(
        None, description="Extractive QA: SQuAD v2 rules (answer nothing when the no-answer score wins); "
                          "default: true when some evaluated row has no answer.")
    max_train_samples: int | None = Field(None, ge=1, le=MAX_COUNT, description="Train on the first N good rows "
                                                                                "only.")
    max_eval_samples: int | None = Field(None, ge=1, le=MAX_COUNT, description="Evaluate on the first N good rows "
                                                                               "only.")
    preprocessing_num_workers: int | None = Field(None, ge=1, le=MAX_WORKERS, description="Processes that check "
                                                                                          "and tokenize rows.")
    drop_bad_rows: bool = Field(False, description="Skip rows the task cannot use (null or missing text, wrong "
                                                   "shape) and log how many, instead of stopping with exit 2.")

    _as_source = field_validator("train", "validation", "test", mode="before")(_source)

    @field_validator("train", "validation", "test")
    @classmethod
    def _sources_apart(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("an empty list of sources; give one file, or a list of at least one source")
        labels = [source.default_label() for source in value]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"several sources are labelled {', '.join(repr(t) for t in twice)}; give each a "
                             f"label of its own")
        weighted = [source.weight is not None for source in value]
        if any(weighted) and not all(weighted):
            raise ValueError("give every source a weight (drawn in those proportions) or none (concatenated)")
        return value

    @model_validator(mode="after")
    def _weights_only_for_training(self) -> DataSection:
        for key in ("validation", "test"):
            if any(source.weight is not None for source in as_sources(getattr(self, key))):
                raise ValueError(f"weight draws training examples, and every {key} row is scored: leave it out "
                                 f"of data.{key}")
        if self.streaming and isinstance(self.train, list) and len(self.train) > 1:
            raise ValueError("data.streaming reads one training source; give data.train one source, or "
                             "leave data.streaming off to mix several")
        return self

    def sources(self, key: str) -> list[DataSource]:
        return as_sources(getattr(self, key))


class TrainSection(Section):
    """Optimization, schedule, checkpoints and where the run goes."""

    output_dir: str = Field(description="Where the model, checkpoints, metrics and logs go.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seeds Python, NumPy and torch, hence data order, dropout "
                                                         "and a scratch model's initial weights.")
    num_train_epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS, description="Passes over the training rows "
                                                                          "(fractions allowed).")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW's peak learning rate.")
    per_device_train_batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Examples per process per "
                                                                                "micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    lr_scheduler_type: SchedulerName = Field("linear", description="Learning-rate schedule after warm-up "
                                                                   "(transformers' get_scheduler).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the optimizer steps that warm the learning "
                                                             "rate up from 0 (when warmup_steps is 0).")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Optimizer steps of warm-up; overrides "
                                                                 "warmup_ratio when above 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; biases and norm weights are not "
                                                       "decayed.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW's second-moment decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW's denominator term.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (null: no "
                                                               "clipping).")
    logging_steps: int = Field(10, ge=1, le=MAX_STEPS, description="A metrics.jsonl row every this many optimizer "
                                                                   "steps.")
    eval_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Evaluate on data.validation every this "
                                                                         "many optimizer steps (always at the end).")
    save_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="A checkpoint every this many optimizer "
                                                                         "steps (always one at the end).")
    save_total_limit: int | None = Field(None, ge=1, le=MAX_COUNT, description="Keep only the newest N checkpoints "
                                                                               "(and the best one, with "
                                                                               "load_best_model_at_end).")
    resume_from_checkpoint: str | None = Field(None, description="latest, or a checkpoint folder: continue that run "
                                                                 "with the same settings.")
    overwrite_output_dir: bool = Field(False, description="Start afresh where output_dir holds a run, removing only "
                                                          "that run's files.")
    dataloader_num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description="Worker processes that collate "
                                                                             "training batches (0: the main one).")
    group_by_length: bool = Field(
        False, description="Batch examples of similar length together: less padding, but batches less mixed "
                           "(can cost quality on short runs).")
    packing: bool = Field(
        False, description="Lay each micro-batch's examples back to back in fewer rows, each example kept to "
                           "itself (decoder-only: by position ids; T5, BART, Marian: block-diagonal masks and "
                           "per-example positions): the same examples per step on less padding.")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast (weights and optimizer stay fp32). true: always, over the launcher's "
                            "mixed_precision; false: the launcher's mixed_precision (fp32 unless it sets one); auto: "
                            "the launcher's where it sets bf16 or fp16 (the bundled accelerate configs' \"no\" sets "
                            "none), else a resumed checkpoint's (for `hftk eval`, the saved run's), else fp32 for "
                            "decoder-only models (faster here) and bf16 on a GPU or CPU with native bf16. The log's "
                            "first lines say which.")
    fast_dropout: bool = Field(
        True, description="On CPUs, dropout masks from a vectorised counter hash seeded by torch's generator (same "
                          "rate and scaling, about 3x cheaper than torch's serial draws); false: torch's own. "
                          "GPUs and gradient checkpointing always use torch's.")
    ddp_timeout: int = Field(1800, ge=10, le=MAX_TIMEOUT_S,
                             description="Seconds a collective may wait for a silent process before every other "
                                         "process ends with a line naming it; must cover the longest evaluation "
                                         "and checkpoint save.")
    on_divergence: Literal["stop", "rollback"] = Field(
        "stop", description="On a non-finite loss, or a step loss above spike_factor x the running median: stop "
                            "(exit 1), or rollback: go back to the newest checkpoint, skip that optimizer step's "
                            "micro-batches and go on (at most max_rollbacks times).")
    spike_factor: float | None = Field(
        None, gt=1, description="A step whose loss exceeds this many times the median of the previous "
                                "steps' losses (up to 32 of them, from the 5th step on) counts as a divergence; "
                                "unset: only non-finite losses do.")
    max_rollbacks: int = Field(3, ge=1, le=1000, description="train.on_divergence=rollback: how many rollbacks a "
                                                             "run may make before it stops with exit 1.")
    ddp_bucket_cap_mb: float | None = Field(
        None, gt=0, le=1024, description="DDP's gradient bucket size in MB (unset: torch's 25); smaller buckets "
                                          "start sending sooner during the backward pass. DDP launches only.")
    load_best_model_at_end: bool = Field(
        False, description="Save the weights of the checkpoint with the best evaluation as the final model "
                           "(needs eval_steps, and save_steps a multiple of eval_steps).")
    metric_for_best_model: str = Field("eval_loss", description="The eval metric that picks the best checkpoint "
                                                                "and drives early stopping (eval_ may be left out).")
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metric is better (default: false for loss and perplexity, else true).")
    early_stopping_patience: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Stop after this many evaluations without improvement (needs eval_steps).")
    early_stopping_threshold: float = Field(0.0, ge=0, description="How much the metric must improve to count.")
    report_to: list[TrackerName] = Field(
        default_factory=list, description="Experiment trackers that receive the logged metrics, through Accelerate.")
    eval_on_start: bool | None = Field(
        None, description="Evaluate before the first optimizer step (the step-0 row of metrics.jsonl, "
                          "predictions_step0.jsonl); unset: yes for a pretrained model.name_or_path, no for a "
                          "scratch model.config.")

    _home_expanded = field_validator("output_dir", "resume_from_checkpoint")(_expand_home)

    @field_validator("output_dir")
    @classmethod
    def _names_a_folder(cls, value: str) -> str:
        if not value.strip():  # an empty path would train into the current directory
            raise ValueError("is empty; name the folder the run writes to (e.g. runs/summarize)")
        return value

    @field_validator("bf16", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"must be auto, true or false, not {value!r}")

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        if value in ("none", None):
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("metric_for_best_model")
    @classmethod
    def _eval_prefixed(cls, value: str) -> str:
        return value if value.startswith("eval_") else f"eval_{value}"  # as TrainingArguments does

    @model_validator(mode="after")
    def _rerun_mode(self) -> TrainSection:
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ValueError("train.resume_from_checkpoint and train.overwrite_output_dir exclude each other")
        return self

    @model_validator(mode="after")
    def _best_needs_evaluations(self) -> TrainSection:
        if self.load_best_model_at_end:
            if not self.eval_steps or not self.save_steps:
                raise ValueError("train.load_best_model_at_end needs train.eval_steps and train.save_steps")
            if self.save_steps % self.eval_steps:
                raise ValueError(f"train.load_best_model_at_end needs train.save_steps ({self.save_steps}) to be a "
                                 f"multiple of train.eval_steps ({self.eval_steps}), so every best has a checkpoint")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("train.early_stopping_patience needs train.eval_steps (it counts evaluations)")
        return self

    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.metric_for_best_model.endswith(("loss", "perplexity"))


class EvalSection(Section):
    """Evaluation: batch size and generation settings."""

    per_device_eval_batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Examples per process per "
                                                                               "evaluation batch.")
    num_beams: int = Field(1, ge=1, le=MAX_BATCH, description="Beam search width when generating (1: greedy).")
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS, description="Most tokens generated per example.")
    metric_source: Literal["local", "hub"] = Field(
        "local", description="local: the metric libraries installed here; hub: evaluate.load from the Hub."
    )
    bootstrap_samples: int = Field(
        1000, ge=0, le=MAX_COUNT, description="Bootstrap resamples of the evaluated examples behind each "
                                              "eval_<metric>_ci95 95% interval (0: no intervals; metric_source "
                                              "local only).")
    bootstrap_seed: int = Field(12345, ge=1, le=MAX_SEED, description="Seeds the resamples (sacreBLEU's default; "
                                                                      "it reads 0 as unseeded).")


class ParallelSection(Section):
    """Settings Accelerate's YAML cannot express; the topology itself comes from the accelerate config."""

    comm_hook: Literal["none", "fp16", "bf16", "int8", "topk", "powersgd"] = Field(
        "none", description="DDP gradient compression: fp16/bf16 casts, int8 quantization, top-k sparsification "
                            "(both with error feedback), or PowerSGD low-rank approximation."
    )
    topk_ratio: float = Field(0.25, gt=0.0, le=1.0,
                              description="topk: the fraction of each gradient tensor's entries sent every step "
                                          "once the decay is over. The defaults send 16% of plain DDP's bytes and "
                                          "end the bundled summarize, translate and dialogue recipes' first 60 "
                                          "steps within 3% of its loss (benchmarks/RESULTS.md).")
    topk_start_iter: int = Field(10, ge=0, le=MAX_STEPS,
                                 description="topk: plain all-reduce for this many optimizer steps first, while "
                                             "gradients change fastest.")
    topk_decay_steps: int = Field(20, ge=0, le=MAX_STEPS,
                                  description="topk: after the plain steps, the ratio falls exponentially from "
                                              "topk_decay_from to topk_ratio over this many steps (0: topk_ratio at "
                                              "once; at 10% on summarize, 1.10x plain DDP's loss at step 60 without, 1.03x with).")
    topk_decay_from: float = Field(1.0, gt=0.0, le=1.0, description="topk: the ratio the decay starts from.")
    topk_momentum: float = Field(0.0, ge=0.0, lt=1.0,
                                 description="topk: momentum correction (Deep Gradient Compression): each process "
                                             "sends the top-k of its accumulated local velocity u = momentum x u + g, "
                                             "and a sent entry's velocity restarts at 0 (0: plain error feedback; "
                                             "with AdamW, which has its own momentum, 0.9 trails further).")
    powersgd_rank: int = Field(1, ge=1, le=MAX_BATCH, description="PowerSGD matrix approximation rank.")
    powersgd_start_iter: int = Field(1000, ge=2, le=MAX_STEPS,
                                     description="Plain all-reduce (with error feedback warm-up) before this step.")
    powersgd_min_compression_rate: float = Field(2.0, ge=1.0, description="PowerSGD: tensors compressed less than "
                                                                          "this are sent whole.")


class LoraSection(Section):
    """Train a LoRA adapter through peft on a pretrained base instead of every weight."""

    r: int = Field(8, ge=1, le=MAX_BATCH, description="Rank of the update matrices.")
    alpha: float = Field(16.0, gt=0, description="Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Module names to adapt; default: peft's choice for the family, else the "
                                        "Linear/Conv1D projections inside attention blocks.")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter; default: a task head the base lacks "
                          "(extractive QA's qa_outputs).")
    use_dora: bool = Field(False, description="DoRA: learn each weight's magnitude apart from its direction.")
    use_rslora: bool = Field(False, description="Scale the update by alpha / sqrt(r) instead of alpha / r.")
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = Field(
        True, description="peft's adapter initialisation (true: the update starts at zero).")
    merge: bool = Field(False, description="Also save the base with the adapter merged in, in output_dir/merged.")
    quantize: Literal["none", "4bit", "8bit"] = Field("none", description="QLoRA: load the base quantized "
                                                                          "through bitsandbytes (CUDA only).")


class HubSection(Section):
    """Push the finished run to the Hugging Face Hub (main process only)."""

    push: bool = Field(False, description="Upload output_dir with its model card once training ends.")
    repo_id: str | None = Field(None, description="USER/NAME on the Hub.")
    private: bool = Field(False, description="Create the repository as private.")
    require_better_than: str | None = Field(
        None, description="Push only a run significantly better (paired test, p < 0.05) than this run folder, or "
                          "than its own step-0 score with `start`; otherwise the push is skipped.")
    require_better_on: str | None = Field(
        None, description="The metric require_better_than compares (default: the task's headline metric: rougeL, "
                          "bleu, f1 or perplexity).")

    _home_expanded = field_validator("require_better_than")(_expand_home)

    @model_validator(mode="after")
    def _repo_to_push(self) -> HubSection:
        if self.push and not self.repo_id:
            raise ValueError("hub.push needs hub.repo_id (USER/NAME)")
        if self.repo_id is not None and (self.repo_id.count("/") != 1 or not all(self.repo_id.split("/"))):
            raise ValueError(f"hub.repo_id must be USER/NAME, not '{self.repo_id}'")
        return self


class Recipe(Section):
    task: TaskName = Field(description="What the model learns; picks the columns, preprocessing and metrics.")
    model: ModelSection
    data: DataSection
    train: TrainSection
    eval: EvalSection = EvalSection()
    parallel: ParallelSection = ParallelSection()
    lora: LoraSection | None = None
    hub: HubSection | None = None

    @model_validator(mode="after")
    def _adapter_needs_a_base(self) -> Recipe:
        if self.lora is not None and self.model.config is not None:
            raise ValueError("lora needs a pretrained base to load onto: set model.name_or_path instead of "
                             "model.config (train and save a full run first)")
        return self

    @model_validator(mode="after")
    def _weights_or_lengths(self) -> Recipe:
        if self.train.group_by_length and any(s.weight is not None for s in self.data.sources("train")):
            raise ValueError("train.group_by_length orders every example by length, which would undo the sources' "
                             "weights; leave one of the two out")
        return self

    @model_validator(mode="after")
    def _stream_needs_steps(self) -> Recipe:
        if self.data.streaming and not self.train.max_steps:
            raise ValueError("data.streaming needs train.max_steps: a stream has no length to count epochs by")
        return self

    @model_validator(mode="after")
    def _evaluations_need_data(self) -> Recipe:
        wants = [k for k in ("load_best_model_at_end", "early_stopping_patience", "eval_on_start")
                 if getattr(self.train, k)]
        if wants and self.data.validation is None:
            raise ValueError(f"train.{wants[0]} needs data.validation to evaluate on")
        if self.hub and self.hub.require_better_than == "start" and not self.evaluates_on_start():
            raise ValueError("hub.require_better_than=start needs the step-0 score: set train.eval_on_start=true")
        return self

    def evaluates_on_start(self) -> bool:
        """train.eval_on_start, or unset: a pretrained checkpoint has a score worth knowing, a scratch model none."""
        if self.data.validation is None:
            return False
        return self.train.eval_on_start if self.train.eval_on_start is not None else bool(self.model.name_or_path)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
    loc = [str(part) for part in error["loc"] if part not in (ONE, MANY)]
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
        if part.isdigit():  # an item of a list of sources
            continue
        field = section.model_fields.get(part)
        found = _model_in(getattr(field, "annotation", None))
        if found is None:
            return None
        section = found
    match = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1, cutoff=0.6)
    return ".".join(loc[:-1] + match) if match else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The section class inside an annotation (through unions, lists and Annotated)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := _model_in(arg)) is not None), None)
