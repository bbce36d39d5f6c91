"""Model configs, families and construction: pretrained (Hub id or directory) or from scratch."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, PretrainedConfig

from hftk.errors import UserError
from hftk.recipe import ModelSection
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY, Encoding, Task


def family_of(config: PretrainedConfig) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not _is_masked_encoder(config):
        return DECODER_ONLY
    return ENCODER_ONLY


def _is_masked_encoder(config: PretrainedConfig) -> bool:
    # BERT-likes also appear in the causal-LM mapping (as decoders); they are encoders unless told otherwise.
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def resolve_config(model: ModelSection) -> PretrainedConfig:
    """The model's config, read without loading any weights; bad ids and fields are UserErrors."""
    if model.config is not None:
        return scratch_config(model.config)
    name = model.name_or_path
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"model.name_or_path: {name} has no config.json (not a saved model directory)")
    try:
        return AutoConfig.from_pretrained(
            str(local) if local.exists() else name,
            trust_remote_code=model.trust_remote_code, revision=model.revision,
        )
    except (OSError, ValueError) as err:
        if local.exists():
            raise UserError(f"model.name_or_path: cannot read the config in {name}: {_first_line(err)}") from None
        raise UserError(
            f"model.name_or_path: '{name}' is not a local directory and cannot be fetched from the "
            f"Hugging Face Hub ({_first_line(err)}); give the path of a saved model directory, "
            f"or model.config for a scratch model"
        ) from None


def scratch_config(fields: dict[str, Any]) -> PretrainedConfig:
    fields = dict(fields)
    model_type = fields.pop("model_type")
    try:
        default = AutoConfig.for_model(model_type)
    except ValueError:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        hint = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING_NAMES), n=1, cutoff=0.5)
        raise UserError(
            f"model.config.model_type: unknown model type '{model_type}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        ) from None
    # transformers accepts any keyword silently; a typo here would quietly build another model.
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    unknown = [k for k in fields if k not in known]
    if unknown:
        hints = [difflib.get_close_matches(k, sorted(known), n=1) for k in unknown]
        described = [f"'model.config.{k}'" + (f" (did you mean 'model.config.{h[0]}'?)" if h else "") for k, h in zip(unknown, hints)]
        raise UserError(f"unknown {model_type} config field {', '.join(described)}")
    return AutoConfig.for_model(model_type, **fields)


def pick_encoding(task: Task, config: PretrainedConfig) -> Encoding:
    family = family_of(config)
    encodings = task.encodings()
    if family not in encodings:
        supported = " or ".join(sorted(encodings))
        raise UserError(
            f"task {task.name} cannot use an {family} model ({config.model_type}); it needs an {supported} model"
        )
    return encodings[family]


def check_lengths(config: PretrainedConfig, family: str, max_source_length: int, max_target_length: int) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return  # relative positions (T5): no hard limit
    needed = max_source_length + max_target_length if family == DECODER_ONLY else max(max_source_length, max_target_length)
    if needed > limit:
        what = "data.max_source_length + data.max_target_length" if family == DECODER_ONLY else "data.max_source_length/max_target_length"
        raise UserError(f"{what} = {needed} exceeds the model's {limit} positions")


def align_with_tokenizer(config: PretrainedConfig, tokenizer: Any, explicit: dict[str, Any]) -> PretrainedConfig:
    """A scratch config takes its vocabulary size and special-token ids from the tokenizer."""
    if "vocab_size" in explicit and explicit["vocab_size"] < len(tokenizer):
        raise UserError(f"model.config.vocab_size={explicit['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    updates = {"vocab_size": explicit.get("vocab_size", len(tokenizer))}
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if key not in explicit and getattr(tokenizer, key, None) is not None:
            updates[key] = getattr(tokenizer, key)
    if getattr(config, "is_encoder_decoder", False) and "decoder_start_token_id" not in explicit:
        updates["decoder_start_token_id"] = tokenizer.pad_token_id
    for key, value in updates.items():
        setattr(config, key, value)
    return config


def build_model(model: ModelSection, config: PretrainedConfig, encoding: Encoding, tokenizer: Any):
    auto_class = getattr(transformers, encoding.auto_class)
    if model.config is not None:
        built = auto_class.from_config(align_with_tokenizer(config, tokenizer, model.config))
    else:
        built = auto_class.from_pretrained(
            model.name_or_path, config=config, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
        if built.get_input_embeddings().num_embeddings < len(tokenizer):
            built.resize_token_embeddings(len(tokenizer))
    generation = getattr(built, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if model.gradient_checkpointing:
        built.gradient_checkpointing_enable()
    return built


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
