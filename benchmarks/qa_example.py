"""Extractive QA as the transformers example does it (examples/pytorch/question-answering: run_qa.py's
prepare_train_features / prepare_validation_features and utils_qa.postprocess_qa_predictions),
restated here so the Trainer side of benchmarks/vs_trainers.py runs that recipe, not hftk's.

The example's defaults that matter for speed are kept: question left-stripped, overlapping windows
`doc_stride` tokens apart, and padding every window to max_seq_length (pad_to_max_length=True)
unless `pad` is False. Answers go to the first token (the example's cls_index: <s> for a
RoBERTa-style tokenizer) when the window does not hold them.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np


def _tokenize(examples: dict[str, list], tokenizer: Any, max_length: int, doc_stride: int, pad: bool):
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]
    return tokenizer(
        questions if pad_on_right else examples["context"],
        examples["context"] if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
        padding="max_length" if pad else False,
    ), pad_on_right


def _cls_index(input_ids: list[int], tokenizer: Any) -> int:
    for special in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        if special is not None and special in input_ids:
            return input_ids.index(special)
    return 0


def prepare_train_features(examples: dict[str, list], tokenizer: Any, max_length: int, doc_stride: int,
                           pad: bool = True) -> dict[str, list]:
    tokenized, pad_on_right = _tokenize(examples, tokenizer, max_length, doc_stride, pad)
    context_side = 1 if pad_on_right else 0
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = _cls_index(input_ids, tokenizer)
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        start, end = cls_index, cls_index
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start = 0
            while sequence_ids[token_start] != context_side:
                token_start += 1
            token_end = len(input_ids) - 1
            while sequence_ids[token_end] != context_side:
                token_end -= 1
            if offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char:
                while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                    token_start += 1
                while offsets[token_end][1] >= end_char:
                    token_end -= 1
                start, end = token_start - 1, token_end + 1
        tokenized["start_positions"].append(start)
        tokenized["end_positions"].append(end)
    return tokenized


def prepare_validation_features(examples: dict[str, list], tokenizer: Any, max_length: int, doc_stride: int,
                                pad: bool = True) -> dict[str, list]:
    tokenized, pad_on_right = _tokenize(examples, tokenizer, max_length, doc_stride, pad)
    context_side = 1 if pad_on_right else 0
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        tokenized["example_id"].append(examples["id"][sample_mapping[i]])
        # Only context tokens can start or end an answer.
        tokenized["offset_mapping"][i] = [o if sequence_ids[k] == context_side else None
                                          for k, o in enumerate(tokenized["offset_mapping"][i])]
    return tokenized


def postprocess_qa_predictions(examples: Any, features: Any, predictions: tuple[np.ndarray, np.ndarray],
                               version_2_with_negative: bool = False, n_best_size: int = 20,
                               max_answer_length: int = 30, null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """Example id -> answer text ("" when the null answer wins, SQuAD v2)."""
    all_start_logits, all_end_logits = predictions
    example_index = {k: i for i, k in enumerate(examples["id"])}
    features_per_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        features_per_example[example_index[example_id]].append(i)
    offset_mappings = features["offset_mapping"]
    answers = {}
    for index, (example_id, context) in enumerate(zip(examples["id"], examples["context"])):
        candidates, null = _candidates(features_per_example[index], all_start_logits, all_end_logits,
                                       offset_mappings, n_best_size, max_answer_length)
        if version_2_with_negative:
            candidates.append(null)
        candidates = sorted(candidates, key=lambda c: c["score"], reverse=True)[:n_best_size]
        if version_2_with_negative and not any(c["offsets"] == (0, 0) for c in candidates):
            candidates.append(null)
        for candidate in candidates:
            start, end = candidate.pop("offsets")
            candidate["text"] = context[start:end]
        if not candidates or (len(candidates) == 1 and candidates[0]["text"] == ""):
            candidates.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        if not version_2_with_negative:
            answers[example_id] = candidates[0]["text"]
            continue
        best = next(c for c in candidates if c["text"] != "")
        score_diff = null["score"] - best["start_logit"] - best["end_logit"]
        answers[example_id] = "" if score_diff > null_score_diff_threshold else best["text"]
    return answers


def _candidates(feature_indices: list[int], all_start_logits: np.ndarray, all_end_logits: np.ndarray,
                offset_mappings: list, n_best_size: int, max_answer_length: int) -> tuple[list[dict], dict]:
    """The spans of every window of one example, and its null answer (the lowest over its windows)."""
    null, candidates = None, []
    for feature_index in feature_indices:
        start_logits, end_logits = all_start_logits[feature_index], all_end_logits[feature_index]
        offsets = offset_mappings[feature_index]
        null_score = start_logits[0] + end_logits[0]
        if null is None or null["score"] > null_score:
            null = {"offsets": (0, 0), "score": null_score, "start_logit": start_logits[0],
                    "end_logit": end_logits[0]}
        starts = np.argsort(start_logits)[-1:-n_best_size - 1:-1].tolist()
        ends = np.argsort(end_logits)[-1:-n_best_size - 1:-1].tolist()
        for s in starts:
            for e in ends:
                if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                    continue
                if e < s or e - s + 1 > max_answer_length:
                    continue
                candidates.append({"offsets": (offsets[s][0], offsets[e][1]),
                                   "score": start_logits[s] + end_logits[e],
                                   "start_logit": start_logits[s], "end_logit": end_logits[e]})
    return candidates, null
