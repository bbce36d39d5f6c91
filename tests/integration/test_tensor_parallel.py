"""Tensor parallelism on a family with a tensor-parallel plan (a scratch Llama), through a real
`accelerate launch` of tp.yaml (2 Gloo processes) and fsdp_tp.yaml (4): the same losses as one
process at the same global batch, a saved model that plain transformers reloads, the same
evaluation, and a resume from its own sharded checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import accelerate_launch, losses, results, run_hftk, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds

STEPS = 6
GLOBAL_BATCH = 8
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
# config -> (processes, data shards): the global batch is per-process batch x data shards.
LAUNCHES = {"tp.yaml": (2, 1), "fsdp_tp.yaml": (4, 2)}
ENV = {"ACCELERATE_USE_CPU": "false"}


def recipe_file(tmp_path: Path, name: str, batch: int, model: dict | None = None, **train) -> Path:
    settings = {"output_dir": str(tmp_path / name), "max_steps": STEPS, "logging_steps": 1, "save_steps": 3,
                "per_device_train_batch_size": batch, **train}
    recipe = tiny_recipe(tmp_path, train=settings)
    recipe["model"]["config"] = model or LLAMA
    return write_recipe(tmp_path, recipe, f"{name}.yaml")


@pytest.mark.parametrize("config", sorted(LAUNCHES))
def test_tensor_parallel_equals_one_process(config, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    processes, shards = LAUNCHES[config]
    name = config.removesuffix(".yaml")
    batch = GLOBAL_BATCH // shards
    run = run_hftk("finetune", str(recipe_file(tmp_path, name, batch)), launcher=accelerate_launch(config), env=ENV)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"tensor parallel 2 x data shards {shards}" in run.stderr
    assert f"on {processes} process(es)" in run.stderr
    folder = tmp_path / name
    mine, theirs = losses(folder), losses(one_process)
    assert sorted(mine) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in theirs:
        assert mine[step] == pytest.approx(theirs[step], rel=1e-4), step

    # The saved model is whole and plain transformers reloads it.
    reloaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(one_process).state_dict()
    assert sorted(reloaded) == sorted(reference)
    assert max((reloaded[k] - reference[k]).abs().max().item() for k in reference) < 1e-4
    assert results(folder)["eval_loss"] == pytest.approx(results(one_process)["eval_loss"], rel=1e-4)
    assert results(folder)["eval_samples"] == 16
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 16

    # Resume from the sharded step-3 checkpoint: steps 4-6 come out the same.
    resumed = tmp_path / f"{name}-resumed"
    resumed.mkdir()
    shutil.copytree(folder / "checkpoint-3", resumed / "checkpoint-3")
    again = run_hftk("finetune", str(recipe_file(tmp_path, f"{name}-resumed", batch, resume_from_checkpoint="latest")),
                     launcher=accelerate_launch(config), env=ENV)
    assert again.returncode == 0, again.stderr[-4000:]
    unbroken = {s: v for s, v in mine.items() if s > 3}
    assert losses(resumed) == pytest.approx(unbroken, rel=1e-6)


def test_a_family_without_a_plan_is_refused(tmp_path):
    t5 = tiny_recipe(tmp_path)["model"]["config"]
    run = run_hftk("finetune", str(recipe_file(tmp_path, "refused", 4, model=t5)), launcher=accelerate_launch("tp.yaml"),
                   env=ENV)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("hftk:")]
    assert len(lines) == 1, run.stderr[-3000:]
    assert "t5 has none" in lines[0] and "llama" in lines[0]
    assert not (tmp_path / "refused").exists()


def test_a_launch_of_the_wrong_size_is_refused(tmp_path):
    run = run_hftk("finetune", str(recipe_file(tmp_path, "refused", 4)),
                   launcher=accelerate_launch("fsdp_tp.yaml", "--num_processes", "2"), env=ENV)
    lines = [line for line in run.stderr.splitlines() if line.startswith("hftk:")]
    assert run.returncode != 0 and len(lines) == 1, run.stderr[-3000:]
    assert "needs 4 processes" in lines[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_on_two_gpus(one_process, tmp_path):
    run = run_hftk("finetune", str(recipe_file(tmp_path, "gpu", GLOBAL_BATCH)), launcher=accelerate_launch("tp.yaml"))
    assert run.returncode == 0, run.stderr[-4000:]
    mine, theirs = losses(tmp_path / "gpu"), losses(one_process)
    for step in theirs:
        assert mine[step] == pytest.approx(theirs[step], rel=1e-3), step
