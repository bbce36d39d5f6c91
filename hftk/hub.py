"""Model cards and uploads through huggingface_hub (main process only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hftk.errors import UserError

CARD_TEMPLATE = """---
{card_data}
---

# {title}

Fine-tuned with hftk for **{task}**.

## Evaluation

| metric | value |
| --- | --- |
{metric_rows}

## Training

| figure | value |
| --- | --- |
{training_rows}

## Training recipe

```yaml
{recipe}```

## Use

```python
from transformers import AutoTokenizer, {auto_class}

tokenizer = AutoTokenizer.from_pretrained("{model_ref}")
model = {auto_class}.from_pretrained("{model_ref}")
```
"""

PIPELINE_TASKS = {
    "summarization": "summarization", "translation": "translation", "generative_qa": "text2text-generation",
    "extractive_qa": "question-answering", "text_generation": "text-generation", "dialogue": "text-generation",
}


def write_model_card(output_dir: Path, task: str, recipe_yaml: str, results: dict[str, Any], base_model: str | None,
                     auto_class: str, model_ref: str | None = None) -> None:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="transformers", tags=["hftk", task], base_model=base_model,
                         pipeline_tag=PIPELINE_TASKS.get(task))
    evaluation = {k: v for k, v in results.items() if k.startswith("eval_")}
    training = {k: v for k, v in results.items() if k not in evaluation}
    card = CARD_TEMPLATE.format(
        card_data=data.to_yaml(), title=Path(output_dir).name, task=task, metric_rows=_table_rows(evaluation),
        training_rows=_table_rows(training), recipe=recipe_yaml,
        auto_class=auto_class, model_ref=model_ref or str(output_dir),
    )
    (Path(output_dir) / "README.md").write_text(card)


def _table_rows(figures: dict[str, Any]) -> str:
    if not figures:
        return "| - | - |"
    return "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(figures.items()))


def push_run(run_dir: Path, repo_id: str, private: bool, token: str | None, api: Any = None) -> str:
    """Upload a finished run (model, tokenizer, card, results); checkpoints and partial files stay local."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "all_results.json").is_file():
        raise UserError(f"{run_dir} is not a finished hftk run (config.json and all_results.json are missing)")
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(run_dir), repo_id=repo_id, commit_message="Upload model trained with hftk",
            ignore_patterns=["checkpoint-*", ".checkpoint-*", "*.partial/*", "metrics.jsonl"],
        )
    except Exception as err:  # noqa: BLE001 - network, auth and repo errors end the same way for the user
        raise UserError(f"push to {repo_id} failed: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    return str(url)


def read_results(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "all_results.json").read_text())
