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


# The fast tier (-m "not slow") stays fast by itself: a test without the slow marker whose setup and
# call together take longer than this fails, naming the marker to add (a session fixture's training
# lands in the setup of the first test that asks for it).
UNMARKED_LIMIT_S = float(os.environ.get("HFTK_UNMARKED_LIMIT_S", "20"))
_SETUP_S = pytest.StashKey[float]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "setup":
        item.stash[_SETUP_S] = report.duration
    elif report.when == "call" and report.passed and item.get_closest_marker("slow") is None:
        spent = item.stash.get(_SETUP_S, 0.0) + report.duration
        if spent > UNMARKED_LIMIT_S:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} took {spent:.1f}s (over {UNMARKED_LIMIT_S:g}s) without "
                               "@pytest.mark.slow: mark it slow, or make it faster")
    return report


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HFTK_CACHE", str(cache / "hftk"))
    yield
    forget_the_run()  # after an in-process command or CliRunner call


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
        # fp32 whatever the CPU: tests compare losses and bits across runs, strategies and reloads
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 8,
                  "learning_rate": 1e-3, "logging_steps": 2, "bf16": False},
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


# Read once, when a process starts (a fault module, the Hub's offline switch, cache roots): a command
# with one of these set runs in a fresh interpreter.
READ_AT_START = {"PYTHONPATH", "HFTK_FAULT", "HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE",
                 "ACCELERATE_USE_CPU", "COLUMNS"}


def run_hftk(*args: str, cwd: Path = ROOT, env: dict | None = None, launcher: list[str] | None = None,
             timeout: int = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """The real command, `hftk.cli.main` with its argv, as a user types it. A launch, `fresh=True` (the test is
    about the process itself: its terminal, its imports, its signals) or an environment read at start-up
    gets a new interpreter; otherwise it runs in this one, which saves an interpreter start (about 6 s of
    imports) per call and gives the same exit status, stdout and stderr."""
    if launcher is None and not fresh and not READ_AT_START & set(env or {}):
        return run_here(list(args), cwd, env or {})
    command = (launcher or [sys.executable, "-m"]) + ["hftk", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def run_here(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import traceback

    from hftk import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = ["hftk", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                status = 0
            except SystemExit as ended:
                status = ended.code if isinstance(ended.code, int) else 0 if ended.code is None else 1
            except Exception:  # noqa: BLE001 - what the interpreter prints for an uncaught error, and its status
                traceback.print_exc()
                status = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        forget_the_run()
    return subprocess.CompletedProcess(["hftk", *args], status, out.getvalue(), err.getvalue())


def forget_the_run() -> None:
    """What a finished process would take with it: Accelerate's process-wide state (a bf16 run would
    leave the next one in bf16), hftk's held log records, its verbosity and open train.log handlers."""
    import logging

    from hftk import logs

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    logs._pending.buffer.clear()
    logs._pending.setTarget(None)
    logs.set_verbosity(logs.NORMAL)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


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
