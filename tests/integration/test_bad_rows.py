"""Rows that are wrong in the middle of a file: every row is checked before any model loads.

Each case writes a file of 200+ rows of the bundled data with a few rows broken past the first
hundred, and expects exit 2 with one line that counts the bad rows and names the first, and no
file changed. Add a row to the table for each new kind of bad row.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hftk.cli import app
from tests.conftest import ROOT, digest, tiny_recipe, write_recipe

ROWS = 240  # every file; broken rows sit past row 100, where the old sample check stopped

DATA = {"summarization": "summarize", "translation": "translate", "generative_qa": "qa", "extractive_qa": "qa",
        "dialogue": "dialogue", "text_generation": "text"}
MODELS = {
    "extractive_qa": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 64, "max_position_embeddings": 128},
    "text_generation": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 1024},
}
TASK_KEYS = {"translation": {"source_lang": "en", "target_lang": "fr"}}


def bundled_rows(task: str) -> list[dict]:
    with (ROOT / "data" / DATA[task] / "train.jsonl").open() as handle:
        return [json.loads(next(handle)) for _ in range(ROWS)]


def broken(task: str, change: Callable[[int, dict], None], at: tuple[int, ...]) -> list[dict]:
    rows = bundled_rows(task)
    for i in at:
        change(i, rows[i])
    return rows


def setter(key: str, value) -> Callable[[int, dict], None]:
    return lambda i, row: row.__setitem__(key, copy.deepcopy(value))


def deleter(key: str) -> Callable[[int, dict], None]:
    return lambda i, row: row.pop(key)


def without_language(lang: str) -> Callable[[int, dict], None]:
    return lambda i, row: row["translation"].pop(lang)


def mixed_summary(i: int, row: dict) -> None:
    row["summary"] = 5 if i % 2 else ["a", "list"]


def user_turns_only(i: int, row: dict) -> None:
    row["messages"] = [m for m in row["messages"] if m["role"] != "assistant"]


# name: (task, rows, expected count, first bad row, words of the problem)
CASES = {
    "summarization null target": ("summarization", lambda: broken("summarization", setter("summary", None),
                                                                  (120, 171, 230)), 3, 120,
                                  "'summary' is missing or null"),
    "summarization missing key": ("summarization", lambda: broken("summarization", deleter("summary"), (133,)), 1,
                                  133, "'summary' is missing or null"),
    "summarization null source": ("summarization", lambda: broken("summarization", setter("document", None),
                                                                  (150, 151)), 2, 150,
                                  "'document' is missing or null"),
    "summarization mixed-type column": ("summarization", lambda: broken("summarization", mixed_summary,
                                                                        (111, 160)), 2, 111,
                                        "column 'summary' must hold text, found int"),
    "translation missing target language": ("translation", lambda: broken("translation", without_language("fr"),
                                                                          (140, 199)), 2, 140,
                                            "'translation' has no language 'fr' (it has: en)"),
    "translation null source text": ("translation", lambda: broken("translation", lambda i, r: r["translation"].update(
        en=None), (125,)), 1, 125, "'translation' has no language 'en' (it has: fr)"),
    "generative qa null answers": ("generative_qa", lambda: broken("generative_qa", setter("answers", None), (177,)),
                                   1, 177, "'answers' is missing or null"),
    "generative qa missing context": ("generative_qa", lambda: broken("generative_qa", deleter("context"), (101,)),
                                      1, 101, "'context' is missing or null"),
    "extractive qa answers not squad": ("extractive_qa", lambda: broken("extractive_qa", setter(
        "answers", {"text": "Ana", "answer_start": 3}), (210,)), 1, 210, "column 'answers' must be in the SQuAD shape"),
    "dialogue no messages": ("dialogue", lambda: broken("dialogue", setter("messages", []), (150, 160)), 2, 150,
                             "a conversation with no messages"),
    "dialogue no assistant turn": ("dialogue", lambda: broken("dialogue", user_turns_only, (199,)), 1, 199,
                                   "no assistant turn"),
    "dialogue message without content": ("dialogue", lambda: broken("dialogue", setter(
        "messages", [{"role": "user"}, {"role": "assistant", "content": "Hi."}]), (108,)), 1, 108,
                                         "every message needs a role"),
    "translation mixed-type text": ("translation", lambda: broken("translation", lambda i, r: r["translation"].update(
        en=5), (160,)), 1, 160, "column 'translation.en' must hold text, found int"),
    "generative qa mixed-type question": ("generative_qa", lambda: broken("generative_qa", setter("question", 42),
                                                                          (190,)), 1, 190,
                                          "column 'question' must hold text, found int"),
    "extractive qa null context": ("extractive_qa", lambda: broken("extractive_qa", setter("context", None),
                                                                   (105, 106)), 2, 105, "'context' is missing or null"),
    "dialogue mixed-type messages": ("dialogue", lambda: broken("dialogue", setter("messages", "Hi there."), (222,)),
                                     1, 222, "column 'messages' must hold lists of {role, content} messages, found str"),
    "text generation mixed-type text": ("text_generation", lambda: broken("text_generation", setter("text", 7),
                                                                          (180,)), 1, 180,
                                        "column 'text' must hold text, found int"),
    "text generation null text": ("text_generation", lambda: broken("text_generation", setter("text", None),
                                                                    (130, 131, 132)), 3, 130,
                                  "'text' is missing or null"),
}

# name: (task, rows, file suffix, words of the line) for splits that are bad as a whole
WHOLE_SPLIT_CASES = {
    "all sources empty": ("summarization", lambda: broken("summarization", setter("document", " "), tuple(range(ROWS))),
                          "jsonl", "data.train: every 'document' is empty or blank (240 rows)"),
    "all translation sources empty": ("translation", lambda: broken("translation", lambda i, r: r["translation"].update(
        en=""), tuple(range(ROWS))), "jsonl", "every 'en' text is empty or blank"),
    "all dialogue content empty": ("dialogue", lambda: broken("dialogue", setter(
        "messages", [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]), tuple(range(ROWS))),
                                   "jsonl", "every message content in 'messages' is empty or blank"),
    "all texts empty": ("text_generation", lambda: broken("text_generation", setter("text", ""), tuple(range(ROWS))),
                        "jsonl", "every 'text' is empty or blank"),
    "csv missing cells": ("summarization", lambda: broken("summarization", setter("summary", None), (115, 116)), "csv",
                          "data.train: 2 of 240 rows are bad; first at row 115: 'summary' is missing or null"),
}


def write_rows(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe_for(tmp_path: Path, task: str, train: str, **data) -> Path:
    recipe = tiny_recipe(tmp_path)
    recipe["task"] = task
    recipe["model"]["config"] = MODELS.get(task, recipe["model"]["config"])
    recipe["data"].update(train=train, validation=str(ROOT / "data" / DATA[task] / "validation.jsonl"),
                          **TASK_KEYS.get(task, {}), **data)
    return write_recipe(tmp_path, recipe)


def refused_line(tmp_path: Path, command: str, recipe: Path, *overrides: str) -> str:
    """Runs the command in-process; it must exit 2 with one error line and leave every file as it was."""
    before = digest(tmp_path)
    result = CliRunner().invoke(app, [command, str(recipe), *overrides])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hftk: error:"), result.stderr
    assert digest(tmp_path) == before, "bad input changed or wrote files"
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_in_the_middle_exits_2_naming_count_and_first(tmp_path, case):
    task, rows, count, first, problem = CASES[case]
    recipe = recipe_for(tmp_path, task, write_rows(tmp_path / "train.jsonl", rows()))
    line = refused_line(tmp_path, "validate", recipe)
    assert (f"data.train: {count} of {ROWS} rows are bad; first at row {first}: {problem}" in line
            and "data.drop_bad_rows=true" in line), line


@pytest.mark.parametrize("case", sorted(WHOLE_SPLIT_CASES))
def test_bad_split_exits_2(tmp_path, case):
    task, rows, suffix, expected = WHOLE_SPLIT_CASES[case]
    recipe = recipe_for(tmp_path, task, write_rows(tmp_path / f"train.{suffix}", rows()))
    assert expected in refused_line(tmp_path, "validate", recipe)


def test_finetune_checks_every_row_too(tmp_path):
    rows = broken("summarization", setter("summary", None), (150,))
    recipe = recipe_for(tmp_path, "summarization", write_rows(tmp_path / "train.jsonl", rows))
    line = refused_line(tmp_path, "finetune", recipe)
    assert "data.train: 1 of 240 rows are bad; first at row 150" in line


def test_every_row_bad_is_exit_2_even_when_dropping(tmp_path):
    rows = broken("summarization", setter("summary", None), tuple(range(ROWS)))
    recipe = recipe_for(tmp_path, "summarization", write_rows(tmp_path / "train.jsonl", rows), drop_bad_rows=True)
    line = refused_line(tmp_path, "validate", recipe)
    assert "data.train: 240 of 240 rows are bad; first at row 0" in line and "would leave no row" in line


def test_text_too_short_for_one_block_exits_2_before_anything_is_written(tmp_path):
    """Only the tokenizer knows the length: the check runs on the tokenized split, before output_dir."""
    rows = broken("text_generation", lambda i, r: r.update(text=r["text"].split()[0]), tuple(range(ROWS)))
    recipe = recipe_for(tmp_path, "text_generation", write_rows(tmp_path / "train.jsonl", rows),
                        max_source_length=512, max_target_length=1)
    line = refused_line(tmp_path, "finetune", recipe)
    assert "data.train:" in line and "less than one block of data.max_source_length=512 tokens" in line, line
    assert not (tmp_path / "run").exists()


def test_drop_bad_rows_trains_and_logs_the_count(tmp_path):
    rows = broken("summarization", setter("summary", None), (120, 150, 201))
    recipe = recipe_for(tmp_path, "summarization", write_rows(tmp_path / "train.jsonl", rows), drop_bad_rows=True)
    result = CliRunner().invoke(app, ["finetune", str(recipe), "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    logged = " ".join(result.stderr.split())  # the console wraps long lines
    assert "data.train: dropped 3 bad rows of 240 (first at row 120: 'summary' is missing or null)" in logged, logged
    assert (tmp_path / "run" / "all_results.json").exists()
