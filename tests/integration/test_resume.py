"""Checkpoints a rerun resumes from, overwrite on request, and a resumed run equal to an unbroken one."""

from __future__ import annotations

import json
import shutil

from hftk.checkpoint import MANIFEST, latest_checkpoint
from tests.conftest import run_hftk, tiny_recipe, write_recipe


def _train(tmp_path, name, *overrides, **sections):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, **sections), f"{name}.yaml")
    result = run_hftk("finetune", str(path), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(folder, after=0):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and r["step"] > after]


def test_resume_from_a_middle_checkpoint_matches_the_unbroken_run(tmp_path):
    unbroken = tmp_path / "unbroken"
    _train(tmp_path, "a", train={"output_dir": str(unbroken), "max_steps": 8, "save_steps": 4, "logging_steps": 1})
    assert sorted(p.name for p in unbroken.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(unbroken / "checkpoint-4", resumed / "checkpoint-4")
    _train(tmp_path, "b", train={"output_dir": str(resumed), "max_steps": 8, "save_steps": 4, "logging_steps": 1,
                                 "resume_from_checkpoint": "latest"})
    assert (resumed / "model.safetensors").read_bytes() == (unbroken / "model.safetensors").read_bytes()
    assert _losses(resumed) == _losses(unbroken, after=4)


def test_overwrite_starts_afresh_and_save_total_limit_prunes(tmp_path):
    run = tmp_path / "run"
    _train(tmp_path, "a", train={"max_steps": 6, "save_steps": 2, "save_total_limit": 2})
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
