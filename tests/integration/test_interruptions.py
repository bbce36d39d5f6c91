"""Runs you can trust: killed or preempted anywhere, a resumed run ends bit-identical to an
unbroken one; guards stop diverging runs and full disks cleanly; secrets never reach the disk."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hftk.checkpoint import MANIFEST
from hftk.run_dir import RUN_MANIFEST
from tests.conftest import (
    FAULTS,
    ROOT,
    accelerate_launch,
    digest,
    loss_rows,
    results,
    run_hftk,
    tiny_recipe,
    wait_for_step,
    weights,
    write_recipe,
)

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds

# 64 rows / batch 4 = 16 micro-batches = 8 optimizer steps per epoch (accumulation 2); 20 steps
# cross two epoch boundaries; a checkpoint every 4 steps, so checkpoint-8 sits on the first boundary.
TRAIN = {"max_steps": 20, "logging_steps": 1, "save_steps": 4, "per_device_train_batch_size": 4,
         "gradient_accumulation_steps": 2}
# Each family with its own default dropout (0.1), as every pretrained checkpoint has it.
MODELS = {
    "t5": {"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 1,
           "num_decoder_layers": 1},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 128},
}


def recipe_path(tmp_path: Path, name: str, family: str = "t5", **train) -> Path:
    settings = {**TRAIN, "output_dir": str(tmp_path / name), **train}
    recipe = tiny_recipe(tmp_path, train=settings)
    recipe["model"]["config"] = MODELS[family]
    return write_recipe(tmp_path, recipe, f"{name}.yaml")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per family, without evaluation during training."""
    runs = {}
    for family in MODELS:
        tmp_path = tmp_path_factory.mktemp(f"unbroken-{family}")
        result = run_hftk("finetune", str(recipe_path(tmp_path, "run", family)))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[family] = tmp_path / "run"
    return runs


