"""Model cards and uploads through huggingface_hub (main process only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hftk.errors import UserError

CARD_BODY = """
# {title}

Fine-tuned with hftk for **{task}**{base_line}.

## Evaluation

| metric | value | 95% interval |
| --- | --- | --- |
{metric_rows}
{interval_note}{start_section}
## Training

| figure | value |
| --- | --- |
{training_rows}
{rollback_lines}
## Training recipe

```yaml
{recipe}```

## Use

```python
{usage}```
"""

# The Hub's task ids (pipeline_tag and model-index task type) for each hftk task.
PIPELINE_TASKS = {
    "summarization": "summarization", "translation": "translation", "generative_qa": "text2text-generation",
    "extractive_qa": "question-answering", "text_generation": "text-generation", "dialogue": "text-generation",
}
DECODER_ONLY_PIPELINE_TASKS = {"summarization", "translation", "generative_qa"}  # prompt + continuation

# Counts, not scores: they stay in all_results.json and out of model-index.
NOT_METRICS = {"eval_samples"}
INTERVAL_SUFFIX = "_ci95"  # eval_<metric>_ci95: [low, high], beside eval_<metric>

INTERVAL_NOTE = """
Intervals: 95% percentile bootstrap over the {examples} evaluated examples (BLEU and chrF through
sacreBLEU's resampling of sentence statistics).
"""

START_SECTION = """
## Before and after fine-tuning

The checkpoint training started from (step 0) against the fine-tuned model, on the same examples:
the difference (after - before), its 95% paired bootstrap interval and the p-value of a paired
approximate randomization test ("yes": significant at 0.05).

| metric | before | after | difference | 95% interval | p | significant |
| --- | --- | --- | --- | --- | --- | --- |
{rows}
"""

GENERATE_USAGE = """\
from transformers import AutoTokenizer{import_line}

tokenizer = AutoTokenizer.from_pretrained("{ref}")
model = {model_class}.from_pretrained("{ref}")
inputs = tokenizer("{prompt}", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0{cut}], skip_special_tokens=True))
"""

SPAN_USAGE = """\
import torch
from transformers import AutoTokenizer{import_line}

tokenizer = AutoTokenizer.from_pretrained("{ref}")
model = {model_class}.from_pretrained("{ref}")
inputs = tokenizer("Who wrote it?", "The report was written by Ada.", return_tensors="pt")
with torch.no_grad():
    output = model(**inputs)
start, end = int(output.start_logits.argmax()), int(output.end_logits.argmax())
print(tokenizer.decode(inputs["input_ids"][0, start:end + 1]))
"""


def is_hub_id(name: str | None) -> bool:
    """A Hub repository id, not a local path (which would mean nothing to a reader of the card)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def usage_snippet(auto_class: str, model_ref: str, adapter: bool, task: str) -> str:
    """Code that runs with transformers 5: a model class and generate() (its pipelines for
    summarization, translation and QA are gone)."""
    model_class = auto_class.replace("AutoModel", "AutoPeftModel") if adapter else auto_class
    import_line = f"\nfrom peft import {model_class}" if adapter else f", {model_class}"
    if auto_class == "AutoModelForQuestionAnswering":
        return SPAN_USAGE.format(import_line=import_line, ref=model_ref, model_class=model_class)
    decoder = auto_class == "AutoModelForCausalLM"
    return GENERATE_USAGE.format(import_line=import_line, ref=model_ref, model_class=model_class,
                                 prompt="Your text here" if task != "translation" else "The house is small.",
                                 cut=", inputs['input_ids'].shape[1]:" if decoder else "")


def eval_results(results: dict[str, Any], task: str, dataset: str, dataset_type: str, split: str) -> list[Any]:
    """One model-index entry per eval_* score in all_results.json."""
    from huggingface_hub import EvalResult

    task_type = PIPELINE_TASKS.get(task, task)
    return [EvalResult(task_type=task_type, dataset_type=dataset_type, dataset_name=dataset, dataset_split=split,
                       metric_type=key.removeprefix("eval_"), metric_name=key, metric_value=value)
            for key, value in sorted(results.items())
            if key.startswith("eval_") and key not in NOT_METRICS and isinstance(value, (int, float))]


