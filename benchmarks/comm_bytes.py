"""Bytes each process hands to collectives per optimizer step under DDP, without and with each
communication hook, with the loss reached and the time per step.

    for hook in none fp16 bf16 int8 topk powersgd; do
        accelerate launch --config_file accelerate_configs/ddp.yaml benchmarks/comm_bytes.py recipes/summarize.yaml $hook
    done

Builds the recipe's model and data exactly as `hftk finetune` does, runs STEPS optimizer steps per
hook on 2 processes, and counts the payload of every all_reduce and all_gather (int8 and top-k
gather instead of reducing). "none" registers PyTorch's plain allreduce hook (what DDP does built
in) so its traffic is counted the same way. With 2 processes a ring all-reduce and an all_gather
both put exactly their payload on the wire once per process. One launch per hook: each gets a fresh
process group and the machine to itself for the timing. Rows are merged into benchmarks/comm_bytes.json by hook (`--output` elsewhere;
`--steps` fewer steps: tests/integration/test_plan_comm.py counts 2 steps of a tiny model with it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from hftk import models
from hftk.parallel import comm_hooks
from hftk.preflight import plan_inputs, run_precision
from hftk.prepare import build_tokenizer, decoder_inputs_for, make_accelerator, make_loader, tokenized
from hftk.recipe import load_recipe
from hftk.train.loop import LoopParts, train_window
from hftk.train.optim import build_optimizer, build_scheduler
from hftk.train.preemption import StopFlag
from hftk.train.progress import NoProgress
from hftk.train.state import TrainState

STEPS = 60
LAST = 10  # the loss "after STEPS steps" is the mean of the last LAST steps, not one batch's noise
POWERSGD_START = 4  # PowerSGD sends full gradients (with error feedback) before this step
HOOKS = ("none", "fp16", "bf16", "int8", "topk", "powersgd")
COUNTED = ("all_reduce", "all_gather")


class ByteCounter:
    """Counts this process's payload at torch.distributed's collectives (looked up at call time by the hooks)."""

    def __init__(self):
        self.bytes = 0
        self._originals = {name: getattr(dist, name) for name in COUNTED}

    def __enter__(self):
        for name, original in self._originals.items():
            setattr(dist, name, self._counting(name, original))
        return self

    def _counting(self, name, original):
        def counting(*args, **kwargs):
            sent = args[1] if name == "all_gather" else args[0]  # all_gather(outputs, input, ...)
            self.bytes += sent.numel() * sent.element_size()
            return original(*args, **kwargs)

        return counting

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def measure(recipe_path: str, hook: str, steps: int = STEPS, topk_ratio: float | None = None,
            overrides: tuple[str, ...] = ()) -> dict:
    """`topk_ratio` None: the recipe's own (parallel.topk_ratio, 0.25 unless it says)."""
    ratio = [] if topk_ratio is None else [f"parallel.topk_ratio={topk_ratio}"]
    recipe = load_recipe(recipe_path, [*overrides, f"train.output_dir=/tmp/hftk-comm-bytes-{hook}", f"parallel.comm_hook={hook}",
                                       *ratio, f"parallel.powersgd_start_iter={POWERSGD_START}"])
    plan = plan_inputs(recipe, ["train"])
    plan.precision = run_precision(plan)
    accelerator = make_accelerator(recipe.train, plan.precision)
    tokenizer = build_tokenizer(plan, accelerator)
    model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    features = tokenized(plan, accelerator, tokenizer, "train", training=True)
    collator = plan.task.collator(tokenizer, plan.encoding.family, decoder_inputs_for(model))
    loader = make_loader(features, collator, recipe.train.per_device_train_batch_size, True, recipe.train.seed)
    model, optimizer, loader = accelerator.prepare(model, build_optimizer(model, recipe.train), loader)
    if hook == "none":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    else:
        comm_hooks.register(model, recipe.parallel)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    parts = LoopParts(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                      family=plan.encoding.family, total_steps=steps, state=TrainState(), metrics_log=None,
                      evaluate=None, save=lambda: "", stop=StopFlag(), progress=NoProgress())
    per_step, losses, seconds = [], [], []
    batches = endless(loader)
    for _ in range(steps):
        window = [next(batches) for _ in range(recipe.train.gradient_accumulation_steps)]
        started = time.perf_counter()
        with ByteCounter() as counter:
            share = train_window(parts, window, recipe.train.max_grad_norm)
        seconds.append(time.perf_counter() - started)
        per_step.append(counter.bytes)
        losses.append(accelerator.reduce(share, reduction="sum").item())
    parameters = sum(p.numel() for p in model.parameters())
    last = min(LAST, steps)
    return {"hook": hook, "parameters": parameters, "bytes_per_step_after_warmup": per_step[-1],
            "bytes_first_step": per_step[0], "bytes_mean_per_step": round(sum(per_step) / steps),
            f"loss_last_{LAST}_steps": sum(losses[-last:]) / last,
            "seconds_per_step": round(sum(seconds[1:]) / max(steps - 1, 1), 4), "accelerator": accelerator}


def endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/summarize.yaml")
    parser.add_argument("hooks", nargs="*", help=f"some of {' '.join(HOOKS)} (default: all)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--topk-ratio", type=float, default=None, help="default: the recipe's parallel.topk_ratio")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    parser.add_argument("--output", default="benchmarks/comm_bytes.json")
    args = parser.parse_args()
    unknown = set(args.hooks) - set(HOOKS)
    if unknown:
        parser.error(f"unknown hooks {sorted(unknown)}; choose from {' '.join(HOOKS)}")
    return args


def main() -> None:
    args = parse_args()
    measured = {}
    for hook in args.hooks or HOOKS:
        result = measure(args.recipe, hook, args.steps, args.topk_ratio, tuple(args.set))
        accelerator = result.pop("accelerator")
        measured[hook] = result
    if accelerator.is_main_process:
        path = Path(args.output)
        saved = {row["hook"]: row for row in json.loads(path.read_text())} if path.is_file() else {}
        saved.update(measured)
        rows = [saved[hook] for hook in HOOKS if hook in saved]
        if "none" in saved:
            baseline, loss = saved["none"]["bytes_per_step_after_warmup"], saved["none"][f"loss_last_{LAST}_steps"]
            for row in rows:
                row["ratio_to_none"] = round(row["bytes_per_step_after_warmup"] / baseline, 4)
                row["loss_ratio_to_none"] = round(row[f"loss_last_{LAST}_steps"] / loss, 4)
        print(json.dumps(rows, indent=2))
        path.write_text(json.dumps(rows, indent=2) + "\n")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
