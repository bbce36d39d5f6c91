"""`hftk plan --probe N`: time at least N real optimizer steps of the recipe on this machine (one process,
the recipe's batch, accumulation, precision and adapter) and estimate the run's training time from them.
Nothing is written; the model is built with real weights only here.

The estimate covers the training steps alone: evaluations during training (train.eval_steps) and
checkpoints (train.save_steps) add to a run's train_runtime, and a machine shared with other work
gives times that belong to the neighbours as much as to the recipe (the probe records the load).
benchmarks/probe_accuracy.py holds it against real runs."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

WARMUP_STEPS = 2  # the first steps allocate memory and pick kernels for new shapes: run, not timed
# A second of steps is at the mercy of whatever else the machine runs in that second (on a shared CPU a
# neighbour's burst slowed three-step probes 5-10x while the real runs next to them were not); past the
# steps asked for, keep timing up to this long, and at most EXTRA_FACTOR times as many steps.
MIN_TIMED_SECONDS = 3.0
EXTRA_FACTOR = 10
BUSY_CPU_SHARE = 0.6  # below this share of its threads' CPU time, the probe says the machine was busy


@dataclass
class Probe:
    steps_measured: int  # at least the steps asked for: more where they took under MIN_TIMED_SECONDS
    # One process, each step timed as the run's clock sees it: from the end of the previous step (so fetching
    # and collating its batches counts) to the end of its optimizer step, clipping included; the median of
    # the measured steps, each first scaled to the run's mean batch (positions per step over an epoch).
    seconds_per_step: float
    estimated_training_seconds: float  # seconds_per_step x the plan's optimizer steps
    device: str
    warmup_steps: int = WARMUP_STEPS
    fastest_step: float = 0.0  # of the measured steps, as timed
    slowest_step: float = 0.0
    load_average: float | None = None  # the machine's one-minute load average when the probe ended
    # CPU time this process got over the timed steps / (their wall time x torch's threads): near 1 when the
    # machine is its own, well below when other work holds the cores (the load average lags such bursts)
    cpu_share: float | None = None
    cpus: int = 0
    # what a run's train_runtime holds beside its steps, and the estimate does not
    evaluations_during_training: int = 0  # train.eval_steps (the final evaluation is not in train_runtime)
    checkpoints_during_training: int = 0  # train.save_steps (the final checkpoint is not either)

    @property
    def busy(self) -> bool:
        """Other work held the CPUs while probing: timings then say more about the neighbours."""
        if self.device != "cpu":
            return False
        starved = self.cpu_share is not None and self.cpu_share < BUSY_CPU_SHARE
        return starved or (self.load_average is not None and self.load_average > self.cpus)


def probe_steps(plan: Any, tokenizer: Any, features: Any, steps: int, total_steps: int,
                positions_per_step: float | None = None, mixed_precision: str = "no") -> Probe:
    """Run WARMUP_STEPS + `steps` optimizer steps as the loop runs them; positions_per_step: the run's mean
    input positions (batch x longest length, summed over the accumulated micro-batches) per optimizer step;
    mixed_precision: the run's, train.bf16 resolved (hftk.precision)."""
    import torch

    from hftk import adapters, models
    from hftk.prepare import route_packed_inputs, train_collator, train_loader
    from hftk.train import fast_dropout
    from hftk.train.optim import build_optimizer, build_scheduler

    recipe = plan.recipe
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    if recipe.lora is not None:
        model = adapters.wrap(model, adapters.plan_adapter(recipe.lora, plan.config, plan.encoding.auto_class),
                              recipe.model.gradient_checkpointing)
    if fast_dropout.applies(recipe.train, recipe.model, device):
        fast_dropout.install(model)
    route_packed_inputs(plan, model)
    model.to(device).train()
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    loader = train_loader(plan, features, train_collator(plan, tokenizer, model), 1)
    timings, positions, cpu_share = _timed_steps(model, optimizer, scheduler, loader, plan, device, steps,
                                                 mixed_precision)
    per_step = typical_step_seconds(timings, positions, positions_per_step)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    every = recipe.train
    return Probe(len(timings), per_step, per_step * total_steps, str(device), fastest_step=min(timings),
                 slowest_step=max(timings), load_average=load, cpus=os.cpu_count() or 1,
                 cpu_share=cpu_share if device.type == "cpu" else None,
                 evaluations_during_training=(total_steps - 1) // every.eval_steps if every.eval_steps else 0,
                 checkpoints_during_training=(total_steps - 1) // every.save_steps if every.save_steps else 0)


def typical_step_seconds(timings: list[float], positions: list[int], mean_positions: float | None = None) -> float:
    """The median of the timed steps, each first scaled to a step of the run's mean size (mean_positions,
    default the timed steps' own mean): a few steps of unusual batches, or one that a neighbour slowed,
    do not become the estimate of every step."""
    mean_positions = mean_positions or sum(positions) / len(positions)
    return statistics.median(t * mean_positions / max(p, 1) for t, p in zip(timings, positions, strict=True))


def enough(timings: list[float], steps: int) -> bool:
    """Timed `steps` steps past the warm-up, and MIN_TIMED_SECONDS of them or EXTRA_FACTOR x as many."""
    timed = timings[WARMUP_STEPS:]
    return len(timed) >= steps and (sum(timed) >= MIN_TIMED_SECONDS or len(timed) >= EXTRA_FACTOR * steps)


def _timed_steps(model: Any, optimizer: Any, scheduler: Any, loader: Any, plan: Any, device: Any,
                 steps: int, mixed_precision: str = "no") -> tuple[list[float], list[int], float]:
    """Seconds and input positions of the timed optimizer steps (after WARMUP_STEPS untimed ones), epoch
    after epoch as the run goes."""
    import torch

    from hftk.objective import token_counts, token_loss_sums
    from hftk.train.loop import windows

    settings, family = plan.recipe.train, plan.encoding.family
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    timings: list[float] = []
    positions: list[int] = []
    epoch, clock = 0, time.perf_counter()
    while not enough(timings, steps):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for window in windows(loader, settings.gradient_accumulation_steps):
            window = [{k: v.to(device) for k, v in batch.items()} for batch in window]
            total = sum(token_counts(b, family).sum() for b in window).clamp(min=1)
            for batch in window:
                with autocast:
                    loss = token_loss_sums(model, batch, family).sum() / total
                loss.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            timings.append(now - clock)
            positions.append(sum(batch["input_ids"].numel() for batch in window))
            clock = now
            if len(timings) == WARMUP_STEPS:
                cpu_started, wall_started = time.process_time(), now
            if enough(timings, steps):
                break
        epoch += 1
    share = (time.process_time() - cpu_started) / max((clock - wall_started) * torch.get_num_threads(), 1e-9)
    return timings[WARMUP_STEPS:], positions[WARMUP_STEPS:], share
