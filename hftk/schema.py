"""`hftk recipe-schema`: every recipe key with its type, default and description, read from the
pydantic models in recipe.py so the listing can never drift from what validation accepts. The README's
recipe reference is the same listing as markdown (`--markdown`, `--write-readme README.md`)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hftk.errors import UserError
from hftk.recipe import Recipe

README_START = "<!-- recipe-reference:start -->"
README_END = "<!-- recipe-reference:end -->"
REGENERATE = "python -m hftk recipe-schema --write-readme README.md"


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section a key holds, looked for through unions and annotations (data.train: one source or a
    list of them lists a source's keys)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := _section_of(arg)) is not None), None)


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
                         "description": info.description or (section.__doc__ or "").strip().split("\n")[0]})
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


def markdown_reference() -> str:
    """The keys as markdown: the top-level keys, then one table per section."""
    keys = recipe_keys()
    sections = [k for k in keys if k["type"] == "section" and "." not in k["key"]]
    parts = [f"<!-- generated from hftk/recipe.py by `{REGENERATE}`; edit the descriptions there -->", ""]
    parts += _markdown_table([k for k in keys if "." not in k["key"] and k["type"] != "section"])
    for section in sections:
        needed = "required" if section["required"] else "optional"
        parts += ["", f"**`{section['key']}`** ({needed}): {section['description']}", ""]
        parts += _markdown_table([k for k in keys if k["key"].startswith(section["key"] + ".")])
    return "\n".join(parts) + "\n"


def _markdown_table(keys: list[dict[str, Any]]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key in keys:
        if key["type"] == "section":
            kind, default = "section", "required" if key["required"] else ""
        else:
            kind = _readable_type(key["type"])
            default = "required" if key["required"] else f"`{json.dumps(key['default'])}`"
        cells = [f"`{key['key']}`", f"`{kind}`" if kind != "section" else "section", default, key["description"]]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def _readable_type(text: str) -> str:
    """Literal['a', 'b'] -> 'a' | 'b', Union[x, y] -> x | y, as a YAML writer thinks of them."""
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: m.group(1).replace(", ", " | "), text)
    return re.sub(r"Union\[(.*)\]", lambda m: m.group(1).replace(", ", " | "), text)


def write_readme(path: Path) -> bool:
    """Put the reference between the README's marker comments; True when the file changed."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if text.count(README_START) != 1 or text.count(README_END) != 1 or text.index(README_START) > text.index(README_END):
        raise UserError(f"{path} needs one '{README_START}' line and, after it, one '{README_END}' line")
    before, rest = text.split(README_START)
    after = rest.split(README_END)[1]
    updated = f"{before}{README_START}\n{markdown_reference()}{README_END}{after}"
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def readme_reference(path: Path) -> str | None:
    """What the README holds between the markers now, or None without them."""
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return None
    return text.split(README_START, 1)[1].split(README_END, 1)[0].removeprefix("\n")
