"""Optimizer, schedule and the step arithmetic, all in optimizer steps."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from hftk.recipe import TrainSection


def total_optimizer_steps(train: TrainSection, batches_per_epoch: int) -> int:
    """batches_per_epoch counts this process's micro-batches, which already divides the data over processes."""
    if train.max_steps:
        return train.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / train.gradient_accumulation_steps)
    return max(1, math.ceil(train.num_train_epochs * steps_per_epoch))


def warmup_steps(train: TrainSection, total_steps: int) -> int:
    return train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)


def build_optimizer(model: torch.nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # Biases and norm gains (1-d) are not decayed, as in GPT-2 and nanoGPT.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
        fused=fused_runs(params),
    )


def fused_runs(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW (one kernel for all tensors; the Trainer's default, adamw_torch_fused): 3x
    faster than the per-tensor loop for a 1M-parameter model on this CPU. Plain tensors only: sharded
    (DTensor) parameters of FSDP2 and tensor parallelism keep the loop."""
    from torch.distributed.tensor import DTensor

    return bool(params) and not any(isinstance(p, DTensor) for p in params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int):
    return get_scheduler(
        train.lr_scheduler_type, optimizer,
        num_warmup_steps=warmup_steps(train, total_steps), num_training_steps=total_steps,
    )


def learning_rates(train: TrainSection, total_steps: int, upto: int) -> list[float]:
    """The rate of build_scheduler's schedule after each of optimizer steps 0..upto: entry s is what the
    loop logs at step s (get_last_lr after the step) and what step s + 1 trains with. Stepped on a
    one-number stand-in optimizer, so a picture can show the warm-up between logging steps."""
    import warnings

    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.learning_rate)
    scheduler = build_scheduler(stand_in, train, total_steps)
    rates = [scheduler.get_last_lr()[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no gradients: the stand-in's step is a no-op, which torch may note
        for _ in range(upto):
            stand_in.step()
            scheduler.step()
            rates.append(scheduler.get_last_lr()[0])
    return rates
