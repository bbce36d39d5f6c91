"""hftk against Hugging Face Seq2SeqTrainer on the same model, data, batch and steps.

    python benchmarks/vs_seq2seq_trainer.py [recipes/summarize.yaml] [--steps 200]

Both train the recipe's scratch model from the same initial weights, with the same tokenizer,
tokenized data, batch size, optimizer settings and number of optimizer steps, then generate on
the validation split. One run; the figures and their ratios go to benchmarks/vs_seq2seq_trainer.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_hftk(recipe: str, steps: int, output_dir: Path) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hftk", "finetune", recipe, f"train.max_steps={steps}",
                    f"train.output_dir={output_dir}", "train.save_steps=null", "train.logging_steps=50"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - started
    results = json.loads((output_dir / "all_results.json").read_text())
    return {"wall_seconds": wall, "train_seconds": results["train_runtime"], "train_loss": results["train_loss"],
            "eval_rougeL": results["eval_rougeL"]}


def run_trainer(recipe_path: str, steps: int, hftk_dir: Path, output_dir: Path) -> dict:
    import torch
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from hftk import data, metrics, models
    from hftk.prepare import plan_inputs
    from hftk.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    plan = plan_inputs(recipe, ["train", "validation"])
    tokenizer = AutoTokenizer.from_pretrained(hftk_dir)  # the same trained tokenizer
    torch.manual_seed(recipe.train.seed)
    config = models.align_with_tokenizer(plan.config, tokenizer, recipe.model.config)
    model = AutoModelForSeq2SeqLM.from_config(config)
    train = data.tokenize(plan.splits["train"], plan.task, tokenizer, recipe.data, plan.encoding.family, True)
    validation = plan.splits["validation"]
    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=recipe.train.per_device_train_batch_size,
        learning_rate=recipe.train.learning_rate, weight_decay=recipe.train.weight_decay,
        warmup_steps=recipe.train.warmup_ratio, lr_scheduler_type=recipe.train.lr_scheduler_type,
        max_grad_norm=recipe.train.max_grad_norm, logging_steps=50, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, seed=recipe.train.seed, predict_with_generate=True, use_cpu=True,
        per_device_eval_batch_size=recipe.eval.per_device_eval_batch_size,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                             processing_class=tokenizer)
    started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - started
    # Labels too: the Trainer computes the eval loss alongside generation, as hftk does.
    eval_set = data.tokenize(validation, plan.task, tokenizer, recipe.data, plan.encoding.family, True)
    started = time.perf_counter()
    predictions = trainer.predict(eval_set, max_new_tokens=recipe.eval.max_new_tokens, num_beams=recipe.eval.num_beams)
    eval_seconds = time.perf_counter() - started
    ids = predictions.predictions
    ids[ids < 0] = tokenizer.pad_token_id
    texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    rouge = metrics.rouge(texts, list(validation[recipe.data.target_column or "summary"]))
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "train_loss": output.training_loss,
            "eval_rougeL": rouge["rougeL"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?", default="recipes/summarize.yaml")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hftk = run_hftk(args.recipe, args.steps, Path(tmp) / "hftk")
        trainer = run_trainer(args.recipe, args.steps, Path(tmp) / "hftk", Path(tmp) / "trainer")
    report = {
        "recipe": args.recipe, "optimizer_steps": args.steps, "hftk": hftk, "seq2seq_trainer": trainer,
        "train_speed_ratio_hftk_over_trainer": round(trainer["train_seconds"] / hftk["train_seconds"], 3),
    }
    print(json.dumps(report, indent=2))
    Path("benchmarks/vs_seq2seq_trainer.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
