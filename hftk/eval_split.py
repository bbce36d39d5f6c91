"""Evaluation of a split (during training and by `hftk eval`), predictions and samples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hftk import intervals
from hftk.errors import UserError
from hftk.logs import log
from hftk.preflight import Plan, plan_inputs, saved_run_precision
from hftk.prepare import eval_loader, make_accelerator, tokenized
from hftk.recipe import Recipe
from hftk.tasks.base import ENCODER_ONLY


def evaluate_split(plan: Plan, accelerator: Any, model: Any, tokenizer: Any, key: str,
                   loader: Any) -> tuple[dict[str, float], list[dict]]:
    from hftk.train.evaluation import run_evaluation

    recipe, task = plan.recipe, plan.task
    raw = plan.splits[key]
    rows = raw[:]
    loss, by_index, example_losses = run_evaluation(accelerator, model, loader, tokenizer, task, plan.encoding.family,
                                                    recipe.eval, rows, recipe.data)
    results = {"eval_loss": loss}
    if plan.encoding.family != ENCODER_ONLY:
        results["eval_perplexity"] = math.exp(min(loss, 50.0))  # capped: exp overflows past ~700
    id_column = recipe.data.id_column or "id"
    ids = rows[id_column] if id_column in rows else list(range(len(raw)))
    losses = sorted(example_losses.items())
    statistics = intervals.loss_statistics([s for _, (s, _) in losses], [c for _, (_, c) in losses])
    if by_index:
        references = task.references(rows, recipe.data)
        order = range(len(raw))
        texts = [by_index.get(i, "") for i in order]  # an example with no prediction scores as empty
        scores = task.compute_metrics(texts, references, recipe.eval.metric_source)
        results.update({f"eval_{k}": v for k, v in scores.items()})
        examples = task.example_scores(texts, references)
        predictions = [{"id": ids[i], "prediction": texts[i], "reference": references[i],
                        **({"scores": examples[i]} if examples[i] else {})} for i in order]
        statistics.update(intervals.score_statistics(examples))
        statistics.update(task.corpus_statistics(texts, references))
    else:
        # No text to score: the loss is the metric, and each example's share of it is kept.
        predictions = [{"id": ids[i], "scores": intervals.loss_scores(*example)} for i, example in losses]
    results["eval_samples"] = len(raw)
    if recipe.eval.bootstrap_samples and recipe.eval.metric_source == "local":
        found = intervals.intervals({k: v for k, v in statistics.items() if f"eval_{k}" in results},
                                    recipe.eval.bootstrap_samples, recipe.eval.bootstrap_seed)
        results.update({f"eval_{name}_ci95": bounds for name, bounds in found.items()})
    results.update(_by_source(plan, key, rows, example_losses, by_index))
    return results, predictions


def _by_source(plan: Plan, key: str, rows: dict[str, list[Any]], example_losses: dict[int, Any],
               by_index: dict[int, str]) -> dict[str, float]:
    """Each source of a list scored alone, as eval_<label>_<metric> (its rows are a range of the split)."""
    from hftk.sources import metric_label

    split = plan.sources.get(key)
    if split is None or not split.several:
        return {}
    recipe, task = plan.recipe, plan.task
    results: dict[str, float] = {}
    for label, start, end in split.row_ranges():
        name = f"eval_{metric_label(label)}"
        sums = [example_losses[i] for i in range(start, end) if i in example_losses]
        loss = sum(s for s, _ in sums) / max(sum(c for _, c in sums), 1)
        results[f"{name}_loss"] = float(loss)
        if plan.encoding.family != ENCODER_ONLY:
            results[f"{name}_perplexity"] = math.exp(min(loss, 50.0))
        if by_index:
            part = {column: values[start:end] for column, values in rows.items()}
            texts = [by_index.get(i, "") for i in range(start, end)]
            scores = task.compute_metrics(texts, task.references(part, recipe.data), recipe.eval.metric_source)
            results.update({f"{name}_{k}": v for k, v in scores.items()})
        results[f"{name}_samples"] = end - start
    return results


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


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

    from hftk import adapters, models
    from hftk.tokenizer import with_pad_token

    model_dir = model_dir or recipe.train.output_dir
    adapter = adapters.is_adapter(model_dir)
    if not adapter and not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model: {model_dir} holds no saved model (no config.json or {adapters.ADAPTER_CONFIG})")
    if getattr(recipe.data, split, None) is None:
        raise UserError(f"--split: the recipe has no data.{split}")
    # An adapter is evaluated on the base its adapter_config.json names.
    plan = plan_inputs(recipe, [split], model_dir=adapters.base_of(model_dir) if adapter else model_dir)
    precision = saved_run_precision(plan, model_dir)
    accelerator = make_accelerator(recipe.train, precision)
    log.info(precision.line())
    tokenizer = with_pad_token(transformers.AutoTokenizer.from_pretrained(model_dir))
    if adapter:
        base_section = recipe.model.model_copy(update={"name_or_path": adapters.base_of(model_dir), "config": None,
                                                       "tokenizer": None})
        base = models.build_model(base_section, plan.config, plan.encoding, tokenizer)
        model = adapters.load_adapter(model_dir, base)
    else:
        model = getattr(transformers, plan.encoding.auto_class).from_pretrained(model_dir)
    model = accelerator.prepare(model)
    loader = eval_loader(plan, accelerator, model, tokenizer, tokenized(plan, accelerator, tokenizer, split, False))
    results, rows = evaluate_split(plan, accelerator, model, tokenizer, split, loader)
    # A run's own predictions.jsonl and results stay as training left them.
    target = Path(output_dir) if output_dir else Path(model_dir) / "eval" / split
    if accelerator.is_main_process:
        target.mkdir(parents=True, exist_ok=True)
        (target / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_jsonl(target / "predictions.jsonl", rows)
        if prompts:
            write_jsonl(target / "samples.jsonl", sample_continuations(
                accelerator.unwrap_model(model), tokenizer, prompts, recipe.eval, temperature))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
