"""train.report_to: tensorboard receives the logged rows, and a resumed run continues the same run."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import FAULTS, ROOT, run_hftk, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds


def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_gets_the_rows_and_a_resume_continues_its_run(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"report_to": ["tensorboard"], "logging_steps": 1, "save_steps": 2,
                                          "eval_steps": 2})
    path = str(write_recipe(tmp_path, recipe))
    killed = run_hftk("finetune", path, env={"HFTK_FAULT": "step:3", "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert killed.returncode == -9, killed.stderr
    resumed = run_hftk("finetune", path, "train.resume_from_checkpoint=latest")
    assert resumed.returncode == 0, resumed.stderr
    run = tmp_path / "run"
    assert [p.name for p in (run / "runs").iterdir()] == ["run"]  # one tracker run, named after output_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    logged = _scalars(run / "runs" / "run", "loss")
    assert [step for step, _ in logged] == [1, 2, 3, 4] == [r["step"] for r in train_rows]
    assert [value for _, value in logged] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    assert [step for step, _ in _scalars(run / "runs" / "run", "eval_loss")] == [2, 4]
    assert [step for step, _ in _scalars(run / "runs" / "run", "learning_rate")] == [1, 2, 3, 4]


@pytest.mark.parametrize("tracker", [t for t in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(t) is None])
def test_an_uninstalled_tracker_is_bad_input(tmp_path, tracker):
    recipe = tiny_recipe(tmp_path, train={"report_to": [tracker]})
    result = run_hftk("validate", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 2
    assert result.stderr == f"hftk: error: train.report_to: {tracker} is not installed; pip install {tracker}\n"
