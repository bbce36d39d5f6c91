"""Who wrote what in train.output_dir: hftk deletes or rewrites only entries it wrote itself.

The run's manifest (hftk_run.json), written before anything else, lists the entries that were in the
folder when the run started; every later entry with a name hftk writes is the run's, even when a
crash stopped the run mid-write. A user's own files (data, notes) are never touched: not by
train.overwrite_output_dir, not by a resume. An entry hftk would write but did not (a user's
README.md, config.json) stops the run before it starts.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from hftk.errors import UserError

RUN_MANIFEST = "hftk_run.json"

# Every top-level name a run, `hftk eval` or a later hftk version may write into output_dir.
OUTPUT_PATTERNS = (
    RUN_MANIFEST, f".{RUN_MANIFEST}.partial", "recipe.yaml", "metrics.jsonl", "predictions.jsonl", "predictions_step0.jsonl", "all_results.json", "eval_results.json",
    "README.md", "samples.jsonl", "train.log", "training_curves.png", "report.png", "checkpoint-*", ".checkpoint-*",
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "spiece.model",
    "sentencepiece*.model", "chat_template.*", "added_tokens.json", "adapter_*", "merged", "runs", "eval", ".eval_results",
)


def is_output_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_PATTERNS)


def read(output_dir: Path) -> dict | None:
    try:
        manifest = json.loads((Path(output_dir) / RUN_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _legacy_run(output_dir: Path) -> bool:
    """A run folder written before the manifest existed: it holds an hftk checkpoint or results."""
    from hftk.checkpoint import complete_checkpoints

    return bool(complete_checkpoints(output_dir)) or (output_dir / "all_results.json").is_file()


def written(output_dir: Path) -> set[str]:
    """Top-level entries hftk wrote in output_dir."""
    output_dir = Path(output_dir)
    manifest = read(output_dir)
    if manifest is not None:
        users = set(manifest.get("user_entries", []))
        return {name for name in entries(output_dir) if is_output_name(name) and name not in users}
    if output_dir.is_dir() and _legacy_run(output_dir):
        return {name for name in entries(output_dir) if is_output_name(name) and name != "README.md"}
    return set()


def entries(output_dir: Path) -> set[str]:
    output_dir = Path(output_dir)
    return {p.name for p in output_dir.iterdir()} if output_dir.is_dir() else set()


def holds_run(output_dir: Path) -> bool:
    return bool(written(output_dir) & entries(output_dir))


def finished(output_dir: Path) -> bool:
    manifest = read(output_dir)
    if manifest is not None:
        return bool(manifest.get("finished"))
    return (Path(output_dir) / "all_results.json").is_file()


def check_no_collisions(output_dir: Path) -> None:
    """Refuse before anything is written when a user's file sits where hftk would write one."""
    output_dir = Path(output_dir)
    clashes = sorted(name for name in entries(output_dir) - written(output_dir) if is_output_name(name))
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise UserError(f"train.output_dir: {output_dir} holds {shown}, which hftk did not write and would "
                        f"overwrite; move {'them' if len(clashes) > 1 else 'it'} or choose another output_dir")


def check_output_dir(settings: Any, notes: list[str] | None = None) -> Path | None:
    """What finetune would make of what train.output_dir holds: the checkpoint it resumes from, or None.
    With `notes` (validate), a refusal to touch an earlier run is noted there instead of raised: the
    recipe itself is fine."""
    from hftk import checkpoint

    output_dir = Path(settings.output_dir)
    for path in (output_dir, *output_dir.parents):
        if path.is_symlink() and not path.exists():  # a loop, or a link to nothing
            raise UserError(f"train.output_dir: {path} is a symbolic link that leads nowhere (a loop or a missing "
                            f"target); point train.output_dir at a real folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"train.output_dir: {output_dir} exists and is a file")
    checkpoint.check_writable(output_dir)
    check_no_collisions(output_dir)
    refusal = rerun_refusal(settings)
    if refusal and notes is None:
        raise UserError(refusal)
    resume_from = None if refusal else checkpoint.resolve_resume(output_dir, settings.resume_from_checkpoint)
    if notes is not None:
        notes.append(f"finetune would stop (exit 2): {refusal}" if refusal else output_dir_note(settings, resume_from))
    return resume_from


def rerun_refusal(settings: Any) -> str | None:
    """Why finetune would stop at once on what output_dir already holds, or None."""
    output_dir = Path(settings.output_dir)
    if settings.resume_from_checkpoint == "latest" and finished(output_dir):
        return (f"train.output_dir: {output_dir} holds a finished run, so there is nothing to resume; set "
                f"train.overwrite_output_dir=true to train it afresh, or choose another output_dir")
    if holds_run(output_dir) and not settings.overwrite_output_dir and not settings.resume_from_checkpoint:
        if finished(output_dir):  # only what finetune accepts: a finished run has nothing to resume
            return (f"train.output_dir: {output_dir} already holds a finished run; set train.overwrite_output_dir=true "
                    f"to train it afresh, or choose another output_dir")
        return (f"train.output_dir: {output_dir} already holds a run; set train.resume_from_checkpoint=latest to "
                f"continue it, train.overwrite_output_dir=true to start afresh, or choose another output_dir")
    return None


def output_dir_note(settings: Any, resume_from: Path | None) -> str:
    output_dir = Path(settings.output_dir)
    if resume_from is not None:
        return f"train.output_dir: finetune would resume from {resume_from}"
    if settings.overwrite_output_dir and holds_run(output_dir):
        return f"train.output_dir: finetune would remove the earlier run's files in {output_dir} and start afresh"
    return f"train.output_dir: finetune would start a new run in {output_dir}"


def clear_previous(output_dir: Path) -> None:
    """train.overwrite_output_dir: remove what the earlier run wrote, nothing else."""
    output_dir = Path(output_dir)
    for name in sorted(written(output_dir) & entries(output_dir)):
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def start(output_dir: Path) -> None:
    """Claim the folder before the first write: what is here now and not hftk's is the user's."""
    output_dir = Path(output_dir)
    users = sorted(entries(output_dir) - written(output_dir))
    # A resumed run keeps its id, so experiment trackers continue the run they were logging.
    run_id = (read(output_dir) or {}).get("run_id") or uuid.uuid4().hex[:16]
    earlier = {k: v for k, v in (read(output_dir) or {}).items() if k == "tracker_ids"}
    _write(output_dir, {"user_entries": users, "finished": False, "run_id": run_id, **earlier})


def update(output_dir: Path, **fields) -> None:
    _write(output_dir, {**(read(output_dir) or {}), **fields})


def mark_finished(output_dir: Path) -> None:
    _write(output_dir, {**(read(output_dir) or {}), "finished": True})


def _write(output_dir: Path, manifest: dict) -> None:
    partial = Path(output_dir) / f".{RUN_MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, Path(output_dir) / RUN_MANIFEST)
