"""`hftk recipe-schema` lists exactly the keys validation accepts."""

from __future__ import annotations

import json

from hftk.recipe import validate_recipe
from hftk.schema import recipe_keys
from tests.conftest import run_hftk, tiny_recipe


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "config":  # model.config is free-form
            yield from _leaves(value, f"{dotted}.")
        else:
            yield dotted


def test_every_resolved_key_is_listed_with_its_default(tmp_path):
    listed = {key["key"]: key for key in recipe_keys()}
    resolved = validate_recipe(tiny_recipe(tmp_path)).model_dump(mode="json")
    missing = [key for key in _leaves(resolved) if key not in listed]
    assert missing == []
    assert listed["train.learning_rate"]["default"] == 5e-5 and listed["train.output_dir"]["required"]
    assert listed["train.metric_for_best_model"]["default"] == "eval_loss"
    assert listed["eval"]["type"] == "section"


def test_recipe_schema_command_json():
    result = run_hftk("recipe-schema", "--json")
    assert result.returncode == 0, result.stderr
    keys = json.loads(result.stdout)
    assert [k["key"] for k in keys] == [k["key"] for k in recipe_keys()]
    report_to = next(k for k in keys if k["key"] == "train.report_to")
    assert report_to["default"] == [] and "tensorboard" in report_to["type"]
