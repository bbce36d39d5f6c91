"""Recipe validation: strict keys with suggestions, types, values, overrides, all problems at once."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from hftk.errors import UserError
from hftk.recipe import load_recipe, validate_recipe
from hftk.recipe_yaml import MAX_YAML_VALUES, parse_overrides, read_yaml
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
    ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio: Input should be a finite number"),
    ("train.adam_beta1=-.inf", "train.adam_beta1: Input should be a finite number"),
    ("train.max_steps=.inf", "train.max_steps: Input should be a finite number"),
    ("parallel.powersgd_min_compression_rate=.inf", "parallel.powersgd_min_compression_rate: Input should be a finite number"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    ("train.seed=4294967296", "train.seed: Input should be less than or equal to 4294967295"),
    ("data.max_target_length=1000001", "data.max_target_length: Input should be less than or equal to 1000000"),
    ("data.doc_stride=10000000", "data.doc_stride: Input should be less than or equal to"),
    ("eval.per_device_eval_batch_size=1000000000", "eval.per_device_eval_batch_size: Input should be less than or equal to"),
    ("train.gradient_accumulation_steps=1000000000", "train.gradient_accumulation_steps: Input should be less than or equal to"),
    ("train.warmup_steps=1000000000000", "train.warmup_steps: Input should be less than or equal to"),
    ("data.max_train_samples=1000000000000", "data.max_train_samples: Input should be less than or equal to"),
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


def test_largest_seed_is_accepted(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path)), ["train.seed=4294967295"])
    assert recipe.train.seed == 2**32 - 1


def _yaml_problem(tmp_path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        read_yaml(path)
    return str(caught.value)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    assert _yaml_problem(tmp_path, "task: summarization\ntrain:\n  seed: 1\n  learning_rate: 0.1\n  seed: 2\n") == (
        f"{tmp_path / 'r.yaml'}: malformed YAML at line 5, column 3: duplicate key 'seed' (also at line 3)")
    assert "duplicate key 'task' (also at line 1)" in _yaml_problem(tmp_path, "task: a\nmodel: {}\ntask: b\n")
    assert "duplicate key 'yes' (also at line 1)" in _yaml_problem(tmp_path, "true: 1\nyes: 2\n")  # both mean True


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: &base {seed: 1, learning_rate: 0.1}\ntrain:\n  <<: *base\n  seed: 2\n")
    assert read_yaml(path)["train"] == {"seed": 2, "learning_rate": 0.1}


def test_scalar_aliases_are_fine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("a: &length 128\nb: *length\nc: &pair [1, 2]\nd: [*pair, *pair]\n")
    assert read_yaml(path) == {"a": 128, "b": 128, "c": [1, 2], "d": [[1, 2], [1, 2]]}


def test_alias_bomb_is_refused_at_once(tmp_path):
    levels = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 30)]  # 9**30 values
    started = time.perf_counter()
    message = _yaml_problem(tmp_path, "\n".join(levels) + "\n")
    assert time.perf_counter() - started < 1
    assert f"aliases expand it to more than {MAX_YAML_VALUES} values" in message


def test_alias_bomb_in_an_override_is_refused():
    bomb = "{a: &a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(6)) + "}"
    with pytest.raises(UserError, match="aliases expand it to more than"):
        parse_overrides([f"model.config={bomb}"])


def test_recursive_alias_is_refused(tmp_path):
    assert "an alias refers to a collection that holds it" in _yaml_problem(tmp_path, "a: &a {b: *a}\n")


def test_deep_nesting_is_one_line(tmp_path):
    assert _yaml_problem(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n").endswith("malformed YAML: nested too deeply")


def test_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("task: summarization\n# café\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"r.yaml: not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_yaml(path)


def test_utf8_with_byte_order_mark_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("task: summarization\n".encode("utf-8-sig"))
    assert read_yaml(path) == {"task": "summarization"}


def test_control_character_is_named_with_its_line(tmp_path):
    assert _yaml_problem(tmp_path, "task: a\nnote: x\x01y\n").endswith(
        "malformed YAML at line 2: character #x0001 is not allowed in YAML")
    with pytest.raises(UserError, match="character #x0001 is not allowed"):
        parse_overrides(["train.output_dir=a\x01b"])


def test_recipe_that_is_a_folder(tmp_path):
    with pytest.raises(UserError, match="is a directory, not a recipe file"):
        load_recipe(tmp_path)


def test_home_is_expanded_in_path_values(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    raw = tiny_recipe(tmp_path, train={"output_dir": "~/runs/a", "resume_from_checkpoint": "~/runs/a/checkpoint-4"},
                      data={"train": "~/data/train.jsonl", "validation": {"path": "~/data/validation.jsonl"}})
    raw["model"]["tokenizer"] = {"name_or_path": "~/tokenizer"}
    recipe = validate_recipe(raw)
    assert recipe.train.output_dir == str(home / "runs/a")
    assert recipe.train.resume_from_checkpoint == str(home / "runs/a/checkpoint-4")
    assert recipe.data.train.path == str(home / "data/train.jsonl")
    assert recipe.data.validation.path == str(home / "data/validation.jsonl")
    assert recipe.model.tokenizer.name_or_path == str(home / "tokenizer")
    saved = validate_recipe(tiny_recipe(tmp_path, model={"name_or_path": "~/model", "config": None, "tokenizer": None}))
    assert saved.model.name_or_path == str(home / "model")


def test_hub_ids_and_plain_paths_are_left_alone(tmp_path):
    raw = tiny_recipe(tmp_path, model={"name_or_path": "google-t5/t5-small", "config": None, "tokenizer": None},
                      train={"output_dir": "runs/~not-home", "resume_from_checkpoint": "latest"})
    recipe = validate_recipe({**raw, "model": {"name_or_path": "google-t5/t5-small"}})
    assert (recipe.model.name_or_path, recipe.train.output_dir) == ("google-t5/t5-small", "runs/~not-home")
    assert recipe.train.resume_from_checkpoint == "latest"


def test_home_of_an_unknown_user_is_an_error(tmp_path):
    message = problems(tmp_path, overrides=["train.output_dir=~no-such-user-hftk/run"])
    assert "train.output_dir: cannot expand '~no-such-user-hftk/run'" in message
