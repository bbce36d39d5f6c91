"""`hftk plan --probe N`: time N real optimizer steps of the recipe on this machine (one process, the
recipe's batch, accumulation, precision and adapter) and estimate the run's training time from them.
Nothing is written; the model is built with real weights only here."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Probe:
    steps_measured: int
    seconds_per_step: float  # one process, after one warm-up step
    estimated_training_seconds: float  # seconds_per_step x the plan's optimizer steps
    device: str


def probe_steps(plan: Any, tokenizer: Any, features: Any, steps: int, total_steps: int) -> Probe:
    import torch

    from hftk import adapters, models
    from hftk.objective import token_counts, token_loss_sums
    from hftk.prepare import train_collator, train_loader
    from hftk.train import fast_dropout
    from hftk.train.loop import windows
    from hftk.train.optim import build_optimizer

    recipe, family = plan.recipe, plan.encoding.family
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    if recipe.lora is not None:
        model = adapters.wrap(model, adapters.plan_adapter(recipe.lora, plan.config, plan.encoding.auto_class),
                              recipe.model.gradient_checkpointing)
    if fast_dropout.applies(recipe.train, recipe.model, device):
        fast_dropout.install(model)
    model.to(device).train()
    optimizer = build_optimizer(model, recipe.train)
    loader = train_loader(plan, features, train_collator(plan, tokenizer, model), 1)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if recipe.train.bf16
                else contextlib.nullcontext())
    timings: list[float] = []
    while len(timings) < steps + 1:  # the first step warms up allocators and kernels
        for window in windows(loader, recipe.train.gradient_accumulation_steps):
            started = time.perf_counter()
            window = [{k: v.to(device) for k, v in batch.items()} for batch in window]
            count = sum(token_counts(b, family).sum() for b in window).clamp(min=1)
            for batch in window:
                with autocast:
                    loss = token_loss_sums(model, batch, family).sum() / count
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
            if len(timings) == steps + 1:
                break
    per_step = sum(timings[1:]) / steps
    return Probe(steps, per_step, per_step * total_steps, str(device))
