"""A model's tensor-parallel plan as `hftk plan` counts it: which layers transformers shards and how, the
FSDP2 groups around them, and each parameter's split. Shapes only: it reads a meta-device model."""

from __future__ import annotations

from typing import Any


def layout(model: Any) -> Any:
    """The model's tensor-parallel plan as `hftk plan` counts its collectives (hftk.planning.scaling.TensorParallelLayout),
    or None for a family without one. Works on a meta-device model: shapes only."""
    from hftk.planning.scaling import TP_STYLES, TensorParallelLayout, TpLayer

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
    from hftk.planning.scaling import COLWISE, ROWWISE

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
    from hftk.planning.scaling import TpParameter

    def group_of(name: str) -> int:
        owners = [m for m in groups if m and (name == m or name.startswith(m + "."))]
        return groups[max(owners, key=len)] if owners else groups[""]

    return [TpParameter(tuple(p.shape), p.element_size(), p.requires_grad, split_dims.get(name), group_of(name))
            for name, p in model.named_parameters()]
