"""Bytes all-reduced per optimizer step by DDP, without and with each communication hook.

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/ddp.yaml \
        benchmarks/comm_bytes.py recipes/summarize.yaml

Builds the recipe's model and data exactly as `hftk finetune` does, runs a few optimizer steps per
hook on 2 processes, and counts what each all-reduce sends. "none" registers PyTorch's plain
allreduce hook (what DDP does built in) so its traffic is counted the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from hftk import comm_hooks, models
from hftk.prepare import build_tokenizer, make_accelerator, make_loader, plan_inputs, tokenized
from hftk.recipe import ParallelSection, load_recipe
from hftk.train.loop import LoopParts, train_window
from hftk.train.optim import build_optimizer, build_scheduler
from hftk.train.preemption import StopFlag
from hftk.train.state import TrainState

STEPS = 12
POWERSGD_START = 4  # PowerSGD sends full gradients (with error feedback) before this step


class ByteCounter:
    def __init__(self):
        self.bytes = 0
        self._original = dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def measure(recipe_path: str, hook: str) -> dict:
    recipe = load_recipe(recipe_path, [f"train.output_dir=/tmp/hftk-comm-bytes-{hook}"])
    plan = plan_inputs(recipe, ["train"])
    accelerator = make_accelerator(recipe.train)
    tokenizer = build_tokenizer(plan, accelerator)
    model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    features = tokenized(plan, accelerator, tokenizer, "train", training=True)
    collator = plan.task.collator(tokenizer, plan.encoding.family, model.prepare_decoder_input_ids_from_labels)
    loader = make_loader(features, collator, recipe.train.per_device_train_batch_size, True, recipe.train.seed)
    model, optimizer, loader = accelerator.prepare(model, build_optimizer(model, recipe.train), loader)
    settings = ParallelSection(comm_hook=hook if hook != "none" else "none", powersgd_start_iter=POWERSGD_START)
    if hook == "none":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    else:
        comm_hooks.register(model, settings)
    scheduler = build_scheduler(optimizer, recipe.train, STEPS)
    parts = LoopParts(accelerator, model, optimizer, scheduler, loader, plan.encoding.family, STEPS, TrainState(),
                      None, None, lambda: "", StopFlag())
    per_step, losses = [], []
    batches = iter(loader)
    for _ in range(STEPS):
        window = [next(batches) for _ in range(recipe.train.gradient_accumulation_steps)]
        with ByteCounter() as counter:
            share = train_window(parts, window, recipe.train.max_grad_norm)
        per_step.append(counter.bytes)
        losses.append(accelerator.reduce(share, reduction="sum").item())
    parameters = sum(p.numel() for p in model.parameters())
    return {"hook": hook, "parameters": parameters, "bytes_per_step_after_warmup": per_step[-1],
            "bytes_first_step": per_step[0], "final_loss": losses[-1], "accelerator": accelerator}


def main() -> None:
    recipe_path = sys.argv[1] if len(sys.argv) > 1 else "recipes/summarize.yaml"
    rows = []
    for hook in ("none", "fp16", "bf16", "powersgd"):
        result = measure(recipe_path, hook)
        accelerator = result.pop("accelerator")
        rows.append(result)
    if accelerator.is_main_process:
        baseline = rows[0]["bytes_per_step_after_warmup"]
        for row in rows:
            row["ratio_to_none"] = round(row["bytes_per_step_after_warmup"] / baseline, 4)
        print(json.dumps(rows, indent=2))
        Path("benchmarks/comm_bytes.json").write_text(json.dumps(rows, indent=2) + "\n")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
