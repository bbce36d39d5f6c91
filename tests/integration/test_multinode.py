"""Several machines through Accelerate's multi-node launch, proved with two launches on this
machine over loopback (one process each; two for FSDP2 x TP): the same losses as one process at
the same global batch with DDP, every sharded config and FSDP2 x TP, a checkpoint that resumes on
one machine with 2 processes and, bit-identical, on 2 machines, a SIGTERM to one machine that stops
both with a checkpoint, a launch line that forgets --multi_gpu refused, and a machine that never
arrives bounded by the rendezvous timeout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, NamedTuple

import pytest

from hftk.checkpoint import MANIFEST
from tests.conftest import FAULTS, ROOT, free_port, loss_rows, losses, wait_for_step, weights
from tests.integration.test_parallel import STEPS, recipe_file
from tests.integration.test_tensor_parallel import GLOBAL_BATCH
from tests.integration.test_tensor_parallel import recipe_file as tp_recipe_file

pytestmark = pytest.mark.slow  # every test here trains or launches for more than a few seconds

BATCH = 4  # per process: 2 machines x 1 process x 4 == 1 process x 8


def environment(tmp_path: Path) -> dict:
    # No accelerate config from this machine's HF_HOME; the GPU launch line as is (no ACCELERATE_USE_CPU).
    return {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "ACCELERATE_USE_CPU": "false"}


def machine_launch(rank: int, port: int, *flags: str, processes: int = 2) -> list[str]:
    """What a user types on machine `rank` of 2 (README, "Several machines"); `processes` in all."""
    return ["accelerate", "launch", *flags, "--num_machines", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_processes", str(processes)]


class Launch(NamedTuple):
    command: list[str]
    log: IO[str]
    process: subprocess.Popen


def start_machines(tmp_path: Path, recipe: Path, *flags: str, env: dict | None = None, processes: int = 2) -> list[Launch]:
    """Both machines' launches at once, as on two nodes, each with its own log and its own process
    group (a scheduler signals one machine's launch and what it started)."""
    port = free_port()
    launches = []
    for rank in (0, 1):
        command = [*machine_launch(rank, port, *flags, processes=processes), "-m", "hftk", "finetune", str(recipe)]
        log = (tmp_path / f"machine{rank}.log").open("w+")
        process = subprocess.Popen(command, cwd=ROOT, env={**environment(tmp_path), **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        launches.append(Launch(command, log, process))
    return launches


def finish_machines(launches: list[Launch], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Each launch's exit status, with its log as stderr."""
    finished = []
    for command, log, process in launches:
        process.wait(timeout=timeout)
        log.seek(0)
        finished.append(subprocess.CompletedProcess(command, process.returncode, "", log.read()))
        log.close()
    return finished


def launch_two_machines(tmp_path: Path, recipe: Path, *flags: str, timeout: int = 600,
                        processes: int = 2) -> list[subprocess.CompletedProcess]:
    return finish_machines(start_machines(tmp_path, recipe, *flags, processes=processes), timeout)


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("two-machines")
    runs = launch_two_machines(tmp_path, recipe_file(tmp_path, "multinode", BATCH), "--multi_gpu")
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    assert "on 2 process(es)" in runs[0].stderr
    return tmp_path / "multinode"


def test_two_machines_equal_one_process(two_machines, reference):
    mine, theirs = losses(two_machines), losses(reference)
    assert sorted(mine) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in theirs:
        assert mine[step] == pytest.approx(theirs[step], rel=1e-4)
    manifest = json.loads((two_machines / "checkpoint-3" / "hftk_checkpoint.json").read_text())
    assert manifest["num_processes"] == 2
    assert json.loads((two_machines / "all_results.json").read_text())["eval_samples"] == 16


@pytest.mark.parametrize("config", ["zero1.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "fsdp.yaml",
                                    "fsdp_shard_grad_op.yaml"])
def test_sharded_strategies_across_two_machines_equal_one_process(config, reference, tmp_path):
    """The same two launch lines with each DeepSpeed or FSDP config instead of --multi_gpu: one world
    of 2 (DeepSpeed through deepspeed_multinode_launcher: standard, no pdsh), the recipe unchanged."""
    runs = launch_two_machines(tmp_path, recipe_file(tmp_path, "sharded", BATCH),
                               "--config_file", str(ROOT / "accelerate_configs" / config))
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    assert "on 2 process(es)" in runs[0].stderr
    mine, theirs = losses(tmp_path / "sharded"), losses(reference)
    assert sorted(mine) == sorted(theirs)
    for step in theirs:  # measured: 7e-8 relative for both
        assert mine[step] == pytest.approx(theirs[step], rel=1e-4)
    if config.startswith("fsdp"):
        assert "fully_shard over 2 processes" in runs[0].stderr
    else:  # each machine's process wrote its own ZeRO partition
        assert (tmp_path / "sharded" / "checkpoint-3" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


def test_fsdp_tp_across_two_machines_equal_one_process(one_process, tmp_path):
    """fsdp_tp.yaml on 2 machines x 2 processes: each TP group is one machine's pair of processes
    (transformers puts TP innermost in its mesh), FSDP2 shards across the machines."""
    recipe = tp_recipe_file(tmp_path, "fsdp_tp", GLOBAL_BATCH // 2)
    runs = launch_two_machines(tmp_path, recipe, "--config_file", str(ROOT / "accelerate_configs" / "fsdp_tp.yaml"),
                               processes=4)
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    assert "tensor parallel 2 x data shards 2" in runs[0].stderr and "on 4 process(es)" in runs[0].stderr
    mine, theirs = losses(tmp_path / "fsdp_tp"), losses(one_process)
    assert sorted(mine) == sorted(theirs)
    for step in theirs:  # measured: 1.7e-7 relative
        assert mine[step] == pytest.approx(theirs[step], rel=1e-4)


def test_two_machine_checkpoint_resumes_on_one_machine(two_machines, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two_machines / "checkpoint-3", resumed / "checkpoint-3")
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
               "-m", "hftk", "finetune", str(recipe_file(tmp_path, "resumed", BATCH, resume_from_checkpoint="latest"))]
    run = subprocess.run(command, cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    unbroken = {s: v for s, v in losses(two_machines).items() if s > 3}
    assert losses(resumed) == pytest.approx(unbroken, rel=1e-6)


# Half a second after every optimizer step, so a SIGTERM sent once step 2 is logged stops the run before step 6.
PACED = {"HFTK_FAULT": "pace:500", "PYTHONPATH": f"{FAULTS}:{ROOT}"}
STOPPED = re.compile(r"^hftk: stopped: received (.+); saved (\S+) at optimizer step (\d+);", re.MULTILINE)


def stop_line(log: str) -> tuple[str, Path, int]:
    """What the machine's first process said when it stopped: (why, checkpoint, optimizer step)."""
    found = STOPPED.findall(log)
    assert len(found) == 1, log[-4000:]
    why, folder, step = found[0]
    return why, Path(folder), int(step)


def ended_by_sigterm(launch: subprocess.CompletedProcess) -> bool:
    """How a launcher says a SIGTERM ended it: accelerate up to 1.15 exits 1 and names the signal,
    1.16 and later exit 128 + 15, as a shell does."""
    return (launch.returncode == 1 and "got signal: 15" in launch.stderr) or launch.returncode == 128 + signal.SIGTERM


def test_sigterm_on_one_machine_stops_both_with_a_checkpoint(two_machines, tmp_path):
    launches = start_machines(tmp_path, recipe_file(tmp_path, "run", BATCH), "--multi_gpu", env=PACED)
    # The processes agree on a stop one step after it arrives: at step 4 or 5 here.
    wait_for_step(tmp_path / "run", 2, *(launch.process for launch in launches))
    sent = time.monotonic()
    os.killpg(launches[1].process.pid, signal.SIGTERM)  # as a scheduler stops machine 1: its launch and all under it
    machine0, machine1 = finish_machines(launches, timeout=120)
    took = time.monotonic() - sent
    print(f"both machines ended {took:.1f} s after the SIGTERM", file=sys.stderr)
    # Machine 1's launcher passes the SIGTERM on and, 30 s later, SIGKILLs what is still running.
    assert took < 30, f"{took:.1f} s"
    assert "forcefully exiting" not in machine1.stderr, machine1.stderr[-4000:]
    # Machine 0's launcher exits 1 and reports its process's 75; machine 1's reports the signal it got.
    assert machine0.returncode == 1 and re.search(r"exitcode\s*:\s*75\b", machine0.stderr), machine0.stderr[-4000:]
    assert ended_by_sigterm(machine1), machine1.stderr[-4000:]
    assert stop_line(machine1.stderr)[0] == "SIGTERM"
    why, folder, step = stop_line(machine0.stderr)
    assert why == "a stop signal on another process"
    assert stop_line(machine1.stderr)[1:] == (folder, step)
    # A checkpoint of its own, not a periodic one (every 3 steps), at the step both stopped after.
    assert 4 <= step < STEPS and step % 3 != 0
    assert json.loads((folder / MANIFEST).read_text())["optimizer_step"] == step
    assert loss_rows(tmp_path / "run")[-1][0] == step
    runs = launch_two_machines(tmp_path, recipe_file(tmp_path, "run", BATCH, resume_from_checkpoint="latest"),
                               "--multi_gpu")
    for run in runs:
        assert run.returncode == 0, run.stderr[-4000:]
    assert f"resuming from {folder}" in runs[0].stderr
    assert loss_rows(tmp_path / "run") == loss_rows(two_machines)
    assert weights(tmp_path / "run") == weights(two_machines)


def test_two_machines_without_multi_gpu_are_refused(tmp_path):
    """Without --multi_gpu each launch starts one plain process: two worlds of 1, both training into one
    output_dir. hftk sees a launch told of several processes that started this one alone."""
    runs = launch_two_machines(tmp_path, recipe_file(tmp_path, "refused", BATCH), timeout=300)
    for run in runs:
        assert run.returncode != 0
        lines = [line for line in run.stderr.splitlines() if line.startswith("hftk:")]
        assert len(lines) == 1 and "started this one alone" in lines[0] and "--multi_gpu" in lines[0], run.stderr[-3000:]
    assert not (tmp_path / "refused").exists()


def test_a_machine_that_never_arrives_is_bounded_by_the_rendezvous_timeout(tmp_path):
    """Machine 0 of 2 alone: the launcher waits for machine 1 for the rendezvous timeout (600 s by
    default for the static rendezvous), then fails; --rdzv_conf timeout=N bounds it."""
    command = [*machine_launch(0, free_port(), "--multi_gpu", "--rdzv_conf", "timeout=5"),
               "-m", "hftk", "finetune", str(recipe_file(tmp_path, "alone", BATCH))]
    started = time.monotonic()
    run = subprocess.run(command, cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=300,
                         check=False)
    waited = time.monotonic() - started
    print(f"machine 0 of 2 alone gave up after {waited:.1f} s", file=sys.stderr)
    assert run.returncode != 0
    assert 5 <= waited < 120, f"waited {waited:.1f} s"
    assert not (tmp_path / "alone").exists(), "no process started: nothing written"
