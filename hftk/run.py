"""Wires one validated recipe into tokenizer, model, data, loop, evaluation and checkpoints.

Phases, in order: plan (every input check, nothing loaded or written) -> setup (accelerator,
tokenizer, model, data) -> train -> finish (final checkpoint, model, evaluation, results, card).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hftk import adapters, checkpoint, comparison, hub, models, run_dir
from hftk.errors import RunError
from hftk.eval_split import evaluate_split, write_jsonl
from hftk.experiment_trackers import log_row, start_trackers
from hftk.logs import MetricsLog, attach_log_file, log
from hftk.parallel import launch
from hftk.parallel.strategies import Strategy, strategy_for
from hftk.preflight import Plan, plan_finetune
from hftk.prepare import (
    build_tokenizer,
    eval_loader,
    make_accelerator,
    route_packed_inputs,
    stream_loader,
    tokenized,
    train_collator,
    train_loader,
)
from hftk.recipe import Recipe
from hftk.report import write_training_curves
from hftk.train.best import best_figures, record_evaluation
from hftk.train.loop import LoopParts, train


def finetune(recipe: Recipe) -> dict[str, Any]:
    """plan (every check) -> tokenizer and data -> output dir -> model and loop -> train -> finish."""

    plan = plan_finetune(recipe)
    recipe = plan.recipe  # as resolved from the checkpoint (its task prefix), and so written to recipe.yaml
    accelerator = make_accelerator(recipe.train, plan.precision, list(recipe.train.report_to))
    strategy = strategy_for(recipe.parallel, accelerator, plan.config)
    tokenizer = build_tokenizer(plan, accelerator)
    models.check_vocabulary(recipe.model.config, tokenizer)
    # Tokenize before anything is written: rows that cannot be encoded are bad input too.
    streaming = plan.sources["train"].stream is not None  # a stream is tokenized as it is read
    train_features = None if streaming else tokenized(plan, accelerator, tokenizer, "train", training=True)
    validation_features = (tokenized(plan, accelerator, tokenizer, "validation", training=False)
                           if "validation" in plan.splits else None)
    start_output_dir(accelerator, recipe)
    start_trackers(accelerator, recipe)
    parts, evaluate, sizes = setup_training(plan, accelerator, strategy, tokenizer, train_features, validation_features)
    log.info(f"training {parts.total_steps} optimizer steps on {accelerator.num_processes} process(es)")
    latest = lambda: _latest(recipe.train.output_dir)
    with launch.collective_failures(recipe.train.ddp_timeout, latest):
        try:
            train_results = train(parts, recipe.train, latest)
        finally:
            parts.progress.close()
            parts.stop.uninstall()
        return finish(plan, parts, strategy, tokenizer, {**train_results, **sizes}, evaluate)


def start_output_dir(accelerator: Any, recipe: Recipe) -> None:
    """The first write of a run. Starting afresh removes only what the earlier run wrote."""
    output_dir = Path(recipe.train.output_dir)
    if accelerator.is_main_process:
        if recipe.train.overwrite_output_dir:
            run_dir.clear_previous(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        run_dir.start(output_dir)
        attach_log_file(output_dir)
        (output_dir / "recipe.yaml").write_text(recipe.dump_yaml())
    accelerator.wait_for_everyone()


def _latest(output_dir: str) -> str | None:
    latest = checkpoint.latest_checkpoint(Path(output_dir))
    return str(latest) if latest else None


def setup_training(plan: Plan, accelerator: Any, strategy: Strategy, tokenizer: Any, train_features: Any,
                   validation_features: Any):
    """Model, optimizer, loaders and schedule, prepared for the strategy and restored on resume.
    Returns the loop's parts, the validation evaluation (results, prediction rows) or None, and the
    trainable and total parameter counts."""
    from hftk.train import fast_dropout
    from hftk.train.mfu import flop_counter, peak_flops, training_dtype
    from hftk.train.optim import build_optimizer, build_scheduler, total_optimizer_steps
    from hftk.train.preemption import StopFlag
    from hftk.train.progress import start_progress
    from hftk.train.state import TrainState

    recipe, settings = plan.recipe, plan.recipe.train
    output_dir = Path(settings.output_dir)
    with launch.model_construction(accelerator):
        model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer,
                                   adapters.quantized_loading(recipe.lora, accelerator.device))
    if plan.adapter is not None:  # before prepare(): DDP and the optimizer see only what trains
        model = adapters.wrap(model, plan.adapter, recipe.model.gradient_checkpointing)
    sizes = adapters.count_parameters(model)
    if fast_dropout.applies(settings, recipe.model, accelerator.device):
        fast_dropout.install(model)
    route_packed_inputs(plan, model)
    flops = flop_counter(model, plan.encoding.family)  # before sharding: every process counts the whole model
    if plan.precision is not None:  # not earlier: bad input ends with its one line alone
        log.info(plan.precision.line())
    log.info(f"trainable parameters: {sizes['trainable_parameters']:,} of {sizes['total_parameters']:,} "
             f"({sizes['trainable_parameters'] / max(sizes['total_parameters'], 1):.2%})")
    launch.apply_recipe_to_deepspeed(accelerator, settings.max_grad_norm)
    collator = train_collator(plan, tokenizer, model)
    if plan.sources["train"].stream is not None:
        loader = plan.train_order = stream_loader(plan, accelerator, tokenizer, collator,
                                                  strategy.data_processes(accelerator))
    else:
        loader = train_loader(plan, train_features, collator, strategy.data_processes(accelerator))
    model, optimizer, loader = strategy.prepare(accelerator, model, lambda m: build_optimizer(m, settings), loader)
    total_steps = total_optimizer_steps(settings, len(loader))
    # Not passed to prepare(): Accelerate would step it once per process per optimizer step.
    scheduler = build_scheduler(optimizer, settings, total_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if hasattr(loader, "position"):  # a stream's position in every process
        accelerator.register_for_checkpointing(loader.position)
    forward = (lambda row: log_row(accelerator, row)) if settings.report_to else None
    metrics_log = MetricsLog(output_dir, accelerator.is_main_process, forward)
    def restore(folder: str) -> None:
        accelerator.load_state(str(folder))
        strategy.load_extra(accelerator, Path(folder), model, optimizer)
        metrics_log.truncate_after(state.optimizer_step)

    if plan.resume_from is not None:
        log.info(f"resuming from {plan.resume_from}")
        restore(plan.resume_from)
    else:
        metrics_log.truncate_after(-1)  # a fresh start (also "latest" with nothing saved yet), step 0 included
    restarted_attempt(metrics_log, state, plan.resume_from)

    evaluate = None
    if validation_features is not None:
        validation = eval_loader(plan, accelerator, model, tokenizer, validation_features,
                                 lambda loader: strategy.prepare_loader(accelerator, loader))

        def evaluate() -> tuple[dict[str, float], list[dict]]:
            return evaluate_split(plan, accelerator, model, tokenizer, "validation", validation)

    def evaluate_on_start() -> dict[str, float]:
        scores, rows = evaluate()
        if accelerator.is_main_process:  # kept for paired comparisons against the fine-tuned model
            write_jsonl(output_dir / comparison.START_PREDICTIONS, rows)
        return scores

    def save() -> str:
        return str(checkpoint.save_checkpoint(
            accelerator, output_dir, state.optimizer_step, recipe.dump_yaml(), settings.save_total_limit,
            lambda folder: strategy.save_extra(accelerator, folder, model, optimizer), plan.train_digest,
            keep_step=state.best_step if settings.load_best_model_at_end else None,
            precision=plan.precision.mixed_precision if plan.precision else None))

    progress = start_progress(accelerator.is_main_process, total_steps, state.optimizer_step)
    parts = LoopParts(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                      family=plan.encoding.family, total_steps=total_steps, state=state, metrics_log=metrics_log,
                      evaluate=evaluate and (lambda: evaluate()[0]), save=save, stop=StopFlag().install(),
                      progress=progress, counts_tokens=strategy.counts_tokens, flops=flops,
                      peak_flops=peak_flops(accelerator.device, training_dtype(accelerator)),
                      evaluate_on_start=evaluate_on_start if evaluate and recipe.evaluates_on_start() else None,
                      restore=restore, window_examples=lambda *where: window_examples(accelerator, loader, *where))
    return parts, evaluate, sizes


def restarted_attempt(metrics_log: MetricsLog, state: Any, resumed: Path | None) -> None:
    """A launcher's restart (torch elastic's --max_restarts, a SLURM requeue) says so: a log line and a
    metrics.jsonl row with the restart count and what it resumed from."""
    count = launch.restart_count()
    if not count:
        return
    source = resumed.name if resumed is not None else None
    log.info(f"restart {count} of this launch: {f'resumed from {source}' if source else 'nothing was saved yet; started afresh'} "
                f"at optimizer step {state.optimizer_step}")
    metrics_log.write({"step": state.optimizer_step, "restart": count, "resumed_from": source})


def window_examples(accelerator: Any, loader: Any, epoch: int, position: int, count: int) -> list[int] | None:
    """The training features (dataset indices) of `count` micro-batches from `position` in `epoch`, on every
    process, as the loader's sampler orders them; None where the loader has no sampler to ask (a stream)."""
    import itertools

    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None or not hasattr(loader, "set_epoch"):
        return None
    loader.set_epoch(epoch)  # the loop sets it again before it iterates
    mine = [int(i) for batch in itertools.islice(iter(batch_sampler), position, position + count) for i in batch]
    if accelerator.num_processes == 1:
        return mine
    import torch.distributed as dist

    every: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(every, mine)
    return sorted({i for indices in every for i in indices})


