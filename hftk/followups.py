"""The commands a finetune hands back to its user, ready to paste: how to continue a stopped run, and
what to run after a finished one. Built from what the user typed (the recipe and its overrides)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

# Overrides that say how a run starts; continuing sets its own.
START_KEYS = ("train.resume_from_checkpoint", "train.overwrite_output_dir")


def launched() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _kept(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o.partition("=")[0].strip() not in START_KEYS]


def continue_command(recipe_path: Path, overrides: list[str], recipe: Any = None) -> str:
    """What to run to continue a run stopped after its checkpoint, shell-quoted; under a launcher, the
    part after the launcher's own options."""
    args = [str(recipe_path), *_kept(overrides)]
    if recipe is not None and recipe.train.overwrite_output_dir:  # the recipe's own, which excludes resuming
        args.append("train.overwrite_output_dir=false")
    args.append("train.resume_from_checkpoint=latest")
    if launched():
        return f"rerun the same launcher line with: -m {shlex.join(['hftk', 'finetune', *args])}"
    return f"to continue, run: {shlex.join(['hftk', 'finetune', *args])}"


def finished_line(recipe_path: Path, overrides: list[str], output_dir: str) -> str:
    """The one line a finished finetune ends with: where its outputs are, and the next commands."""
    evaluate = shlex.join(["hftk", "eval", str(recipe_path), *_kept(overrides)])
    folder = shlex.quote(str(output_dir))
    return (f"hftk: done: model, all_results.json and model card (README.md) in {output_dir}; next: {evaluate} | "
            f"hftk report {folder} | hftk push {folder} --repo-id USER/NAME")
