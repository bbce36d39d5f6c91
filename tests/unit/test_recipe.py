"""Recipe validation: strict keys with suggestions, types, values, overrides, all problems at once."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hftk.errors import UserError
from hftk.recipe import load_recipe, parse_overrides, validate_recipe
from tests.conftest import tiny_recipe, write_recipe


def problems(tmp_path, recipe=None, overrides=None) -> str:
    path = write_recipe(tmp_path, recipe or tiny_recipe(tmp_path))
    with pytest.raises(UserError) as caught:
        load_recipe(path, overrides)
    return str(caught.value)


def test_valid_recipe_loads_into_frozen_typed_objects(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path)), ["train.learning_rate=3e-4"])
    assert recipe.train.learning_rate == pytest.approx(3e-4)
    assert recipe.data.train.path.endswith("train.jsonl")
    with pytest.raises(ValidationError, match="frozen"):
        recipe.train.learning_rate = 1.0


@pytest.mark.parametrize(("section", "typo", "suggestion"), [
    ("train", "learnig_rate", "train.learning_rate"),
    ("data", "max_source_lenght", "data.max_source_length"),
    ("eval", "num_beam", "eval.num_beams"),
])
def test_unknown_nested_key_names_path_and_closest_key(tmp_path, section, typo, suggestion):
    recipe = tiny_recipe(tmp_path)
    recipe[section][typo] = 1
    message = problems(tmp_path, recipe)
    assert f"unknown key '{section}.{typo}'" in message
    assert f"did you mean '{suggestion}'" in message


def test_unknown_top_level_key(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["trian"] = {}
    assert "unknown key 'trian' (did you mean 'train'?)" in problems(tmp_path, recipe)


def test_unknown_key_in_override_is_reported_like_yaml(tmp_path):
    message = problems(tmp_path, overrides=["train.per_device_batch_size=4"])
    assert "unknown key 'train.per_device_batch_size'" in message
    assert "train.per_device_train_batch_size" in message


@pytest.mark.parametrize(("override", "expected"), [
    ("train.learning_rate=-1", "train.learning_rate: Input should be greater than 0"),
    ("data.max_source_length=0", "data.max_source_length: Input should be greater than or equal to 1"),
    ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size: Input should be greater than or equal to 1"),
    ("train.learning_rate=fast", "train.learning_rate: Input should be a valid number"),
    ("task=poetry", "task: must be one of"),
    ("train.lr_scheduler_type=cosine_annealing", "train.lr_scheduler_type: must be one of"),
])
def test_wrong_types_and_impossible_values(tmp_path, override, expected):
    assert expected in problems(tmp_path, overrides=[override])


def test_all_problems_are_reported_together_on_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["train"]["learnig_rate"] = 1
    recipe["data"]["max_target_length"] = 0
    del recipe["train"]["output_dir"]
    message = problems(tmp_path, recipe)
    assert "\n" not in message
    for part in ("train.learnig_rate", "data.max_target_length", "missing key 'train.output_dir'"):
        assert part in message


def test_model_needs_exactly_one_source(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["model"]["name_or_path"] = "google-t5/t5-small"
    assert "exactly one of model.name_or_path" in problems(tmp_path, recipe)


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: summarization\nmodel: [unclosed\n")
    with pytest.raises(UserError, match="malformed YAML at line"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_parse_values_as_yaml():
    assert parse_overrides(["train.learning_rate=3e-4", "train.overwrite_output_dir=true", "a.b.c=x"]) == {
        "train": {"learning_rate": 3e-4, "overwrite_output_dir": True}, "a": {"b": {"c": "x"}},
    }
    with pytest.raises(UserError, match="is not KEY=VALUE"):
        parse_overrides(["train.learning_rate"])


def test_data_split_accepts_path_or_hub_mapping(tmp_path):
    raw = tiny_recipe(tmp_path, data={"train": {"path": "EdinburghNLP/xsum", "split": "train"}})
    recipe = validate_recipe(raw)
    assert recipe.data.train.path == "EdinburghNLP/xsum" and recipe.data.train.split == "train"


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    again = load_recipe(write_recipe(tmp_path, __import__("yaml").safe_load(recipe.dump_yaml()), "again.yaml"))
    assert again == recipe
