"""The bundled summarize recipe, run as a user runs it: it learns, saves, reloads and re-evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, digest, run_hftk

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds

RECIPE = str(ROOT / "recipes/summarize.yaml")
FP32 = "train.bf16=false"  # its predictions are compared with a plain fp32 reload's
# Measured: ROUGE-L 0.64 after the 2 epochs run here with T5's dropout 0.1 (0.71 without); untrained: ~0.
ROUGE_L_THRESHOLD = 0.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("summarize") / "run"
    result = run_hftk("finetune", RECIPE, f"train.output_dir={output_dir}", "train.num_train_epochs=2", FP32)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def _results(folder: Path, name: str = "all_results.json") -> dict:
    return json.loads((folder / name).read_text())


def test_recipe_learns_summarization(trained):
    results = _results(trained)
    assert results["eval_rougeL"] > ROUGE_L_THRESHOLD
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeLsum", "eval_loss", "train_loss", "train_runtime",
                "train_tokens_per_second"):
        assert key in results
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[0]["step"] == 25 and {"epoch", "learning_rate", "tokens_per_second"} <= set(train_rows[0])
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] / 5
    assert rows[-1]["eval_rougeL"] == results["eval_rougeL"]


def test_run_directory_holds_the_contract(trained):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "README.md",
                 "predictions.jsonl", "metrics.jsonl", "all_results.json"):
        assert (trained / name).is_file(), name
    predictions = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 200 and predictions[0]["id"] == "sum-03000"
    assert {"id", "prediction", "reference"} <= set(predictions[0])
    card = (trained / "README.md").read_text()
    assert "eval_rougeL" in card and "AutoModelForSeq2SeqLM" in card


def test_saved_model_reloads_in_plain_transformers(trained):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForSeq2SeqLM.from_pretrained(trained).eval()
    first = json.loads((ROOT / "data/summarize/validation.jsonl").read_text().splitlines()[0])
    inputs = tokenizer(first["document"], return_tensors="pt", truncation=True, max_length=128)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=32)
    text = tokenizer.decode(output[0], skip_special_tokens=True).strip()
    stored = json.loads((trained / "predictions.jsonl").read_text().splitlines()[0])["prediction"]
    assert text == stored


def test_eval_command_reproduces_final_metrics(trained):
    own_predictions = (trained / "predictions.jsonl").read_text()
    result = run_hftk("eval", RECIPE, f"train.output_dir={trained}", "train.num_train_epochs=2", FP32)
    assert result.returncode == 0, result.stderr[-3000:]
    written = trained / "eval" / "validation"  # the default: beside the run's own files, never over them
    again, final = _results(written, "eval_results.json"), _results(trained)
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_loss"):
        assert again[key] == pytest.approx(final[key], abs=1e-6), key
    assert (written / "predictions.jsonl").read_text() == own_predictions
    assert (trained / "predictions.jsonl").read_text() == own_predictions


def test_rerun_refuses_and_leaves_the_run_untouched(trained):
    before = digest(trained)
    result = run_hftk("finetune", RECIPE, f"train.output_dir={trained}")
    assert result.returncode == 2
    # Only what finetune accepts: a finished run has nothing to resume.
    assert "already holds a finished run" in result.stderr and "overwrite_output_dir=true" in result.stderr
    assert "resume_from_checkpoint" not in result.stderr
    assert digest(trained) == before


def test_decoder_only_summarizes_at_least_as_well(trained, tmp_path):
    """The decoder-only recipe, with whole prompts and its family's dropout, reaches at least the
    encoder-decoder recipe's ROUGE-L after the same 2 epochs."""
    out = tmp_path / "gpt2"
    result = run_hftk("finetune", str(ROOT / "recipes/summarize_gpt2.yaml"), f"train.output_dir={out}",
                      "train.num_train_epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _results(out)["eval_rougeL"] >= _results(trained)["eval_rougeL"]
    from tests.integration.test_tasks_learn import _reloads

    _reloads(out)

