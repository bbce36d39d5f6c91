"""The task registry: the only place a task name is looked up."""

from __future__ import annotations

from hftk.errors import UserError
from hftk.tasks.base import Task
from hftk.tasks.summarization import Summarization

TASKS: dict[str, type] = {
    "summarization": Summarization,
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task '{name}' is not available yet; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
