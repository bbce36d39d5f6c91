"""Checkpoint cadence and pruning, overwrite on request, and which checkpoint counts as latest.

Resumed runs equal to unbroken ones: tests/integration/test_interruptions.py."""

from __future__ import annotations

import json
import shutil

import pytest

from hftk.checkpoint import MANIFEST, latest_checkpoint
from tests.conftest import run_hftk, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds


def _train(tmp_path, name, *overrides, env=None, **sections):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, **sections), f"{name}.yaml")
    result = run_hftk("finetune", str(path), *overrides, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_overwrite_starts_afresh_and_save_total_limit_prunes(tmp_path):
    run = tmp_path / "run"
    secret = "hf_secretTOKENvalue1234567890"
    _train(tmp_path, "a", train={"max_steps": 6, "save_steps": 2, "save_total_limit": 2, "eval_steps": 2},
           env={"HF_TOKEN": secret})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]  # every eval_steps, then the final one
    for path in run.rglob("*"):  # a Hub token in the environment never reaches the disk
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    _train(tmp_path, "b", train={"max_steps": 2, "overwrite_output_dir": True})
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((run / "checkpoint-2" / MANIFEST).read_text())["optimizer_step"] == 2


def test_incomplete_checkpoint_is_not_latest(tmp_path):
    run = tmp_path / "run"
    _train(tmp_path, "a", train={"max_steps": 4, "save_steps": 2})
    broken = run / "checkpoint-9"
    shutil.copytree(run / "checkpoint-4", broken)
    (broken / MANIFEST).unlink()
    assert latest_checkpoint(run) == run / "checkpoint-4"
