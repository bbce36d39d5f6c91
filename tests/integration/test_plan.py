"""`hftk plan` against what a real run of the same recipe builds and measures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from hftk.planning.planner import PRECISIONS, model_state_memory, read_launch_config
from tests.conftest import ROOT, accelerate_launch, run_hftk, tiny_recipe, write_recipe


@pytest.mark.slow
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


@pytest.mark.slow
def test_probe_times_real_steps_and_writes_nothing(tmp_path):
    path = str(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    planned = run_hftk("plan", path, "--probe", "2", "--json")
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    probe = report["probe"]
    # at least the 2 steps asked for: steps this short are timed for longer (probe.MIN_TIMED_SECONDS)
    assert probe["steps_measured"] >= 2 and probe["seconds_per_step"] > 0 and probe["device"] == "cpu"
    assert probe["estimated_training_seconds"] == pytest.approx(probe["seconds_per_step"] * report["total_steps"])
    # the scale tables' compute is the step measured here, not the assumed device's
    assert report["scale"]["compute_source"] == "probe"
    assert report["scale"]["compute_seconds_per_step"] == probe["seconds_per_step"]
    assert probe["fastest_step"] <= probe["slowest_step"] and probe["warmup_steps"] == 2
    assert not (tmp_path / "run").exists()
    shown = run_hftk("plan", path, "--probe", "1")
    assert shown.returncode == 0 and "per optimizer step on cpu" in shown.stdout


def test_plan_tables_name_the_config_strategy(tmp_path):
    path = str(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    result = run_hftk("plan", path, "--config-file", str(ROOT / "accelerate_configs" / "zero3.yaml"),
                      "--num-processes", "4", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "zero3 (this config)" in result.stdout and "4 process(es)" in result.stdout


def test_model_state_memory_follows_the_zero_paper():
    fp32 = model_state_memory(1000, PRECISIONS["no"], 4)
    assert fp32["ddp"]["device"] == 16_000 and fp32["fsdp"]["device"] == 16_000 / 4
    # DeepSpeed steps an fp32 master copy even of fp32 weights: the paper's 12 optimizer bytes, not 8
    assert fp32["zero1"]["device"] == 4000 + 4000 + 12_000 / 4
    assert fp32["zero2"]["device"] == 4000 + 16_000 / 4
    assert fp32["zero3"]["device"] == 20_000 / 4
    assert fp32["zero3_offload"] == {"device": 0, "cpu": 24_000 / 4}  # + the fp32 gradient copy the CPU steps on
    mixed = model_state_memory(1000, PRECISIONS["bf16"], 8)
    assert mixed["ddp"]["device"] == 16_000 and mixed["zero1"]["device"] == 2000 + 2000 + 12_000 / 8
    assert mixed["zero3"]["device"] == mixed["fsdp"]["device"] == 16_000 / 8
    assert mixed["zero3_offload"] == {"device": 0, "cpu": 20_000 / 8}
    kept = model_state_memory(1000, PRECISIONS["bf16"], 8, persistent_params=100)  # ZeRO-3 keeps these whole
    assert kept["zero3"]["device"] == 16_000 / 8 + 200 and kept["zero3_offload"]["device"] == 200


def zero3_config(tmp_path: Path, threshold: int) -> Path:
    """zero3.yaml, but with its DeepSpeed settings in a JSON file that sets the persistence threshold."""
    (tmp_path / "ds.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "gradient_accumulation_steps": 1, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto"}))
    config = yaml.safe_load((ROOT / "accelerate_configs" / "zero3.yaml").read_text())
    config["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": False,
                                  "deepspeed_multinode_launcher": "standard"}
    del config["mixed_precision"]  # the JSON says it (fp32 when it does not)
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "zero3.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [None, 1000])
def test_plan_matches_the_model_states_of_a_real_zero3_run(tmp_path, threshold):
    """2 processes of ZeRO-3 over Gloo, built as `hftk finetune` builds them; benchmarks/model_states.py adds up
    the partitions each holds (weights, fp32 master, gradients, Adam) and the parameters kept whole, just
    before the second optimizer step. With DeepSpeed's default threshold this tiny model is kept whole; at
    1000 elements its matrices are partitioned and its norms and position bias kept."""
    config = ROOT / "accelerate_configs" / "zero3.yaml" if threshold is None else zero3_config(tmp_path, threshold)
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path))
    planned = run_hftk("plan", str(recipe), "--config-file", str(config), "--num-processes", "2", "--json")
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    assert report["launch"]["strategy"] == "zero3"
    expected = report["memory_per_process"]["zero3"]["device"]
    output = tmp_path / "model_states.json"
    command = [*accelerate_launch()[:-1], "--config_file", str(config), str(ROOT / "benchmarks" / "model_states.py"),
               str(recipe), "--output", str(output)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "false"}  # DeepSpeed over Gloo
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(output.read_text())
    assert [row["process"] for row in rows] == [0, 1]
    for row in rows:
        assert row["trainable_parameters"] == report["trainable_parameters"]
        assert row["model_states"] == pytest.approx(expected, rel=0.15), (row, expected)


@pytest.mark.parametrize("config, strategy", [("ddp.yaml", "ddp"), ("zero1.yaml", "zero1"), ("zero3.yaml", "zero3"),
                                              ("zero3_offload.yaml", "zero3_offload"), ("fsdp.yaml", "fsdp"),
                                              ("fsdp_shard_grad_op.yaml", "fsdp_shard_grad_op")])
def test_launch_config_strategy(config, strategy):
    shape = read_launch_config(ROOT / "accelerate_configs" / config, None)
    assert shape.strategy == strategy and shape.num_processes == 2