def write_model_card(output_dir: Path, task: str, recipe_yaml: str, results: dict[str, Any], base_model: str | None,
                     auto_class: str, model_ref: str | None = None, *, adapter: bool = False,
                     datasets: list[str] | None = None, eval_dataset: str | None = None,
                     eval_split: str = "validation", before: dict[str, Any] | None = None,
                     paired: list[Any] | None = None, rollbacks: list[dict] | None = None) -> None:
    """README.md with Hub metadata: model-index from the eval_* results, base model and datasets
    only where they are Hub ids, library peft for an adapter. `before` (the step-0 evaluation) and
    `paired` (hftk.comparison.Comparison of the final predictions against step 0's) add the section
    on what fine-tuning changed."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    title = output_dir.name
    hub_base = base_model if is_hub_id(base_model) else None
    dataset = eval_dataset or "local"
    data = ModelCardData(
        model_name=title, library_name="peft" if adapter else "transformers",
        tags=["hftk", task] + (["lora"] if adapter else []), base_model=hub_base,
        datasets=[d for d in datasets or [] if is_hub_id(d)] or None, pipeline_tag=PIPELINE_TASKS.get(task),
        eval_results=eval_results(results, task, Path(dataset).name, dataset if is_hub_id(dataset) else "json",
                                  eval_split) or None,
    )
    evaluation = {k: v for k, v in results.items() if k.startswith("eval_")}
    training = {k: v for k, v in results.items() if k not in evaluation}
    has_intervals = any(k.endswith(INTERVAL_SUFFIX) for k in evaluation)
    body = CARD_BODY.format(
        title=title, task=task, base_line=f" from [{hub_base}](https://huggingface.co/{hub_base})" if hub_base else "",
        metric_rows=_metric_rows(evaluation), training_rows=_table_rows(training), recipe=recipe_yaml,
        interval_note=INTERVAL_NOTE.format(examples=results.get("eval_samples", "")) if has_intervals else "",
        start_section=_start_section(before or {}, results, paired or []),
        rollback_lines=_rollback_lines(rollbacks or []),
        usage=usage_snippet(auto_class, model_ref or str(output_dir), adapter, task),
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(output_dir / "README.md")
    write_eval_results(output_dir, results, eval_dataset, eval_split)


def _rollback_lines(rollbacks: list[dict]) -> str:
    """One line per rollback (train.on_divergence=rollback): where, why, and what was skipped."""
    def skipped(r: dict) -> str:
        count = len(r["skipped_examples"]) if r.get("skipped_examples") is not None else None
        return f"its {count} training examples" if count is not None else "that step's training examples"

    lines = [f"- at optimizer step {r['step']}: {r['reason']}; rolled back to {r['rolled_back_to']} and skipped "
             f"{skipped(r)}" for r in rollbacks]
    return "\nRollbacks past loss spikes:\n\n" + "\n".join(lines) + "\n" if lines else ""


EVAL_RESULTS = ".eval_results"


def write_eval_results(output_dir: Path, results: dict[str, Any], dataset: str | None, split: str) -> Path | None:
    """The Hub's current form of evaluation results (`.eval_results/*.yaml`, read beside the legacy
    model-index), written only for a Hub dataset: the entries name the dataset by its Hub id."""
    import yaml
    from huggingface_hub import EvalResultEntry, eval_result_entries_to_yaml

    if not is_hub_id(dataset):
        return None
    entries = [EvalResultEntry(dataset_id=dataset, task_id=key.removeprefix("eval_"), value=value,
                               notes=f"split {split}")
               for key, value in sorted(results.items())
               if key.startswith("eval_") and key not in NOT_METRICS and isinstance(value, (int, float))]
    if not entries:
        return None
    folder = Path(output_dir) / EVAL_RESULTS
    folder.mkdir(exist_ok=True)
    path = folder / f"{dataset.split('/')[-1]}.yaml"
    path.write_text(yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False))
    return path


def _metric_rows(evaluation: dict[str, Any]) -> str:
    scores = {k: v for k, v in evaluation.items() if not k.endswith(INTERVAL_SUFFIX)}
    if not scores:
        return "| - | - | - |"
    return "\n".join(f"| {k} | {_number(v)} | {_interval(evaluation.get(k + INTERVAL_SUFFIX))} |"
                     for k, v in sorted(scores.items()))


def _start_section(before: dict[str, Any], after: dict[str, Any], paired: list[Any]) -> str:
    """A row per metric of the step-0 evaluation: the paired test where the examples allow one."""
    tested = {f"eval_{c.metric}": c for c in paired}
    keys = [k for k in sorted(before) if k.startswith("eval_") and k not in NOT_METRICS
            and not k.endswith(INTERVAL_SUFFIX) and isinstance(after.get(k), (int, float))]
    if not keys:
        return ""
    rows = []
    for key in keys:
        test = tested.get(key)
        if test is None:
            rows.append(f"| {key} | {_number(before[key])} | {_number(after[key])} | "
                        f"{after[key] - before[key]:+.4f} | - | - | - |")
        else:
            rows.append(f"| {key} | {_number(test.a)} | {_number(test.b)} | {test.delta:+.4f} | "
                        f"{_interval(test.ci95)} | {test.p_value:.3g} | {'yes' if test.significant else 'no'} |")
    return START_SECTION.format(rows="\n".join(rows))


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _interval(bounds: Any) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]" if isinstance(bounds, (list, tuple)) and len(bounds) == 2 else "-"


def _table_rows(figures: dict[str, Any]) -> str:
    if not figures:
        return "| - | - |"
    return "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(figures.items()))


def push_run(run_dir: Path, repo_id: str, private: bool, token: str | None, api: Any = None,
             require_better_than: str | None = None, metric: str | None = None) -> str:
    """Upload a finished run (model, tokenizer, card, results); checkpoints and partial files stay local.
    With `require_better_than` (a run folder, or `start`), only a run significantly better on `metric`:
    otherwise a UserError, before any request."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    has_model = (run_dir / "config.json").is_file() or (run_dir / "adapter_config.json").is_file()
    if not has_model or not (run_dir / "all_results.json").is_file():
        raise UserError(f"{run_dir} is not a finished hftk run (config.json or adapter_config.json, and "
                        f"all_results.json, are missing)")
    if require_better_than:
        from hftk.comparison import gate

        gate(run_dir, require_better_than, metric)
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(run_dir), repo_id=repo_id, commit_message="Upload model trained with hftk",
            ignore_patterns=["checkpoint-*", ".checkpoint-*", "*.partial/*", "metrics.jsonl", "report.png"],
        )
    except Exception as err:  # noqa: BLE001 - network, auth and repo errors end the same way for the user
        raise UserError(f"push to {repo_id} failed: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    return str(url)


def check_push(settings: Any) -> None:
    """hub.push: refuse before training what could only fail after it (offline, no token)."""
    if settings is None or not settings.push:
        return
    other = settings.require_better_than
    if other and other != "start" and not (Path(other) / "predictions.jsonl").is_file():
        raise UserError(f"hub.require_better_than: {other} holds no predictions.jsonl to compare the run with; name a "
                        f"finished run folder, or `start`")
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"hub.push: HF_HUB_OFFLINE is set, so {settings.repo_id} cannot be pushed to; unset it or "
                        f"set hub.push=false (and run `hftk push` later)")
    if get_token() is None:
        raise UserError("hub.push: no Hugging Face token found; run `hf auth login` or set HF_TOKEN")


def push_finished_run(settings: Any, output_dir: Path, api: Any = None) -> str | None:
    """The recipe's hub section after training (main process only); None when it asks for no push, or
    when hub.require_better_than refuses it (one line: the run itself is done and ends well)."""
    if settings is None or not settings.push:
        return None
    from huggingface_hub import get_token

    from hftk.errors import RunError

    if settings.require_better_than:
        from hftk.comparison import gate
        from hftk.logs import log

        try:
            passed = gate(output_dir, settings.require_better_than, settings.require_better_on)
        except UserError as err:
            log.warning(f"{err}; not pushed (the run is saved in {output_dir})")
            return None
        log.info(f"push gate passed: {passed.sentence()}")

    try:
        return push_run(output_dir, settings.repo_id, settings.private, token=get_token(), api=api)
    except UserError as err:  # the run itself is saved: not bad input any more
        raise RunError(f"{err}; the run is saved in {output_dir}: `hftk push {output_dir} --repo-id "
                       f"{settings.repo_id}` uploads it later") from None


def read_results(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "all_results.json").read_text())
