"""Every check a command makes before it loads a model: the preflight of finetune, eval, validate and plan.

Two kinds: the surroundings (what output_dir holds, trackers installed, Hub settings; cheap, no ML
library imported, asked on every call) and the inputs (every row, the columns, the model config built
on the meta device, the adapter's target modules; their answer depends only on the recipe, the files it
names and the installed libraries, so `hftk validate` remembers it). The ML libraries are imported
inside the input checks, so a remembered answer costs no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hftk import checkpoint, experiment_trackers, hub, metrics, run_dir
from hftk.recipe import Recipe

if TYPE_CHECKING:
    import datasets

    from hftk.tasks.base import Encoding, Task


@dataclass
class Plan:
    """Everything learned from the inputs before any model is loaded."""

    recipe: Recipe
    task: Task
    config: Any
    encoding: Encoding
    splits: dict[str, datasets.Dataset]
    resume_from: Path | None = None
    train_digest: str | None = None  # what the training rows were, kept in every checkpoint
    adapter: Any = None  # adapters.AdapterPlan when the recipe trains a LoRA adapter


def plan_inputs(recipe: Recipe, split_keys: list[str], model_dir: str | None = None) -> Plan:
    """The rows of these splits checked, the model config resolved and built on the meta device: every
    check that reads the inputs' contents."""
    from hftk import data, models
    from hftk.tasks import get_task

    task = get_task(recipe.task)
    metrics.check_metric_source(recipe.eval.metric_source)
    splits = data.load_checked(task, recipe.data, split_keys)
    model_section = recipe.model if model_dir is None else recipe.model.model_copy(
        update={"name_or_path": model_dir, "config": None, "tokenizer": None})
    config = models.resolve_config(model_section)
    encoding = models.pick_encoding(task, config)
    target_length = recipe.data.max_target_length if task.uses_target_length else 0
    models.check_lengths(config, encoding.family, recipe.data.max_source_length, target_length)
    models.check_kernel(model_section, config, encoding)
    if recipe.train.packing:
        models.check_packing(model_section, config, encoding.family)
    return Plan(recipe, task, config, encoding, splits)


def check_surroundings(recipe: Recipe, notes: list[str] | None = None) -> Path | None:
    """The checks about this machine and output_dir rather than the inputs' contents: what output_dir
    holds (returns the checkpoint a resume starts from), the trackers installed, the Hub settings.
    Cheap: no data is read and no ML library imported."""
    resume_from = run_dir.check_output_dir(recipe.train, notes)
    experiment_trackers.check_installed(list(recipe.train.report_to))
    metrics.check_metric_source(recipe.eval.metric_source)
    hub.check_push(recipe.hub)
    return resume_from


def plan_finetune(recipe: Recipe, notes: list[str] | None = None) -> Plan:
    """Every check finetune makes before it loads a model. With `notes` (validate), what finetune would
    refuse to do with an existing output_dir is noted there instead of raised: the recipe itself is fine."""
    resume_from = check_surroundings(recipe, notes)
    plan = check_inputs(recipe)
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, recipe, plan.train_digest)
    plan.resume_from = resume_from
    return plan


def check_inputs(recipe: Recipe) -> Plan:
    """The checks that read the data and the model config: every row, the columns, the model built on the
    meta device, the adapter's target modules. Their answer depends only on the recipe, the files it names
    and the installed libraries (hftk validate remembers it)."""
    from hftk import adapters

    plan = plan_inputs(recipe, ["train", "validation"])
    plan.train_digest = checkpoint.train_data_digest(recipe.data.train, plan.splits["train"])
    plan.adapter = adapters.plan_adapter(recipe.lora, plan.config, plan.encoding.auto_class)
    return plan
