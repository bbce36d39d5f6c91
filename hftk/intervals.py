"""95% intervals and paired tests over evaluation examples.

Every metric is a function of per-example statistics summed over a sample of examples: a mean score
(ROUGE, exact match, F1) sums [score, 1], a loss sums [loss, tokens], BLEU and chrF sum sacreBLEU's
sentence statistics (n-gram matches and lengths). Resampling the examples and recomputing the metric
from the summed statistics gives
- `interval`: the percentile bootstrap interval of one evaluation's metric (BLEU and chrF through
  sacrebleu.significance, which draws its resamples from SACREBLEU_SEED);
- `difference_interval`: the paired bootstrap interval of b - a on the same examples;
- `randomization_p_value`: the paired approximate randomization test of "a and b score alike", exact
  (every one of the 2^n swaps) on a few examples, seeded random swaps otherwise; sacreBLEU's own test
  for BLEU and chrF.
Resamples are drawn as sacreBLEU draws them (numpy's default_rng(seed).choice), so with one seed every
metric of an evaluation is resampled on the same example sets.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hftk import metrics

CONFIDENCE = "95%"  # sacreBLEU's bounds: the (n // 40)-th resample from each end
EXACT_UP_TO = 16  # examples: up to 2^16 swaps are enumerated instead of sampled
RANDOMIZATION_TRIALS = 10_000  # sacreBLEU's default number of approximate randomization trials
BLOCK = 200  # resamples drawn at once: memory stays at BLOCK x examples x statistics
PERPLEXITY_CAP = 50.0  # exp overflows past ~700; eval_perplexity caps its loss the same way
LOSS_KEYS = ("loss", "tokens", "perplexity")  # per-example scores that are parts of the loss, not means


@dataclass(frozen=True)
class Statistic:
    """A metric as a function of per-example statistics [examples, k] summed over the examples."""

    stats: np.ndarray
    greater_is_better: bool = True

    def __len__(self) -> int:
        return len(self.stats)

    def values(self, summed: np.ndarray) -> np.ndarray:
        """The metric of each row of summed statistics [..., k]."""
        raise NotImplementedError

    def value(self) -> float:
        return float(self.values(self.stats.sum(axis=0)[None])[0])

    def resampled(self, samples: int, seed: int) -> np.ndarray:
        """The metric on `samples` bootstrap resamples of the examples."""
        return np.concatenate([self.values(self.stats[index].sum(axis=1))
                               for index in resample_blocks(len(self), samples, seed)])


@dataclass(frozen=True)
class Mean(Statistic):
    """The mean of one score per example."""

    @classmethod
    def of(cls, scores: list[float], greater_is_better: bool = True) -> Mean:
        values = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
        return cls(np.hstack([values, np.ones_like(values)]), greater_is_better)

    def values(self, summed: np.ndarray) -> np.ndarray:
        return summed[..., 0] / summed[..., 1]


@dataclass(frozen=True)
class TokenLoss(Statistic):
    """Summed loss over summed tokens (eval_loss), or its exponential (eval_perplexity)."""

    exponentiate: bool = False

    @classmethod
    def of(cls, loss_sums: list[float], tokens: list[float], exponentiate: bool = False) -> TokenLoss:
        stats = np.column_stack([np.asarray(loss_sums, dtype=np.float64), np.asarray(tokens, dtype=np.float64)])
        return cls(stats, greater_is_better=False, exponentiate=exponentiate)

    def values(self, summed: np.ndarray) -> np.ndarray:
        loss = summed[..., 0] / np.maximum(summed[..., 1], 1.0)
        return np.exp(np.minimum(loss, PERPLEXITY_CAP)) if self.exponentiate else loss


@dataclass(frozen=True)
class Sentences(Statistic):
    """A sacreBLEU corpus metric (BLEU, chrF) from its sentence statistics; keeps the texts for
    sacreBLEU's own paired test."""

    metric: Any = None
    hypotheses: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)  # each prediction's references

    @classmethod
    def of(cls, metric: Any, hypotheses: list[str], references: list[list[str]]) -> Sentences:
        stats = metric._extract_corpus_statistics(hypotheses, metrics.reference_streams(references))
        return cls(np.asarray(stats, dtype=np.float64).reshape(len(hypotheses), -1), True, metric,
                   list(hypotheses), [list(r) for r in references])

    def values(self, summed: np.ndarray) -> np.ndarray:
        return np.array([self.metric._compute_score_from_stats(row).score for row in summed.reshape(-1, summed.shape[-1])])

    def resampled(self, samples: int, seed: int) -> np.ndarray:
        from sacrebleu import significance

        with sacrebleu_seed(seed):
            _, scores = significance._bootstrap_resample(self.stats, self.metric, samples)
        return np.array([score.score for score in scores])


def sacrebleu_statistics(predictions: list[str], references: list[list[str]]) -> dict[str, Sentences]:
    """BLEU and chrF with sacreBLEU's defaults, the settings of metrics.bleu_chrf."""
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": Sentences.of(BLEU(), predictions, references),
            "chrf": Sentences.of(CHRF(), predictions, references)}


