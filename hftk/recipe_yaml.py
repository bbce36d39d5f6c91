"""Recipe text to a plain tree: a hardened YAML loader (duplicate keys, unbounded aliases and non-UTF-8
refused with the line they are on), dotted KEY=VALUE overrides, and the merge of the two. The schema that
judges the tree is hftk.recipe."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hftk.errors import UserError

# More values than any recipe holds; aliases nested a few levels deep ("billion laughs") pass it at once.
MAX_YAML_VALUES = 100_000


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads 3e-4 (no dot) as a float, as YAML 1.2 and users do, refuses
    duplicate keys (PyYAML keeps the last one silently) and aliases that expand without bound."""

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        _reject_duplicate_keys(self, node)
        return node

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _reject_duplicate_keys(loader: _RecipeLoader, node: yaml.MappingNode) -> None:
    first_seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if key in first_seen:
            first = first_seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key_node.value}' (also at line {first})", key_node.start_mark)
        first_seen[key] = key_node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values the node becomes once every alias is copied out; counted once per node."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise yaml.composer.ComposerError(None, None, "an alias refers to a collection that holds it",
                                          node.start_mark)
    open_nodes.add(id(node))
    children = [] if isinstance(node, yaml.ScalarNode) else node.value
    pairs = children if isinstance(node, yaml.MappingNode) else [(child,) for child in children]
    size = 1 + sum(_expanded_size(part, sizes, open_nodes) for pair in pairs for part in pair)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise yaml.composer.ComposerError(
            None, None, f"aliases expand it to more than {MAX_YAML_VALUES} values", node.start_mark)
    sizes[id(node)] = size
    return size


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: a recipe is data, never code


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["train.learning_rate=3e-4", ...] into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}' is not KEY=VALUE with a dotted key (e.g. train.learning_rate=3e-4)")
        try:
            value = _yaml(raw) if raw else ""
        except (yaml.YAMLError, RecursionError) as err:
            raise UserError(f"override '{item}': value is not valid YAML ({_yaml_problem(err)})") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' conflicts with another override of '{part}'")
        node[leaf] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = _recipe_text(path)
    try:
        raw = _yaml(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise UserError(f"{path}: malformed YAML{_where(err, text)}: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with task, model, data and train sections")
    return raw


def _recipe_text(path: Path) -> str:
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a recipe file")
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read the recipe {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                        f"save the recipe as UTF-8") from None


def _where(err: BaseException, text: str) -> str:
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(err, yaml.reader.ReaderError):
        return f" at line {text.count(chr(10), 0, err.position) + 1}"
    return ""


def _yaml_problem(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, yaml.reader.ReaderError):
        return f"character #x{err.character:04x} is not allowed in YAML"
    return str(getattr(err, "problem", None) or err)
