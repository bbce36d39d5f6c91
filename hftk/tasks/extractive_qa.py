"""Extractive QA on encoder models: long contexts in overlapping windows (doc_stride), offset
mappings back to characters, n-best span search with a maximum answer length, SQuAD v1 and v2.

Features of one example may land on several processes; every window's logits are gathered with
its example index and offsets, and the spans are chosen once all windows are in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import datasets
import torch

from hftk import metrics
from hftk.errors import UserError
from hftk.logs import log
from hftk.recipe import DataSection
from hftk.tasks.base import ENCODER_ONLY, EXAMPLE_INDEX, Encoding
from hftk.tasks.squad_schema import SquadRows, answer_texts, qa_columns, repair_answer_starts
from hftk.tasks.text_to_text import pad

N_BEST = 20
MAX_ANSWER_TOKENS = 30
NO_OFFSET = -1


class ExtractiveQA(SquadRows):
    name = "extractive_qa"
    headline_metric = "f1"

    def encodings(self):
        return {ENCODER_ONLY: Encoding(ENCODER_ONLY, "AutoModelForQuestionAnswering")}

    def repair(self, dataset: datasets.Dataset, data: DataSection, where: str) -> datasets.Dataset:
        """Real data often has answer_start offsets that miss their text: move them to the text,
        drop answers whose text is not in the context, and rows left with no answer at all."""
        cols = qa_columns(data)
        counts = {"repaired": 0, "dropped": 0}
        keep = []
        answers_out = []
        for i, (context, answers) in enumerate(zip(dataset[cols.context], dataset[cols.answers])):
            texts, starts, repaired, dropped = repair_answer_starts(context, answers["text"], answers["answer_start"])
            counts["repaired"] += repaired
            counts["dropped"] += dropped
            if answers["text"] and not texts:
                continue  # every answer was unusable: not an unanswerable question, a broken row
            keep.append(i)
            answers_out.append({"text": texts, "answer_start": starts})
        if counts["repaired"] or counts["dropped"]:
            log.info(f"{where}: repaired {counts['repaired']} answer_start offsets, dropped {counts['dropped']} "
                     f"answers whose text is not in the context ({len(dataset) - len(keep)} rows removed)")
        kept = dataset.select(keep)
        return kept.remove_columns(cols.answers).add_column(cols.answers, answers_out)

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        cols = qa_columns(data)
        yield from rows[cols.question]
        yield from rows[cols.context]

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        cols = qa_columns(data)
        questions = [q.lstrip() for q in rows[cols.question]]
        longest_question = max(len(tokenizer(q)["input_ids"]) for q in questions)
        if longest_question + 8 > data.max_source_length:
            raise UserError(f"data.max_source_length={data.max_source_length} leaves no room for the context after "
                            f"a question of {longest_question} tokens; raise it")
        encoded = tokenizer(
            questions, rows[cols.context], truncation="only_second", max_length=data.max_source_length,
            stride=min(data.doc_stride, data.max_source_length // 2), return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        sample_of = encoded.pop("overflow_to_sample_mapping")
        features: dict[str, list] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                     "start_positions": [], "end_positions": []}
        if "token_type_ids" in encoded:  # BERT-style segments: question 0, context 1, as in pretraining
            features["token_type_ids"] = encoded["token_type_ids"]
        if not training:
            features["offsets"], features[EXAMPLE_INDEX] = [], []
        for i, offsets in enumerate(encoded["offset_mapping"]):
            sequence = encoded.sequence_ids(i)
            answers = rows[cols.answers][sample_of[i]]
            start, end = _span(offsets, sequence, answers)
            features["start_positions"].append(start)
            features["end_positions"].append(end)
            if not training:
                # Only context tokens can be part of an answer.
                features["offsets"].append([list(o) if s == 1 else [NO_OFFSET, NO_OFFSET]
                                            for o, s in zip(offsets, sequence)])
                features[EXAMPLE_INDEX].append(sample_of[i])  # relative: data.tokenize makes it absolute
        return features

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return SpanCollator(tokenizer.pad_token_id)

    def predict(self, accelerator: Any, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any,
                settings: Any, family: str) -> dict[str, torch.Tensor]:
        from hftk.objective import model_inputs, span_loss_of

        outputs = model(**model_inputs(batch))
        logits = torch.stack([outputs.start_logits, outputs.end_logits], dim=1).float()
        logits = logits.masked_fill(batch["attention_mask"][:, None, :] == 0, -1e4)
        # The loss comes from the same forward pass, so evaluation runs the model once per batch.
        return {"logits": accelerator.pad_across_processes(logits, dim=2, pad_index=-1e4),
                "offsets": accelerator.pad_across_processes(batch["offsets"], dim=1, pad_index=NO_OFFSET),
                "loss": span_loss_of(outputs, batch)}

    def decode(self, collected: dict[str, list[torch.Tensor]], rows: dict[str, list[Any]], tokenizer: Any,
               data: DataSection) -> dict[int, str]:
        contexts = rows[qa_columns(data).context]
        windows = defaultdict(list)
        for indices, logits, offsets in zip(collected[EXAMPLE_INDEX], collected["logits"], collected["offsets"]):
            for index, window_logits, window_offsets in zip(indices.tolist(), logits, offsets):
                windows[index].append((window_logits, window_offsets))
        allow_empty = answers_can_be_empty(rows, data)
        return {index: best_answer(contexts[index], parts, allow_empty) for index, parts in windows.items()}

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[list[str]]:
        return answer_texts(rows, data)

    def compute_metrics(self, predictions: list[str], references: list[list[str]], source: str) -> dict[str, float]:
        return metrics.squad(predictions, references)

    def example_scores(self, predictions: list[str], references: list[list[str]]) -> list[dict[str, float]]:
        return metrics.squad_per_example(predictions, references)


def _span(offsets: list[tuple[int, int]], sequence: list[int | None], answers: dict) -> tuple[int, int]:
    """Token positions of the first answer in this window; (0, 0) (the first token) when it has none."""
    if not answers["text"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [i for i, s in enumerate(sequence) if s == 1]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0  # the answer is not (wholly) inside this window
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


def answers_can_be_empty(rows: dict[str, list[Any]], data: DataSection) -> bool:
    """SQuAD v2 rules when the recipe says so, or, unset, when some evaluated row has no answer (as the
    v2 data does); v1 data never gets an empty answer, as in the transformers QA example."""
    if data.version_2_with_negative is not None:
        return data.version_2_with_negative
    return any(not texts for texts in answer_texts(rows, data))


def best_answer(context: str, windows: list[tuple[torch.Tensor, torch.Tensor]], allow_empty: bool = True) -> str:
    """The best-scoring span over all windows; with `allow_empty` (SQuAD v2), "" when the no-answer score
    beats it."""
    best_score, best_text = None, ""
    null_score = None
    for logits, offsets in windows:
        start_logits, end_logits = logits[0], logits[1]
        window_null = (start_logits[0] + end_logits[0]).item()
        null_score = window_null if null_score is None else min(null_score, window_null)
        starts = torch.topk(start_logits, min(N_BEST, start_logits.numel())).indices
        ends = torch.topk(end_logits, min(N_BEST, end_logits.numel())).indices
        # Every (start, end) pair of the top candidates at once; invalid pairs can never win.
        scores = start_logits[starts][:, None] + end_logits[ends][None, :]
        span = ends[None, :] - starts[:, None]
        valid = (span >= 0) & (span < MAX_ANSWER_TOKENS) & (offsets[starts, 0] >= 0)[:, None] & (offsets[ends, 0] >= 0)[None, :]
        if not valid.any():
            continue
        flat = torch.where(valid, scores, torch.tensor(float("-inf"))).flatten()
        pick = int(flat.argmax())  # the first of equal scores, in (start, end) order
        score = flat[pick].item()
        if best_score is None or score > best_score:
            s, e = starts[pick // len(ends)], ends[pick % len(ends)]
            best_score, best_text = score, context[int(offsets[s][0]):int(offsets[e][1])]
    if best_score is None or (allow_empty and null_score is not None and null_score > best_score):
        return ""
    return best_text


class SpanCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        batch = {"input_ids": pad(ids, self.pad_token_id),
                 "attention_mask": pad([[1] * len(s) for s in ids], 0),
                 "start_positions": torch.tensor([r["start_positions"] for r in rows]),
                 "end_positions": torch.tensor([r["end_positions"] for r in rows])}
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = pad([r["token_type_ids"] for r in rows], 0)
        if "offsets" in rows[0]:
            width = batch["input_ids"].shape[1]
            batch["offsets"] = torch.tensor([r["offsets"] + [[NO_OFFSET, NO_OFFSET]] * (width - len(r["offsets"]))
                                             for r in rows], dtype=torch.long)
            batch[EXAMPLE_INDEX] = torch.tensor([r[EXAMPLE_INDEX] for r in rows], dtype=torch.long)
        return batch
