"""Encoder-decoder packing (train.packing) against one example per row: padding and training seconds
on the same micro-batches, in one process, alternating batch by batch so both layouts see the same
machine.

    python benchmarks/packing.py recipes/summarize.yaml recipes/translate.yaml recipes/dialogue_t5.yaml

Builds each recipe's model, tokenizer and training rows as `hftk finetune` does (fp32, dropout as the
recipe has it), takes BATCHES micro-batches of its batch size in a seeded order, collates each both
ways, and times a forward and backward pass of each (no optimizer step, so both layouts see the same
weights). Writes benchmarks/packing.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hftk import models
from hftk.objective import padding_counts, token_counts, token_loss_sums
from hftk.precision import resolve_precision
from hftk.preflight import plan_inputs
from hftk.prepare import build_tokenizer, decoder_inputs_for, make_accelerator, tokenized
from hftk.recipe import load_recipe
from hftk.train import packed_forward
from hftk.train.packing import PackedSeq2SeqCollator

BATCHES = 20
PASSES = 2


def padding(batches: list[dict]) -> float:
    counts = sum(padding_counts(b) for b in batches)
    return round(float(counts[0] / counts[1]), 4)


def measure(recipe_path: str) -> dict:
    recipe = load_recipe(recipe_path, ["train.bf16=false"])
    plan = plan_inputs(recipe, ["train"])
    accelerator = make_accelerator(recipe.train, resolve_precision(False))
    tokenizer = build_tokenizer(plan, accelerator)
    model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    features = tokenized(plan, accelerator, tokenizer, "train", training=True)
    size = recipe.train.per_device_train_batch_size
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0)).tolist()
    groups = [[features[i] for i in order[k:k + size]] for k in range(0, min(len(order), BATCHES * size), size)]
    shift = decoder_inputs_for(model)
    plain = [plan.task.collator(tokenizer, plan.encoding.family, shift)(rows) for rows in groups]
    block = (recipe.data.max_source_length, recipe.data.max_target_length)
    started = time.perf_counter()
    packed = [PackedSeq2SeqCollator(tokenizer.pad_token_id, shift, block)(rows) for rows in groups]
    collate_ms = (time.perf_counter() - started) / len(groups) * 1000
    packed_forward.install(model)
    model.train()
    family = plan.encoding.family

    def step(batch: dict) -> float:
        begun = time.perf_counter()
        (token_loss_sums(model, batch, family).sum() / token_counts(batch, family).sum()).backward()
        model.zero_grad()
        return time.perf_counter() - begun

    for batch in plain[:2] + packed[:2]:  # warm-up
        step(batch)
    seconds = {"plain": 0.0, "packed": 0.0}
    for _ in range(PASSES):
        for one, other in zip(plain, packed):
            seconds["plain"] += step(one)
            seconds["packed"] += step(other)
    return {"recipe": recipe_path, "batches": len(groups), "batch_size": size,
            "padding_plain": padding(plain), "padding_packed": padding(packed),
            "rows_plain": size, "rows_packed": round(sum(b["input_ids"].shape[0] for b in packed) / len(packed), 1),
            "seconds_plain": round(seconds["plain"], 2), "seconds_packed": round(seconds["packed"], 2),
            "packed_over_plain": round(seconds["packed"] / seconds["plain"], 3), "collate_ms_packed": round(collate_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    rows = [measure(path) for path in args.recipes]
    Path(args.output).write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
