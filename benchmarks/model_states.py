"""Bytes of model states each process really holds after an optimizer step: weights, gradients and
optimizer states, to set beside `hftk plan`'s memory_per_process.

    accelerate launch --config_file accelerate_configs/zero3.yaml benchmarks/model_states.py recipes/summarize.yaml

Builds the recipe's model, optimizer and data exactly as `hftk finetune` does (hftk's own strategy and
prepare), runs `--steps` optimizer steps, and just before the last one (the optimizer made its states at
the first; the gradients are reduced and not yet freed, as ZeRO-1/2 free them after the step) adds up the
storage behind every tensor that holds a model state on this process, each storage once (DeepSpeed keeps
views into flat buffers):

- weights: ZeRO-3 keeps each parameter's partition in `param.ds_tensor` (views into one flat buffer);
  parameters it keeps whole on every process (`ds_persist`, below stage3_param_persistence_threshold)
  also hold their full `param.data`. Other strategies: `param.data`.
- master weights: the optimizer's fp32 copies (`fp32_partitioned_groups_flat` in ZeRO-3,
  `single_partition_of_fp32_groups` in ZeRO-1/2), counted only where they are storage of their own
  (DeepSpeed copies them even from fp32 weights).
- gradients: ZeRO-3's `grad_partitions_flat_buffer` (each process's gradient partition), ZeRO-1/2's
  `averaged_gradients`, any `.grad` still set.
- optimizer: every tensor in the inner optimizer's `state` (Adam's exp_avg and exp_avg_sq, its step).

DeepSpeed's reduce bucket (`ipg_buckets`) is a temporary communication buffer, not a model state (the
ZeRO paper's "residual" memory), and is reported beside them as `buffers`. One JSON row per process
goes to `--output` (tests/integration/test_plan.py compares them with the plan).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from hftk import models
from hftk.parallel import launch
from hftk.parallel.strategies import strategy_for
from hftk.preflight import plan_inputs, run_precision
from hftk.prepare import build_tokenizer, decoder_inputs_for, make_accelerator, make_loader, tokenized
from hftk.recipe import load_recipe
from hftk.train.loop import LoopParts, train_window
from hftk.train.optim import build_optimizer, build_scheduler
from hftk.train.preemption import StopFlag
from hftk.train.progress import NoProgress
from hftk.train.state import TrainState

CATEGORIES = ("weights", "master_weights", "gradients", "optimizer")


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a tensor, a list, tuple or dict of them (nested), else none."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def held_tensors(model: Any, optimizer: Any) -> dict[str, list[torch.Tensor]]:
    """The tensors behind each kind of model state, as the engine (or plain model) holds them."""
    zero = getattr(model, "optimizer", None)  # a DeepSpeedEngine's ZeRO optimizer
    inner = getattr(zero, "optimizer", None) or getattr(optimizer, "optimizer", optimizer)  # the torch AdamW
    params = list(model.parameters())
    weights = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in params]
    weights += [p.data for p in params if hasattr(p, "ds_tensor") and p.data.numel() > 0]  # held whole (ds_persist)
    masters = [t for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups")
               for t in tensors_in(getattr(zero, name, None))]
    gradients = [t for name in ("grad_partitions_flat_buffer", "averaged_gradients")
                 for t in tensors_in(getattr(zero, name, None))]
    gradients += [t.grad for t in params + masters if t.grad is not None]
    states = tensors_in(list(getattr(inner, "state", {}).values()))
    return {"weights": weights, "master_weights": masters, "gradients": gradients, "optimizer": states}


def storage_bytes(groups: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Bytes per kind, each storage counted once, under the first kind that holds it."""
    seen: set[int] = set()
    sizes = {}
    for kind in CATEGORIES:
        total = 0
        for tensor in groups[kind]:
            if tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        sizes[kind] = total
    return sizes


def bucket_bytes(model: Any) -> int:
    buckets = getattr(getattr(model, "optimizer", None), "ipg_buckets", None) or {}
    return sum(t.numel() * t.element_size() for b in buckets.values() for t in tensors_in(getattr(b, "buffer", None)))


def measure(recipe_path: str, steps: int) -> tuple[Any, dict]:
    recipe = load_recipe(recipe_path, ["train.output_dir=/tmp/hftk-model-states", f"train.max_steps={steps}"])
    plan = plan_inputs(recipe, ["train"])
    plan.precision = run_precision(plan)
    accelerator = make_accelerator(recipe.train, plan.precision)
    strategy = strategy_for(recipe.parallel, accelerator, plan.config)
    tokenizer = build_tokenizer(plan, accelerator)
    features = tokenized(plan, accelerator, tokenizer, "train", training=True)
    with launch.model_construction(accelerator):
        model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    launch.apply_recipe_to_deepspeed(accelerator, recipe.train.max_grad_norm)
    collator = plan.task.collator(tokenizer, plan.encoding.family, decoder_inputs_for(model))
    loader = make_loader(features, collator, recipe.train.per_device_train_batch_size, True, recipe.train.seed)
    model, optimizer, loader = strategy.prepare(accelerator, model, lambda m: build_optimizer(m, recipe.train), loader)
    scheduler = build_scheduler(optimizer, recipe.train, steps)
    parts = LoopParts(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                      family=plan.encoding.family, total_steps=steps, state=TrainState(), metrics_log=None,
                      evaluate=None, save=lambda: "", stop=StopFlag(), progress=NoProgress())
    # The object whose step() updates the weights: DeepSpeed's ZeRO optimizer (the engine steps it inside
    # accelerator.backward), else the torch optimizer inside Accelerate's wrapper.
    stepper = getattr(model, "optimizer", None) or getattr(optimizer, "optimizer", optimizer)
    step, taken = stepper.step, []

    def measured_step(*args, **kwargs):
        taken.append(storage_bytes(held_tensors(model, optimizer)))
        return step(*args, **kwargs)

    stepper.step = measured_step
    batches = iter(loader)
    for _ in range(steps):
        window = [next(batches) for _ in range(recipe.train.gradient_accumulation_steps)]
        train_window(parts, window, recipe.train.max_grad_norm)
    sizes = taken[-1]
    row = {"process": accelerator.process_index, "num_processes": accelerator.num_processes,
           "trainable_parameters": trainable, **sizes, "model_states": sum(sizes.values()),
           "buffers": bucket_bytes(model)}
    return accelerator, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/summarize.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output", default="model_states.json")
    args = parser.parse_args()
    accelerator, row = measure(args.recipe, args.steps)
    from accelerate.utils import gather_object

    rows = gather_object([row])
    if accelerator.is_main_process:
        print(json.dumps(rows, indent=2))
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
