"""What the launch gave us, and the few places where a strategy needs a hand.

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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes", "on"}


def launch_problems() -> None:
    """Checks on the launch environment, before any process group exists."""
    requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    gpu = torch.cuda.is_available()
    deepspeed = _env_true("ACCELERATE_USE_DEEPSPEED")
    if deepspeed and _env_true("ACCELERATE_USE_CPU"):
        raise UserError(
            "ACCELERATE_USE_CPU=true turns a DeepSpeed config into plain DDP; launch DeepSpeed configs without it "
            "(hftk uses Gloo on CPUs by itself)"
        )
    if requested == "fp16" and not gpu:
        raise UserError("mixed_precision fp16 cannot run on a CPU; use bf16 or no in the accelerate config")
    if _env_true("ACCELERATE_USE_FSDP") and not gpu:
        raise UserError(
            "Accelerate's FSDP needs GPUs; on a CPU launch the FSDP configs with ACCELERATE_USE_CPU=true, "
            "which hftk shards with PyTorch's fully_shard over Gloo"
        )


def process_group_kwargs() -> list[Any]:
    from accelerate.utils import InitProcessGroupKwargs

    # DeepSpeed and torch.distributed default to NCCL, which a CPU cannot run.
    return [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]


def check_world(accelerator: Any) -> None:
    """The launcher's WORLD_SIZE must be the world we joined, and gradients must really be shared."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"launched {launched} processes but this one runs alone (an unsynchronised launch); on a CPU use "
            f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {launched} ..."
        )
    if accelerator.num_processes > 1:
        probe = torch.ones((), device=accelerator.device)
        total = accelerator.reduce(probe, reduction="sum").item()
        if int(total) != accelerator.num_processes:
            raise UserError(f"an all-reduce over {accelerator.num_processes} processes gave {total}: processes are not connected")


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


def apply_recipe_to_deepspeed(accelerator: Any, max_grad_norm: float | None) -> None:
    """DeepSpeed clips inside its engine (Accelerate's clip_grad_norm_ does nothing there)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None:
        plugin.deepspeed_config["gradient_clipping"] = max_grad_norm or 0.0
