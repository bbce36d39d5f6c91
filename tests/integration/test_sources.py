"""Several sources and streams, trained: weighted draws in their proportions, reproduced and resumed
bit-identically; a stream split over 2 real processes without an example drawn twice or skipped, its
bad rows past the judged head skipped and counted, and a killed stream resumed bit-identically."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import (
    FAULTS,
    ROOT,
    accelerate_launch,
    loss_rows,
    results,
    run_hftk,
    tiny_recipe,
    weights,
    write_recipe,
)

pytestmark = pytest.mark.slow  # every test here trains or launches

SUMMARIES = [json.loads(line) for line in (ROOT / "data/summarize/train.jsonl").read_text().splitlines()]
VALIDATION = [json.loads(line) for line in (ROOT / "data/summarize/validation.jsonl").read_text().splitlines()]


def _own_columns(rows):
    return [{"uid": r["id"], "article": r["document"], "highlights": r["summary"]} for r in rows]


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


WIKI = {"source_column": "article", "target_column": "highlights", "id_column": "uid"}


def mixed_recipe(tmp_path: Path, name: str = "run", news_weight: float = 0.75, **train) -> Path:
    """news (recipe columns) and wiki (its own), 32 rows each, drawn 0.75 / 0.25: an epoch of 64 draws is
    48 news (each row 1.5 times) and 16 wiki; 16 steps of 8 are two epochs."""
    data = {
        "train": [{"path": _write(tmp_path / "news.jsonl", SUMMARIES[:32]), "weight": news_weight},
                  {"path": _write(tmp_path / "wiki.jsonl", _own_columns(SUMMARIES[32:64])),
                   "weight": 1 - news_weight, **WIKI}],
        "validation": [_write(tmp_path / "news_eval.jsonl", VALIDATION[:8]),
                       {"path": _write(tmp_path / "wiki_eval.jsonl", _own_columns(VALIDATION[8:16])),
                        "label": "wiki", **WIKI}],
        "max_train_samples": None,
    }
    settings = {"output_dir": str(tmp_path / name), "max_steps": 16, "logging_steps": 1, "save_steps": 4, **train}
    recipe = tiny_recipe(tmp_path, data=data, train=settings)
    recipe["model"]["config"]["dropout_rate"] = 0.1  # resumes must restore the dropout generator too
    return write_recipe(tmp_path, recipe, f"{name}.yaml")


def _finetune(path: Path, *overrides, env=None):
    result = run_hftk("finetune", str(path), *overrides, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("mixed")
    _finetune(mixed_recipe(tmp_path))
    return tmp_path / "run"


def test_weighted_sources_draw_their_proportions_and_each_is_scored(mixed):
    found = results(mixed)
    # 16 steps x 8 = 128 draws = two epochs of the mixture: exactly 75% / 25%
    assert found["train_examples_by_source"] == {"news": 96, "wiki": 32}
    for label in ("news_eval", "wiki"):
        assert f"eval_{label}_loss" in found and f"eval_{label}_rougeL" in found
        assert found[f"eval_{label}_samples"] == 8
    whole = (found["eval_news_eval_loss"] + found["eval_wiki_loss"]) / 2
    assert found["eval_loss"] == pytest.approx(whole, rel=0.05)  # the whole is made of its parts
    ids = [json.loads(line)["id"] for line in (mixed / "predictions.jsonl").read_text().splitlines()]
    assert ids == [r["id"] for r in VALIDATION[:16]]  # wiki's uid column came along as the id


def test_a_rerun_reproduces_the_mixture(mixed, tmp_path):
    _finetune(mixed_recipe(tmp_path))
    assert loss_rows(tmp_path / "run") == loss_rows(mixed)
    assert weights(tmp_path / "run") == weights(mixed)


def test_a_killed_mixed_run_resumes_bit_identically(mixed, tmp_path):
    path = mixed_recipe(tmp_path)
    killed = run_hftk("finetune", str(path), env={"HFTK_FAULT": "step:6", "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert killed.returncode == -signal.SIGKILL
    resumed = _finetune(path, "train.resume_from_checkpoint=latest")
    assert "resuming from" in resumed.stderr
    assert loss_rows(tmp_path / "run") == loss_rows(mixed)
    assert weights(tmp_path / "run") == weights(mixed)
    assert results(tmp_path / "run")["train_examples_by_source"] == {"news": 96, "wiki": 32}


def test_resuming_with_other_weights_is_refused(mixed, tmp_path):
    path = mixed_recipe(tmp_path, max_steps=4, save_steps=2)
    killed = run_hftk("finetune", str(path), env={"HFTK_FAULT": "step:3", "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert killed.returncode == -signal.SIGKILL
    changed = mixed_recipe(tmp_path, news_weight=0.5, max_steps=4, save_steps=2)
    result = run_hftk("finetune", str(changed), "train.resume_from_checkpoint=latest")
    assert result.returncode == 2
    assert "every source's rows, weight, label and column keys count" in result.stderr


# --- streaming -------------------------------------------------------------------------------------------

STREAM_ROWS, BAD_AT, JUDGED = 120, 70, 50


def stream_recipe(tmp_path: Path, name: str, batch: int, dropout: float = 0.1, **train) -> Path:
    rows = [dict(r) for r in SUMMARIES[:STREAM_ROWS]]
    rows[BAD_AT]["summary"] = None  # past the judged head: skipped and counted while training
    data = {"train": _write(tmp_path / "stream.jsonl", rows), "streaming": True, "stream_check_rows": JUDGED,
            "max_train_samples": None}
    settings = {"output_dir": str(tmp_path / name), "logging_steps": 1, "save_steps": 4,
                "per_device_train_batch_size": batch, **train}
    recipe = tiny_recipe(tmp_path, data=data, train=settings)
    recipe["model"]["config"]["dropout_rate"] = dropout
    return write_recipe(tmp_path, recipe, f"{name}.yaml")


def _recorded(folder: Path) -> list[list[list[int]]]:
    """Per optimizer step, the examples (token ids) of every process together."""
    ranks = [[json.loads(line) for line in path.read_text().splitlines()] for path in sorted(folder.glob("rank-*"))]
    return [[example for steps in ranks for example in steps[i]] for i in range(len(ranks[0]))]


def test_a_stream_on_two_processes_draws_each_example_once_as_one_process_does(tmp_path):
    env = {"PYTHONPATH": f"{FAULTS}:{ROOT}"}
    one, two = tmp_path / "one-steps", tmp_path / "two-steps"
    one.mkdir(), two.mkdir()
    # no dropout: one process and two draw other masks
    _finetune(stream_recipe(tmp_path, "one", 8, 0.0, max_steps=10), env={**env, "HFTK_RECORD": str(one)})
    launched = run_hftk("finetune", str(stream_recipe(tmp_path, "two", 4, 0.0, max_steps=10)),
                        launcher=accelerate_launch("ddp.yaml"),
                        env={**env, "HFTK_RECORD": str(two), "ACCELERATE_USE_CPU": "false"})
    assert launched.returncode == 0, launched.stderr[-4000:]
    single, double = _recorded(one), _recorded(two)
    assert len(single) == len(double) == 10
    drawn = [tuple(example) for step in double for example in step]
    assert len(drawn) == 80 and len(set(drawn)) == 80, "an example drawn twice"
    # the same examples in every step as one process reading the stream in order: none skipped
    assert [Counter(map(tuple, step)) for step in double] == [Counter(map(tuple, step)) for step in single]
    for folder in (tmp_path / "one", tmp_path / "two"):
        found = results(folder)
        assert found["train_bad_rows_skipped"] == 1 and found["train_examples_by_source"] == {"stream": 80}
    assert "skipped 1 bad row(s) of the stream ('summary' is missing or null)" in launched.stderr
    got, want = dict(loss_rows(tmp_path / "two")), dict(loss_rows(tmp_path / "one"))
    assert max(abs(got[s] - want[s]) / want[s] for s in want) < 1e-4


@pytest.fixture(scope="module")
def unbroken_stream(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("stream")
    _finetune(stream_recipe(tmp_path, "run", 8, max_steps=20))  # 160 draws: the 119 good rows, then again
    return tmp_path / "run"


@pytest.mark.parametrize("fault", ["step:6", "step:17"])  # in the first pass; in the second
def test_a_killed_stream_resumes_bit_identically(unbroken_stream, tmp_path, fault):
    path = stream_recipe(tmp_path, "run", 8, max_steps=20)
    killed = run_hftk("finetune", str(path), env={"HFTK_FAULT": fault, "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert killed.returncode == -signal.SIGKILL
    _finetune(path, "train.resume_from_checkpoint=latest")
    assert loss_rows(tmp_path / "run") == loss_rows(unbroken_stream)
    assert weights(tmp_path / "run") == weights(unbroken_stream)
    found, want = results(tmp_path / "run"), results(unbroken_stream)
    assert found["train_bad_rows_skipped"] == want["train_bad_rows_skipped"] == 2  # met in both passes
    assert found["train_examples_by_source"] == {"stream": 160}