def score_statistics(scores: list[dict[str, float]]) -> dict[str, Statistic]:
    """Statistics of per-example scores (as predictions.jsonl holds them): a mean for every score all
    examples have, and with `loss` and `tokens` the token-weighted loss and its perplexity."""
    if not scores:
        return {}
    keys = set.intersection(*(set(s) for s in scores))
    found: dict[str, Statistic] = {key: Mean.of([s[key] for s in scores], greater_is_better=True)
                                   for key in sorted(keys - set(LOSS_KEYS))}
    if {"loss", "tokens"} <= keys:
        found.update(loss_statistics([s["loss"] * s["tokens"] for s in scores], [s["tokens"] for s in scores]))
    return found


def loss_statistics(loss_sums: list[float], tokens: list[float]) -> dict[str, Statistic]:
    return {"loss": TokenLoss.of(loss_sums, tokens), "perplexity": TokenLoss.of(loss_sums, tokens, exponentiate=True)}


def loss_scores(loss_sum: float, tokens: float) -> dict[str, float]:
    """One example's share of the loss, as predictions.jsonl keeps it where the loss is the metric."""
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "tokens": tokens, "perplexity": math.exp(min(loss, PERPLEXITY_CAP))}


@contextlib.contextmanager
def sacrebleu_seed(seed: int) -> Iterator[None]:
    """sacrebleu.significance reads its seed from the environment; set it for one call."""
    saved = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = saved


def resample_blocks(examples: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples (rows of example positions), in blocks; the same draws as sacreBLEU's
    rng.choice(examples, size=(samples, examples)) made at once."""
    rng = np.random.default_rng(seed)
    for start in range(0, samples, BLOCK):
        yield rng.choice(examples, size=(min(BLOCK, samples - start), examples), replace=True)


def bounds(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile bounds, by sacreBLEU's rule (its half-width is half their distance)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    lower = len(ordered) // 40
    return float(ordered[lower]), float(ordered[len(ordered) - lower - 1])


def _holding(point: float, low: float, high: float) -> list[float]:
    # A percentile interval can miss its own estimate by a rounding step on a degenerate sample.
    return [min(low, point), max(high, point)]


def interval(statistic: Statistic, samples: int, seed: int) -> list[float]:
    """[low, high]: the 95% bootstrap interval of the metric over the examples."""
    return _holding(statistic.value(), *bounds(statistic.resampled(samples, seed)))


def intervals(statistics: dict[str, Statistic], samples: int, seed: int) -> dict[str, list[float]]:
    return {name: interval(statistic, samples, seed) for name, statistic in statistics.items() if len(statistic)}


def difference_interval(a: Statistic, b: Statistic, samples: int, seed: int) -> list[float]:
    """[low, high] of b - a by the paired bootstrap: both metrics on the same resampled examples."""
    _same_examples(a, b)
    deltas = [b.values(b.stats[index].sum(axis=1)) - a.values(a.stats[index].sum(axis=1))
              for index in resample_blocks(len(a), samples, seed)]
    return _holding(b.value() - a.value(), *bounds(np.concatenate(deltas)))


def randomization_p_value(a: Statistic, b: Statistic, trials: int = RANDOMIZATION_TRIALS, seed: int = 12345) -> float:
    """Two-sided p-value of |b - a| under swapping each example's statistics between a and b.

    Up to EXACT_UP_TO examples every assignment is counted (the observed one among them), so p is the
    share of the 2^n swaps with a difference at least the observed one; past that, `trials` seeded
    random swaps and (count + 1) / (trials + 1). BLEU and chrF go through sacreBLEU's paired test."""
    _same_examples(a, b)
    if isinstance(a, Sentences) and isinstance(b, Sentences):
        return sacrebleu_p_value(a, b, trials, seed)
    observed = abs(b.value() - a.value())
    tolerance = 1e-9 * max(1.0, observed)  # equal differences summed in another order still count
    moved_by, sum_a, sum_b = b.stats - a.stats, a.stats.sum(axis=0), b.stats.sum(axis=0)
    exact = len(a) <= EXACT_UP_TO
    count = 0
    for swaps in (_all_swaps(len(a)) if exact else _random_swaps(len(a), trials, seed)):
        moved = swaps.astype(np.float64) @ moved_by
        differences = np.abs(b.values(sum_b - moved) - a.values(sum_a + moved))
        count += int((differences >= observed - tolerance).sum())
    return count / 2 ** len(a) if exact else (count + 1) / (trials + 1)


def _all_swaps(examples: int) -> Iterator[np.ndarray]:
    for start in range(0, 2 ** examples, 4096):
        codes = np.arange(start, min(start + 4096, 2 ** examples))
        yield ((codes[:, None] >> np.arange(examples)) & 1).astype(bool)


def _random_swaps(examples: int, trials: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for start in range(0, trials, BLOCK):
        yield rng.integers(2, size=(min(BLOCK, trials - start), examples), dtype=bool)


def sacrebleu_p_value(a: Sentences, b: Sentences, trials: int, seed: int) -> float:
    """sacreBLEU's paired approximate randomization test, a as the baseline."""
    from sacrebleu.significance import PairedTest

    with sacrebleu_seed(seed):
        test = PairedTest([("a", a.hypotheses), ("b", b.hypotheses)], {"metric": type(a.metric)()},
                          metrics.reference_streams(a.references), test_type="ar", n_samples=trials)
        _, scores = test()
    (results,) = (v for k, v in scores.items() if k != "System")
    return float(results[1].p_value)


def _same_examples(a: Statistic, b: Statistic) -> None:
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a paired comparison needs the same examples on both sides ({len(a)} and {len(b)})")
