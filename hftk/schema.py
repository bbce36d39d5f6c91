"""`hftk recipe-schema`: every recipe key with its type, default and description, read from the
pydantic models in recipe.py so the listing can never drift from what validation accepts."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hftk.recipe import Recipe


def _section_of(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) or (annotation,)
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _type_name(annotation: Any) -> str:
    text = str(annotation) if typing.get_args(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("NoneType", "None")


def recipe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[dict[str, Any]]:
    """[{key, type, default, required, description}] in recipe order, sections flattened to dotted keys."""
    keys: list[dict[str, Any]] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        section = _section_of(info.annotation)
        if section is not None and section is not model:
            keys.append({"key": dotted, "type": "section", "default": None, "required": info.is_required(),
                         "description": (section.__doc__ or "").strip().split("\n")[0]})
            keys.extend(recipe_keys(section, f"{dotted}."))
            continue
        default = info.get_default(call_default_factory=True)
        keys.append({"key": dotted, "type": _type_name(info.annotation),
                     "default": None if default is PydanticUndefined else default,
                     "required": info.is_required(), "description": info.description or ""})
    return keys


def print_schema() -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="recipe keys")
    for column in ("key", "type", "default", "description"):
        table.add_column(column)
    for key in recipe_keys():
        default = "required" if key["required"] else ("" if key["type"] == "section" else repr(key["default"]))
        table.add_row(key["key"], escape(key["type"]), escape(default), escape(key["description"]))
    Console().print(table)
