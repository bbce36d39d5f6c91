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
