"""The task registry: the only place a task name is looked up."""

from __future__ import annotations

from hftk.errors import UserError
from hftk.tasks.base import Task
from hftk.tasks.dialogue import Dialogue
from hftk.tasks.extractive_qa import ExtractiveQA
from hftk.tasks.generative_qa import GenerativeQA
from hftk.tasks.summarization import Summarization
from hftk.tasks.text_generation import TextGeneration
from hftk.tasks.translation import Translation

TASKS: dict[str, type] = {
    "summarization": Summarization,
    "translation": Translation,
    "extractive_qa": ExtractiveQA,
    "generative_qa": GenerativeQA,
    "dialogue": Dialogue,
    "text_generation": TextGeneration,
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task '{name}' is not available; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
