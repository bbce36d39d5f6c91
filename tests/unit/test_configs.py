"""Every shipped recipe validates; every accelerate config parses and names a known topology."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hftk.recipe import load_recipe
from hftk.run import plan_finetune
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_with_its_data(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path, [f"train.output_dir={tmp_path / 'out'}"])
    plan = plan_finetune(recipe)
    assert plan.splits["train"].num_rows > 0
    assert path.read_text().startswith("#"), "a shipped recipe opens with a comment that gives its launch command"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses(path: Path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED", "FSDP"}
    assert "hftk" in path.read_text().split("\n", 3)[0] or path.read_text().startswith("#")


def test_there_are_recipes_and_configs():
    assert RECIPES and CONFIGS
