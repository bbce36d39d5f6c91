"""Experiment trackers (train.report_to) through Accelerate: checked at plan time, started with the
resolved recipe as their config, and continued, not restarted, by a resumed run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from hftk import run_dir
from hftk.errors import UserError

# tracker name -> the module Accelerate imports for it, and the pip package that provides it
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow")}
LOGGING_DIR = "runs"  # tensorboard event files: output_dir/runs/<run name>/


def check_installed(names: list[str]) -> None:
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"train.report_to: {', '.join(missing)} {verb} not installed; "
                        f"pip install {' '.join(PACKAGES[name][1] for name in missing)}")


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The recipe as tracker hyperparameters: dotted keys, scalar values (lists as JSON text)."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flat_config(value, f"{prefix}.{key}" if prefix else key))
        return flat
    if isinstance(tree, (list, tuple)):
        return {prefix: json.dumps(tree)}
    return {} if tree is None else {prefix: tree}


def start_trackers(accelerator: Any, recipe: Any) -> None:
    """The same run name (and, where a tracker has one, run id) every time this output_dir trains, so a
    resume appends to the tracker run it interrupted."""
    names = list(recipe.train.report_to)
    if not names:
        return
    output_dir = Path(recipe.train.output_dir)
    manifest = run_dir.read(output_dir) or {}
    run_name, run_id = output_dir.name, manifest.get("run_id", "")
    saved_ids = manifest.get("tracker_ids", {})
    init_kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {"id": run_id, "resume": "allow", "name": run_name, "dir": str(output_dir)}
    if "trackio" in names:
        init_kwargs["trackio"] = {"name": run_id, "resume": "allow"}
    if "mlflow" in names:
        init_kwargs["mlflow"] = {"run_name": run_name, **({"run_id": saved_ids["mlflow"]} if "mlflow" in saved_ids else {})}
    accelerator.init_trackers(run_name, config=flat_config(recipe.to_dict()), init_kwargs=init_kwargs)
    if "mlflow" in names and accelerator.is_main_process:
        mlflow_run = accelerator.get_tracker("mlflow", unwrap=True)
        run_dir.update(output_dir, tracker_ids={**saved_ids, "mlflow": mlflow_run.info.run_id})


def log_row(accelerator: Any, row: dict[str, Any]) -> None:
    """A metrics.jsonl row to every tracker, at its optimizer step (numbers only)."""
    values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(values, step=row["step"])
