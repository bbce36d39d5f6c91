"""95% intervals and paired tests over evaluation examples, against bootstraps and tests written here."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from fractions import Fraction

import numpy as np
import pytest
import sacrebleu
from sacrebleu import significance
from sacrebleu.metrics import BLEU, CHRF

from hftk import intervals, metrics
from hftk.comparison import read_rows
from hftk.tasks import get_task

WORDS = ["the", "a", "council", "mayor", "city", "market", "bridge", "harbour", "will", "move", "close", "repair",
         "says", "its", "new", "old", "central"]


def sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def predictions_file(tmp_path, examples: int, seed: int = 0):
    """A summarization predictions.jsonl as hftk writes it: texts with each example's ROUGE."""
    rng = random.Random(seed)
    references = [sentence(rng, rng.randint(5, 12)) for _ in range(examples)]
    predictions = [" ".join(r.split()[: rng.randint(0, 8)] + [sentence(rng, rng.randint(0, 4))]) for r in references]
    scores = get_task("summarization").example_scores(predictions, references)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"id": f"ex-{i}", "prediction": p, "reference": r, "scores": s}) + "\n"
                            for i, (p, r, s) in enumerate(zip(predictions, references, scores))))
    return path, predictions, references


def rouge_l(rows: list[dict]) -> intervals.Statistic:
    return intervals.score_statistics([row["scores"] for row in rows])["rougeL"]


