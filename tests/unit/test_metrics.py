"""Metric values equal the reference implementations on fixed predictions."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from hftk import metrics
from hftk.errors import UserError

PREDICTIONS = ["the cat sat on the mat. it was happy.", "a quick brown fox", "nothing in common"]
REFERENCES = ["the cat was on the mat. it purred.", "the quick brown fox jumps", "completely different words"]


def test_rouge_matches_rouge_score_mean():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {k: 0.0 for k in metrics.ROUGE_TYPES}
    for pred, ref in zip(PREDICTIONS, REFERENCES):
        pred_lines, ref_lines = pred.replace(". ", ".\n"), ref.replace(". ", ".\n")
        for key, score in scorer.score(ref_lines, pred_lines).items():
            expected[key] += score.fmeasure / len(PREDICTIONS)
    assert metrics.rouge(PREDICTIONS, REFERENCES) == pytest.approx(expected)


def test_rouge_lsum_uses_one_sentence_per_line():
    assert metrics.one_sentence_per_line("First one. Second one! Third?") == "First one.\nSecond one!\nThird?"
    perfect = metrics.rouge(["A b. C d."], ["A b. C d."])
    assert perfect["rougeLsum"] == pytest.approx(1.0)


def test_bleu_and_chrf_match_sacrebleu_with_several_references():
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["a dog runs", "the dog is running"]]
    preds = ["the cat is on the mat", "a dog is running"]
    scores = metrics.bleu_chrf(preds, refs)
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)


def test_squad_scoring_rules():
    # Values from the official SQuAD v1.1 script's rules: normalisation, max over gold answers.
    scores = metrics.squad(["The Denver Broncos", "Broncos", "in 1990"], [["Denver Broncos"], ["Denver Broncos"], ["1991"]])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_squad_v2_no_answer():
    assert metrics.squad([""], [[""]]) == {"exact_match": 100.0, "f1": 100.0}
    assert metrics.squad(["something"], [[]]) == {"exact_match": 0.0, "f1": 0.0}


def test_hub_metrics_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="metric_source=local"):
        metrics.check_metric_source("hub")
    metrics.check_metric_source("local")
