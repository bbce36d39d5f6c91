"""Shared fixtures: offline settings, a tiny recipe on the bundled data, a CLI runner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# On PYTHONPATH with HFTK_FAULT set, tests/faults/sitecustomize.py injects a fault (see there).
FAULTS = str(ROOT / "tests" / "faults")

# Tests run offline: every Hub lookup must fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HFTK_CACHE", str(cache / "hftk"))


def tiny_recipe(tmp_path: Path, **sections) -> dict:
    """A small summarization recipe on a slice of the bundled data; sections override keys."""
    recipe = {
        "task": "summarization",
        "model": {
            "config": {"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64,
                       "num_layers": 1, "num_decoder_layers": 1, "dropout_rate": 0.0},
            "tokenizer": {"train": {"vocab_size": 300, "min_frequency": 2}},
        },
        "data": {"train": str(ROOT / "data/summarize/train.jsonl"),
                 "validation": str(ROOT / "data/summarize/validation.jsonl"),
                 "max_train_samples": 64, "max_eval_samples": 16,
                 "max_source_length": 64, "max_target_length": 16},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 8,
                  "learning_rate": 1e-3, "logging_steps": 2},
        "eval": {"per_device_eval_batch_size": 8, "max_new_tokens": 8},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(config: str | None = None, *flags: str) -> list[str]:
    """`accelerate launch ... -m` on a free port, so launches in parallel test workers never collide."""
    command = ["accelerate", "launch", "--main_process_port", str(free_port())]
    if config:
        command += ["--config_file", str(ROOT / "accelerate_configs" / config)]
    return command + [*flags, "-m"]


def run_hftk(*args: str, cwd: Path = ROOT, env: dict | None = None, launcher: list[str] | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """The real command in a fresh process, as a user types it."""
    command = (launcher or [sys.executable, "-m"]) + ["hftk", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def loss_rows(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged training row, in order: a repeated or missing row shows."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def losses(folder: Path) -> dict[int, float]:
    return dict(loss_rows(folder))


def weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def wait_for_step(folder: Path, step: int, *processes: subprocess.Popen, timeout: float = 240) -> None:
    """Until metrics.jsonl logs `step` or a later one; fails at once if a process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for process in processes:
            if process.poll() is not None:
                said = process.stderr.read()[-3000:] if process.stderr else ""
                raise AssertionError(f"exit {process.returncode} before step {step}: {said}")
        metrics = folder / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def results(folder: Path) -> dict:
    return json.loads((folder / "all_results.json").read_text())


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
