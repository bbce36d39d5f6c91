"""`hftk validate`: every check finetune makes before it loads a model, answered in well under a second
the second time.

Checking the rows and building the model on the meta device takes seconds, nearly all of it spent
importing torch, transformers and datasets. That answer depends only on the resolved recipe, the bytes of
the local files it names, and the code that checks them (hftk and the libraries), so a passing answer is
remembered under the hftk cache, keyed on all of those: a changed recipe, override, data file, model
folder or library version asks again. What output_dir holds, the trackers installed and the Hub settings
are not about those files and are checked on every call. Failures are never remembered.
Only local inputs are remembered: a Hub model or dataset can change under the same name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hftk import checkpoint
from hftk.cache import cache_root
from hftk.logs import log
from hftk.preflight import check_surroundings, resumed_run_precision, with_prefix
from hftk.recipe import Recipe

# The libraries whose code takes part in the input checks; a new version may answer differently.
CHECKING_LIBRARIES = ("transformers", "datasets", "pyarrow", "torch", "tokenizers", "huggingface_hub",
                      "safetensors", "pydantic", "peft")
ANSWERS = "validate"  # the folder under the hftk cache


def validate(recipe: Recipe, remember: bool = True) -> list[str]:
    """The lines `hftk validate` prints: the verdict on the inputs, then notes on output_dir."""
    notes: list[str] = []
    resume_from = check_surroundings(recipe, notes)
    key = inputs_key(recipe) if remember else None  # before reading: a file edited meanwhile asks again
    answer = _recall(key)
    if answer is None:
        answer = _check_inputs(recipe)
        _remember(key, answer)
    else:
        for level, message in answer["log"]:  # what the checks said the first time (dropped rows, repairs)
            log.log(level, message)
    if resume_from is not None:
        resolved = with_prefix(recipe, answer.get("source_prefix"))  # as finetune resolves it
        checkpoint.check_compatible(resume_from, resolved, answer["train_digest"])
        resumed_run_precision(resume_from, resolved)  # refuses an fp16 checkpoint where fp16 cannot run
    return [answer["verdict"], *(f"note: {note}" for note in notes)]


def _check_inputs(recipe: Recipe) -> dict[str, Any]:
    from hftk.preflight import check_inputs

    with _hftk_records() as records:
        plan = check_inputs(recipe)
    sizes = ", ".join(f"{key}: {len(rows)} rows" if plan.sources[key].stream is None else
                      f"{key}: a stream, its first {len(rows)} rows judged" for key, rows in plan.splits.items())
    family = plan.encoding.family
    article = "an" if family[0] in "aeiou" else "a"
    verdict = f"ok: {recipe.task} on {article} {family} {plan.config.model_type} model; {sizes}"
    return {"verdict": verdict, "log": records, "train_digest": plan.train_digest,
            "source_prefix": plan.recipe.data.source_prefix}


@contextlib.contextmanager
def _hftk_records() -> Iterator[list[tuple[int, str]]]:
    records: list[tuple[int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelno, record.getMessage()))

    handler = Keep(logging.INFO)
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def inputs_key(recipe: Recipe) -> str | None:
    """A digest of everything the input checks' answer depends on, or None when it cannot be known from
    here (a Hub dataset or model, a data file that is not there)."""
    sources = [s for key in ("train", "validation", "test") for s in recipe.data.sources(key)]
    files = [_stat(Path(source.path)) for source in sources]
    model = recipe.model.name_or_path
    model_files: list[Any] = []
    if model is not None:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            return None
        model_files = [_stat(path) for path in sorted(folder.iterdir()) if path.is_file()]
    if None in files:
        return None
    blob = json.dumps({"recipe": recipe.to_dict(), "files": files, "model_files": model_files,
                       "code": _code_versions(), "python": sys.version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _stat(path: Path) -> list[Any] | None:
    """A file by where it is, its size and its modification time (as make and git judge a change)."""
    path = path.expanduser().resolve()
    try:
        found = path.stat()
    except OSError:
        return None
    return [str(path), found.st_size, found.st_mtime_ns] if path.is_file() else None


def _code_versions() -> dict[str, Any]:
    """The installed libraries' versions, and hftk's own files (a checkout being edited keeps its
    version number)."""
    versions: dict[str, Any] = {}
    for name in CHECKING_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["hftk"] = [_stat(path) for path in sorted(Path(__file__).parent.rglob("*.py"))]
    return versions


def _answers_dir() -> Path:
    return cache_root() / ANSWERS


def _recall(key: str | None) -> dict[str, Any] | None:
    if key is None:
        return None
    try:
        answer = json.loads((_answers_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) and {"verdict", "log", "train_digest"} <= set(answer) else None


def _remember(key: str | None, answer: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only makes the next validate slower."""
    if key is None:
        return
    folder = _answers_dir()
    partial = folder / f".{key}.{os.getpid()}.partial"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(answer))
        os.replace(partial, folder / f"{key}.json")
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
