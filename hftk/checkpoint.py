"""Atomic checkpoints: Accelerate's save_state into a temporary folder, a manifest, then a rename.

A checkpoint counts only when its manifest says it is complete, so a crash during a save leaves
the earlier ones as they were, and "latest" is read from manifests, never guessed from names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from hftk.errors import RunError, UserError
from hftk.precision import Resolved, resolve_precision

MANIFEST = "hftk_checkpoint.json"
PREFIX = "checkpoint-"


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


def checkpoint_at(output_dir: Path, optimizer_step: int) -> Path | None:
    return next((folder for step, folder in complete_checkpoints(output_dir) if step == optimizer_step), None)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def damage(folder: Path) -> str | None:
    """Why a complete checkpoint can no longer be read (a file gone or cut short), or None."""
    manifest = read_manifest(folder) or {}
    sizes = manifest.get("files")
    if sizes is None:  # written before sizes were recorded: read the safetensors headers instead
        return _safetensors_damage(folder)
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written"
    return None


def _safetensors_damage(folder: Path) -> str | None:
    from hftk.models import weights_problem  # the same header check a model folder gets

    for path in sorted(folder.rglob("*.safetensors")):
        problem = weights_problem(path)
        if problem:
            return f"{path.relative_to(folder)} {problem}"
    return None


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh start), "latest" (the newest intact one) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        return _latest_intact(Path(output_dir))
    folder = Path(resume)
    if not folder.is_dir():
        raise UserError(f"train.resume_from_checkpoint: no such checkpoint folder: {resume}")
    if read_manifest(folder) is None:
        raise UserError(f"train.resume_from_checkpoint: {resume} is not a complete hftk checkpoint (no complete {MANIFEST})")
    problem = damage(folder)
    if problem:
        raise UserError(f"train.resume_from_checkpoint: {resume} is damaged: {problem}")
    return folder


def _latest_intact(output_dir: Path) -> Path | None:
    """The newest checkpoint whose files are whole; a damaged newer one is named and passed over."""
    from hftk.logs import log

    found = complete_checkpoints(output_dir)
    damaged = []
    for _, folder in reversed(found):
        problem = damage(folder)
        if problem is None:
            if damaged:
                log.warning(f"{damaged[0][0].name} is damaged ({damaged[0][1]}); resuming from {folder.name}, "
                            f"the newest intact checkpoint")
            return folder
        damaged.append((folder, problem))
    if damaged:
        raise UserError(f"train.resume_from_checkpoint: every checkpoint in {output_dir} is damaged "
                        f"({damaged[0][0].name}: {damaged[0][1]}); start afresh with train.overwrite_output_dir=true")
    return None  # nothing saved yet: start from the beginning


def save_checkpoint(accelerator: Any, output_dir: Path, optimizer_step: int, recipe_yaml: str,
                    save_total_limit: int | None, save_extra: Callable[[Path], None] | None = None,
                    data_digest: str | None = None, keep_step: int | None = None,
                    precision: str | None = None) -> Path:
    """precision: what the run trains in, train.bf16 resolved (hftk.precision); a resume compares it."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{optimizer_step}"
    partial = output_dir / f".{PREFIX}{optimizer_step}.partial"
    started = time.perf_counter()
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))  # every process writes its own RNG state
        if save_extra is not None:
            save_extra(partial)  # what Accelerate does not hold: sharded CPU-FSDP states, comm hook state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / "recipe.yaml").write_text(recipe_yaml)
            manifest = {"complete": True, "optimizer_step": optimizer_step, "saved_at": time.time(),
                        "write_seconds": round(time.perf_counter() - started, 3),
                        "num_processes": accelerator.num_processes,
                        "precision": precision or str(accelerator.mixed_precision), "versions": library_versions(),
                        "train_data": data_digest, "files": _file_sizes(partial)}
            _write_synced(partial / MANIFEST, json.dumps(manifest, indent=2))
            if final.exists():  # a rerun that reached the same step again
                shutil.rmtree(final)
            os.replace(partial, final)
            _prune(output_dir, save_total_limit, keep_step)
    except (OSError, SafetensorError) as err:  # disk full, quota, permissions: earlier checkpoints stay
        shutil.rmtree(partial, ignore_errors=True)
        reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[-1]
        raise RunError(f"cannot write {final.name} in {output_dir}: {reason}; earlier checkpoints are intact") from None
    accelerator.wait_for_everyone()
    return final


