"""`hftk plan`: what a recipe will cost before it runs. Loads the data and the tokenizer, builds the model
on the meta device (no weights, no memory), and works out parameters, memory per process for each
strategy, token lengths and padding, steps and FLOPs, and the communication of every strategy on 1 to 1024
devices (hftk/planning/scaling.py).

Model-state memory follows the ZeRO paper (Rajbhandari et al., 2020): Adam in fp32 keeps 16 bytes per
parameter (4 weights + 4 gradients + 8 moments); mixed precision keeps 2 + 2 + 12 (16-bit weights and
gradients, fp32 master weights and moments). DeepSpeed keeps the paper's 12 optimizer bytes in fp32 too,
and ZeRO-3 keeps small parameters whole; model_state_memory says where (measured against real runs by
benchmarks/model_states.py, tests/integration/test_plan.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hftk.errors import UserError
from hftk.models import first_size
from hftk.planning.scaling import DEVICE_COUNTS, Interconnect, ScalePlan, TensorParallelRun, scale_plan, tensor_shapes
from hftk.planning.tables import print_plan  # noqa: F401 - `hftk plan` prints through this name
from hftk.precision import device_type, resolve_precision
from hftk.recipe import Recipe


@dataclass
class Precision:
    name: str  # "no" (fp32), "bf16" or "fp16", as Accelerate names mixed_precision
    weights: int
    gradients: int
    optimizer: int


PRECISIONS = {"no": Precision("no", 4, 4, 8), "bf16": Precision("bf16", 2, 2, 12), "fp16": Precision("fp16", 2, 2, 12)}


# DeepSpeed's stage3_param_persistence_threshold default: ZeRO-3 keeps parameters of at most this many
# elements whole on every process (no gather for each use), beside their partition.
PERSISTENCE_THRESHOLD = 100_000


@dataclass
class LaunchShape:
    num_processes: int = 1
    mixed_precision: str = "no"
    strategy: str = "ddp"  # the row of the memory table this accelerate config runs
    # ZeRO-3's threshold: a number of elements, or "auto" (Accelerate makes it 10 x the hidden size)
    param_persistence_threshold: int | str = PERSISTENCE_THRESHOLD
    tp_size: int = 1  # parallelism_config_tp_size (tp.yaml, fsdp_tp.yaml)

    @property
    def data_processes(self) -> int:
        """The processes that read different batches: a TP group reads one batch."""
        return max(self.num_processes // self.tp_size, 1)


def read_launch_config(path: Path | None, num_processes: int | None) -> LaunchShape:
    """The process count, precision and strategy of an accelerate config (or one plain process)."""
    import yaml

    shape = LaunchShape()
    if path is not None:
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"--config-file: cannot read {path}: {err}") from None
        shape.num_processes = int(config.get("num_processes", 1))
        shape.mixed_precision = str(config.get("mixed_precision", "no"))
        deepspeed = _deepspeed_settings(config, Path(path).parent)
        shape.strategy = _strategy_of(config, deepspeed)
        shape.param_persistence_threshold = _persistence_threshold(deepspeed)
        shape.tp_size = _tp_size(config)
    if num_processes is not None:
        shape.num_processes = num_processes
    if shape.tp_size > 1:
        if shape.num_processes % shape.tp_size:
            raise UserError(f"--config-file: tp_size={shape.tp_size} needs a multiple of {shape.tp_size} processes, "
                            f"not {shape.num_processes}")
        shape.strategy = "fsdp_tp" if shape.num_processes > shape.tp_size else "tp"
    if shape.mixed_precision not in PRECISIONS:
        raise UserError(f"--config-file: mixed_precision '{shape.mixed_precision}' is not no, bf16 or fp16")
    return shape


def _tp_size(config: dict[str, Any]) -> int:
    value = (config.get("parallelism_config") or {}).get("parallelism_config_tp_size", 1)
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--config-file: parallelism_config_tp_size must be a whole number, not {value!r}") from None
    if size < 1:
        raise UserError(f"--config-file: parallelism_config_tp_size must be at least 1, not {size}")
    return size


def _strategy_of(config: dict[str, Any], deepspeed: dict[str, Any]) -> str:
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        stage = int(deepspeed.get("zero_stage", 0))
        offloaded = any(deepspeed.get(k, "none") not in ("none", None) for k in
                        ("offload_optimizer_device", "offload_param_device"))
        return f"zero{stage}" + ("_offload" if offloaded and stage >= 2 else "")
    if kind == "FSDP":
        reshard = config.get("fsdp_config", {}).get("fsdp_reshard_after_forward", True)
        return "fsdp" if reshard not in (False, "SHARD_GRAD_OP") else "fsdp_shard_grad_op"
    return "ddp"


def _deepspeed_settings(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The accelerate config's deepspeed_config keys, or the same read from the DeepSpeed JSON it names
    (deepspeed_config_file: found as Accelerate finds it, else beside the accelerate config)."""
    import json

    inline = config.get("deepspeed_config") or {}
    name = inline.get("deepspeed_config_file")
    if not name:
        return inline
    json_path = Path(name) if Path(name).exists() else folder / name
    try:
        zero = json.loads(json_path.read_text()).get("zero_optimization", {})
        return {"zero_stage": zero.get("stage", 0),
                "offload_optimizer_device": (zero.get("offload_optimizer") or {}).get("device", "none"),
                "offload_param_device": (zero.get("offload_param") or {}).get("device", "none"),
                "stage3_param_persistence_threshold": zero.get("stage3_param_persistence_threshold",
                                                               PERSISTENCE_THRESHOLD)}
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"--config-file: cannot read its deepspeed_config_file {name}: {err}") from None


