"""Wires one validated recipe into tokenizer, model, data, loop, evaluation and checkpoints.

Phases, in order: plan (every input check, nothing loaded or written) -> setup (accelerator,
tokenizer, model, data) -> train -> finish (final checkpoint, model, evaluation, results, card).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hftk import checkpoint, models, parallel, run_dir
from hftk.errors import RunError, UserError
from hftk.evaluate import evaluate_split, write_jsonl
from hftk.hub import write_model_card
from hftk.prepare import (
    Plan,
    build_tokenizer,
    decoder_inputs_for,
    eval_loader,
    make_accelerator,
    make_loader,
    plan_inputs,
    tokenized,
)
from hftk.recipe import Recipe
from hftk.tracking import MetricsLog, log


def plan_finetune(recipe: Recipe) -> Plan:
    settings = recipe.train
    output_dir = Path(settings.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"train.output_dir: {output_dir} exists and is a file")
    checkpoint.check_writable(output_dir)
    run_dir.check_no_collisions(output_dir)
    if settings.resume_from_checkpoint == "latest" and run_dir.finished(output_dir):
        raise UserError(f"train.output_dir: {output_dir} holds a finished run, so there is nothing to resume; set "
                        f"train.overwrite_output_dir=true to train it afresh, or choose another output_dir")
    resume_from = checkpoint.resolve_resume(output_dir, settings.resume_from_checkpoint)
    if run_dir.holds_run(output_dir) and not settings.overwrite_output_dir and not settings.resume_from_checkpoint:
        raise UserError(
            f"train.output_dir: {output_dir} already holds a run; set train.resume_from_checkpoint=latest to "
            f"continue it, train.overwrite_output_dir=true to start afresh, or choose another output_dir"
        )
    plan = plan_inputs(recipe, ["train", "validation"])
    plan.train_digest = checkpoint.train_data_digest(recipe.data.train, plan.splits["train"])
    if resume_from is not None:
        checkpoint.check_compatible(resume_from, recipe, plan.train_digest)
    plan.resume_from = resume_from
    return plan


def finetune(recipe: Recipe) -> dict[str, Any]:
    """plan (every check) -> tokenizer and data -> output dir -> model and loop -> train -> finish."""
    from hftk.train.loop import train

    plan = plan_finetune(recipe)
    accelerator = make_accelerator(recipe.train)
    strategy = parallel.strategy_for(recipe.parallel, accelerator, plan.config)
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
    """The first write of a run. Starting afresh removes only what the earlier run wrote."""
    output_dir = Path(recipe.train.output_dir)
    if accelerator.is_main_process:
        if recipe.train.overwrite_output_dir:
            run_dir.clear_previous(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        run_dir.start(output_dir)
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
    loader = make_loader(train_features, collator, settings.per_device_train_batch_size, True, settings.seed,
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
        validation = eval_loader(plan, accelerator, model, tokenizer, validation_features,
                                 lambda loader: strategy.prepare_loader(accelerator, loader))

        def evaluate() -> tuple[dict[str, float], list[dict]]:
            return evaluate_split(plan, accelerator, model, tokenizer, "validation", validation)

    def save() -> str:
        return str(checkpoint.save_checkpoint(
            accelerator, output_dir, state.optimizer_step, recipe.dump_yaml(), settings.save_total_limit,
            lambda folder: strategy.save_extra(accelerator, folder, model, optimizer), plan.train_digest))

    parts = LoopParts(accelerator, model, optimizer, scheduler, loader, plan.encoding.family, total_steps, state,
                      metrics_log, evaluate and (lambda: evaluate()[0]), save, StopFlag().install(),
                      counts_tokens=getattr(strategy, "counts_tokens", True))
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
        run_dir.mark_finished(output_dir)
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
