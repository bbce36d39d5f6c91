"""The SQuAD schema shared by extractive and generative QA: flat rows
(id, title, context, question, answers{text, answer_start}) or the original nested JSON
(data -> paragraphs -> qas), and the repair of answer_start offsets that miss their text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hftk.errors import UserError
from hftk.recipe import DataSection
from hftk.tasks.base import TaskDefaults, first_problem, has_text, text_problem


@dataclass(frozen=True)
class QAColumns:
    question: str
    context: str
    answers: str


def qa_columns(data: DataSection) -> QAColumns:
    return QAColumns(data.question_column or "question", data.context_column or "context",
                     data.answer_column or "answers")


SQUAD_SHAPE = "{'text': [str, ...], 'answer_start': [int, ...]} (empty lists for no answer)"


def qa_row_problems(rows: dict[str, list[Any]], data: DataSection) -> list[str | None]:
    """Per row: question and context are text, answers have the SQuAD shape."""
    cols = qa_columns(data)
    return [first_problem(text_problem(cols.question, q), text_problem(cols.context, c), _answers_problem(a, cols))
            for q, c, a in zip(rows[cols.question], rows[cols.context], rows[cols.answers])]


def _answers_problem(answers: Any, cols: QAColumns) -> str | None:
    if answers is None:
        return f"'{cols.answers}' is missing or null"
    if not _is_squad_shape(answers):
        return f"column '{cols.answers}' must be in the SQuAD shape {SQUAD_SHAPE}"
    return None


def _is_squad_shape(answers: Any) -> bool:
    if not isinstance(answers, dict):
        return False
    texts, starts = answers.get("text"), answers.get("answer_start")
    return (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
            and all(isinstance(t, str) for t in texts)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in starts))


def contexts_present(rows: dict[str, list[Any]], data: DataSection) -> list[bool]:
    return [has_text(c) for c in rows[qa_columns(data).context]]


def answer_texts(rows: dict[str, list[Any]], data: DataSection) -> list[list[str]]:
    return [list(a["text"]) for a in rows[qa_columns(data).answers]]


def is_nested_squad(path: Path) -> bool:
    """The file users download from the SQuAD site: one JSON object with a "data" list."""
    if path.suffix != ".json" or not path.is_file():
        return False
    with path.open() as handle:
        head = handle.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head and '"paragraphs"' in head


def flatten_nested_squad(path: Path) -> list[dict[str, Any]]:
    try:
        articles = json.loads(path.read_text())["data"]
        rows = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    rows.append({
                        "id": str(qa["id"]), "title": article.get("title", ""), "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {"text": [a["text"] for a in answers],
                                    "answer_start": [int(a["answer_start"]) for a in answers]},
                    })
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: not a SQuAD file (data -> paragraphs -> qas): {err!r}") from None
    return rows


def repair_answer_starts(context: str, texts: list[str], starts: list[int]) -> tuple[list[str], list[int], int, int]:
    """Keep answers whose start points at their text; move the others to where the text occurs
    (the occurrence nearest the stated start), drop those whose text is not in the context.
    Returns texts, starts, repaired count, dropped count."""
    kept_texts, kept_starts, repaired, dropped = [], [], 0, 0
    for text, start in zip(texts, starts):
        if context[start:start + len(text)] == text:
            kept_texts.append(text), kept_starts.append(start)
            continue
        found = [i for i in _occurrences(context, text)]
        if found:
            kept_texts.append(text), kept_starts.append(min(found, key=lambda i: abs(i - start)))
            repaired += 1
        else:
            dropped += 1
    return kept_texts, kept_starts, repaired, dropped


def _occurrences(context: str, text: str):
    if not text:
        return
    start = context.find(text)
    while start != -1:
        yield start
        start = context.find(text, start + 1)


class SquadRows(TaskDefaults):
    """The columns and row checks every task on SQuAD-schema rows shares (extractive and generative QA)."""

    def columns(self, data: DataSection) -> list[str]:
        cols = qa_columns(data)
        return [cols.question, cols.context, cols.answers]

    def row_problems(self, rows: dict[str, list[Any]], data: DataSection) -> list[str | None]:
        return qa_row_problems(rows, data)

    def has_source(self, rows: dict[str, list[Any]], data: DataSection) -> list[bool]:
        return contexts_present(rows, data)

    def source_label(self, data: DataSection) -> str:
        return f"'{qa_columns(data).context}'"
