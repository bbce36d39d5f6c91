"""`hftk plan`'s bytes per optimizer step against the collectives of real 2-process DDP runs, counted
by benchmarks/comm_bytes.py: it wraps torch.distributed.all_reduce and all_gather and adds up the
payload each process hands them. "none" is counted through PyTorch's allreduce hook, which hands
all_reduce the same buckets DDP's built-in reduction does."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from hftk.planning.scaling import Collective, ring_seconds, ring_wire_bytes
from tests.conftest import ROOT, accelerate_launch, run_hftk, tiny_recipe, write_recipe

HOOKS = ("none", "fp16", "int8", "topk")
DDP = str(ROOT / "accelerate_configs" / "ddp.yaml")


def planned_bytes(report: dict, processes: int) -> dict[str, int]:
    return {row["comm_hook"]: row["bytes_per_step"] for row in report["scale"]["rows"]
            if row["strategy"] == "ddp" and row["processes"] == processes}


def plan_json(*args: str) -> dict:
    planned = run_hftk("plan", *args, "--config-file", DDP, "--json")
    assert planned.returncode == 0, planned.stderr
    return json.loads(planned.stdout)


def count_collectives(recipe, hooks, steps: int, output) -> dict[str, dict]:
    """benchmarks/comm_bytes.py under `accelerate launch` on 2 processes; its rows by hook."""
    command = [*accelerate_launch("ddp.yaml")[:-1], str(ROOT / "benchmarks" / "comm_bytes.py"), str(recipe), *hooks,
               "--steps", str(steps), "--output", str(output)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "false"}  # over Gloo here
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return {row["hook"]: row for row in json.loads(output.read_text())}


@pytest.mark.slow
def test_plan_bytes_equal_a_real_two_process_run(tmp_path):
    # top-k at 5%: every tensor of this tiny model sends its positions as a bitmap (the recorded benchmark
    # below, at the default 25%, as bitmaps too), after one step of plain all-reduce and no decay.
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, parallel={"topk_ratio": 0.05, "topk_start_iter": 1,
                                                                    "topk_decay_steps": 0}))
    planned = planned_bytes(plan_json(str(recipe)), 2)
    counted = count_collectives(recipe, HOOKS, 2, tmp_path / "counted.json")
    # Every step of the others hands the same bytes; the first and the last are both compared.
    first_step = {**planned, "topk": planned["none"]}
    assert {h: (counted[h]["bytes_first_step"], counted[h]["bytes_per_step_after_warmup"]) for h in HOOKS} == \
        {h: (first_step[h], planned[h]) for h in HOOKS}
    assert planned["topk"] < planned["int8"]
    assert planned["fp16"] - 8 == (planned["none"] - 8) // 2  # 8: the token count every step all-reduces


def test_plan_bytes_equal_the_recorded_benchmark():
    """All six hooks (PowerSGD and bf16 included) on the bundled recipe, against the 60-step 2-process
    counts in benchmarks/comm_bytes.json (PowerSGD after its warm-up)."""
    recorded = {row["hook"]: row["bytes_per_step_after_warmup"]
                for row in json.loads((ROOT / "benchmarks" / "comm_bytes.json").read_text())}
    planned = planned_bytes(plan_json(str(ROOT / "recipes" / "summarize.yaml"), "parallel.powersgd_rank=1"), 2)
    assert planned == recorded


def test_ring_model():
    reduce, gather = Collective("all_reduce", 1000), Collective("all_gather", 1000)
    assert ring_wire_bytes(reduce, 2) == ring_wire_bytes(gather, 2) == 1000  # 2 processes: the payload once
    assert ring_wire_bytes(reduce, 1024) == pytest.approx(2000, rel=1e-3)  # an all-reduce's stays flat
    assert ring_wire_bytes(gather, 1024) == 1023 * 1000  # a gather's grows with every process
    assert ring_seconds(reduce, 8, bytes_per_second=1e9, latency=1e-5) == pytest.approx(2 * 7 / 8 * 1e-6 + 14e-5)
