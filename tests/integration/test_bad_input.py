"""Bad input ends before any model loads: exit 2, one line on stderr, nothing written.

This table grows with every bug found: add a row, not a new test.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hftk.cli import app
from tests.conftest import ROOT, run_hftk, tiny_recipe, write_recipe


def _empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return str(path)


def _renamed_column(tmp_path):
    path = tmp_path / "renamed.jsonl"
    path.write_text(json.dumps({"document": "a text.", "abstract": "a summary."}) + "\n")
    return str(path)


def _not_text(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text(json.dumps({"document": 3, "summary": "a summary."}) + "\n")
    return str(path)


def _rows(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task(task, train, *extra):
    return lambda t: ({}, [f"task={task}", f"data.train={train(t) if callable(train) else train}",
                           f"data.validation={train(t) if callable(train) else train}", *extra])


QA_FILE = str(ROOT / "data/qa/validation.jsonl")
BAD_ANSWERS = lambda t: _rows(t, "qa", [{"question": "Who?", "context": "Ana spoke.", "answers": "Ana"}])
NO_ROLES = lambda t: _rows(t, "chat", [{"messages": [{"speaker": "user", "text": "hi"}]}])


def _output_is_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    return str(path)


CASES = {
    "task on a family it cannot use": (_task("extractive_qa", QA_FILE), "task extractive_qa cannot use an encoder-decoder model (t5)"),
    "missing language key": (_task("translation", str(ROOT / "data/translate/validation.jsonl"), "data.source_lang=en",
                                   "data.target_lang=de"), "has no language 'de'"),
    "no languages given": (_task("translation", str(ROOT / "data/translate/validation.jsonl")), "needs data.source_lang"),
    "answers not in SQuAD shape": (_task("generative_qa", BAD_ANSWERS), "SQuAD shape"),
    "dialogue row without roles": (_task("dialogue", NO_ROLES), "every message needs a role"),
    "no room for the question": (_task("generative_qa", QA_FILE, "data.max_source_length=6"), "leaves no room for the context"),
    "unknown key": (lambda t: ({}, ["train.learnig_rate=1e-3"]), "unknown key 'train.learnig_rate' (did you mean 'train.learning_rate'?)"),
    "unknown task": (lambda t: ({}, ["task=poetry"]), "task: must be one of"),
    "negative lr": (lambda t: ({}, ["train.learning_rate=-0.1"]), "train.learning_rate"),
    "zero length": (lambda t: ({}, ["data.max_target_length=0"]), "data.max_target_length"),
    "missing data file": (lambda t: ({"data": {"train": str(t / "missing.jsonl")}}, []), "file not found"),
    "empty data file": (lambda t: ({"data": {"train": _empty_file(t)}}, []), "is empty"),
    "missing column": (lambda t: ({"data": {"train": _renamed_column(t)}}, []), "missing column 'summary' (columns are: document, abstract)"),
    "column not text": (lambda t: ({"data": {"validation": _not_text(t)}}, []), "column 'document' must hold text"),
    "unreachable model id": (lambda t: ({"model": {"name_or_path": "no-such-user/no-such-model", "config": None,
                                                   "tokenizer": None}}, []),
                             "cannot be fetched from the Hugging Face Hub"),
    "unreachable hub dataset": (lambda t: ({"data": {"train": {"path": "no-such-user/no-such-data"}}}, []),
                                "give a local .json/.jsonl/.csv/.parquet file"),
    "unknown model type": (lambda t: ({"model": {"config": {"model_type": "t6"}}}, []), "unknown model type 't6' (did you mean 't5'?)"),
    "misspelt config field": (lambda t: ({"model": {"config": {"model_type": "t5", "num_layer": 2}}}, []),
                              "'model.config.num_layer' (did you mean 'model.config.num_layers'?)"),
    "output_dir is a file": (lambda t: ({"train": {"output_dir": _output_is_file(t)}}, []), "exists and is a file"),
    "output_dir under a file": (lambda t: ({"train": {"output_dir": _output_is_file(t) + "/run"}}, []),
                                "is a file, so"),
    "hub metrics offline": (lambda t: ({"eval": {"metric_source": "hub"}}, []), "HF_HUB_OFFLINE"),
    "resume from nowhere": (lambda t: ({"train": {"resume_from_checkpoint": str(t / "ckpt")}}, []), "no such checkpoint folder"),
    "lengths past positions": (lambda t: ({"model": {"config": {"model_type": "bart", "max_position_embeddings": 32,
                                                                 "d_model": 16}}}, []),
                               "exceeds the model's 32 positions"),
}


def _strip_none(section: dict) -> dict:
    return {k: v for k, v in section.items() if v is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    make, expected = CASES[case]
    changes, overrides = make(tmp_path)
    recipe = tiny_recipe(tmp_path)
    for section, values in changes.items():
        if section == "model" and "config" in values and values["config"] and "tokenizer" not in values:
            recipe["model"]["config"] = values["config"]
        else:
            recipe[section] = _strip_none({**recipe[section], **values})
    before = sorted(p.name for p in tmp_path.iterdir())
    path = write_recipe(tmp_path, recipe)
    result = CliRunner().invoke(app, ["finetune", str(path), *overrides])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hftk: error:"), result.stderr
    assert expected in lines[0]
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == sorted(before + ["recipe.yaml"]), "the run wrote files despite bad input"


def test_validate_command_agrees(tmp_path):
    good = write_recipe(tmp_path, tiny_recipe(tmp_path))
    ok = CliRunner().invoke(app, ["validate", str(good)])
    assert ok.exit_code == 0 and "ok: summarization on a encoder-decoder t5 model" in ok.output
    bad = CliRunner().invoke(app, ["validate", str(good), "data.source_column=text"])
    assert bad.exit_code == 2 and "missing column 'text'" in bad.stderr
    assert not (tmp_path / "run").exists()


def test_real_command_prints_no_traceback(tmp_path):
    result = run_hftk("finetune", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"hftk: error: recipe file not found: {tmp_path / 'missing.yaml'}"
    flag = run_hftk("eval", str(ROOT / "recipes/summarize.yaml"), "--split", "dev")
    assert flag.returncode == 2 and "--split must be train, validation or test" in flag.stderr
