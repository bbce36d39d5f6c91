"""hftk deletes or rewrites only what it wrote: a user's files beside a run survive every rerun mode,
a finished or damaged run is never silently retrained, and a resume refuses other training data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hftk.run_dir import RUN_MANIFEST
from tests.conftest import ROOT, digest, run_hftk, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds

TRAIN = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}


def recipe(tmp_path: Path, run: Path, name: str = "recipe.yaml", **train) -> Path:
    return write_recipe(tmp_path, tiny_recipe(tmp_path, train={**TRAIN, "output_dir": str(run), **train}), name)


def finetune(path: Path, *overrides: str):
    return run_hftk("finetune", str(path), *overrides)


def user_files(folder: Path) -> Path:
    """What a user keeps in the folder they point output_dir at."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "data").mkdir()
    (folder / "data" / "mine.jsonl").write_text('{"document": "mine", "summary": "mine"}\n')
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("finished")
    result = finetune(recipe(tmp_path, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def assert_refused(result, expected: str, tmp_path: Path, before: dict[str, str]) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hftk: error:") and expected in lines[0], result.stderr
    assert digest(tmp_path) == before, "a refused run changed files"


def test_overwrite_removes_only_the_earlier_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    user_files(run)
    mine = {k: v for k, v in digest(run).items() if k == "notes.txt" or k.startswith("data/")}
    path = recipe(tmp_path, run, max_steps=2)
    result = finetune(path, "train.overwrite_output_dir=true")
    assert result.returncode == 0, result.stderr[-3000:]
    after = digest(run)
    assert {k: after[k] for k in mine} == mine, "the user's files changed"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # the earlier run's are gone
    manifest = json.loads((run / RUN_MANIFEST).read_text())
    assert manifest["finished"] is True and sorted(manifest["user_entries"]) == ["data", "notes.txt"]


def test_a_fresh_run_beside_user_files_leaves_them_alone(tmp_path):
    run = user_files(tmp_path / "run")
    before = digest(run)
    result = finetune(recipe(tmp_path, run, max_steps=2, save_steps=None))
    assert result.returncode == 0, result.stderr[-3000:]
    after = digest(run)
    assert {k: after[k] for k in before} == before
    # A second run on the same folder is refused as a rerun, and overwrite keeps the user's files.
    again = finetune(recipe(tmp_path, run, max_steps=2, save_steps=None), "train.overwrite_output_dir=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: digest(run)[k] for k in before} == before


@pytest.mark.parametrize("name", ["README.md", "config.json", "predictions.jsonl"])
def test_a_user_file_where_hftk_would_write_is_refused(name, tmp_path):
    run = user_files(tmp_path / "run")
    (run / name).write_text("the user's own\n")
    path = recipe(tmp_path, run)
    before = digest(tmp_path)
    for overrides in ([], ["train.overwrite_output_dir=true"]):
        assert_refused(finetune(path, *overrides), f"holds {name}, which hftk did not write", tmp_path, before)


@pytest.mark.parametrize("checkpoints", [True, False])
def test_resuming_a_finished_run_is_refused(checkpoints, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    if not checkpoints:
        for folder in run.glob("checkpoint-*"):
            shutil.rmtree(folder)
    path = recipe(tmp_path, run)
    before = digest(tmp_path)
    assert_refused(finetune(path, "train.resume_from_checkpoint=latest"), "holds a finished run", tmp_path, before)


def _unfinished(finished: Path, tmp_path: Path) -> Path:
    """The finished run as it was when stopped after step 4's checkpoint, before the final model."""
    run = copy_run(finished, tmp_path)
    for name in ("all_results.json", "model.safetensors", "config.json", "README.md", "predictions.jsonl"):
        (run / name).unlink()
    manifest = json.loads((run / RUN_MANIFEST).read_text())
    (run / RUN_MANIFEST).write_text(json.dumps({**manifest, "finished": False}))
    return run


def test_resume_on_other_training_data_is_refused(finished, tmp_path):
    run = _unfinished(finished, tmp_path)
    rows = (ROOT / "data/summarize/train.jsonl").read_text().splitlines()
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(reversed(rows)) + "\n")
    path = recipe(tmp_path, run)
    before = digest(tmp_path)
    result = finetune(path, "train.resume_from_checkpoint=latest", f"data.train={other}")
    assert_refused(result, "differ from those checkpoint-4 was trained on", tmp_path, before)
    # The same rows from a copied file (a new path, a new mtime) resume: only the content counts.
    same = tmp_path / "same.jsonl"
    shutil.copyfile(ROOT / "data/summarize/train.jsonl", same)
    resumed = finetune(path, "train.resume_from_checkpoint=latest", f"data.train={same}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_a_truncated_newest_checkpoint_falls_back_to_an_intact_one(finished, tmp_path):
    run = _unfinished(finished, tmp_path)
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = finetune(recipe(tmp_path, run), "train.resume_from_checkpoint=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(notes) == 1 and "checkpoint-4" in notes[0] and "checkpoint-2" in notes[0], result.stderr
    # Steps 3-4 are trained again from checkpoint-2 and land where the unbroken run did.
    assert (run / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()


def test_no_intact_checkpoint_is_bad_input(finished, tmp_path):
    run = _unfinished(finished, tmp_path)
    for folder in run.glob("checkpoint-*"):
        (folder / "model.safetensors").write_bytes(b"")
    path = recipe(tmp_path, run)
    before = digest(tmp_path)
    assert_refused(finetune(path, "train.resume_from_checkpoint=latest"), "every checkpoint", tmp_path, before)
    explicit = f"train.resume_from_checkpoint={run / 'checkpoint-2'}"
    assert_refused(finetune(path, explicit), "checkpoint-2 is damaged", tmp_path, before)


def test_a_checkpoint_without_recorded_sizes_is_checked_by_its_headers(finished, tmp_path):
    """Checkpoints written before sizes were recorded: the safetensors headers tell a cut file."""
    from hftk.checkpoint import MANIFEST, damage

    run = _unfinished(finished, tmp_path)
    for folder in run.glob("checkpoint-*"):
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest.pop("files")
        (folder / MANIFEST).write_text(json.dumps(manifest))
    assert damage(run / "checkpoint-4") is None
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors is truncated" in damage(run / "checkpoint-4")
    result = finetune(recipe(tmp_path, run), "train.resume_from_checkpoint=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()
