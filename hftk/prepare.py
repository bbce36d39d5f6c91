"""What every command assembles from a checked plan (hftk.preflight): the accelerator, the tokenizer,
the tokenized splits and the loaders. Nothing here trains or writes a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from hftk import data
from hftk.logs import import_deepspeed_quietly, setup_logging
from hftk.parallel import launch, tensor_parallel
from hftk.precision import Resolved
from hftk.preflight import Plan
from hftk.recipe import TrainSection
from hftk.tasks.base import ENCODER_DECODER


def make_accelerator(settings: TrainSection, precision: Resolved, trackers: list[str] | None = None):
    """The Accelerator of this launch, in the precision resolved from train.bf16 (hftk.precision)."""
    import_deepspeed_quietly()  # before Accelerate imports it and it prints to stdout
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    from hftk.experiment_trackers import LOGGING_DIR

    launch.launch_problems(precision.mixed_precision)
    launch.skip_deepspeed_inference_comm()
    launch.join_this_attempt(settings.ddp_timeout)
    tensor_parallel.requested()  # bad sizes are bad input, found before the process group starts
    tensor_parallel.keep_accelerate_out()
    project = ProjectConfiguration(project_dir=settings.output_dir,
                                   logging_dir=str(Path(settings.output_dir) / LOGGING_DIR))
    accelerator = Accelerator(cpu=launch.cpu_processes(), mixed_precision=precision.accelerator_argument(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              kwargs_handlers=[*launch.process_group_kwargs(settings.ddp_timeout),
                                               *launch.ddp_kwargs(settings.ddp_bucket_cap_mb)],
                              log_with=trackers or None, project_config=project)
    launch.check_world(accelerator)
    set_seed(settings.seed)
    setup_logging(accelerator.is_main_process)
    return accelerator


def build_tokenizer(plan: Plan, accelerator: Any) -> Any:
    return plan.task.prepare_tokenizer(_raw_tokenizer(plan, accelerator))  # e.g. a chat template for dialogue


def _raw_tokenizer(plan: Plan, accelerator: Any) -> Any:
    from hftk import tokenizer as tok

    spec = plan.recipe.model.tokenizer
    if spec is None or spec.train is None:
        return tok.load_tokenizer(plan.recipe.model, plan.config)
    train = plan.splits["train"]
    key = tok.training_key(spec.train, plan.encoding.family, train._fingerprint)
    rows = train if spec.train.max_texts is None else train.select(range(min(spec.train.max_texts, len(train))))
    texts = (t for start in range(0, len(rows), 1000)
             for t in plan.task.texts(rows[start:start + 1000], plan.recipe.data) if t)
    with accelerator.main_process_first():
        return tok.trained_tokenizer(texts, spec.train, plan.encoding.family, key, accelerator.is_main_process)


def make_loader(dataset: datasets.Dataset, collator: Any, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
                sampler: Any = None):
    """A loader with a generator of its own. Without one, every new iterator (each epoch, each
    evaluation, the resumed loader) draws its worker base seed from the global generator, which
    dropout also draws from: evaluation would change training, and a resume would shift every mask.
    `sampler` (an order of its own, e.g. length-grouped) replaces shuffle."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=collator, num_workers=workers, generator=generator)


def train_collator(plan: Plan, tokenizer: Any, model: Any) -> Any:
    """The task's collator (one example per row, padded), or with train.packing the packing one."""
    if plan.recipe.train.packing and plan.encoding.family == ENCODER_DECODER:
        from hftk.train.packing import PackedSeq2SeqCollator

        data = plan.recipe.data
        return PackedSeq2SeqCollator(tokenizer.pad_token_id, decoder_inputs_for(model),
                                     (data.max_source_length, data.max_target_length))
    if plan.recipe.train.packing:
        from hftk.train.packing import PackedCollator, block_length

        return PackedCollator(tokenizer.pad_token_id, block_length(plan.task, plan.recipe.data))
    return plan.task.collator(tokenizer, plan.encoding.family, decoder_inputs_for(model))


def route_packed_inputs(plan: Plan, model: Any) -> None:
    """With train.packing on an encoder-decoder, the model takes its packed masks and positions through
    hooks (hftk.train.packed_forward); installed on the unwrapped model, before any strategy wraps it."""
    if plan.recipe.train.packing and plan.encoding.family == ENCODER_DECODER:
        from hftk.train import packed_forward

        packed_forward.install(model)


