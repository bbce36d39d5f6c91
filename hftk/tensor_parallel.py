"""Tensor parallelism (TP) and FSDP2 x TP through transformers' own plans (`base_model_tp_plan`,
`base_model_fsdp_plan`) and its `DistributedConfig`.

`accelerate_configs/tp.yaml` and `fsdp_tp.yaml` carry the sizes in Accelerate's `parallelism_config`
section; the launcher hands them to every process as PARALLELISM_CONFIG_* variables. hftk reads them
itself and keeps Accelerate's ParallelismConfig off, since Accelerate refuses it on CPUs (MULTI_CPU):
the model is built as usual (the same weights on every process), then transformers shards it on a
(fsdp, tp) device mesh over the process group Accelerate started (Gloo on CPUs, NCCL on GPUs).
Processes of one TP group read the same batches; the data is split over the fsdp dimension only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hftk.errors import UserError
from hftk.parallel import CpuFsdpStrategy, forward_in_mixed_precision
from hftk.tracking import log

SWITCH = "ACCELERATE_USE_PARALLELISM_CONFIG"


@dataclass(frozen=True)
class Sizes:
    tp: int
    dp_shard: int

    @property
    def processes(self) -> int:
        return self.tp * self.dp_shard


def requested() -> Sizes | None:
    """The sizes the accelerate config asked for, or None without tensor parallelism."""
    if "PARALLELISM_CONFIG_TP_SIZE" not in os.environ:  # set by the launcher with the parallelism_config
        return None
    sizes = {}
    for name in ("TP_SIZE", "DP_SHARD_SIZE", "DP_REPLICATE_SIZE", "CP_SIZE", "SP_SIZE"):
        value = os.environ.get(f"PARALLELISM_CONFIG_{name}", "1")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"parallelism_config: {name.lower()} must be a whole number, not {value!r}") from None
        if sizes[name] < 1:
            raise UserError(f"parallelism_config: {name.lower()} must be at least 1, not {sizes[name]}")
    others = [f"{name.lower()}={sizes[name]}" for name in ("DP_REPLICATE_SIZE", "CP_SIZE", "SP_SIZE") if sizes[name] > 1]
    if others:
        raise UserError(f"parallelism_config: hftk runs tp_size and dp_shard_size; {', '.join(others)} is not supported")
    if sizes["TP_SIZE"] == 1:
        return None  # plain FSDP: the fsdp configs say it without a parallelism_config
    return Sizes(tp=sizes["TP_SIZE"], dp_shard=sizes["DP_SHARD_SIZE"])


def keep_accelerate_out() -> None:
    """Accelerate's ParallelismConfig refuses CPUs, and on GPUs it would build a second device mesh;
    hftk builds the one mesh itself. The sizes stay readable in PARALLELISM_CONFIG_*."""
    os.environ.pop(SWITCH, None)


def families_with_a_plan() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = []
    for model_type in CONFIG_MAPPING.keys():  # noqa: SIM118 - a lazy mapping: keys() without importing each class
        try:
            if CONFIG_MAPPING[model_type].base_model_tp_plan:
                found.append(model_type)
        except Exception:  # noqa: BLE001, S112 - a family whose code cannot import here has no plan to offer
            continue
    return sorted(found)


def check_model(config: Any, sizes: Sizes) -> None:
    if not getattr(config, "base_model_tp_plan", None):
        families = families_with_a_plan()
        shown = ", ".join(f for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2")
                          if f in families)
        raise UserError(
            f"tensor parallelism needs a model family with a tensor-parallel plan (base_model_tp_plan in its "
            f"transformers config); {config.model_type} has none. Families that have one include {shown} "
            f"({len(families)} in all); or use ddp.yaml / fsdp.yaml for this model"
        )
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and heads % sizes.tp:
        raise UserError(f"parallelism_config: tp_size={sizes.tp} must divide the model's {heads} key/value heads")


class TensorParallelStrategy(CpuFsdpStrategy):
    """TP (and FSDP2 over the data dimension) through transformers; sharded checkpoints through
    torch.distributed.checkpoint like CPU FSDP."""

    def __init__(self, settings: Any, accelerator: Any, sizes: Sizes, config: Any):
        super().__init__(settings, accelerator)  # refuses communication hooks
        if accelerator.num_processes != sizes.processes:
            raise UserError(
                f"parallelism_config: tp_size={sizes.tp} x dp_shard_size={sizes.dp_shard} needs {sizes.processes} "
                f"processes, this launch has {accelerator.num_processes}; launch with --num_processes {sizes.processes}"
            )
        check_model(config, sizes)
        if accelerator.mixed_precision == "fp16":  # no loss scaler: the optimizer is not Accelerate's
            raise UserError("tensor parallelism trains in fp32 or bf16, not fp16; launch with --mixed_precision bf16 "
                            "or set train.bf16=true")
        self.sizes = sizes
        self.data_rank = accelerator.process_index // sizes.tp  # the mesh is (fsdp, tp), tp innermost
        self.counts_tokens = accelerator.process_index % sizes.tp == 0  # one process per TP group

    def prepare(self, accelerator: Any, model: Any, make_optimizer: Any, loader: Any):
        from transformers.distributed import DistributedConfig
        from transformers.distributed.utils import initialize_distributed_mesh

        config = DistributedConfig(tp_size=self.sizes.tp, fsdp_size=self.sizes.dp_shard)
        model = model.to(accelerator.device)
        _, meshes = initialize_distributed_mesh(config)  # over the process group Accelerate started
        # Every process built the same weights; each keeps its own slice (no communication).
        model = type(model).maybe_distribute_model(model, config, meshes)
        # hftk gathers the whole model itself when saving; transformers would gather it a second time.
        model.config.distributed_config = None
        forward_in_mixed_precision(accelerator, model)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        log.info(f"tensor parallel {self.sizes.tp} x data shards {self.sizes.dp_shard}: this process holds "
                 f"{local} of {total} parameters")
        return model, make_optimizer(model), self.prepare_loader(accelerator, loader)

    def data_processes(self, accelerator: Any) -> int:
        return self.sizes.dp_shard  # the processes of one TP group read the same batches

    def prepare_loader(self, accelerator: Any, loader: Any) -> Any:
        """Split over the data dimension only: the processes of one TP group get the same batches."""
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(
            loader, accelerator.device, num_processes=self.sizes.dp_shard, process_index=self.data_rank,
            put_on_device=True, rng_types=accelerator.rng_types.copy(), even_batches=accelerator.even_batches,
            use_seedable_sampler=accelerator.use_seedable_sampler,
        )


def layout(model: Any) -> Any:
    """The model's tensor-parallel plan as `hftk plan` counts its collectives (hftk.scaling.TensorParallelLayout),
    or None for a family without one. Works on a meta-device model: shapes only."""
    from hftk.scaling import TP_STYLES, TensorParallelLayout, TpLayer

    plan = getattr(model, "tp_plan", None) or {}
    if not plan:
        return None
    layers, unmodelled, split_dims = [], set(), {}
    for name, module in model.named_modules():
        style = _plan_style(plan, name)
        if style is None:
            continue
        if style not in TP_STYLES:
            unmodelled.add(style)
            continue
        width = getattr(module, "out_features", None) or getattr(module, "embedding_dim", 0)
        trained = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        layers.append(TpLayer(style, getattr(module, "in_features", 0), width,
                              trained if style == "replicated_with_grad_allreduce" else 0))
        for param_name, param in module.named_parameters(recurse=False):
            dim = _split_dim(style, param_name, param.dim())
            if dim is not None:
                split_dims[f"{name}.{param_name}" if name else param_name] = dim
    names = {name for name, _ in model.named_parameters()}  # plan entries on bare parameters (MoE experts)
    unmodelled |= {style for key, style in plan.items() if style not in TP_STYLES and key in names}
    if not layers:
        return None
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1)
    groups, reshards = _fsdp_groups(model)
    return TensorParallelLayout(layers, _parameters(model, split_dims, groups), reshards, int(heads),
                                sorted(unmodelled))


def _plan_style(plan: dict[str, str], name: str) -> str | None:
    """A module's entry in a transformers plan, whose keys name layers by number or with `*` for it."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    return plan.get(name) or plan.get(replace_layer_number_by_wildcard(name))


