"""Wires one validated recipe into tokenizer, model, data, loop, evaluation and checkpoints.

Phases, in order: plan (every input check, nothing loaded or written) -> setup (accelerator,
tokenizer, model, data) -> train -> finish (final checkpoint, model, evaluation, results, card).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from hftk import checkpoint, data, metrics, models, parallel
from hftk.errors import RunError, UserError
from hftk.hub import write_model_card
from hftk.recipe import Recipe, TrainSection
from hftk.tasks import get_task
from hftk.tasks.base import ENCODER_ONLY, Encoding, Task
from hftk.tracking import MetricsLog, log, setup_logging


@dataclass
class Plan:
    """Everything learned from the inputs before any model is loaded."""

    recipe: Recipe
    task: Task
    config: Any
    encoding: Encoding
    splits: dict[str, datasets.Dataset]
    resume_from: Path | None = None


def plan_finetune(recipe: Recipe) -> Plan:
    output_dir = Path(recipe.train.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"train.output_dir: {output_dir} exists and is a file")
    checkpoint.check_writable(output_dir)
    resume_from = checkpoint.resolve_resume(output_dir, recipe.train.resume_from_checkpoint)
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, recipe)
    if (checkpoint.holds_previous_run(output_dir) and not recipe.train.overwrite_output_dir
            and not recipe.train.resume_from_checkpoint):
        raise UserError(
            f"train.output_dir: {output_dir} already holds a run; set train.resume_from_checkpoint=latest to "
            f"continue it, train.overwrite_output_dir=true to start afresh, or choose another output_dir"
        )
    plan = plan_inputs(recipe, ["train", "validation"])
    plan.resume_from = resume_from
    return plan


def plan_inputs(recipe: Recipe, split_keys: list[str], model_dir: str | None = None) -> Plan:
    task = get_task(recipe.task)
    metrics.check_metric_source(recipe.eval.metric_source)
    splits = data.load_checked(task, recipe.data, split_keys)
    model_section = recipe.model if model_dir is None else recipe.model.model_copy(
        update={"name_or_path": model_dir, "config": None, "tokenizer": None})
    config = models.resolve_config(model_section)
    encoding = models.pick_encoding(task, config)
    models.check_lengths(config, encoding.family, recipe.data.max_source_length, recipe.data.max_target_length)
    return Plan(recipe, task, config, encoding, splits)


def make_accelerator(settings: TrainSection):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    parallel.launch_problems()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              kwargs_handlers=parallel.process_group_kwargs(settings.ddp_timeout))
    parallel.check_world(accelerator)
    set_seed(settings.seed)
    setup_logging(accelerator.is_main_process)
    return accelerator


def build_tokenizer(plan: Plan, accelerator: Any) -> Any:
    tokenizer = _raw_tokenizer(plan, accelerator)
    if hasattr(plan.task, "prepare_tokenizer"):  # e.g. a chat template for dialogue
        tokenizer = plan.task.prepare_tokenizer(tokenizer)
    return tokenizer


def _raw_tokenizer(plan: Plan, accelerator: Any) -> Any:
    from hftk import tokenizer as tok

    spec = plan.recipe.model.tokenizer
    if spec is None or spec.train is None:
        return tok.load_tokenizer(plan.recipe.model)
    train = plan.splits["train"]
    key = tok.training_key(spec.train, plan.encoding.family, train._fingerprint)
    rows = train if spec.train.max_texts is None else train.select(range(min(spec.train.max_texts, len(train))))
    texts = (t for start in range(0, len(rows), 1000)
             for t in plan.task.texts(rows[start:start + 1000], plan.recipe.data) if t)
    with accelerator.main_process_first():
        return tok.trained_tokenizer(texts, spec.train, plan.encoding.family, key, accelerator.is_main_process)


def make_loader(dataset: datasets.Dataset, collator: Any, batch_size: int, shuffle: bool, workers: int = 0):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, num_workers=workers)


def tokenized(plan: Plan, accelerator: Any, tokenizer: Any, key: str, training: bool) -> datasets.Dataset:
    with accelerator.main_process_first():
        return data.tokenize(plan.splits[key], plan.task, tokenizer, plan.recipe.data, plan.encoding.family, training)


def decoder_inputs_for(model: Any) -> Any:
    return getattr(model, "prepare_decoder_input_ids_from_labels", None)


def eval_loader(plan: Plan, accelerator: Any, model: Any, tokenizer: Any, features: datasets.Dataset) -> Any:
    """Prepared once per run: every prepare() call adds a loader Accelerate keeps for good."""
    collator = plan.task.collator(tokenizer, plan.encoding.family, decoder_inputs_for(accelerator.unwrap_model(model)))
    return accelerator.prepare(make_loader(features, collator, plan.recipe.eval.per_device_eval_batch_size, shuffle=False))


def evaluate_split(plan: Plan, accelerator: Any, model: Any, tokenizer: Any, key: str,
                   loader: Any) -> tuple[dict[str, float], list[dict]]:
    from hftk.train.evaluation import run_evaluation

    recipe, task = plan.recipe, plan.task
    raw = plan.splits[key]
    rows = raw[:]
    loss, by_index = run_evaluation(accelerator, model, loader, tokenizer, task, plan.encoding.family, recipe.eval,
                                    rows, recipe.data)
    results = {"eval_loss": loss}
    if plan.encoding.family != ENCODER_ONLY:
        results["eval_perplexity"] = math.exp(min(loss, 50.0))  # capped: exp overflows past ~700
    predictions = []
    if by_index:
        references = task.references(rows, recipe.data)
        order = range(len(raw))
        texts = [by_index.get(i, "") for i in order]  # an example with no prediction scores as empty
        scores = task.compute_metrics(texts, references, recipe.eval.metric_source)
        results.update({f"eval_{k}": v for k, v in scores.items()})
        id_column = recipe.data.id_column or "id"
        ids = rows[id_column] if id_column in rows else list(order)
        predictions = [{"id": ids[i], "prediction": texts[i], "reference": references[i]} for i in order]
    results["eval_samples"] = len(raw)
    return results, predictions


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def finetune(recipe: Recipe) -> dict[str, Any]:
    """plan (every check) -> tokenizer and data -> output dir -> model and loop -> train -> finish."""
    from hftk.train.loop import train

    plan = plan_finetune(recipe)
    accelerator = make_accelerator(recipe.train)
    strategy = parallel.strategy_for(recipe.parallel, accelerator)
    tokenizer = build_tokenizer(plan, accelerator)
    # Tokenize before anything is written: rows that cannot be encoded are bad input too.
    train_features = tokenized(plan, accelerator, tokenizer, "train", training=True)
    validation_features = (tokenized(plan, accelerator, tokenizer, "validation", training=False)
                           if "validation" in plan.splits else None)
    start_output_dir(accelerator, recipe)
    parts, evaluate = setup_training(plan, accelerator, strategy, tokenizer, train_features, validation_features)
    log.info(f"training {parts.total_steps} optimizer steps on {accelerator.num_processes} process(es)")
    try:
        train_results = train(parts, recipe.train, lambda: _latest(recipe.train.output_dir))
    finally:
        parts.stop.uninstall()
    return finish(plan, parts, strategy, tokenizer, train_results, evaluate)


def start_output_dir(accelerator: Any, recipe: Recipe) -> None:
    output_dir = Path(recipe.train.output_dir)
    if accelerator.is_main_process:
        if recipe.train.overwrite_output_dir and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(recipe.dump_yaml())
    accelerator.wait_for_everyone()


def _latest(output_dir: str) -> str | None:
    latest = checkpoint.latest_checkpoint(Path(output_dir))
    return str(latest) if latest else None


def setup_training(plan: Plan, accelerator: Any, strategy: Any, tokenizer: Any, train_features: Any,
                   validation_features: Any):
    """Model, optimizer, loaders and schedule, prepared for the strategy and restored on resume.
    Returns the loop's parts and the validation evaluation (results, prediction rows), or None."""
    from hftk.train.loop import LoopParts
    from hftk.train.optim import build_optimizer, build_scheduler, total_optimizer_steps
    from hftk.train.preemption import StopFlag
    from hftk.train.state import TrainState

    recipe, settings = plan.recipe, plan.recipe.train
    output_dir = Path(settings.output_dir)
    with parallel.model_construction(accelerator):
        model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    parallel.apply_recipe_to_deepspeed(accelerator, settings.max_grad_norm)
    collator = plan.task.collator(tokenizer, plan.encoding.family, decoder_inputs_for(model))
    loader = make_loader(train_features, collator, settings.per_device_train_batch_size, True,
                         settings.dataloader_num_workers)
    model, optimizer, loader = strategy.prepare(accelerator, model, lambda m: build_optimizer(m, settings), loader)
    total_steps = total_optimizer_steps(settings, len(loader))
    # Not passed to prepare(): Accelerate would step it once per process per optimizer step.
    scheduler = build_scheduler(optimizer, settings, total_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    metrics_log = MetricsLog(output_dir, accelerator.is_main_process)
    if plan.resume_from is not None:
        log.info(f"resuming from {plan.resume_from}")
        accelerator.load_state(str(plan.resume_from))
        strategy.load_extra(accelerator, plan.resume_from, model, optimizer)
        metrics_log.truncate_after(state.optimizer_step)
    else:
        metrics_log.truncate_after(0)  # a fresh start (also "latest" with nothing saved yet)

    evaluate = None
    if validation_features is not None:
        validation = eval_loader(plan, accelerator, model, tokenizer, validation_features)

        def evaluate() -> tuple[dict[str, float], list[dict]]:
            return evaluate_split(plan, accelerator, model, tokenizer, "validation", validation)

    def save() -> str:
        return str(checkpoint.save_checkpoint(
            accelerator, output_dir, state.optimizer_step, recipe.dump_yaml(), settings.save_total_limit,
            lambda folder: strategy.save_extra(accelerator, folder, model, optimizer)))

    parts = LoopParts(accelerator, model, optimizer, scheduler, loader, plan.encoding.family, total_steps, state,
                      metrics_log, evaluate and (lambda: evaluate()[0]), save, StopFlag().install())
    return parts, evaluate


def finish(plan: Plan, parts: Any, strategy: Any, tokenizer: Any, train_results: dict,
           evaluate: Any) -> dict[str, Any]:
    """The final checkpoint, the whole model, the last evaluation, results and the model card."""
    recipe, accelerator, model = plan.recipe, parts.accelerator, parts.model
    output_dir = Path(recipe.train.output_dir)
    parts.save()
    try:
        save_model(accelerator, accelerator.unwrap_model(model), strategy.full_state_dict(accelerator, model),
                   tokenizer, output_dir)
    except OSError as err:
        raise RunError(f"cannot write the final model in {output_dir}: {err.strerror or err}; "
                       f"the final checkpoint is complete") from None
    results = dict(train_results)
    if evaluate is not None:
        eval_results, rows = evaluate()
        results.update(eval_results)
        parts.metrics_log.write({"step": parts.state.optimizer_step, **eval_results})
        if accelerator.is_main_process:
            write_jsonl(output_dir / "predictions.jsonl", rows)
    if accelerator.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
        write_model_card(output_dir, recipe.task, recipe.dump_yaml(), results, recipe.model.name_or_path,
                         plan.encoding.auto_class)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def save_model(accelerator: Any, model: Any, state_dict: dict, tokenizer: Any, output_dir: Path) -> None:
    model.save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def sample_continuations(model: Any, tokenizer: Any, prompts: list[str], settings: Any, temperature: float) -> list[dict]:
    """Sampled continuations of free prompts (top-p 0.95), for a look at what a model writes."""
    import torch

    samples = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=True, top_p=0.95, temperature=temperature,
                                    max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if not model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1]:]
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(output[0], skip_special_tokens=True)})
    return samples


