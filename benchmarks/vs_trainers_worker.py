"""One side of benchmarks/vs_trainers.py, in a process of its own so its peak memory is its own.

    python benchmarks/vs_trainers_worker.py init|trainer|hftk-eval|trainer-eval SPEC.json RESULT.json

init: the tokenizer and the scratch model exactly as `hftk finetune` makes them (seed, then the
tokenizer, then the model), saved in one folder that both sides load: the same initial weights.
trainer: the Hugging Face Trainer (Seq2SeqTrainer for encoder-decoders) on that folder, then its
evaluation, timed. hftk-eval: hftk's own evaluation of a finished hftk run, timed the same way.
trainer-eval: the Trainer's evaluation of that same hftk run (identical weights on both paths).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY
from hftk.tasks.text_to_text import IGNORE_INDEX


def model_overrides(init_dir: str) -> list[str]:
    """Recipe overrides that read the model and tokenizer from the shared initial folder."""
    return [f"model.name_or_path={init_dir}", "model.config=null", "model.tokenizer=null"]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_initial(spec: dict) -> dict:
    from hftk import models
    from hftk.preflight import plan_inputs, run_precision
    from hftk.prepare import build_tokenizer, make_accelerator, tokenized
    from hftk.recipe import load_recipe
    from hftk.train.optim import total_optimizer_steps

    recipe = load_recipe(spec["recipe"], spec["overrides"] + [f"train.seed={spec['seed']}"])
    plan = plan_inputs(recipe, ["train", "validation"])
    accelerator = make_accelerator(recipe.train, run_precision(plan))  # seeds every generator, as finetune does first
    tokenizer = build_tokenizer(plan, accelerator)
    features = tokenized(plan, accelerator, tokenizer, "train", training=True)
    model = models.build_model(recipe.model, plan.config, plan.encoding, tokenizer)
    model.save_pretrained(spec["init_dir"])
    tokenizer.save_pretrained(spec["init_dir"])
    settings = recipe.train
    steps = total_optimizer_steps(settings, math.ceil(len(features) / settings.per_device_train_batch_size))
    return {"train_features": len(features), "parameters": sum(p.numel() for p in model.parameters()),
            "family": plan.encoding.family, "epoch_steps": steps, "model_type": plan.config.model_type}


def time_hftk_eval(spec: dict) -> dict:
    """What finish() runs after training (evaluate_split on the validation split), on the saved model."""
    import transformers

    from hftk.eval_split import evaluate_split
    from hftk.preflight import plan_inputs, run_precision
    from hftk.prepare import eval_loader, make_accelerator, tokenized
    from hftk.recipe import load_recipe
    from hftk.tokenizer import with_pad_token

    model_dir = spec["model_dir"]
    recipe = load_recipe(spec["recipe"], spec["overrides"] + model_overrides(model_dir))
    plan = plan_inputs(recipe, ["validation"], model_dir=model_dir)
    accelerator = make_accelerator(recipe.train, run_precision(plan))
    tokenizer = with_pad_token(transformers.AutoTokenizer.from_pretrained(model_dir))
    model = accelerator.prepare(getattr(transformers, plan.encoding.auto_class).from_pretrained(model_dir))
    loader = eval_loader(plan, accelerator, model, tokenizer, tokenized(plan, accelerator, tokenizer, "validation", False))
    synchronize()
    started = time.perf_counter()
    results, _ = evaluate_split(plan, accelerator, model, tokenizer, "validation", loader)
    synchronize()
    return {"eval_seconds": time.perf_counter() - started, "results": results}


def batch_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[non-pad tokens, padded positions, all positions], counted as hftk's loop counts them
    (hftk.train.loop.batch_tokens and hftk.objective.padding_counts)."""
    mask = batch["attention_mask"]
    tokens, padded, total = mask.sum(), (mask == 0).sum(), torch.tensor(mask.numel(), device=mask.device)
    if "decoder_input_ids" in batch:
        labels = batch["labels"]
        tokens = tokens + (labels != IGNORE_INDEX).sum()
        padded = padded + (labels == IGNORE_INDEX).sum()
        total = total + labels.numel()
    return torch.stack([tokens, padded, total])


class CountingTrainer:
    """Mixed in front of Trainer/Seq2SeqTrainer: tallies the batches training_step really trains on
    (the loader runs one batch ahead, so a wrapped collator would count one too many). Stays on the
    device: no host sync in the hot path."""

    tally: torch.Tensor | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        counts = batch_counts(inputs)
        self.tally = counts if self.tally is None else self.tally + counts.to(self.tally.device)
        return super().training_step(model, inputs, num_items_in_batch)


def counting(base: type) -> type:
    return type(f"Counting{base.__name__}", (CountingTrainer, base), {})