def _split_dim(style: str, param_name: str, ndim: int) -> int | None:
    """The dimension a style shards a parameter on (transformers' shard_param), or None where it stays whole."""
    from hftk.scaling import COLWISE, ROWWISE

    if style in COLWISE:
        return max(ndim - 2, 0)  # weight: its output rows; bias: its only dimension
    if style in ROWWISE:
        return None if param_name == "bias" else ndim - 1
    return {"embedding_rowwise": 0, "embedding_colwise": 1}.get(style)


def _fsdp_groups(model: Any) -> tuple[dict[str, int], list[bool]]:
    """transformers' FSDP2 groups of the model (apply_fully_sharded_data_parallelism): each module of its
    fsdp plan, the final norm and output head bundled where they are the only kept pair, the root last.
    Returns the group of each module name and, per group, whether it is freed after forward."""
    from transformers.distributed.fsdp import _resolve_tied_embed_lm_head_plan, is_norm_and_head_pair

    plan = _resolve_tied_embed_lm_head_plan(dict(getattr(model, "fsdp_plan", None) or {}), model)
    freed, kept = [], []
    for name, module in model.named_modules():
        style = _plan_style(plan, name)
        if style is not None:
            (kept if style == "keep_full_weight" else freed).append((name, module))
    groups = {name: index for index, (name, _) in enumerate(freed)}
    reshards = [True] * len(freed)
    if is_norm_and_head_pair(kept, model):
        groups.update({name: len(reshards) for name, _ in kept})
        reshards.append(False)
    else:
        for name, _ in kept:
            groups[name] = len(reshards)
            reshards.append(False)
    groups[""] = len(reshards)  # the root holds the rest, and FSDP2 keeps the root's weights after forward
    reshards.append(False)
    return groups, reshards


def _parameters(model: Any, split_dims: dict[str, int], groups: dict[str, int]) -> list[Any]:
    from hftk.scaling import TpParameter

    def group_of(name: str) -> int:
        owners = [m for m in groups if m and (name == m or name.startswith(m + "."))]
        return groups[max(owners, key=len)] if owners else groups[""]

    return [TpParameter(tuple(p.shape), p.element_size(), p.requires_grad, split_dims.get(name), group_of(name))
            for name, p in model.named_parameters()]
