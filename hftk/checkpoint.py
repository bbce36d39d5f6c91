"""Atomic checkpoints: Accelerate's save_state into a temporary folder, a manifest, then a rename.

A checkpoint counts only when its manifest says it is complete, so a crash during a save leaves
the earlier ones as they were, and "latest" is read from manifests, never guessed from names.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from hftk.errors import UserError

MANIFEST = "hftk_checkpoint.json"
PREFIX = "checkpoint-"
FINISHED_MARKERS = ("all_results.json", "config.json", "model.safetensors", "adapter_config.json")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("complete") is True else None


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(optimizer step, folder) of every complete checkpoint, oldest first."""
    found = []
    if Path(output_dir).is_dir():
        for folder in Path(output_dir).iterdir():
            manifest = read_manifest(folder) if folder.is_dir() and folder.name.startswith(PREFIX) else None
            if manifest is not None:
                found.append((int(manifest["optimizer_step"]), folder))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def holds_previous_run(output_dir: Path) -> bool:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return False
    return any((output_dir / m).exists() for m in FINISHED_MARKERS) or any(
        p.name.startswith(PREFIX) for p in output_dir.iterdir()
    )


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh start), "latest" or a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)  # None: nothing saved yet, start from the beginning
    folder = Path(resume)
    if not folder.is_dir():
        raise UserError(f"train.resume_from_checkpoint: no such checkpoint folder: {resume}")
    if read_manifest(folder) is None:
        raise UserError(f"train.resume_from_checkpoint: {resume} is not a complete hftk checkpoint (no complete {MANIFEST})")
    return folder


def save_checkpoint(accelerator: Any, output_dir: Path, optimizer_step: int, recipe_yaml: str,
                    save_total_limit: int | None, save_extra: Callable[[Path], None] | None = None) -> Path:
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{optimizer_step}"
    partial = output_dir / f".{PREFIX}{optimizer_step}.partial"
    started = time.perf_counter()
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every process writes its own RNG state
    if save_extra is not None:
        save_extra(partial)  # what Accelerate does not hold: sharded CPU-FSDP states, comm hook state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "recipe.yaml").write_text(recipe_yaml)
        manifest = {"complete": True, "optimizer_step": optimizer_step, "saved_at": time.time(),
                    "num_processes": accelerator.num_processes, "versions": library_versions()}
        _write_synced(partial / MANIFEST, json.dumps(manifest, indent=2))
        if final.exists():  # a rerun that reached the same step again
            shutil.rmtree(final)
        os.replace(partial, final)
        _prune(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _prune(output_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    for _, folder in complete_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(folder, ignore_errors=True)


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import transformers

    import hftk

    return {"hftk": hftk.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__}
