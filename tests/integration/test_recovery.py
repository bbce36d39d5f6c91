"""Runs that carry on by themselves: a launcher's restart after a lost worker resumes bit-identical, a loss
spike is rolled back past (the same way on every rerun), a frozen process ends the others within
train.ddp_timeout, and the command printed after Ctrl-C continues the run as printed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hftk.checkpoint import MANIFEST, damage
from tests.conftest import FAULTS, ROOT, accelerate_launch, loss_rows, results, run_hftk, wait_for_step, weights
from tests.integration.test_interruptions import recipe_path

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds

FAULTY = {"PYTHONPATH": f"{FAULTS}:{ROOT}"}
# 8 examples an optimizer step, a checkpoint every 4 steps, each step's loss judged as it is logged; 128
# rows make 16 steps an epoch, so the skipped examples do not come back (in the next epoch they would).
ROLLBACK = {"max_steps": 12, "on_divergence": "rollback", "spike_factor": 3.0, "save_total_limit": 1}
ONE_EPOCH = "data.max_train_samples=128"


def rows_with(folder: Path, key: str) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if key in row]


def test_a_restart_after_a_lost_worker_resumes_bit_identical(straight, tmp_path):
    """accelerate launch --max_restarts: torch elastic restarts both workers when one is SIGKILLed after
    checkpoint-4; with resume_from_checkpoint: latest they go on from it and end as the unbroken run."""
    launcher = accelerate_launch("ddp.yaml", "--max_restarts", "2", "--monitor_interval", "1")
    env = {"ACCELERATE_USE_CPU": "false", "HFTK_FAULT": "step:6:1", **FAULTY}  # first attempt only
    run = run_hftk("finetune", str(recipe_path(tmp_path, "run")), "train.resume_from_checkpoint=latest",
                   launcher=launcher, env=env, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    [restart] = rows_with(tmp_path / "run", "restart")
    assert restart == {"step": 4, "restart": 1, "resumed_from": "checkpoint-4"}
    assert "restart 1 of this launch: resumed from checkpoint-4" in run.stderr
    assert loss_rows(tmp_path / "run") == loss_rows(straight)
    assert weights(tmp_path / "run") == weights(straight)


def test_a_rollback_skips_the_spike_the_same_way_on_a_rerun_and_through_a_resume(tmp_path):
    """The spike is keyed by the examples of the 7th step: it comes back wherever they are trained on. The
    first run rolls back to checkpoint-4, skips them, and is killed at step 9 (after checkpoint-8, which
    holds the rollback); its resume must end bit-identical to a rerun of the same recipe that is never
    interrupted, with the same rollback row."""
    keys = tmp_path / "spiking_examples.json"
    env = {"HFTK_FAULT": "spike:7,step:12", "HFTK_FAULT_KEYS": str(keys), **FAULTY}
    killed = run_hftk("finetune", str(recipe_path(tmp_path, "first", **ROLLBACK)), ONE_EPOCH, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert keys.is_file(), "the spike did not fire"
    resumed = run_hftk("finetune", str(recipe_path(tmp_path, "first", **ROLLBACK)), ONE_EPOCH,
                       "train.resume_from_checkpoint=latest",
                       env={"HFTK_FAULT": "spike:7", "HFTK_FAULT_KEYS": str(keys), **FAULTY})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-8" in resumed.stderr
    rerun = run_hftk("finetune", str(recipe_path(tmp_path, "rerun", **ROLLBACK)), ONE_EPOCH,
                     env={"HFTK_FAULT": "spike:7", "HFTK_FAULT_KEYS": str(keys), **FAULTY})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rolled back to checkpoint-4" in rerun.stderr

    for folder in (tmp_path / "first", tmp_path / "rerun"):
        [rollback] = rows_with(folder, "rollback")
        assert rollback["step"] == 7 and rollback["rollback"] == 1 and rollback["rolled_back_to"] == "checkpoint-4"
        assert "exceeds train.spike_factor=3" in rollback["reason"]
        assert len(rollback["skipped_examples"]) == 8 and len(set(rollback["skipped_examples"])) == 8
        assert results(folder)["train_rollbacks"] == 1
        assert "rolled back" in (folder / "README.md").read_text()
        steps = [step for step, _ in loss_rows(folder)]
        assert steps == list(range(1, 13)), "every step logged once: the undone steps 5-7 were taken back"
    assert rows_with(tmp_path / "first", "rollback") == rows_with(tmp_path / "rerun", "rollback")
    assert loss_rows(tmp_path / "first") == loss_rows(tmp_path / "rerun")
    assert weights(tmp_path / "first") == weights(tmp_path / "rerun")


def test_past_max_rollbacks_the_run_stops_with_its_checkpoints_intact(tmp_path):
    """A divergence that skipping cannot cure (every step from the 7th spikes): two rollbacks, then exit 1."""
    run = run_hftk("finetune", str(recipe_path(tmp_path, "run", **ROLLBACK, max_rollbacks=2)),
                   env={"HFTK_FAULT": "spikes:7", **FAULTY})
    assert run.returncode == 1, run.stderr[-3000:]
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("hftk: error:") and "train.max_rollbacks=2" in line and "every checkpoint intact" in line
    assert [row["rollback"] for row in rows_with(tmp_path / "run", "rollback")] == [1, 2]
    saved = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [p.name for p in saved] == ["checkpoint-4"]
    assert json.loads((saved[0] / MANIFEST).read_text())["complete"] and damage(saved[0]) is None
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_frozen_process_ends_the_launch_within_ddp_timeout(tmp_path):
    """Rank 1 is SIGSTOPped after its 3rd step: rank 0 waits in a collective until train.ddp_timeout, then
    says so in one line naming the setting and the checkpoint; the launcher ends the frozen one."""
    timeout = 15  # long enough for the barriers of a cold start; each second here is a second of the suite
    started = time.time()
    run = run_hftk("finetune", str(recipe_path(tmp_path, "run", save_steps=2, ddp_timeout=timeout)),
                   launcher=accelerate_launch("ddp.yaml"), timeout=timeout + 120,
                   env={"ACCELERATE_USE_CPU": "false", "HFTK_FAULT": "freeze:3:1", **FAULTY})
    took = time.time() - started
    assert run.returncode != 0
    assert took < timeout + 45 + 15, f"{took:.0f} s"  # 15 s: two interpreters starting on this machine
    ours = [line for line in run.stderr.splitlines() if line.startswith("hftk:")]
    assert len(ours) == 1, run.stderr[-4000:]
    assert f"train.ddp_timeout={timeout}" in ours[0] and "checkpoint-2" in ours[0], ours[0]
    frames = [line for line in run.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [frame for frame in frames if "/hftk/" in frame], run.stderr[-4000:]


def test_the_command_printed_after_ctrl_c_continues_the_run(tmp_path):
    """Started with overrides the recipe does not have; the printed command, run as printed, finishes."""
    recipe = recipe_path(tmp_path, "recipe_dir")  # the recipe's own output_dir is not the one used
    elsewhere = tmp_path / "with space"
    command = [sys.executable, "-m", "hftk", "finetune", str(recipe), f"train.output_dir={elsewhere}",
               "train.max_steps=14"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "HFTK_FAULT": "pace:200", **FAULTY})
    wait_for_step(elsewhere, 5, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("hftk: stopped:")]
    printed = line.split("to continue, run: ", 1)[1]
    words = shlex.split(printed)
    assert words[:2] == ["hftk", "finetune"] and f"train.output_dir={elsewhere}" in words
    again = run_hftk(*words[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    assert [step for step, _ in loss_rows(elsewhere)] == list(range(1, 15))
    assert not (tmp_path / "recipe_dir").exists()
    done = [line for line in again.stderr.splitlines() if line.startswith("hftk: done:")]
    assert len(done) == 1 and str(elsewhere) in done[0] and "hftk report" in done[0] and "hftk push" in done[0]
