"""Every check a command makes before it loads a model: the preflight of finetune, eval, validate and plan.

Two kinds: the surroundings (what output_dir holds, trackers installed, Hub settings; cheap, no ML
library imported, asked on every call) and the inputs (every row, the columns, the model config built
on the meta device, the adapter's target modules; their answer depends only on the recipe, the files it
names and the installed libraries, so `hftk validate` remembers it). The ML libraries are imported
inside the input checks, so a remembered answer costs no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hftk import checkpoint, experiment_trackers, hub, metrics, run_dir, tokenizer_files
from hftk.errors import UserError
from hftk.logs import log
from hftk.recipe import Recipe

if TYPE_CHECKING:
    import datasets

    from hftk.precision import Resolved
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
    sources: dict[str, Any] = field(default_factory=dict)  # sources.Split per split: its parts and their labels
    train_order: Any = None  # the training loader's sampler, to count what it drew (train_examples_by_source)
    precision: Resolved | None = None  # train.bf16 resolved for this launch (and its resume)


def plan_inputs(recipe: Recipe, split_keys: list[str], model_dir: str | None = None) -> Plan:
    """The rows of these splits checked, the model config resolved and built on the meta device: every
    check that reads the inputs' contents."""
    from hftk import models, sources
    from hftk.tasks import get_task

    task = get_task(recipe.task)
    metrics.check_metric_source(recipe.eval.metric_source)
    split_sources = sources.load_checked(task, recipe.data, split_keys)
    splits = {key: split.rows for key, split in split_sources.items()}
    model_section = recipe.model if model_dir is None else recipe.model.model_copy(
        update={"name_or_path": model_dir, "config": None, "tokenizer": None})
    tokenizer_files.check_packages(model_section)
    config = models.resolve_config(model_section)
    if model_section.config is None:
        recipe = with_prefix(recipe, checkpoint_prefix(recipe, task, config))
    encoding = models.pick_encoding(task, config)
    target_length = recipe.data.max_target_length if task.uses_target_length else 0
    models.check_lengths(config, encoding.family, recipe.data.max_source_length, target_length)
    models.check_kernel(model_section, config, encoding)
    if recipe.train.packing:
        models.check_packing(model_section, config, encoding.family)
    return Plan(recipe, task, config, encoding, splits, sources=split_sources)


def checkpoint_prefix(recipe: Recipe, task: Task, config: Any) -> str | None:
    """A pretrained checkpoint's own task prefix (T5's "summarize: ", in its config's task_specific_params)
    when the recipe names none; set data.source_prefix (even to "") to choose another."""
    key = task.pipeline_task(recipe.data)
    if recipe.data.source_prefix is not None or key is None:
        return None
    params = (getattr(config, "task_specific_params", None) or {}).get(key)
    prefix = params.get("prefix") if isinstance(params, dict) else None
    if not isinstance(prefix, str) or not prefix:
        return None
    log.info(f"data.source_prefix is unset: using the checkpoint's own prefix {prefix!r} "
             f"(task_specific_params.{key} in its config)")
    return prefix


def with_prefix(recipe: Recipe, prefix: str | None) -> Recipe:
    """The recipe the run goes by: the one given, with data.source_prefix filled in where it was resolved."""
    if prefix is None or recipe.data.source_prefix is not None:
        return recipe
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"source_prefix": prefix})})


def check_surroundings(recipe: Recipe, notes: list[str] | None = None) -> Path | None:
    """The checks about this machine and output_dir rather than the inputs' contents: what output_dir
    holds (returns the checkpoint a resume starts from), the trackers installed, the Hub settings.
    Cheap: no data is read and no ML library imported."""
    resume_from = run_dir.check_output_dir(recipe.train, notes)
    experiment_trackers.check_installed(list(recipe.train.report_to))
    tokenizer_files.check_packages(recipe.model)  # what is installed here, as the trackers
    metrics.check_metric_source(recipe.eval.metric_source)
    hub.check_push(recipe.hub)
    return resume_from


def plan_finetune(recipe: Recipe, notes: list[str] | None = None) -> Plan:
    """Every check finetune makes before it loads a model. With `notes` (validate), what finetune would
    refuse to do with an existing output_dir is noted there instead of raised: the recipe itself is fine."""
    resume_from = check_surroundings(recipe, notes)
    plan = check_inputs(recipe)
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, plan.recipe, plan.train_digest)
    plan.resume_from = resume_from
    plan.precision = run_precision(plan)
    return plan


def run_precision(plan: Plan) -> Resolved:
    """train.bf16 resolved for this launch: as the checkpoint a resume starts from trained, where auto."""
    from hftk.precision import device_type, resolve_precision

    if plan.resume_from is not None:
        return resumed_run_precision(plan.resume_from, plan.recipe)
    return resolve_precision(plan.recipe.train.bf16, plan.encoding.family, device_type())


def resumed_run_precision(resume_from: Path, recipe: Recipe) -> Resolved:
    """train.bf16 resolved for a resume: a resume keeps its checkpoint's precision (checkpoint.check_compatible)
    and auto follows it, so neither family nor device is asked, and a checkpoint trained in fp16 cannot resume
    where fp16 cannot run. torch is imported only for an fp16 checkpoint (a remembered validate answer
    imports none)."""
    from hftk.precision import device_type, fp16_runs_on

    resolved = checkpoint.resumed_precision(resume_from, recipe)
    if resolved.mixed_precision == "fp16" and not resolved.launcher and not fp16_runs_on(device := device_type()):
        raise UserError(f"train.resume_from_checkpoint: {resume_from.name} trained in fp16, which cannot run "
                        f"on this {device.upper()}; resume it on a CUDA GPU, or start afresh in another "
                        f"train.output_dir")
    return resolved


def saved_run_precision(plan: Plan, model_dir: str) -> Resolved:
    """train.bf16 resolved for `hftk eval` of a saved model: where auto, as the run that saved it trained (its
    newest checkpoint records it), so the model scores as in that run's own last evaluation. A model without
    checkpoints beside it (copied, downloaded), or one trained in fp16 evaluated where fp16 cannot run,
    resolves as a new run would."""
    from hftk.precision import device_type, fp16_runs_on, resolve_precision

    latest = checkpoint.latest_checkpoint(Path(model_dir))
    saved = checkpoint.saved_precision(latest) if latest is not None else None
    if saved is None or (saved == "fp16" and not fp16_runs_on(device_type())):
        return run_precision(plan)
    return resolve_precision(plan.recipe.train.bf16, saved=saved, saved_by=f"the run that saved {model_dir}")


def check_inputs(recipe: Recipe) -> Plan:
    """The checks that read the data and the model config: every row, the columns, the model built on the
    meta device, the adapter's target modules. Their answer depends only on the recipe, the files it names
    and the installed libraries (hftk validate remembers it)."""
    from hftk import adapters, sources

    plan = plan_inputs(recipe, ["train", "validation"])
    plan.train_digest = sources.split_digest(plan.sources["train"], "train", recipe.data, checkpoint.train_data_digest)
    plan.adapter = adapters.plan_adapter(recipe.lora, plan.config, plan.encoding.auto_class)
    return plan