def _file_sizes(folder: Path) -> dict[str, int]:
    """What a resume checks, so a checkpoint cut short later (a copy, a full disk) is not trusted."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def check_writable(output_dir: Path) -> None:
    """Try, rather than guess from permission bits (root ignores them, quotas do not show)."""
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"train.output_dir: {existing} is a file, so {output_dir} cannot be created")
    try:
        probe = tempfile.mkdtemp(prefix=".hftk-write-probe-", dir=existing)
    except OSError as err:
        raise UserError(f"train.output_dir: cannot write in {existing}: {err.strerror or err}") from None
    os.rmdir(probe)


# Settings that may change between a run and its resumption: they do not touch the trajectory.
FREE_ON_RESUME = (
    "train.output_dir", "train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_total_limit",
    "train.resume_from_checkpoint", "train.overwrite_output_dir", "train.dataloader_num_workers",
    "data.train",  # where the rows live may change; the rows themselves are compared by digest
    "data.validation", "data.test", "data.max_eval_samples", "data.preprocessing_num_workers", "eval",
    "data.stream_check_rows",  # how much of a stream is judged up front; later bad rows are skipped anyway
    # what is reported, kept, saved or uploaded, not how the weights move
    "train.report_to", "hub", "lora.merge", "train.load_best_model_at_end", "train.metric_for_best_model",
    "train.greater_is_better", "train.early_stopping_patience", "train.early_stopping_threshold",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


# Compared as what they resolve to, not as written (train.bf16=auto may resolve to a saved false).
RESOLVED_ON_RESUME = ("train.bf16",)


def saved_precision(folder: Path) -> str:
    """What a checkpoint trained in, as Accelerate names it ("bf16", "fp16", "no"): its manifest's record.
    One saved before the record trained as its recipe.yaml's train.bf16 (true or false, false when absent:
    the default then) resolves: false is the launcher's mixed_precision, fp32 unless it sets one."""
    import yaml

    manifest = read_manifest(folder) or {}
    if manifest.get("precision"):
        return str(manifest["precision"])
    raw = yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
    return resolve_precision((raw.get("train") or {}).get("bf16") is True).mixed_precision


def resumed_precision(folder: Path, recipe: Any, family: str | None = None, device: str | None = None) -> Resolved:
    """train.bf16 resolved for a resume from `folder`: auto follows the checkpoint unless the launcher sets one."""
    return resolve_precision(recipe.train.bf16, family, device, saved=saved_precision(folder))


def check_compatible(folder: Path, recipe: Any, data_digest: str | None = None) -> None:
    """A resumed run must be the same run: refuse training settings that differ from the checkpoint's."""
    import yaml

    from hftk.recipe import validate_recipe

    saved = _flatten(validate_recipe(yaml.safe_load((folder / "recipe.yaml").read_text())).to_dict())
    current = _flatten(recipe.to_dict())
    differing = [k for k in sorted(set(saved) | set(current))
                 if saved.get(k) != current.get(k) and not k.startswith(FREE_ON_RESUME + RESOLVED_ON_RESUME)]
    changes = [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in differing]
    trained = saved_precision(folder)
    resolved = resolve_precision(recipe.train.bf16, saved=trained)  # auto follows `trained`: family and device unasked
    if resolved.mixed_precision != trained:
        changes.append(f"precision ({trained!r} -> {resolved.mixed_precision!r}: {resolved.reason})")
    if changes:
        raise UserError(f"train.resume_from_checkpoint: {folder} was saved with other training settings: "
                        f"{', '.join(changes)}; "
                        f"resume with the same settings or start afresh")
    manifest = read_manifest(folder) or {}
    saved_digest = manifest.get("train_data")
    if saved_digest and data_digest and saved_digest != data_digest:
        named = ", ".join(source.path for source in recipe.data.sources("train"))
        raise UserError(f"train.resume_from_checkpoint: the rows of data.train ({named}) differ from those "
                        f"{folder.name} was trained on (every source's rows, weight, label and column keys "
                        f"count); resume with the same data or start afresh")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if manifest.get("num_processes", launched) != launched:
        raise UserError(f"train.resume_from_checkpoint: {folder} was saved by {manifest['num_processes']} processes, "
                        f"this launch has {launched}; resume with the same number of processes")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _prune(output_dir: Path, limit: int | None, keep_step: int | None = None) -> None:
    """Keep the newest `limit` checkpoints, and the best one (keep_step) beside them, as Trainer does."""
    if not limit:
        return
    for step, folder in complete_checkpoints(output_dir)[:-limit]:
        if step != keep_step:
            shutil.rmtree(folder, ignore_errors=True)


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import torch
    import transformers

    import hftk

    return {"hftk": hftk.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__}


def train_data_digest(source: Any, dataset: Any) -> str:
    """What the training rows were: a local file's bytes (wherever it was copied to; remembered by the
    file's identity, so an unchanged file is not read again), or the Hub dataset's fingerprint (which
    follows its revision)."""
    from hftk.file_digest import file_sha256

    path = Path(source.path).expanduser()
    if not path.is_file():
        return str(dataset._fingerprint)
    return file_sha256(path)
