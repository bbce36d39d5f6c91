"""`hftk recipe-schema` lists exactly the keys validation accepts."""

from __future__ import annotations

import json

from hftk.recipe import validate_recipe
from hftk.schema import (
    README_END,
    README_START,
    REGENERATE,
    markdown_reference,
    readme_reference,
    recipe_keys,
    write_readme,
)
from tests.conftest import ROOT, run_hftk, tiny_recipe


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


def test_every_key_has_a_description():
    assert [key["key"] for key in recipe_keys() if not key["description"].strip()] == []
    assert all("\n" not in key["description"] for key in recipe_keys())


def test_readme_recipe_reference_is_current():
    held = readme_reference(ROOT / "README.md")
    assert held is not None, f"README.md lacks the {README_START} / {README_END} markers"
    assert held == markdown_reference(), f"README.md's recipe reference is stale; run: {REGENERATE}"


def test_write_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{README_START}\nold list\n{README_END}\nafter\n")
    assert write_readme(readme) and not write_readme(readme)
    assert readme.read_text() == f"# title\n\nbefore\n{README_START}\n{markdown_reference()}{README_END}\nafter\n"
    assert "| `train.learning_rate` | `float` | `5e-05` |" in markdown_reference()