def finish(plan: Plan, parts: LoopParts, strategy: Strategy, tokenizer: Any, train_results: dict,
           evaluate: Any) -> dict[str, Any]:
    """The final checkpoint, the last evaluation, the best checkpoint's weights where asked, the whole
    model, results and the model card."""
    recipe, accelerator, model, state = plan.recipe, parts.accelerator, parts.model, parts.state
    output_dir = Path(recipe.train.output_dir)
    parts.save()
    results = dict(train_results)
    results["train_examples_by_source"] = drawn_by_source(plan, state, recipe.train.per_device_train_batch_size
                                                          * strategy.data_processes(accelerator))
    if hasattr(parts.loader, "bad_rows_skipped"):  # a stream's rows past the judged head
        results["train_bad_rows_skipped"] = parts.loader.bad_rows_skipped()
    rows = None
    if evaluate is not None:
        eval_results, rows = evaluate()
        parts.metrics_log.write({"step": state.optimizer_step, **eval_results})
        record_evaluation(state, recipe.train, eval_results, checkpointed=True)
        if recipe.train.load_best_model_at_end and state.best_step != state.optimizer_step:
            restore_best(parts, strategy, recipe.train)
            eval_results, rows = evaluate()  # what the saved model scores, predictions included
        results.update(eval_results)
        results.update(best_figures(state))
    save = adapters.save_adapter if plan.adapter is not None else save_model
    try:
        save(accelerator, accelerator.unwrap_model(model), strategy.full_state_dict(accelerator, model),
             tokenizer, output_dir)
    except OSError as err:
        raise RunError(f"cannot write the final model in {output_dir}: {err.strerror or err}; "
                       f"the final checkpoint is complete") from None
    if accelerator.is_main_process:
        if rows is not None:
            write_jsonl(output_dir / "predictions.jsonl", rows)
        if plan.adapter is not None and recipe.lora.merge:
            # a fresh config: loading the training base may have resized its vocabulary in place
            base = models.build_model(recipe.model, models.resolve_config(recipe.model), plan.encoding, tokenizer)
            log.info(f"merged model saved in {adapters.save_merged(output_dir, base, tokenizer)}")
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_training_curves(output_dir, parts.total_steps)  # the steps its learning-rate schedule spans
        sources = [source.path for key in ("train", "validation") for source in recipe.data.sources(key)]
        evaluated = recipe.data.sources("validation")[:1]
        hub.write_model_card(output_dir, recipe.task, recipe.dump_yaml(), results, recipe.model.name_or_path,
                             plan.encoding.auto_class, adapter=plan.adapter is not None, datasets=sources,
                             eval_dataset=evaluated[0].path if evaluated else None,
                             eval_split=(evaluated and evaluated[0].split) or "validation",
                             model_ref=recipe.hub.repo_id if recipe.hub and recipe.hub.push else None,
                             rollbacks=state.rollbacks,
                             **before_and_after(plan, output_dir))
        run_dir.mark_finished(output_dir)
        url = hub.push_finished_run(recipe.hub, output_dir)
        if url:
            log.info(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def drawn_by_source(plan: Plan, state: Any, global_batch: int) -> dict[str, int]:
    """Training examples (features: a QA window, a text block) drawn from each source, by label."""
    from hftk.train.mixing import examples_by_source

    split = plan.sources["train"]
    if getattr(split, "stream", None) is not None:  # a stream counts what it read
        return {split.parts[0].label: plan.train_order.examples_drawn()}
    return examples_by_source([part.label for part in split.parts], split.feature_sizes, plan.train_order,
                              state.epoch, state.batches_in_epoch, global_batch)


def restore_best(parts: LoopParts, strategy: Strategy, settings: Any) -> None:
    """Load the best checkpoint's weights; the loop's own position stays that of the end of training."""
    state = parts.state
    folder = checkpoint.checkpoint_at(Path(settings.output_dir), state.best_step)
    if folder is None:
        raise RunError(f"the best checkpoint (optimizer step {state.best_step}) is gone from {settings.output_dir}")
    position = state.state_dict()
    parts.accelerator.load_state(str(folder))
    strategy.load_extra(parts.accelerator, folder, parts.model, parts.optimizer)
    state.load_state_dict(position)
    log.info(f"loaded the best checkpoint {folder.name} ({settings.metric_for_best_model}={state.best_metric:.4g})")


def save_model(accelerator: Any, model: Any, state_dict: dict, tokenizer: Any, output_dir: Path) -> None:
    model.save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def before_and_after(plan: Plan, output_dir: Path) -> dict[str, Any]:
    """The card's step-0 section: the step-0 row of metrics.jsonl and the final predictions paired against
    predictions_step0.jsonl (nothing without train.eval_on_start)."""
    from hftk.report import read_metrics

    before = next((row for row in read_metrics(output_dir) if row.get("step") == 0 and "eval_loss" in row), None)
    if before is None:
        return {}
    settings = comparison.Settings(plan.recipe.eval.bootstrap_samples or comparison.DEFAULT_SAMPLES,
                                   plan.recipe.eval.bootstrap_seed)
    return {"before": before, "paired": comparison.against_start(output_dir, plan.task, settings)}
