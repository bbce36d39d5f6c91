"""Generation metrics named and scaled as `evaluate` names them, computable with no network.

`evaluate.load(name)` fetches a metric script from the Hub at run time and fails (or hangs)
offline, so the default source is "local": the same libraries those scripts wrap (rouge_score,
sacrebleu) called directly. metric_source "hub" keeps `evaluate.load` for users who want it.
"""

from __future__ import annotations

import collections
import os
import re
import string
from typing import Any

from hftk.errors import UserError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# nltk's punkt model is a download; a regex split is enough to put one sentence per line for rougeLsum.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def check_metric_source(source: str) -> None:
    if source == "hub" and hub_offline():
        raise UserError("eval.metric_source=hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; use eval.metric_source=local")


def _load_hub_metric(name: str) -> Any:
    import evaluate

    return evaluate.load(name)


def one_sentence_per_line(text: str) -> str:
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: list[str], references: list[str], source: str = "local") -> dict[str, float]:
    """ROUGE F-measures in [0, 1], as evaluate's "rouge" returns them (stemming on)."""
    predictions = [one_sentence_per_line(p) for p in predictions]
    references = [one_sentence_per_line(r) for r in references]
    if source == "hub":
        scores = _load_hub_metric("rouge").compute(predictions=predictions, references=references, use_stemmer=True)
        return {k: float(scores[k]) for k in ROUGE_TYPES}
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for scores in _rouge_lines(predictions, references):
        for key, value in scores.items():
            totals[key] += value
    # The exact mean: evaluate's default bootstrap aggregator reports a resampled median instead,
    # which moves from run to run; a rerun of `hftk eval` must reproduce the figures.
    return {k: v / max(len(predictions), 1) for k, v in totals.items()}


def rouge_per_example(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Each example's ROUGE F-measures (local rouge_score); their mean is `rouge`'s local value."""
    return _rouge_lines([one_sentence_per_line(p) for p in predictions],
                        [one_sentence_per_line(r) for r in references])


def _rouge_lines(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [{key: float(score.fmeasure) for key, score in scorer.score(reference, prediction).items()}
            for prediction, reference in zip(predictions, references, strict=True)]


def bleu_chrf(predictions: list[str], references: list[list[str]], source: str = "local") -> dict[str, float]:
    """sacreBLEU and chrF (0-100) with several references per prediction allowed."""
    if source == "hub":
        bleu = _load_hub_metric("sacrebleu").compute(predictions=predictions, references=references)
        chrf = _load_hub_metric("chrf").compute(predictions=predictions, references=references)
        return {"bleu": float(bleu["score"]), "chrf": float(chrf["score"])}
    import sacrebleu

    streams = reference_streams(references)
    return {
        "bleu": float(sacrebleu.corpus_bleu(predictions, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, streams).score),
    }


def reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacreBLEU's layout: one stream per reference position, each as long as the predictions."""
    width = max((len(r) for r in references), default=1)
    if any(len(r) != width for r in references):
        raise ValueError("sacreBLEU needs the same number of references for every prediction")
    return [[refs[i] for refs in references] for i in range(width)]


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred_tokens or not truth_tokens:
        # SQuAD v2 rule: an empty answer scores 1 only against an empty truth.
        return float(pred_tokens == truth_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """SQuAD exact match and F1 (0-100), the best over each question's gold answers.

    An unanswerable question (SQuAD v2) has references [""] and is right only when the prediction is empty.
    """
    pairs = _squad_fractions(predictions, references)
    count = max(len(predictions), 1)
    return {"exact_match": 100.0 * sum(e for e, _ in pairs) / count, "f1": 100.0 * sum(f for _, f in pairs) / count}


def squad_per_example(predictions: list[str], references: list[list[str]]) -> list[dict[str, float]]:
    """Each question's exact match and F1 (0-100); `squad` is their mean."""
    return [{"exact_match": 100.0 * e, "f1": 100.0 * f} for e, f in _squad_fractions(predictions, references)]


def _squad_fractions(predictions: list[str], references: list[list[str]]) -> list[tuple[float, float]]:
    pairs = []
    for prediction, truths in zip(predictions, references, strict=True):
        truths = truths or [""]
        pairs.append((max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths),
                      max(_f1(prediction, t) for t in truths)))
    return pairs
