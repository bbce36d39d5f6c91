"""Every shipped recipe validates; every accelerate config parses and names a known topology."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hftk.preflight import plan_finetune
from hftk.recipe import load_recipe
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def _output_dirs() -> dict[str, Path]:
    return {yaml.safe_load(p.read_text())["train"]["output_dir"]: p for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_with_its_data(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert path.read_text().startswith("#"), "a shipped recipe opens with a comment that gives its launch command"
    recipe = load_recipe(path, [f"train.output_dir={tmp_path / 'out'}"])
    base = recipe.model.name_or_path
    if base and not (ROOT / base).exists():
        # A LoRA recipe whose base is the output of a bundled full run: the chain must hold, and
        # the base recipe itself is validated by its own case.
        assert base in _output_dirs(), f"{path.name}: base {base} is neither a folder nor a bundled run's output"
        assert load_recipe(_output_dirs()[base]).task == recipe.task
        return
    plan = plan_finetune(recipe)
    assert plan.splits["train"].num_rows > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses(path: Path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED", "FSDP"}
    assert "hftk" in path.read_text().split("\n", 3)[0] or path.read_text().startswith("#")


def test_there_are_recipes_and_configs():
    assert RECIPES and CONFIGS
