"""What a finished run leaves for people to read, and how the commands answer about it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, run_hftk, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(folder, tiny_recipe(folder))
    result = run_hftk("finetune", str(recipe))
    assert result.returncode == 0, result.stderr
    return recipe, folder / "run"


def test_validate_notes_what_finetune_would_do_with_a_finished_run(finished):
    recipe, run = finished
    result = run_hftk("validate", str(recipe))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("ok: summarization on an encoder-decoder t5 model")
    # Only options finetune accepts: a finished run has nothing to resume.
    assert result.stdout.splitlines()[1] == (f"note: finetune would stop (exit 2): train.output_dir: {run} already "
                                             f"holds a finished run; set train.overwrite_output_dir=true to train it "
                                             f"afresh, or choose another output_dir")
    resumed = run_hftk("finetune", str(recipe), "train.resume_from_checkpoint=latest")
    assert resumed.returncode == 2 and "nothing to resume" in resumed.stderr
    fresh = run_hftk("validate", str(recipe), "train.overwrite_output_dir=true")
    assert fresh.stdout.splitlines()[1] == (f"note: train.output_dir: finetune would remove the earlier run's files "
                                            f"in {run} and start afresh")


def test_eval_writes_beside_the_run_not_over_it(finished):
    recipe, run = finished
    own = {name: (run / name).read_text() for name in ("predictions.jsonl", "all_results.json")}
    result = run_hftk("eval", str(recipe))
    assert result.returncode == 0, result.stderr
    written = run / "eval" / "validation"
    again = json.loads((written / "eval_results.json").read_text())
    assert again["eval_loss"] == pytest.approx(json.loads(own["all_results.json"])["eval_loss"], rel=1e-6)
    assert (written / "predictions.jsonl").read_text() == own["predictions.jsonl"]
    assert {name: (run / name).read_text() for name in own} == own


def test_eval_under_auto_scores_in_the_precision_the_run_trained_in(finished, monkeypatch, tmp_path):
    """The run trained in fp32 on a CPU that auto would put in bf16: hftk eval follows the run (its newest
    checkpoint records fp32) and reproduces its last evaluation; a copy of the model alone, without the
    checkpoints, is evaluated as a new run would train (bf16 here)."""
    import shutil

    from hftk import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    recipe, run = finished
    own = json.loads((run / "all_results.json").read_text())
    result = run_hftk("eval", str(recipe), "train.bf16=auto", "--output-dir", str(tmp_path / "same"))
    assert result.returncode == 0, result.stderr
    assert f"precision: fp32 (train.bf16=auto: as the run that saved {run} trained)" in result.stderr
    again = json.loads((tmp_path / "same" / "eval_results.json").read_text())
    assert again["eval_loss"] == pytest.approx(own["eval_loss"], rel=1e-6)

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    result = run_hftk("eval", str(recipe), "train.bf16=auto", "--model", str(copy), "--output-dir",
                      str(tmp_path / "fresh"))
    assert result.returncode == 0, result.stderr
    assert "precision: bf16 autocast (train.bf16=auto: this CPU has native bf16)" in result.stderr
    fresh = json.loads((tmp_path / "fresh" / "eval_results.json").read_text())
    assert fresh["eval_loss"] != pytest.approx(own["eval_loss"], rel=1e-6), "bf16 scores a little differently"


def test_results_recipe_and_card_read_well(finished):
    _, run = finished
    text = (run / "all_results.json").read_text()
    assert text.endswith("}\n")
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["data"]["train"] == {"path": str(ROOT / "data/summarize/train.jsonl")}
    assert resolved["data"]["validation"] == {"path": str(ROOT / "data/summarize/validation.jsonl")}
    card = (run / "README.md").read_text()
    evaluation = card.split("## Evaluation")[1].split("## Training")[0]
    training = card.split("## Training\n")[1].split("## Training recipe")[0]
    results = json.loads(text)
    assert f"| eval_loss | {results['eval_loss']:.4f} |" in evaluation and "train_runtime" not in evaluation
    assert "| train_runtime |" in training and "eval_" not in training


def test_eval_help_names_its_defaults():
    result = run_hftk("eval", "--help", env={"COLUMNS": "200"})
    assert "The saved model's directory (default: the recipe's train.output_dir)." in result.stdout
    assert "Where results go (default: MODEL/eval/SPLIT)." in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["finetune", "--help"], ["report", "--help"]])
def test_help_imports_no_ml_library(args):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "hftk", *args], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0
    imported = {m.group(1) for m in re.finditer(r"\|\s+(\S+)$", result.stderr, re.MULTILINE)}
    assert "typer" in imported
    assert not imported & {"torch", "transformers", "datasets", "accelerate", "matplotlib"}
