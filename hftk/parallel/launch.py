"""What the launch gave us: environment and world checks, process-group and DDP settings, DeepSpeed's
configuration hooks.

The topology comes from the accelerate config. hftk picks the backend (NCCL on GPUs, Gloo on CPUs),
checks that the world it got is the world it was launched with, and refuses combinations that
would silently run something else.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from hftk.errors import UserError


def env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes", "on"}


def launch_problems(mixed_precision: str = "no") -> None:
    """Checks on the launch environment, before any process group exists; mixed_precision: what the run
    trains in, train.bf16 and the launcher's setting resolved (hftk.precision)."""
    if unjoined_launch():
        raise UserError(
            "this launch was told of several processes or machines but started this one alone (accelerate launch "
            "without --multi_gpu or a multi-process config runs one plain process per launch); add --multi_gpu "
            "(or --config_file accelerate_configs/ddp.yaml) to the launch on every machine"
        )
    deepspeed = env_true("ACCELERATE_USE_DEEPSPEED")
    if deepspeed and env_true("ACCELERATE_USE_CPU"):
        raise UserError(
            "ACCELERATE_USE_CPU=true turns a DeepSpeed config into plain DDP; launch DeepSpeed configs without it "
            "(hftk uses Gloo on CPUs by itself)"
        )
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision fp16 cannot run on a CPU; use bf16 or no in the accelerate config")


def unjoined_launch() -> bool:
    """`accelerate launch --num_machines 2 --num_processes 2 ...` without --multi_gpu starts one plain
    process per launch: it sets MASTER_ADDR/MASTER_PORT for the world it was told of, but no WORLD_SIZE
    or RANK, so every process would train alone, all into one output_dir. ACCELERATE_MIXED_PRECISION
    marks a process started by accelerate launch (a shell that exports MASTER_ADDR alone is not one)."""
    return ("WORLD_SIZE" not in os.environ and "RANK" not in os.environ and "MASTER_ADDR" in os.environ
            and "ACCELERATE_MIXED_PRECISION" in os.environ)


def cpu_processes() -> bool:
    """A multi-process launch with no GPU: the DDP and FSDP configs (written for GPUs) then run as CPU
    processes over Gloo, so the command a user runs on a GPU machine also runs on a laptop. Without
    this, Accelerate starts processes that never join one group. DeepSpeed brings its own launch."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            and not env_true("ACCELERATE_USE_DEEPSPEED"))


def process_group_kwargs(timeout_seconds: int) -> list[Any]:
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    # DeepSpeed and torch.distributed default to NCCL, which a CPU cannot run. A lone process gets
    # none: Accelerate would take a backend as a request to start a process group.
    # The timeout bounds how long the others wait when one process hangs or dies.
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return []
    backend = None if torch.cuda.is_available() else "gloo"
    return [InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=timeout_seconds))]


def ddp_kwargs(bucket_cap_mb: float | None) -> list[Any]:
    """Accelerate hands these to DistributedDataParallel; other strategies ignore them."""
    if bucket_cap_mb is None:
        return []
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(bucket_cap_mb=bucket_cap_mb)]


def check_world(accelerator: Any) -> None:
    """The launcher's WORLD_SIZE must be the world we joined, and gradients must really be shared."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"launched {launched} processes but this one runs alone (an unsynchronised launch); launch with "
            f"accelerate launch --multi_gpu --num_processes {launched} (or an accelerate config) ..."
        )
    if accelerator.num_processes > 1:
        probe = torch.ones((), device=accelerator.device)
        total = accelerator.reduce(probe, reduction="sum").item()
        if int(total) != accelerator.num_processes:
            raise UserError(
                f"an all-reduce over {accelerator.num_processes} processes gave {total:g}: the processes are not "
                "synchronised; check the launch's --num_processes, --num_machines and --main_process_ip"
            )


def deepspeed_plugin(accelerator: Any) -> Any:
    return getattr(accelerator.state, "deepspeed_plugin", None)


@contextlib.contextmanager
def model_construction(accelerator: Any):
    """Build the model the same way whatever the strategy, unless the config asks for zero.Init.

    Accelerate registers its DeepSpeed config with transformers even when zero3_init_flag is false,
    and transformers then initialises ZeRO-3 models partitioned, with other random numbers than
    one process would draw.
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None or plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


# What Gloo and NCCL say when a peer is silent past the timeout, or gone.
_SILENT = ("Timed out waiting", "collective operation timeout", "timed out after", "Timeout waiting")
_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "communicator was aborted",
         "Broken pipe")


@contextlib.contextmanager
def collective_failures(timeout_s: int, latest: Any):
    """A collective that failed because another process froze or died becomes one line naming
    train.ddp_timeout and the newest checkpoint, on every process, instead of a traceback."""
    from hftk.errors import CollectiveFailure

    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if any(s in text for s in _SILENT):
            what = (f"no answer from another process within train.ddp_timeout={timeout_s} s (a process stopped, a "
                    f"wedged data worker, a network partition)")
        elif any(s in text for s in _GONE):
            what = "another process of this launch ended (its own lines say why)"
        else:
            raise
        saved = latest()
        raise CollectiveFailure(
            f"{what}; last checkpoint: {saved or 'none'}; with train.resume_from_checkpoint=latest a relaunch (or "
            f"accelerate launch --max_restarts) continues from it; train.ddp_timeout must also cover the longest "
            f"evaluation and checkpoint save") from None


def restart_count() -> int:
    """Which attempt this is: torch elastic's restarts (accelerate launch / torchrun --max_restarts), or a
    SLURM requeue; 0 for the first."""
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def join_this_attempt(timeout_s: int) -> None:
    """A restarted attempt joins its process group under a key prefix of its own. torch elastic's static
    rendezvous (accelerate launch's and torchrun's default) keeps one store for every attempt, so the
    processes of a restart could read the dead attempt's addresses and wait on them; the first attempt
    is left to Accelerate as always."""
    import datetime

    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    gpu = torch.cuda.is_available() and not env_true("ACCELERATE_USE_CPU")
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpu else "gloo", store=dist.PrefixStore(f"hftk/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def skip_deepspeed_inference_comm() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce kernel when it starts (about a
    minute on a fresh machine, then a load on every launch), and only its inference all-reduce uses it:
    training collectives go through torch.distributed either way."""
    import importlib
    import sys

    if "deepspeed" not in sys.modules or torch.cuda.is_available():
        return
    # By module path: the name `torch` inside deepspeed.comm is torch itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def apply_recipe_to_deepspeed(accelerator: Any, max_grad_norm: float | None) -> None:
    """DeepSpeed clips inside its engine (Accelerate's clip_grad_norm_ does nothing there)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None:
        plugin.deepspeed_config["gradient_clipping"] = max_grad_norm or 0.0


def cpu_fsdp_requested() -> bool:
    """An FSDP config launched on a CPU (Accelerate is told to use the CPU, so it gives plain processes)."""
    return env_true("ACCELERATE_USE_FSDP") and not torch.cuda.is_available()


def reshard_after_forward() -> bool:
    # FSDP2 configs say it directly; FSDP1-style configs say SHARD_GRAD_OP for "keep parameters".
    if "FSDP_RESHARD_AFTER_FORWARD" in os.environ:
        return env_true("FSDP_RESHARD_AFTER_FORWARD")
    return os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper() not in {"SHARD_GRAD_OP", "2"}
