"""A stop under torchrun or accelerate launch must fit in the launcher's grace between the SIGTERM it
passes on and its SIGKILL: hftk says so at the first save that shows it would not."""

from __future__ import annotations

import logging

import pytest

from hftk.train.preemption import StopFlag, launcher_grace


@pytest.fixture
def elastic_launch(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)


def grace_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "SIGKILLs" in r.getMessage()]


def test_no_launcher_no_grace(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launcher_grace() is None


def test_the_launcher_default_and_its_variable(elastic_launch, monkeypatch):
    assert launcher_grace() == 30
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    assert launcher_grace() == 600


def test_a_save_past_the_grace_is_said_once(elastic_launch, caplog):
    stop = StopFlag()
    with caplog.at_level(logging.WARNING, logger="hftk"):
        stop.check_grace(12.0, 3)
        assert grace_warnings(caplog) == []
        stop.check_grace(41.0, 6)
        stop.check_grace(45.0, 9)
    said = grace_warnings(caplog)
    assert len(said) == 1
    assert said[0].startswith("optimizer step 6 and its checkpoint took 41 s, longer than the 30 s")
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in said[0]


def test_a_raised_grace_is_respected(elastic_launch, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    with caplog.at_level(logging.WARNING, logger="hftk"):
        StopFlag().check_grace(41.0, 6)
    assert grace_warnings(caplog) == []


def _agree_over_gloo(rank: int, port: int, results) -> None:
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stop, accelerator = StopFlag(), SimpleNamespace(num_processes=2, device="cpu")
    seen = []
    for step in range(1, 7):
        if rank == 1 and step == 3:
            stop.received = "SIGTERM"  # as the handler sets it, during step 3
        seen.append(stop.agreed(accelerator))
    stop.settle()
    results[rank] = (seen, stop.received)
    dist.destroy_process_group()


def test_every_process_agrees_at_the_same_step_one_after_the_signal():
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    results = mp.Manager().dict()
    mp.spawn(_agree_over_gloo, args=(free_port(), results), nprocs=2)
    expected = [False, False, False, True, True, True]  # raised at step 3, agreed at step 4
    assert results[0] == (expected, "a stop signal on another process")
    assert results[1] == (expected, "SIGTERM")