def resume(tmp_path: Path, name: str, family: str = "t5", launcher=None, env=None, **train) -> subprocess.CompletedProcess:
    result = run_hftk("finetune", str(recipe_path(tmp_path, name, family, **train)),
                      "train.resume_from_checkpoint=latest", launcher=launcher, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


KILLS = {
    "step:6": ({}, "mid-epoch 0, after the first checkpoint"),
    "step:9": ({}, "right after an epoch boundary (checkpoint-8 sits on it)"),
    "micro:27": ({}, "inside an accumulation window"),
    "save:2": ({}, "during a checkpoint write"),
    "step:11": ({"eval_steps": 5}, "with evaluation during training on"),
}
CASES = [(family, fault) for family in MODELS for fault in KILLS
         if family == "t5" or fault in ("step:6", "micro:27", "step:11")]


@pytest.mark.parametrize(("family", "fault"), CASES)
def test_sigkill_then_resume_is_bit_identical_with_dropout(family, fault, unbroken, tmp_path):
    train, what = KILLS[fault]
    killed = run_hftk("finetune", str(recipe_path(tmp_path, "run", family, **train)),
                      env={"HFTK_FAULT": fault, "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert killed.returncode == -signal.SIGKILL, f"{what}: the fault did not fire"
    if fault.startswith("save"):
        assert list((tmp_path / "run").glob(".checkpoint-*.partial")), "the write was cut off midway"
    resumed = resume(tmp_path, "run", family, **train)
    assert "resuming from" in resumed.stderr
    # The unbroken run had no evaluation during training: evaluating must not change training either.
    assert loss_rows(tmp_path / "run") == loss_rows(unbroken[family]), what
    assert weights(tmp_path / "run") == weights(unbroken[family]), what
    assert not list((tmp_path / "run").glob(".checkpoint-*.partial"))


def packed_recipe_path(tmp_path: Path, name: str) -> Path:
    """GPT-2 with train.packing on translation pairs of ~72 tokens, in rows of up to 160: two share a row."""
    recipe = tiny_recipe(tmp_path, train={**TRAIN, "output_dir": str(tmp_path / name), "packing": True},
                         data={"train": str(ROOT / "data/translate/train.jsonl"),
                               "validation": str(ROOT / "data/translate/validation.jsonl"),
                               "source_lang": "en", "target_lang": "fr", "max_source_length": 96, "max_target_length": 64})
    recipe["task"] = "translation"
    recipe["model"]["config"] = {**MODELS["gpt2"], "n_positions": 160}
    return write_recipe(tmp_path, recipe, f"{name}.yaml")


@pytest.fixture(scope="module")
def unbroken_packed(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("unbroken-packed")
    recipe = str(packed_recipe_path(tmp_path, "run"))
    result = run_hftk("finetune", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    unpacked = run_hftk("plan", recipe, "train.packing=false", "--json")
    assert unpacked.returncode == 0, unpacked.stderr[-3000:]
    # rows really held several examples (measured: 4.3% of positions padded, 10.0% unpacked)
    assert results(tmp_path / "run")["train_padding_fraction"] < json.loads(unpacked.stdout)["padding_fraction"]
    return tmp_path / "run"


def test_sigkill_then_resume_is_bit_identical_with_packing(unbroken_packed, tmp_path):
    fault = "micro:27"  # inside an accumulation window, past the first checkpoint
    killed = run_hftk("finetune", str(packed_recipe_path(tmp_path, "run")),
                      env={"HFTK_FAULT": fault, "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert killed.returncode == -signal.SIGKILL, "the fault did not fire"
    resumed = run_hftk("finetune", str(packed_recipe_path(tmp_path, "run")), "train.resume_from_checkpoint=latest")
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert loss_rows(tmp_path / "run") == loss_rows(unbroken_packed)
    assert weights(tmp_path / "run") == weights(unbroken_packed)


def _start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, **env}, start_new_session=True)


def test_sigterm_saves_exits_75_and_resumes_identically(unbroken, tmp_path):
    process = _start([sys.executable, "-m", "hftk", "finetune", str(recipe_path(tmp_path, "run"))], {})
    wait_for_step(tmp_path / "run", 7, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert "hftk: stopped: received SIGTERM" in stderr and "resume_from_checkpoint=latest" in stderr
    stopped_at = max(json.loads((p / MANIFEST).read_text())["optimizer_step"] for p in (tmp_path / "run").glob("checkpoint-*"))
    assert stopped_at % 4 != 0 or stopped_at >= 7  # the preemption checkpoint, not only the periodic ones
    resume(tmp_path, "run")
    assert weights(tmp_path / "run") == weights(unbroken["t5"])
    assert loss_rows(tmp_path / "run") == loss_rows(unbroken["t5"])


def test_sigterm_under_two_process_launch(straight, tmp_path):
    # Same process count on both sides, so dropout stays on: each process restores its own generator.
    launcher = accelerate_launch("ddp.yaml")
    env = {"ACCELERATE_USE_CPU": "false"}  # the GPU command line, run as is on a CPU
    process = _start(launcher + ["hftk", "finetune", str(recipe_path(tmp_path, "run"))], env)
    wait_for_step(tmp_path / "run", 5, process)
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: the launcher and its workers
    _, stderr = process.communicate(timeout=120)
    assert "hftk: stopped: received SIGTERM" in stderr, stderr[-3000:]
    resume(tmp_path, "run", launcher=launcher, env=env)
    assert weights(tmp_path / "run") == weights(straight)
    assert loss_rows(tmp_path / "run") == loss_rows(straight)


def test_a_dead_process_ends_the_others_quickly(tmp_path):
    launcher = accelerate_launch("ddp.yaml")
    started = time.time()
    result = run_hftk("finetune", str(recipe_path(tmp_path, "run", save_steps=3)), launcher=launcher, timeout=180,
                      env={"HFTK_FAULT": "step:4:1", "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert result.returncode != 0
    assert time.time() - started < 120
    assert (tmp_path / "run" / "checkpoint-3" / MANIFEST).is_file()  # the last good checkpoint survives
    # The survivor says so in one line that names the checkpoint, unless the launcher ended it first.
    ours = [line for line in result.stderr.splitlines() if line.startswith("hftk: error:")]
    assert len(ours) <= 1, result.stderr[-3000:]
    if ours:
        assert "another process of this launch ended" in ours[0] and "checkpoint-3" in ours[0], ours[0]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_hftk("finetune", str(recipe_path(tmp_path, "run", learning_rate=1e30, max_grad_norm=None,
                                                  logging_steps=2)))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hftk: error: the training loss became non-finite at optimizer step")
    bad_step = int(line.split("optimizer step ")[1].split(";")[0])
    saved = [json.loads((p / MANIFEST).read_text())["optimizer_step"] for p in (tmp_path / "run").glob("checkpoint-*")]
    assert all(step < bad_step for step in saved)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_full_disk_during_a_save_leaves_earlier_checkpoints_intact(tmp_path):
    first = run_hftk("finetune", str(recipe_path(tmp_path, "run", max_steps=6, save_steps=3)))
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")  # as if the run had been stopped after step 5
    manifest = tmp_path / "run" / RUN_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "finished": False}))
    before = digest(tmp_path / "run" / "checkpoint-3")
    size = (tmp_path / "run" / "checkpoint-3" / "model.safetensors").stat().st_size

    def small_files():  # the disk "fills up": no file may grow past half a model
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    command = [sys.executable, "-m", "hftk", "finetune", str(recipe_path(tmp_path, "run", max_steps=6, save_steps=3)),
               "train.resume_from_checkpoint=latest"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=300,
                            check=False)
    assert result.returncode == 1
    assert "cannot write checkpoint-" in result.stderr and "earlier checkpoints are intact" in result.stderr
    assert digest(tmp_path / "run" / "checkpoint-3") == before
    assert not list((tmp_path / "run").glob(".checkpoint-*.partial"))


def test_resume_with_other_training_settings_is_refused(tmp_path):
    first = run_hftk("finetune", str(recipe_path(tmp_path, "run", max_steps=6)),
                     env={"HFTK_FAULT": "step:5", "PYTHONPATH": f"{FAULTS}:{ROOT}"})
    assert first.returncode == -signal.SIGKILL  # stopped after checkpoint-4
    result = run_hftk("finetune", str(recipe_path(tmp_path, "run", max_steps=6)), "train.resume_from_checkpoint=latest",
                      "train.learning_rate=0.5", "train.logging_steps=7")
    assert result.returncode == 2
    assert "train.learning_rate (0.001 -> 0.5)" in result.stderr and "logging_steps" not in result.stderr
