"""`hftk validate` remembers a passing answer about the inputs: a second call on the same recipe and files
imports none of torch, transformers or datasets, while any change to the recipe or a data file checks
again, and what output_dir holds is judged afresh every time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from typer.testing import CliRunner

from hftk.cli import app
from tests.conftest import ROOT, tiny_recipe, write_recipe

# The real command in a fresh process; reports on stderr which ML libraries it imported.
PROBE = """
import sys
from hftk.cli import main
try:
    main()
finally:
    print("imported:", *sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules), file=sys.stderr)
"""


def probe(*args: str) -> tuple[int, str, list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, check=False)
    imported = [line for line in result.stderr.splitlines() if line.startswith("imported:")]
    return result.returncode, result.stdout, imported[-1].split()[1:]


def local_data(tmp_path):
    """The bundled data copied where the test may change it."""
    for split in ("train", "validation"):
        shutil.copy(ROOT / f"data/summarize/{split}.jsonl", tmp_path / f"{split}.jsonl")
    return {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl")}


def test_second_validate_answers_without_the_ml_libraries(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path))
    first_status, first_out, first_imports = probe("validate", str(recipe))
    assert first_status == 0 and "torch" in first_imports  # the checks themselves ran
    second_status, second_out, second_imports = probe("validate", str(recipe))
    assert second_status == 0 and second_out == first_out
    assert second_imports == [], f"a remembered answer still imported {second_imports}"
    fresh_status, fresh_out, fresh_imports = probe("validate", str(recipe), "--no-cache")
    assert fresh_status == 0 and fresh_out == first_out and "torch" in fresh_imports


def test_a_changed_data_file_is_checked_again(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, data=local_data(tmp_path)))
    assert CliRunner().invoke(app, ["validate", str(recipe)]).exit_code == 0
    with (tmp_path / "validation.jsonl").open("a") as handle:
        handle.write(json.dumps({"document": 3, "summary": "a number is no document."}) + "\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "data.validation: 1 of 201 rows are bad" in result.stderr


def test_a_changed_recipe_or_override_is_checked_again(tmp_path):
    recipe = tiny_recipe(tmp_path, data=local_data(tmp_path))
    path = write_recipe(tmp_path, recipe)
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0
    override = CliRunner().invoke(app, ["validate", str(path), "data.target_column=abstract"])
    assert override.exit_code == 2 and "missing column 'abstract'" in override.stderr
    recipe["model"]["config"]["num_heads"] = 0
    edited = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, recipe))])
    assert edited.exit_code == 2 and "model.config.num_heads: must be at least 1, not 0" in edited.stderr


def test_output_dir_and_logged_notes_are_fresh_on_a_remembered_answer(tmp_path):
    data = local_data(tmp_path)
    with open(data["train"], "a") as handle:
        handle.write(json.dumps({"document": None, "summary": "no document."}) + "\n")
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data={**data, "drop_bad_rows": True}))
    first = CliRunner().invoke(app, ["validate", str(path)])
    assert first.exit_code == 0, first.output
    assert "note: train.output_dir: finetune would start a new run" in first.stdout
    run = tmp_path / "run"  # a finished run appears in output_dir between the two calls
    run.mkdir()
    (run / "hftk_run.json").write_text(json.dumps({"user_entries": [], "finished": True}))
    (run / "all_results.json").write_text("{}")
    second = CliRunner().invoke(app, ["validate", str(path)])
    assert second.exit_code == 0, second.output
    assert second.stdout.splitlines()[0] == first.stdout.splitlines()[0]
    assert f"note: finetune would stop (exit 2): train.output_dir: {run} already holds a finished run" in second.stdout
    assert "resume_from_checkpoint" not in second.stdout  # finetune would refuse that on a finished run
    dropped = "data.train: dropped 1 bad rows of 3001"
    assert dropped in first.stderr and dropped in second.stderr  # what the checks logged is shown again


def test_a_mistyped_key_is_reported_before_the_ml_libraries_load(tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path))
    for command in ("validate", "finetune", "plan"):
        status, _, imported = probe(command, str(recipe), "train.learnig_rate=1e-3")
        assert status == 2 and imported == [], (command, imported)
