"""The one training loop: windows of micro-batches, one optimizer step each, then log/eval/save.

Step semantics are optimizer steps everywhere (max_steps, logging, eval, save), identical for one
or many processes. The only host synchronisation is at logging, eval and save steps.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import skip_first_batches

from hftk.errors import Preempted, RunError
from hftk.logs import MetricsLog, log
from hftk.objective import padding_counts, token_counts, token_loss_sums, token_mask
from hftk.recipe import TrainSection
from hftk.tasks.base import IGNORE_INDEX
from hftk.train.best import patience_ran_out, record_evaluation
from hftk.train.divergence import Diverged, DivergenceWatch
from hftk.train.preemption import StopFlag
from hftk.train.progress import NoProgress
from hftk.train.state import TrainState


@dataclass(kw_only=True)
class LoopParts:
    """What the loop is handed: built with keywords, since most fields share a type."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    family: str
    total_steps: int
    state: TrainState
    metrics_log: MetricsLog
    evaluate: Callable[[], dict[str, float]] | None  # eval_* metrics at the current step
    save: Callable[[], str]  # a full checkpoint at the current step; returns its folder
    stop: StopFlag
    progress: NoProgress
    counts_tokens: bool = True  # False where another process reads the same batches (tensor parallel)
    flops: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # training FLOPs of a micro-batch
    peak_flops: float = 0.0  # what one process's device can do per second
    evaluate_on_start: Callable[[], dict[str, float]] | None = None  # train.eval_on_start: the step-0 scores
    restore: Callable[[str], None] | None = None  # load a checkpoint folder into the running parts (a rollback)
    window_examples: Callable[[int, int, int], list[int] | None] | None = None  # (epoch, position, count) -> indices


