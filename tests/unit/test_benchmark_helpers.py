"""The pure parts of the benchmark scripts: FLOPs arithmetic, override routing, QA post-processing,
time to a target metric. The scripts themselves need minutes (vs_trainers.py) or GPUs (gpu.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu
import probe_accuracy
import qa_example
import vs_trainers


def test_gpt2_small_flops_per_token_are_six_n_plus_attention():
    flops = gpu.model_flops("gpt2")
    d, layers, vocab, block = 768, 12, 50257, gpu.MODELS["gpt2"]["source"]
    embeddings = vocab * d + 1024 * d  # token and position lookups: no FLOPs
    n = flops["parameters"] - embeddings + vocab * d  # the tied output head is a real matmul
    assert flops["parameters"] == 124_439_808
    assert flops["flops_per_token"] == pytest.approx(6 * n + 12 * layers * d * block)


def test_gpu_refuses_without_cuda_in_one_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        gpu.main(["--models", "gpt2"])
    assert "no CUDA device" in str(stopped.value.code) and "\n" not in str(stopped.value.code)


def test_overrides_without_a_task_prefix_go_to_every_task():
    items = ["data.max_eval_samples=64", "squad:data.doc_stride=32", "translation:train.seed=1"]
    assert vs_trainers._for_task(items, "squad") == ["data.max_eval_samples=64", "data.doc_stride=32"]
    assert vs_trainers._for_task(items, "summarization") == ["data.max_eval_samples=64"]


def test_time_to_target_takes_the_first_evaluation_that_reaches_it():
    run = {"seed": 42, "hftk": {"train_seconds": 10.0, "train_steps": 100},
           "default": {"metric": 0.5, "train_seconds": 8.0}}
    curve = [{"step": 20, "metric": 0.3}, {"step": 40, "metric": 0.5}, {"step": 60, "metric": 0.6}]
    result = vs_trainers.time_to_target(run, curve, "default", 20)
    assert result["reached_at_step"] == 40 and result["hftk_seconds"] == pytest.approx(4.0)
    assert result["hftk_over_trainer"] == pytest.approx(0.5)
    assert vs_trainers.time_to_target(run, curve[:1], "default", 20)["reached_at_step"] is None


def test_postprocess_picks_the_best_span_or_the_null_answer():
    examples = {"id": ["a", "b"], "context": ["red cat sat", "blue dog ran"]}
    offsets = [None, (0, 3), (4, 7), (8, 11)]
    features = {"example_id": ["a", "b"], "offset_mapping": [offsets, offsets]}
    start = np.array([[0.0, 1.0, 5.0, 0.0], [9.0, 1.0, 0.0, 0.0]])
    end = np.array([[0.0, 0.0, 5.0, 1.0], [9.0, 0.0, 1.0, 0.0]])
    answers = qa_example.postprocess_qa_predictions(examples, features, (start, end), version_2_with_negative=True)
    assert answers == {"a": "cat", "b": ""}


def test_probe_accuracy_counts_estimates_within_a_quarter_of_the_real_time():
    rows = [{"estimated_training_seconds": e, "train_runtime": 50.0} for e in (50.0, 100.0, 40.0)]
    summary = probe_accuracy.ratio_summary(rows)
    assert summary["ratios"] == [1.0, 2.0, 0.8] and summary["median_ratio"] == 1.0
    assert (summary["min_ratio"], summary["max_ratio"], summary["within_25_percent"]) == (0.8, 2.0, 2)