def train_loader(plan: Plan, features: datasets.Dataset, collator: Any, data_processes: int) -> Any:
    """Shuffled each epoch; with train.group_by_length, in groups of similar lengths the size of one
    optimizer step's examples (per-device batch x accumulation steps x data-parallel processes), so any
    split of that step over processes and micro-batches trains on the same examples."""
    from hftk.train.batching import LengthGroupedSampler, example_lengths

    settings = plan.recipe.train
    sampler = None
    split = plan.sources.get("train")
    if split is not None and split.several and not settings.group_by_length:
        # Drawn in the sources' proportions (hftk.train.mixing); unweighted, each example once an epoch.
        from hftk.train.mixing import MixtureSampler

        weights = [part.weight for part in split.parts] if split.weighted else split.feature_sizes
        sampler = MixtureSampler(split.feature_sizes, weights, settings.seed)
    elif settings.group_by_length:
        sampler = LengthGroupedSampler(example_lengths(features, plan.encoding.family),
                                       settings.per_device_train_batch_size * settings.gradient_accumulation_steps
                                       * data_processes, settings.seed)
    plan.train_order = sampler
    return make_loader(features, collator, settings.per_device_train_batch_size, True, settings.seed,
                       settings.dataloader_num_workers, sampler)


def stream_loader(plan: Plan, accelerator: Any, tokenizer: Any, collator: Any, data_processes: int) -> Any:
    """data.streaming: this process's share of the stream, checked, tokenized and batched as it is read."""
    from hftk.errors import UserError
    from hftk.streaming import StreamLoader, stream_rows

    if data_processes != accelerator.num_processes:
        raise UserError("data.streaming splits the stream over every process; tensor parallelism (processes that "
                        "read the same batches) is not supported with it")
    source, own, where = plan.sources["train"].stream
    settings = plan.recipe.train
    return StreamLoader(stream_rows(source, "train", where, plan.recipe.data.max_train_samples), plan.task, tokenizer,
                        own, plan.encoding.family, collator, settings.per_device_train_batch_size,
                        settings.max_steps * settings.gradient_accumulation_steps, accelerator.process_index,
                        accelerator.num_processes, accelerator.device, where)


def tokenized(plan: Plan, accelerator: Any, tokenizer: Any, key: str, training: bool) -> datasets.Dataset:
    """Several sources are tokenized one by one (text_generation's blocks never join two), laid end to end;
    the split's feature_sizes say where each begins."""
    split = plan.sources.get(key)
    with accelerator.main_process_first():
        if split is None or not split.several:
            features = data.tokenize(plan.splits[key], plan.task, tokenizer, plan.recipe.data, plan.encoding.family,
                                     training, split=key)
            if split is not None:
                split.feature_sizes = [len(features)]
            return features
        features = [data.tokenize(part.rows, plan.task, tokenizer, plan.recipe.data, plan.encoding.family, training,
                                  split=key, offset=0 if training else start)
                    for part, (_, start, _) in zip(split.parts, split.row_ranges())]
    split.feature_sizes = [len(f) for f in features]
    return datasets.concatenate_datasets(features)


def decoder_inputs_for(model: Any) -> Any:
    return getattr(model, "prepare_decoder_input_ids_from_labels", None)


def eval_loader(plan: Plan, accelerator: Any, model: Any, tokenizer: Any, features: datasets.Dataset,
                shard: Any = None) -> Any:
    """Prepared once per run: every prepare() call adds a loader Accelerate keeps for good. `shard` splits
    it over the processes (Accelerate's prepare unless the strategy splits data its own way)."""
    collator = plan.task.collator(tokenizer, plan.encoding.family, decoder_inputs_for(accelerator.unwrap_model(model)))
    from hftk.train.batching import example_lengths

    # Longest first: generation pads each batch to its longest example, so similar lengths waste least;
    # predictions map back to their rows by EXAMPLE_INDEX, so the order changes no number.
    lengths = example_lengths(features, plan.encoding.family)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return (shard or accelerator.prepare)(make_loader(features, collator, plan.recipe.eval.per_device_eval_batch_size,
                                           shuffle=False, seed=plan.recipe.train.seed, sampler=order))