def windows(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of `size` micro-batches; the last group of an epoch may be shorter."""
    window: list[Any] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


@contextlib.contextmanager
def micro_batch(accelerator: Any, model: Any, sync: bool):
    # Accelerate's accumulate() counts micro-batches itself and syncs early when a loader ends; the
    # loop fetches a whole window first (to normalise by its token count), so it says when to sync.
    accelerator.gradient_state._set_sync_gradients(sync)
    if hasattr(model, "set_requires_gradient_sync"):  # fully_shard (FSDP2) modules have no no_sync()
        model.set_requires_gradient_sync(sync)
        yield
        return
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        yield


def train_window(parts: LoopParts, window: list[dict[str, torch.Tensor]], max_grad_norm: float | None) -> torch.Tensor:
    """One optimizer step over a window; returns this process's share of the step's global mean loss."""
    accelerator, model = parts.accelerator, parts.model
    local_count = sum(token_counts(b, parts.family).sum() for b in window)
    global_count = accelerator.reduce(local_count.detach().clone(), reduction="sum").clamp(min=1)
    share = torch.zeros((), device=accelerator.device)
    for position, batch in enumerate(window):
        with micro_batch(accelerator, model, sync=position == len(window) - 1):
            loss = token_loss_sums(model, batch, parts.family).sum() / global_count
            # DDP and DeepSpeed average gradients over processes; this loss is already a share of the
            # global sum, so scale it back up to make the average the true gradient.
            accelerator.backward(loss * accelerator.num_processes)
            share += loss.detach()
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    parts.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule where it was
        parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return share


def batch_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    tokens = token_mask(batch).sum()
    if "decoder_input_ids" in batch:
        tokens = tokens + (batch["labels"] != IGNORE_INDEX).sum()
    return tokens


@dataclass
class Totals:
    """What train_* results add up over the whole run; a rollback takes back what it undid."""

    logged: dict[int, tuple[float, int]] = field(default_factory=dict)  # logging step -> (mean loss, steps)
    padding: Any = None  # [padded, all] positions since start, on the device
    clock: dict[str, float] = field(default_factory=lambda: {"since": time.perf_counter(), "tokens": 0, "flops": 0.0})
    started: float = field(default_factory=time.perf_counter)


def train(parts: LoopParts, settings: TrainSection, last_good: Callable[[], str | None]) -> dict[str, float]:
    accelerator, state = parts.accelerator, parts.state
    if parts.evaluate_on_start is not None and state.optimizer_step == 0:  # a resumed run has its row already
        # The step-0 row. No checkpoint holds these weights, so it is never a candidate for the best model.
        parts.metrics_log.write({"step": 0, **parts.evaluate_on_start()})
    totals = Totals(padding=torch.zeros(2, dtype=torch.long, device=accelerator.device))
    while True:
        watch = DivergenceWatch(settings.spike_factor, state.recent_losses)  # a restored state brings its own
        try:
            _train_steps(parts, settings, watch, totals)
            break
        except Diverged as bad:
            roll_back(parts, settings, bad, last_good)  # or stop, with one line
            totals.logged = {s: v for s, v in totals.logged.items() if s <= state.optimizer_step}
    runtime = time.perf_counter() - totals.started
    padded, positions = accelerator.reduce(totals.padding, reduction="sum").tolist()
    steps_run = sum(steps for _, steps in totals.logged.values())
    results = {"train_loss": sum(loss * steps for loss, steps in totals.logged.values()) / max(steps_run, 1),
               "train_runtime": runtime, "train_tokens_per_second": totals.clock["tokens"] / max(runtime, 1e-9),
               "train_steps": state.optimizer_step, "train_padding_fraction": padded / max(positions, 1)}
    if state.rollbacks:
        results["train_rollbacks"] = len(state.rollbacks)
    if parts.flops is not None and parts.peak_flops:
        results["train_mfu"] = totals.clock["flops"] / max(runtime, 1e-9) / (parts.peak_flops * accelerator.num_processes)
    return results


def _advance(state: TrainState, micro_batches: int, batches_per_epoch: int) -> None:
    state.batches_in_epoch += micro_batches
    if state.batches_in_epoch == batches_per_epoch:
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def _train_steps(parts: LoopParts, settings: TrainSection, watch: DivergenceWatch, totals: Totals) -> None:
    """From the state's position to the last step; raises Diverged at the judgement after a bad step."""
    accelerator, state = parts.accelerator, parts.state
    parts.model.train()
    # A checkpoint keeps the global pending sums (saved by the main process); add them in once.
    carried = accelerator.is_main_process
    pending_loss = torch.tensor(state.pending_loss if carried else 0.0, device=accelerator.device)
    pending_tokens = torch.tensor(state.pending_tokens if carried else 0, device=accelerator.device)
    pending_flops = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    batches_per_epoch = len(parts.loader)
    patience_over = patience_ran_out(state, settings)  # a resumed run that had already run out of patience
    while state.optimizer_step < parts.total_steps and not patience_over:
        parts.loader.set_epoch(state.epoch)
        # Resuming mid-epoch: the same shuffled order, minus what the interrupted run consumed.
        # (A stream's loader keeps its own position: hftk.streaming.)
        skip = state.batches_in_epoch and not getattr(parts.loader, "keeps_position", False)
        batches = skip_first_batches(parts.loader, state.batches_in_epoch) if skip else parts.loader
        for window in windows(batches, settings.gradient_accumulation_steps):
            if [state.epoch, state.batches_in_epoch] in state.skipped_windows:  # a rollback passed over these
                _advance(state, len(window), batches_per_epoch)
                continue
            window_started, epoch, position = time.perf_counter(), state.epoch, state.batches_in_epoch
            share = train_window(parts, window, settings.max_grad_norm)
            pending_loss += share
            if parts.counts_tokens:
                pending_tokens += sum(batch_tokens(b) for b in window)
                totals.padding += sum(padding_counts(b) for b in window)
                if parts.flops is not None:
                    pending_flops += sum(parts.flops(b) for b in window)
            state.optimizer_step += 1
            state.pending_steps += 1
            _advance(state, len(window), batches_per_epoch)
            step = state.optimizer_step
            watch.record(share, step, epoch, position)
            parts.progress.advance(step, state.epoch + state.batches_in_epoch / batches_per_epoch)
            if step % settings.logging_steps == 0 or step == parts.total_steps:
                watch.judge(accelerator)
                row = _log_row(parts, pending_loss, pending_tokens, pending_flops, batches_per_epoch, totals.clock)
                totals.logged[step] = (row["loss"], state.pending_steps)
                pending_loss.zero_(), pending_tokens.zero_(), pending_flops.zero_()
                state.pending_steps = 0
            saving = bool(settings.save_steps) and step % settings.save_steps == 0 and step < parts.total_steps
            if parts.evaluate and settings.eval_steps and step % settings.eval_steps == 0 and step < parts.total_steps:
                scores = parts.evaluate()
                parts.metrics_log.write({"step": step, **scores})
                record_evaluation(state, settings, scores, checkpointed=saving)
                patience_over = patience_ran_out(state, settings)
            stopping = parts.stop.agreed(accelerator)
            if stopping or saving:
                watch.judge(accelerator)  # a checkpoint holds only steps judged good
                state.pending_loss = accelerator.reduce(pending_loss.clone(), reduction="sum").item()
                state.pending_tokens = int(accelerator.reduce(pending_tokens.clone(), reduction="sum").item())
                folder = parts.save()
                if accelerator.is_main_process:  # the step's device work is done: the save's reduce waited for it
                    parts.stop.check_grace(time.perf_counter() - window_started, step)
            if stopping:
                raise Preempted(f"received {parts.stop.received}; saved {folder} at optimizer step {step}")
            if patience_over:
                log.info(f"early stopping at optimizer step {step}: {settings.metric_for_best_model} has not improved "
                         f"for {state.evaluations_without_improvement} evaluations")
                break
            if step >= parts.total_steps:
                break
    parts.stop.settle()
    watch.judge(accelerator)


def roll_back(parts: LoopParts, settings: TrainSection, bad: Diverged, last_good: Callable[[], str | None]) -> None:
    """train.on_divergence=rollback: back to the newest checkpoint (always before the bad step: a checkpoint
    is written only after its steps were judged, and pruning keeps the newest), the bad step's
    micro-batches skipped from then on. Otherwise, or past max_rollbacks, one line and exit 1."""
    state = parts.state
    folder = last_good()
    what = f"{bad.reason} at optimizer step {bad.step}"
    if settings.on_divergence == "stop" or folder is None or parts.restore is None:
        hint = ("" if settings.on_divergence == "stop" or folder else
                "; train.on_divergence=rollback needs a checkpoint before it (set train.save_steps)")
        raise RunError(f"{what}; stopped without saving (last good checkpoint: {folder or 'none'}){hint}; lower "
                       f"train.learning_rate or set train.max_grad_norm")
    if len(state.rollbacks) >= settings.max_rollbacks:
        raise RunError(f"{what}, after {len(state.rollbacks)} rollbacks (train.max_rollbacks={settings.max_rollbacks}); "
                       f"stopped, every checkpoint intact (newest: {folder}); lower train.learning_rate or set "
                       f"train.max_grad_norm")
    skipped = parts.window_examples(bad.epoch, bad.position, settings.gradient_accumulation_steps) \
        if parts.window_examples is not None else None
    record = {"step": bad.step, "rollback": len(state.rollbacks) + 1, "rolled_back_to": Path(folder).name,
              "reason": bad.reason, "skipped_epoch": bad.epoch, "skipped_examples": skipped}
    skips, rollbacks = [*state.skipped_windows, [bad.epoch, bad.position]], [*state.rollbacks, record]
    parts.restore(folder)  # weights, optimizer, schedule, RNG, the loop's state; metrics.jsonl cut back to it
    state.skipped_windows, state.rollbacks = skips, rollbacks
    for earlier in rollbacks:  # metrics.jsonl was cut back to the checkpoint: its later rollback rows go back in
        if earlier["step"] > state.optimizer_step:
            parts.metrics_log.write(earlier)
    log.warning(f"{what}: rolled back to {Path(folder).name} (optimizer step {state.optimizer_step}); that step's "
                f"micro-batches are skipped (rollback {len(rollbacks)} of at most {settings.max_rollbacks})")


def _log_row(parts: LoopParts, pending_loss: torch.Tensor, pending_tokens: torch.Tensor, pending_flops: torch.Tensor,
             batches_per_epoch: int, clock: dict[str, float]) -> dict[str, float]:
    accelerator, state = parts.accelerator, parts.state
    loss = accelerator.reduce(pending_loss.clone(), reduction="sum").item() / max(state.pending_steps, 1)
    tokens = int(accelerator.reduce(pending_tokens.clone(), reduction="sum").item())
    flops = accelerator.reduce(pending_flops.clone(), reduction="sum").item()
    now = time.perf_counter()
    elapsed = max(now - clock["since"], 1e-9)
    row = {
        "step": state.optimizer_step,
        "epoch": round(state.epoch + state.batches_in_epoch / max(batches_per_epoch, 1), 4),
        "loss": loss,
        "learning_rate": parts.scheduler.get_last_lr()[0],
        "tokens_per_second": tokens / elapsed,
    }
    if parts.flops is not None and parts.peak_flops:
        row["mfu"] = flops / elapsed / (parts.peak_flops * accelerator.num_processes)
    clock["since"], clock["tokens"], clock["flops"] = now, clock["tokens"] + tokens, clock["flops"] + flops
    parts.metrics_log.write(row)
    parts.progress.show(row)
    return row
