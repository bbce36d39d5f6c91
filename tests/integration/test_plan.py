"""`hftk plan` against what a real run of the same recipe builds and measures."""

from __future__ import annotations

import json

import pytest

from hftk.planning import PRECISIONS, model_state_memory, read_launch_config
from tests.conftest import ROOT, run_hftk, tiny_recipe, write_recipe


def test_plan_matches_a_real_run(tmp_path):
    # Lengths that vary, so batches pad; one whole epoch, so the run sees every batch the plan counts.
    recipe = tiny_recipe(tmp_path, data={"max_source_length": 256, "max_target_length": 64},
                         train={"max_steps": None, "num_train_epochs": 1})
    del recipe["train"]["max_steps"]
    path = str(write_recipe(tmp_path, recipe))
    planned = run_hftk("plan", path, "--json")
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    assert not (tmp_path / "run").exists()  # a plan writes nothing
    result = run_hftk("finetune", path)
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run")
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert 0 < report["padding_fraction"] == results["train_padding_fraction"]
    assert report["steps_per_epoch"] == report["total_steps"] == results["train_steps"] == 8
    assert report["flops_per_step"] == 6 * report["parameters"] * report["tokens_per_step"]
    assert report["source_lengths"]["max"] <= 256 and report["source_lengths"]["count"] == 64


def test_plan_tables_name_the_config_strategy(tmp_path):
    path = str(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    result = run_hftk("plan", path, "--config-file", str(ROOT / "accelerate_configs" / "zero3.yaml"),
                      "--num-processes", "4", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "zero3 (this config)" in result.stdout and "4 process(es)" in result.stdout


def test_model_state_memory_follows_the_zero_paper():
    fp32 = model_state_memory(1000, PRECISIONS["no"], 4)
    assert fp32["ddp"]["device"] == 16_000
    assert fp32["zero1"]["device"] == 4000 + 4000 + 8000 / 4
    assert fp32["zero2"]["device"] == 4000 + 12_000 / 4
    assert fp32["zero3"]["device"] == fp32["fsdp"]["device"] == 16_000 / 4
    mixed = model_state_memory(1000, PRECISIONS["bf16"], 8)
    assert mixed["ddp"]["device"] == 16_000 and mixed["zero1"]["device"] == 2000 + 2000 + 12_000 / 8
    assert mixed["zero3_offload"] == {"device": 0, "cpu": 16_000 / 8}


@pytest.mark.parametrize("config, strategy", [("ddp.yaml", "ddp"), ("zero1.yaml", "zero1"), ("zero3.yaml", "zero3"),
                                              ("zero3_offload.yaml", "zero3_offload"), ("fsdp.yaml", "fsdp"),
                                              ("fsdp_shard_grad_op.yaml", "fsdp_shard_grad_op")])
def test_launch_config_strategy(config, strategy):
    shape = read_launch_config(ROOT / "accelerate_configs" / config, None)
    assert shape.strategy == strategy and shape.num_processes == 2