def _persistence_threshold(deepspeed: dict[str, Any]) -> int | str:
    value = deepspeed.get("stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)
    try:
        return value if value == "auto" else int(value)
    except (TypeError, ValueError):
        raise UserError(f"--config-file: stage3_param_persistence_threshold must be a number or auto, "
                        f"not {value!r}") from None


# DeepSpeed steps an fp32 master partition with Adam's two fp32 moments whatever the weights' precision:
# with fp32 weights too, it keeps that partition as a copy of its own (4 + 8 bytes per parameter).
DEEPSPEED_OPTIMIZER = 12
FP32_GRADIENTS = 4  # an offloaded optimizer steps on the CPU from an fp32 copy of the gradient partition


def model_state_memory(num_params: int, precision: Precision, processes: int,
                       persistent_params: int = 0, frozen_params: int = 0) -> dict[str, dict[str, float]]:
    """Bytes per process for weights + gradients + optimizer states: {strategy: {"device": B, "cpu": B}}.
    num_params: the trained parameters; frozen_params (a LoRA base) have weights only.
    persistent_params: the parameters ZeRO-3 keeps whole on every process (PERSISTENCE_THRESHOLD)."""
    p = (num_params + frozen_params) * precision.weights
    g, o = (num_params * b for b in (precision.gradients, precision.optimizer))
    z, fp32_g = num_params * DEEPSPEED_OPTIMIZER, num_params * FP32_GRADIENTS
    whole = persistent_params * precision.weights
    n = processes
    return {
        "ddp": {"device": p + g + o, "cpu": 0},
        "zero1": {"device": p + g + z / n, "cpu": 0},
        "zero2": {"device": p + (g + z) / n, "cpu": 0},
        "zero2_offload": {"device": p, "cpu": (fp32_g + z) / n},  # optimizer states and their step on the CPU
        "zero3": {"device": (p + g + z) / n + whole, "cpu": 0},
        # only the persistent parameters and the layer being computed are on the device
        "zero3_offload": {"device": whole, "cpu": (p + g + fp32_g + z) / n},
        "fsdp_shard_grad_op": {"device": p + (g + o) / n, "cpu": 0},
        "fsdp": {"device": (p + g + o) / n, "cpu": 0},
    }


def persistent_parameters(model: Any, threshold: int | str, config: Any) -> int:
    """How many trained parameters ZeRO-3 keeps whole: those of tensors with at most `threshold` elements."""
    if threshold == "auto":  # what Accelerate writes there: 10 x the hidden size
        threshold = 10 * first_size(config, "hidden_size", "d_model", "n_embd")
    return sum(p.numel() for p in model.parameters() if p.requires_grad and p.numel() <= int(threshold))


def activation_bytes(config: Any, batch_size: int, source_len: int, target_len: int, family: str,
                     precision: Precision, checkpointing: bool) -> float:
    """A rough estimate per process (Korthikanti et al., 2022: s*b*h*(34 + 5*a*s/h) bytes per layer in
    16-bit); with gradient checkpointing only each layer's input (2*s*b*h) is kept."""
    hidden = first_size(config, "hidden_size", "d_model", "n_embd")
    heads = first_size(config, "num_attention_heads", "num_heads", "n_head")
    layers = first_size(config, "num_hidden_layers", "num_layers", "n_layer")
    decoder_layers = first_size(config, "num_decoder_layers", "decoder_layers") or layers
    scale = precision.weights / 2

    def per_layer(length: int) -> float:
        if checkpointing:
            return 2 * length * batch_size * hidden * scale
        return length * batch_size * hidden * (34 + 5 * heads * length / hidden) * scale

    if family == "encoder-decoder":
        return layers * per_layer(source_len) + decoder_layers * per_layer(target_len)
    return layers * per_layer(source_len if family == "encoder-only" else source_len + target_len)


@dataclass(kw_only=True)
class LengthStats:
    count: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int
    at_limit: float  # the share of examples cut to the length limit


def length_stats(lengths: list[int], limit: int) -> LengthStats:
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return LengthStats(count=len(ordered), mean=sum(ordered) / len(ordered), p50=pct(0.5), p90=pct(0.9),
                       p99=pct(0.99), max=ordered[-1], at_limit=sum(1 for n in ordered if n >= limit) / len(ordered))


@dataclass
class PlanReport:
    task: str
    model_type: str
    family: str
    parameters: int
    trainable_parameters: int
    launch: LaunchShape
    memory_per_process: dict[str, dict[str, float]]
    persistent_parameters: int  # what ZeRO-3 keeps whole on every process (launch.param_persistence_threshold)
    activation_bytes_per_process: float
    source_lengths: LengthStats
    target_lengths: LengthStats | None
    padding_fraction: float
    micro_batch_positions: float  # padded input positions (batch x longest length) of a mean micro-batch
    packing: bool  # train.packing: padding_fraction counts the packed rows
    train_examples: int
    steps_per_epoch: int
    total_steps: int
    tokens_per_step: float
    flops_per_step: float
    scale: ScalePlan
    notes: list[str] = field(default_factory=list)
    probe: Any = None  # hftk.planning.probe.Probe with --probe
    precision: str = "no"  # what the run trains in: train.bf16 and mixed_precision resolved (hftk.precision)
    precision_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _OneProcess:
    """What prepare's helpers ask of an accelerator, for a plan made in this one process."""

    is_main_process = True
    num_processes = 1

    @contextlib.contextmanager
    def main_process_first(self):
        yield


def meta_model(plan: Any, tokenizer: Any) -> Any:
    """The model the run would build, on the meta device: shapes without storage."""
    import torch
    import transformers

    from hftk.models import align_with_tokenizer

    auto_class = getattr(transformers, plan.encoding.auto_class)
    section = plan.recipe.model
    config = (align_with_tokenizer(plan.config, tokenizer, section.config) if section.config is not None
              else plan.config)
    with torch.device("meta"):
        model = auto_class.from_config(config, trust_remote_code=section.trust_remote_code)
        if section.config is None and model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(all, trainable); tied weights (shared embeddings, an lm_head tied to them) count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@dataclass
class LoaderCounts:
    padded: int  # padded positions (padding_counts)
    positions: int  # all positions (padding_counts)
    input_positions: int  # batch x longest length of the input_ids, summed
    batches: int  # micro-batches, all processes together

    @property
    def padding_fraction(self) -> float:
        return self.padded / max(self.positions, 1)

    @property
    def micro_batch_positions(self) -> float:
        """The padded input shape (batch x longest length) of a mean micro-batch."""
        return self.input_positions / max(self.batches, 1)


def loader_counts(plan: Any, features: Any, collator: Any, processes: int) -> LoaderCounts:
    """Positions over the first epoch of the run's own loaders: the run's sampler (length-grouped or
    Accelerate's seeded one) and split over the processes that read different batches, the task's
    collator, and the run's padding_counts."""
    import torch
    from accelerate.data_loader import prepare_data_loader

    from hftk.objective import padding_counts
    from hftk.prepare import train_loader

    counts = torch.zeros(2, dtype=torch.long)
    inputs = batches = 0
    for rank in range(processes):
        torch.manual_seed(plan.recipe.train.seed)  # the sampler's seed, as set_seed(train.seed) leaves it in the run
        loader = prepare_data_loader(train_loader(plan, features, collator, processes), num_processes=processes,
                                     process_index=rank, put_on_device=False, use_seedable_sampler=True)
        loader.set_epoch(0)
        for batch in loader:
            counts += padding_counts(batch)
            inputs, batches = inputs + batch["input_ids"].numel(), batches + 1
    return LoaderCounts(counts[0].item(), counts[1].item(), inputs, batches)


def make_plan(recipe: Recipe, launch: LaunchShape, link: Interconnect | None = None,
              probe_steps: int = 0) -> PlanReport:
    from hftk.preflight import plan_inputs
    from hftk.prepare import build_tokenizer, tokenized, train_collator
    from hftk.train.optim import total_optimizer_steps
    from hftk.train.packing import block_length

    settings = recipe.train
    plan = plan_inputs(recipe, ["train"])
    one = _OneProcess()
    tokenizer = build_tokenizer(plan, one)
    features = tokenized(plan, one, tokenizer, "train", training=True)
    model = meta_model(plan, tokenizer)
    if recipe.lora is not None:  # the same adapter the run adds: only its weights train
        from hftk import adapters

        model = adapters.wrap(model, adapters.plan_adapter(recipe.lora, plan.config, plan.encoding.auto_class),
                              gradient_checkpointing=False)
    total, trainable = count_parameters(model)
    collator = train_collator(plan, tokenizer, model)

    source = [len(ids) for ids in features["input_ids"]]  # decoder-only features carry no attention mask
    target = ([sum(1 for t in labels if t != -100) for labels in features["labels"]]
              if plan.encoding.family == "encoder-decoder" else None)
    n = launch.data_processes  # a TP group reads one batch
    batches_per_process = math.ceil(len(features) / (settings.per_device_train_batch_size * n))
    steps_per_epoch = math.ceil(batches_per_process / settings.gradient_accumulation_steps)
    global_batch = settings.per_device_train_batch_size * n * settings.gradient_accumulation_steps
    mean_tokens = sum(source) / len(source) + (sum(target) / len(target) if target else 0)
    tokens_per_step = mean_tokens * global_batch
    tokens_per_process_step = mean_tokens * settings.per_device_train_batch_size * settings.gradient_accumulation_steps
    # train.bf16 and the config's mixed_precision resolved as the run resolves them, on this machine's device.
    resolved = resolve_precision(settings.bf16, plan.encoding.family, device_type(), launcher=launch.mixed_precision)
    precision = PRECISIONS[resolved.mixed_precision]
    persistent = persistent_parameters(model, launch.param_persistence_threshold, plan.config)
    # A decoder-only example is prompt and target in one sequence: its limit is the two lengths together.
    source_limit = (block_length(plan.task, recipe.data) if plan.encoding.family == "decoder-only"
                    else recipe.data.max_source_length)
    source_stats = length_stats(source, source_limit)
    target_stats = length_stats(target, recipe.data.max_target_length) if target else None
    activations = activation_bytes(plan.config, settings.per_device_train_batch_size, source_stats.max,
                                   target_stats.max if target_stats else 0, plan.encoding.family, precision,
                                   recipe.model.gradient_checkpointing)
    total_steps = total_optimizer_steps(settings, batches_per_process)
    counts = loader_counts(plan, features, collator, n)
    probe = None
    if probe_steps:
        from hftk.planning import probe as probing

        probe = probing.probe_steps(plan, tokenizer, features, probe_steps, total_steps,
                                    counts.micro_batch_positions * settings.gradient_accumulation_steps,
                                    precision.name)
    return PlanReport(
        probe=probe, precision=resolved.mixed_precision, precision_reason=resolved.reason,
        task=recipe.task, model_type=plan.config.model_type, family=plan.encoding.family, parameters=total,
        trainable_parameters=trainable, launch=launch,
        memory_per_process=model_state_memory(trainable, precision, launch.num_processes, persistent,
                                              frozen_params=total - trainable),
        persistent_parameters=persistent,
        activation_bytes_per_process=activations, source_lengths=source_stats, target_lengths=target_stats,
        padding_fraction=counts.padding_fraction, micro_batch_positions=counts.micro_batch_positions,
        packing=settings.packing,
        train_examples=len(features), steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, tokens_per_step=tokens_per_step,
        flops_per_step=6 * total * tokens_per_step,
        scale=scale_plan(tensor_shapes(model), recipe.parallel, precision, settings.gradient_accumulation_steps,
                         tokens_per_process_step, link or Interconnect(),
                         tuple(sorted({*DEVICE_COUNTS, launch.num_processes})),
                         tensor_parallel_run(model, launch, counts, settings.max_grad_norm, precision),
                         measured_step_seconds=probe.seconds_per_step if probe else None),
    )


def tensor_parallel_run(model: Any, launch: LaunchShape, counts: LoaderCounts,
                        max_grad_norm: float | None, precision: Precision) -> TensorParallelRun | None:
    """The TP rows' inputs, for a family with a tensor-parallel plan; their TP groups are the config's
    tp_size, or 2 where the config has none."""
    from hftk.planning.tp_layout import layout

    found = layout(model)
    if found is None:
        return None
    # Under autocast the activations TP reduces are half precision; the parameters stay as built.
    activation_size = precision.weights if precision.name != "no" else None
    return TensorParallelRun(found, launch.tp_size if launch.tp_size > 1 else 2, counts.micro_batch_positions,
                             max_grad_norm is not None, activation_size)