def training_clock():
    """A callback timing on_train_begin -> on_train_end: the loop itself, as hftk's train_runtime does."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        began = ended = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            self.began = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            synchronize()
            self.ended = time.perf_counter()

    return Clock()


def training_arguments(recipe: Any, spec: dict, seq2seq: bool):
    import dataclasses

    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    from hftk.train.optim import warmup_steps

    settings, steps = recipe.train, spec["steps"]
    cls = Seq2SeqTrainingArguments if seq2seq else TrainingArguments
    kwargs = {
        "output_dir": spec["output_dir"], "max_steps": steps, "seed": spec["seed"],
        "per_device_train_batch_size": settings.per_device_train_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "per_device_eval_batch_size": recipe.eval.per_device_eval_batch_size,
        "learning_rate": settings.learning_rate, "weight_decay": settings.weight_decay,
        "adam_beta1": settings.adam_beta1, "adam_beta2": settings.adam_beta2, "adam_epsilon": settings.adam_epsilon,
        "lr_scheduler_type": settings.lr_scheduler_type, "warmup_steps": warmup_steps(settings, steps),
        "max_grad_norm": settings.max_grad_norm or 0.0, "logging_steps": settings.logging_steps,
        "dataloader_num_workers": settings.dataloader_num_workers, "save_strategy": "no", "eval_strategy": "no",
        "report_to": [], "disable_tqdm": True, "use_cpu": not torch.cuda.is_available(),
    }
    if seq2seq:
        kwargs["predict_with_generate"] = True
    if spec["variant"] == "tuned":
        kwargs["bf16"] = True
        names = {f.name for f in dataclasses.fields(cls)}
        if "group_by_length" in names:  # transformers 4.x
            kwargs["group_by_length"] = True
        else:  # transformers 5
            kwargs["train_sampling_strategy"] = "group_by_length"
    return cls(**kwargs)


def trainer_side(spec: dict, model_dir: str, train: bool) -> TrainerSide:
    import transformers

    from hftk.preflight import plan_inputs
    from hftk.recipe import load_recipe
    from hftk.tokenizer import with_pad_token

    recipe = load_recipe(spec["recipe"], spec["overrides"] + model_overrides(model_dir) + [f"train.seed={spec['seed']}"])
    # The same checked (and, for QA, repaired) rows as hftk's.
    plan = plan_inputs(recipe, ["train", "validation"] if train else ["validation"])
    tokenizer = with_pad_token(transformers.AutoTokenizer.from_pretrained(model_dir))
    model = getattr(transformers, plan.encoding.auto_class).from_pretrained(model_dir)
    side = {ENCODER_DECODER: Seq2SeqSide, DECODER_ONLY: CausalSide, ENCODER_ONLY: QASide}[plan.encoding.family]
    return side(plan, recipe, tokenizer, model, spec)


def run_trainer(spec: dict) -> dict:
    side = trainer_side(spec, spec["init_dir"], train=True)
    trained = side.train()
    evaluated = side.evaluate()
    evaluated.pop("predictions")
    return {**trained, **evaluated}


def trainer_eval_of_hftk(spec: dict) -> dict:
    """The Trainer's evaluation path on hftk's final weights: eval time on identical weights, and
    whether both paths predict the same texts (they should; a difference is an evaluation bug)."""
    side = trainer_side(spec, spec["model_dir"], train=False)
    side.make_trainer(None)
    result = side.evaluate()
    saved = [json.loads(line)["prediction"] for line in (Path(spec["model_dir"]) / "predictions.jsonl").open()]
    texts = result.pop("predictions")
    return {**result, "identical_predictions": sum(a == b for a, b in zip(texts, saved)), "examples": len(saved)}


class TrainerSide:
    """Train, then evaluate; subclasses give the data, the collator, the Trainer class and predict()."""

    trainer_class_name = "Trainer"
    seq2seq = False

    def __init__(self, plan: Any, recipe: Any, tokenizer: Any, model: Any, spec: dict):
        self.plan, self.recipe, self.tokenizer, self.model, self.spec = plan, recipe, tokenizer, model, spec
        self.trainer: Any = None

    def make_trainer(self, train_set: Any, callbacks: list | None = None) -> None:
        import transformers

        trainer_class = counting(getattr(transformers, self.trainer_class_name))
        self.trainer = trainer_class(model=self.model, args=training_arguments(self.recipe, self.spec, self.seq2seq),
                                     train_dataset=train_set, data_collator=self.collator(),
                                     processing_class=self.tokenizer, callbacks=callbacks)

    def train(self) -> dict:
        train_set = self.train_set()
        clock = training_clock()
        self.make_trainer(train_set, [clock])
        output = self.trainer.train()
        train_seconds = clock.ended - clock.began
        tokens, padded, positions = self.trainer.tally.tolist()
        optim = self.trainer.args.optim
        return {"trainer": self.trainer_class_name, "optimizer": getattr(optim, "value", optim),
                "train_seconds": train_seconds, "train_steps": output.global_step, "train_loss": output.training_loss,
                "train_tokens": tokens, "train_tokens_per_second": tokens / max(train_seconds, 1e-9),
                "train_padding_fraction": padded / max(positions, 1), "train_features": len(train_set)}

    def evaluate(self) -> dict:
        """Generation (or span search), decoding and scoring, timed; the inputs are tokenized before."""
        eval_inputs = self.eval_data()
        task, data = self.plan.task, self.recipe.data
        references = task.references(self.plan.splits["validation"][:], data)
        synchronize()
        started = time.perf_counter()
        texts = self.predict(eval_inputs)
        scores = task.compute_metrics(texts, references, "local")  # hftk.metrics, as hftk scores
        return {"eval_seconds": time.perf_counter() - started, "metrics": scores, "predictions": texts}

    def tokenize(self, training: bool):
        from hftk import data

        key = "train" if training else "validation"
        plan = self.plan
        return data.tokenize(plan.splits[key], plan.task, self.tokenizer, self.recipe.data, plan.encoding.family,
                             training, split=key)


class Seq2SeqSide(TrainerSide):
    """hftk's tokenized rows, DataCollatorForSeq2Seq, Seq2SeqTrainer.predict with generation."""

    trainer_class_name = "Seq2SeqTrainer"
    seq2seq = True

    def train_set(self):
        return self.tokenize(True)

    def collator(self):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(self.tokenizer, model=self.model)

    def eval_data(self):
        return self.tokenize(False)  # with labels: predict() computes the loss too, as hftk's evaluation does

    def predict(self, features) -> list[str]:
        settings = self.recipe.eval
        output = self.trainer.predict(features, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams)
        ids = output.predictions
        ids[ids < 0] = self.tokenizer.pad_token_id
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class CausalSide(TrainerSide):
    """hftk's tokenized rows (prompt labels already -100, as text_to_text.encode_prompt_completion
    makes them), padded by DataCollatorForSeq2Seq (labels with -100); the Trainer's causal LM loss
    shifts the labels itself. Evaluation: Trainer.evaluate for the loss, then, as Trainer has no
    generation, a plain greedy loop over left-padded prompts."""

    def train_set(self):
        return self.tokenize(True)

    def collator(self):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX)

    def eval_data(self):
        features = self.tokenize(False)
        return features, features["prompt_input_ids"]

    def predict(self, eval_inputs) -> list[str]:
        features, prompts = eval_inputs
        self.trainer.evaluate(features)  # the validation loss, which hftk's evaluation reports too
        return self.generate(prompts)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[str]:
        model, settings, pad_id = self.trainer.model, self.recipe.eval, self.tokenizer.pad_token_id
        model.eval()
        device = next(model.parameters()).device
        texts = []
        size = settings.per_device_eval_batch_size
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.trainer.args.bf16)
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with autocast:
                output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                        num_beams=settings.num_beams, do_sample=False, pad_token_id=pad_id)
            texts += [t.strip() for t in self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]
        return texts


