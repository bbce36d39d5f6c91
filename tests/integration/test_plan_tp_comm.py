"""`hftk plan`'s tensor-parallel bytes per optimizer step against real runs of hftk's TP setup on a scratch
Llama: `accelerate launch` of tp.yaml (2 Gloo processes) and fsdp_tp.yaml (4), 2 optimizer steps each,
counted by benchmarks/tp_comm_bytes.py (a TorchDispatchMode that sees DTensor's functional collectives
and torch.distributed's alike)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, accelerate_launch, run_hftk, tiny_recipe, write_recipe
from tests.integration.test_tensor_parallel import LLAMA

# case -> (config, processes, recipe overrides): fsdp_tp accumulates 2 micro-batches, so FSDP2's gathers
# (every micro-batch) and its reduce_scatter (once per step) both show; tp-bf16 runs under autocast, where
# linear outputs travel in bf16 and input gradients in fp32.
LAUNCHES = {"tp": ("tp.yaml", 2, {"per_device_train_batch_size": 8}),
            "tp-bf16": ("tp.yaml", 2, {"per_device_train_batch_size": 8, "bf16": True}),
            "fsdp_tp": ("fsdp_tp.yaml", 4, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})}
STEPS = 2


def llama_recipe(tmp_path, **train):
    # The bundled examples all reach the 64 + 16 token limit: every micro-batch pads to one shape.
    recipe = tiny_recipe(tmp_path, train={"max_steps": STEPS, **train})
    recipe["model"]["config"] = LLAMA
    return write_recipe(tmp_path, recipe)


def count_tp_collectives(config: str, recipe, output) -> list[dict]:
    """benchmarks/tp_comm_bytes.py under `accelerate launch`; every process's rows."""
    command = [*accelerate_launch(config)[:-1], str(ROOT / "benchmarks" / "tp_comm_bytes.py"), str(recipe),
               "--steps", str(STEPS), "--output", str(output)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "false"}  # over Gloo here
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(path.read_text()) for path in sorted(output.parent.glob(f"{output.stem}*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LAUNCHES))
def test_plan_tp_bytes_equal_a_real_run(case, tmp_path):
    config, processes, train = LAUNCHES[case]
    recipe = llama_recipe(tmp_path, **train)
    planned = run_hftk("plan", str(recipe), "--config-file", str(ROOT / "accelerate_configs" / config), "--json")
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    strategy = config.removesuffix(".yaml")
    assert report["launch"]["strategy"] == strategy
    rows = {row["strategy"]: row for row in report["scale"]["rows"] if row["processes"] == processes}
    assert rows[strategy]["tp_size"] == 2

    counted = count_tp_collectives(config, recipe, tmp_path / "counted.json")
    assert [c["process"] for c in counted] == list(range(processes))
    for process in counted:
        for step in process["steps"]:
            assert step["uncounted_ops"] == []
            for batch, length in step["micro_batch_shapes"]:
                assert batch * length == report["micro_batch_positions"]
            assert step["bytes"] == rows[strategy]["bytes_per_step"], (process["process"], step)


def test_a_family_without_a_plan_has_no_tp_rows():
    planned = run_hftk("plan", str(ROOT / "recipes" / "summarize.yaml"), "--json")  # t5-small
    assert planned.returncode == 0, planned.stderr
    strategies = {row["strategy"] for row in json.loads(planned.stdout)["scale"]["rows"]}
    assert "ddp" in strategies and not strategies & {"tp", "fsdp_tp"}


@pytest.mark.parametrize("config, strategy, data_processes", [("tp.yaml", "tp", 1), ("fsdp_tp.yaml", "fsdp_tp", 2)])
def test_tp_launch_config(config, strategy, data_processes):
    from hftk.errors import UserError
    from hftk.planning.planner import read_launch_config

    path = ROOT / "accelerate_configs" / config
    shape = read_launch_config(path, None)
    assert (shape.strategy, shape.tp_size, shape.data_processes) == (strategy, 2, data_processes)
    assert read_launch_config(path, 8).strategy == "fsdp_tp"
    with pytest.raises(UserError, match="multiple of 2"):
        read_launch_config(path, 3)


def test_tp_rows_only_where_the_layout_fits():
    from hftk.planning.scaling import TensorParallelLayout, TensorParallelRun, TpLayer, tp_layouts

    layout = TensorParallelLayout([TpLayer("rowwise", 8, 8)], [], [False], heads=4)
    rows = tp_layouts(TensorParallelRun(layout, 2, 100.0, clips=False), (1, 2, 8, 64))
    assert [(s, n) for s, n, _, _ in rows] == [("tp", 1), ("tp", 2), ("fsdp_tp", 2), ("fsdp_tp", 8), ("fsdp_tp", 64)]