def hand_bootstrap(values: list[float], samples: int, seed: int) -> tuple[float, float]:
    """An independent percentile bootstrap of a mean: Python's own random draws, 2.5% and 97.5% points."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def test_interval_of_a_predictions_file_is_seeded_holds_the_estimate_and_matches_a_plain_bootstrap(tmp_path):
    path, predictions, references = predictions_file(tmp_path, 200)
    statistic = rouge_l(read_rows(path))
    point = metrics.rouge(predictions, references)["rougeL"]
    assert statistic.value() == pytest.approx(point, abs=1e-12)
    low, high = intervals.interval(statistic, 1000, seed=7)
    assert intervals.interval(statistic, 1000, seed=7) == [low, high]
    assert intervals.interval(statistic, 1000, seed=8) != [low, high]
    assert low < point < high
    ref_low, ref_high = hand_bootstrap([row["scores"]["rougeL"] for row in read_rows(path)], 4000, seed=1)
    width = ref_high - ref_low
    # Percentile end points of 1000 resamples move by a few percent of the width between seeds.
    assert abs(low - ref_low) < 0.15 * width and abs(high - ref_high) < 0.15 * width
    # The normal approximation agrees too: 1.96 standard errors of the mean each side.
    values = np.array([row["scores"]["rougeL"] for row in read_rows(path)])
    assert (high - low) == pytest.approx(2 * 1.96 * values.std(ddof=1) / math.sqrt(len(values)), rel=0.15)


def test_interval_narrows_as_examples_grow(tmp_path):
    path, _, _ = predictions_file(tmp_path, 800)
    rows = read_rows(path)
    widths = {}
    for examples in (50, 200, 800):
        low, high = intervals.interval(rouge_l(rows[:examples]), 1000, seed=3)
        widths[examples] = high - low
    assert widths[800] < widths[200] < widths[50]
    assert widths[800] < 0.7 * widths[50] / 2  # about 1/sqrt(16) of it; far from equal


def test_loss_and_perplexity_resample_token_sums():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 40, size=120).astype(float)
    sums = tokens * rng.uniform(1.0, 3.0, size=120)
    found = intervals.loss_statistics(list(sums), list(tokens))
    loss, perplexity = found["loss"], found["perplexity"]
    assert loss.value() == pytest.approx(sums.sum() / tokens.sum()) and not loss.greater_is_better
    assert perplexity.value() == pytest.approx(math.exp(sums.sum() / tokens.sum()))
    low, high = intervals.interval(loss, 500, seed=5)
    assert low < loss.value() < high
    # The same resamples through a monotone function: perplexity's bounds are exp of the loss's.
    assert intervals.interval(perplexity, 500, seed=5) == pytest.approx([math.exp(low), math.exp(high)])
    # What predictions.jsonl keeps for text generation gives the same statistics back.
    rows = [intervals.loss_scores(s, t) for s, t in zip(sums, tokens)]
    assert intervals.score_statistics(rows)["loss"].value() == pytest.approx(loss.value())


def translations(examples: int, seed: int = 0):
    rng = random.Random(seed)
    references = [[sentence(rng, rng.randint(6, 12))] for _ in range(examples)]
    predictions = [" ".join(r[0].split()[: rng.randint(2, 12)]) for r in references]
    return predictions, references


@pytest.mark.parametrize("name, metric", [("bleu", BLEU), ("chrf", CHRF)])
def test_bleu_and_chrf_resample_through_sacrebleu(name, metric, monkeypatch):
    predictions, references = translations(60)
    calls = []
    original = significance._bootstrap_resample

    def spy(stats, used, n_samples=1000):
        calls.append((os.environ.get("SACREBLEU_SEED"), n_samples, type(used)))
        return original(stats, used, n_samples)

    monkeypatch.setattr(significance, "_bootstrap_resample", spy)
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    statistic = get_task("translation").corpus_statistics(predictions, references)[name]
    assert statistic.value() == pytest.approx(metrics.bleu_chrf(predictions, references)[name])
    low, high = intervals.interval(statistic, 500, seed=99)
    assert calls == [("99", 500, metric)] and "SACREBLEU_SEED" not in os.environ
    # sacreBLEU's own --confidence on the same seed: mean +- half-width, from the same resamples.
    monkeypatch.setenv("SACREBLEU_SEED", "99")
    theirs = metric().corpus_score(predictions, metrics.reference_streams(references), n_bootstrap=500)
    assert (high - low) / 2 == pytest.approx(theirs._ci, rel=1e-6)
    assert low < theirs._mean < high and low <= statistic.value() <= high


def test_a_bleu_difference_resamples_sentence_statistics_on_shared_draws():
    predictions, references = translations(40)
    better = [r[0] for r in references[:20]] + predictions[20:]
    a, b = (get_task("translation").corpus_statistics(p, references)["bleu"] for p in (predictions, better))
    low, high = intervals.difference_interval(a, b, 300, seed=4)
    # The same bootstrap by hand: sacreBLEU's draws, its score of summed statistics, b - a per draw.
    draws = np.random.default_rng(4).choice(40, size=(300, 40), replace=True)
    bleu = BLEU()
    deltas = sorted(bleu._compute_score_from_stats(b.stats[d].sum(0)).score
                    - bleu._compute_score_from_stats(a.stats[d].sum(0)).score for d in draws)
    assert [low, high] == pytest.approx([deltas[300 // 40], deltas[300 - 300 // 40 - 1]])
    assert 0 < low < b.value() - a.value() < high


def brute_force_p(a: list[Fraction], b: list[Fraction]) -> Fraction:
    """Every sign flip of the per-example differences: the share with |mean| at least the observed one."""
    differences = [y - x for x, y in zip(a, b)]
    observed = abs(sum(differences))
    flips = list(itertools.product((1, -1), repeat=len(differences)))
    hits = sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed for signs in flips)
    return Fraction(hits, len(flips))


@pytest.mark.parametrize("seed", range(5))
def test_randomization_p_value_is_exact_on_a_few_examples(seed):
    rng = random.Random(seed)
    a = [Fraction(rng.choice([0, 25, 50, 100])) for _ in range(9)]
    b = [Fraction(max(0, min(100, int(x) + rng.choice([-25, 0, 25, 50])))) for x in a]  # ties, both signs
    p = intervals.randomization_p_value(intervals.Mean.of([float(x) for x in a]), intervals.Mean.of([float(x) for x in b]))
    assert p == pytest.approx(float(brute_force_p(a, b)), abs=1e-12)


def test_randomization_p_value_on_many_examples():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, size=300)
    same = intervals.Mean.of(list(a))
    assert intervals.randomization_p_value(same, same, trials=2000, seed=1) == 1.0
    shifted = intervals.Mean.of(list(np.clip(a + rng.normal(0.05, 0.1, size=300), 0, 1)))
    p = intervals.randomization_p_value(same, shifted, trials=2000, seed=1)
    assert p == intervals.randomization_p_value(same, shifted, trials=2000, seed=1) and p < 0.01
    noise = intervals.Mean.of(list(np.clip(a + rng.normal(0.0, 0.1, size=300), 0, 1)))
    assert intervals.randomization_p_value(same, noise, trials=2000, seed=1) > 0.05


def test_bleu_p_value_is_sacrebleus_paired_test(monkeypatch):
    predictions, references = translations(30)
    better = [r[0] for r in references[:15]] + predictions[15:]
    a, b = (get_task("translation").corpus_statistics(p, references)["bleu"] for p in (predictions, better))
    p = intervals.randomization_p_value(a, b, trials=1000, seed=21)
    monkeypatch.setenv("SACREBLEU_SEED", "21")
    test = significance.PairedTest([("a", predictions), ("b", better)], {"bleu": BLEU()},
                                   metrics.reference_streams(references), test_type="ar", n_samples=1000)
    _, scores = test()
    assert p == scores["BLEU"][1].p_value and p < 0.05
    assert sacrebleu.corpus_bleu(better, metrics.reference_streams(references)).score == pytest.approx(b.value())