class QASide(TrainerSide):
    """The transformers QA example: its own windows (padded to max length unless tuned), Trainer,
    then postprocess_qa_predictions (n_best 20, max answer 30 tokens, v2 when the data has no-answer rows)."""

    def window_settings(self) -> dict:
        data = self.recipe.data
        return {"tokenizer": self.tokenizer, "max_length": data.max_source_length, "doc_stride": data.doc_stride,
                "pad": self.spec["variant"] != "tuned"}

    def raw(self, key: str):
        from hftk.tasks.squad_schema import qa_columns

        cols = qa_columns(self.recipe.data)
        split = self.plan.splits[key]
        renames = {old: new for old, new in zip((cols.question, cols.context, cols.answers),
                                                ("question", "context", "answers")) if old != new}
        split = split.rename_columns(renames) if renames else split
        if "id" not in split.column_names:
            split = split.add_column("id", [str(i) for i in range(len(split))])
        return split

    def train_set(self):
        from qa_example import prepare_train_features

        raw = self.raw("train")
        return raw.map(prepare_train_features, batched=True, remove_columns=raw.column_names,
                       fn_kwargs=self.window_settings())

    def collator(self):
        from transformers import DataCollatorWithPadding, default_data_collator

        return default_data_collator if self.window_settings()["pad"] else DataCollatorWithPadding(self.tokenizer)

    def eval_data(self):
        from qa_example import prepare_validation_features

        raw = self.raw("validation")
        features = raw.map(prepare_validation_features, batched=True, remove_columns=raw.column_names,
                           fn_kwargs=self.window_settings())
        splits = [key for key in ("train", "validation") if key in self.plan.splits]
        negatives = any(not a["text"] for key in splits for a in self.raw(key)["answers"])
        return raw, features, negatives

    def predict(self, eval_inputs) -> list[str]:
        from qa_example import postprocess_qa_predictions

        raw, features, negatives = eval_inputs
        output = self.trainer.predict(features.remove_columns(["example_id", "offset_mapping"]))
        start_logits, end_logits = output.predictions[:2]
        by_id = postprocess_qa_predictions(raw, features, (start_logits, end_logits),
                                           version_2_with_negative=negatives, n_best_size=20, max_answer_length=30)
        return [by_id[i] for i in raw["id"]]


MODES = {"init": make_initial, "trainer": run_trainer, "hftk-eval": time_hftk_eval,
         "trainer-eval": trainer_eval_of_hftk}


def main() -> None:
    mode, spec_path, result_path = sys.argv[1:4]
    sys.path.insert(0, str(Path(__file__).parent))  # qa_example, beside this file
    result = MODES[mode](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
