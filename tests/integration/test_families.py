"""One short end-to-end run per model family, for the fast tier: `hftk finetune` trains a tiny scratch
model with dropout on, the loss falls, and the saved folder reloads in plain transformers as
the family it was, dropout included."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, loss_rows, results, run_hftk, tiny_recipe, write_recipe

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 128}  # dropout 0.1 each
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 128}
T5 = {"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 1,
      "num_decoder_layers": 1}  # dropout_rate 0.1
TRAIN = {"max_steps": 12, "logging_steps": 2, "learning_rate": 3e-3}


def finished(tmp_path, task: str, config: dict, **data) -> tuple[dict, list[tuple[int, float]]]:
    recipe = tiny_recipe(tmp_path, train=TRAIN, data=data)
    recipe["task"], recipe["model"]["config"] = task, config
    run = run_hftk("finetune", str(write_recipe(tmp_path, recipe)))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = loss_rows(tmp_path / "run")
    assert [step for step, _ in rows] == list(range(2, 13, 2))
    assert rows[-1][1] < rows[0][1], rows  # it learns
    return results(tmp_path / "run"), rows


def test_encoder_decoder_trains_and_reloads(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    figures, _ = finished(tmp_path, "summarization", T5)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run")
    assert model.config.dropout_rate == pytest.approx(0.1)
    assert 0 <= figures["eval_rougeL"] <= 1 and figures["eval_samples"] == 16


def test_decoder_only_trains_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    figures, _ = finished(tmp_path, "summarization", GPT2)
    folder = tmp_path / "run"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.resid_pdrop == pytest.approx(0.1) and tokenizer.pad_token_id is not None
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == figures["eval_samples"] == 16


def test_encoder_only_trains_and_reloads(tmp_path):
    from transformers import AutoModelForQuestionAnswering

    figures, _ = finished(tmp_path, "extractive_qa", BERT, train=str(ROOT / "data/qa/train.jsonl"),
                          validation=str(ROOT / "data/qa/validation.jsonl"), max_source_length=96, doc_stride=32)
    model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "run")
    assert model.config.hidden_dropout_prob == pytest.approx(0.1)
    assert {"eval_exact_match", "eval_f1"} <= set(figures)
    with torch.no_grad():  # the reloaded head answers: start and end logits over the tokens
        out = model(input_ids=torch.tensor([[2, 5, 6, 3, 7, 8, 3]]))
    assert out.start_logits.shape == out.end_logits.shape == (1, 7)