def evaluate_saved(recipe: Recipe, model_dir: str | None, split: str, output_dir: str | None,
                   prompts: list[str] | None = None, temperature: float = 0.8) -> dict[str, Any]:
    import transformers

    from hftk.tokenizer import with_pad_token

    model_dir = model_dir or recipe.train.output_dir
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model: {model_dir} holds no saved model (no config.json)")
    if getattr(recipe.data, split, None) is None:
        raise UserError(f"--split: the recipe has no data.{split}")
    plan = plan_inputs(recipe, [split], model_dir=model_dir)
    accelerator = make_accelerator(recipe.train)
    tokenizer = with_pad_token(transformers.AutoTokenizer.from_pretrained(model_dir))
    model = getattr(transformers, plan.encoding.auto_class).from_pretrained(model_dir)
    model = accelerator.prepare(model)
    loader = eval_loader(plan, accelerator, model, tokenizer, tokenized(plan, accelerator, tokenizer, split, False))
    results, rows = evaluate_split(plan, accelerator, model, tokenizer, split, loader)
    target = Path(output_dir or model_dir)
    if accelerator.is_main_process:
        target.mkdir(parents=True, exist_ok=True)
        (target / "eval_results.json").write_text(json.dumps(results, indent=2))
        write_jsonl(target / "predictions.jsonl", rows)
        if prompts:
            write_jsonl(target / "samples.jsonl", sample_continuations(
                accelerator.unwrap_model(model), tokenizer, prompts, recipe.eval, temperature))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
