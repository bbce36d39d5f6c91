"""Model configs, families and construction: pretrained (Hub id or directory) or from scratch."""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import errors as hub_errors
from transformers import AutoConfig, PretrainedConfig

from hftk.errors import UserError
from hftk.logs import log
from hftk.recipe import ModelSection
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY, Encoding, Task

# What reading or making a config raises for bad input: a missing or unreadable file, an unknown model
# type, and huggingface_hub's strict-dataclass errors for a field of the wrong type or an impossible value.
CONFIG_ERRORS = (OSError, ValueError, TypeError, KeyError, getattr(hub_errors, "StrictDataclassError", ValueError))


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
        untyped = local.is_dir() and _untyped_family(local)
        if untyped:
            from transformers import CONFIG_MAPPING

            config = CONFIG_MAPPING[untyped].from_pretrained(str(local))
        else:
            config = AutoConfig.from_pretrained(
                str(local) if local.exists() else name,
                trust_remote_code=model.trust_remote_code, revision=model.revision,
            )
    except CONFIG_ERRORS as err:
        raise _unreadable_config(name, local.exists(), err) from None
    if local.is_dir():
        check_weights(local)
    return config


def _untyped_family(folder: Path) -> str | None:
    """The model type of a config.json that names none (older uploads, e.g. bert-tiny), read off its
    `architectures`; None when it names one. transformers would otherwise guess from the folder's name."""
    try:
        fields = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # AutoConfig says what is wrong with the file
    if not isinstance(fields, dict) or fields.get("model_type"):
        return None
    architectures = fields.get("architectures") or []
    found = next((t for a in architectures if (t := _model_type_of_class(a))), None)
    if found is None:
        said = f" and its architectures ({', '.join(architectures)}) name no family transformers knows" \
            if architectures else " and no architectures"
        raise UserError(f"model.name_or_path: {folder / 'config.json'} has no model_type{said}; add the family's "
                        f"name to it, e.g. \"model_type\": \"bert\" (t5, bart, marian, gpt2, llama, ...)")
    log.info(f"{folder / 'config.json'} names no model_type; read as {found} (its architectures: "
             f"{', '.join(architectures)})")
    return found


def _model_type_of_class(class_name: str) -> str | None:
    from transformers.models.auto import modeling_auto

    for mapping_name in dir(modeling_auto):
        mapping = getattr(modeling_auto, mapping_name)
        if mapping_name.startswith("MODEL_") and mapping_name.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            for model_type, classes in mapping.items():
                if class_name == classes or (isinstance(classes, (list, tuple)) and class_name in classes):
                    return model_type
    return None


def _unreadable_config(name: str, is_local: bool, err: Exception) -> UserError:
    if "trust_remote_code" in str(err):
        return UserError(
            f"model.name_or_path: {name} ships its own model code (auto_map in its config.json); set "
            f"model.trust_remote_code=true to run that code, if you trust where it came from"
        )
    if is_local:
        return UserError(f"model.name_or_path: cannot read the config in {name}: {_reason(err)}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return UserError(
        f"model.name_or_path: '{name}' is not a local directory and cannot be fetched from the "
        f"Hugging Face Hub ({_first_line(err)}); give the path of a saved model directory, "
        f"or model.config for a scratch model"
        + ("" if offline else "; without a network, set HF_HUB_OFFLINE=1 to use the Hub cache without waiting")
    )


# The files from_pretrained looks for in a local folder, in the order it prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights(folder: Path) -> None:
    """An empty, truncated or half-copied model folder is bad input now, not a traceback once the
    run has started writing. Reads file headers only."""
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise UserError(f"model.name_or_path: {folder} holds no weights (none of {', '.join(WEIGHT_FILES)})")
    for weights in _shards(found) if found.name.endswith(".index.json") else [found]:
        problem = weights_problem(weights)
        if problem:
            raise UserError(f"model.name_or_path: {weights} {problem}")


def _shards(index: Path) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"model.name_or_path: {index} is not a readable shard index ({_reason(err)})") from None
    if not names:
        raise UserError(f"model.name_or_path: {index} names no shards")
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"model.name_or_path: {index} names shards that are not there: {listed}")
    return [index.parent / name for name in names]


def weights_problem(path: Path) -> str | None:
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    if path.suffix != ".safetensors":
        return None  # a pickle has no header to check; non-empty is all we can say cheaply
    expected = _safetensors_size(path)
    if expected is None:
        return "is not a safetensors file (its header cannot be read)"
    if expected > size:
        return f"is truncated: the file has {size} bytes, its header needs at least {expected}"
    if expected < size:
        return f"is damaged: {size - expected} bytes follow the data its header describes"
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except (SafetensorError, OSError) as err:  # overlapping offsets, bad dtypes and the like
        return f"is not a readable safetensors file ({_reason(err)})"


MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit


def _safetensors_size(path: Path) -> int | None:
    """The file size a safetensors header promises: 8 length bytes, the JSON header, the data."""
    try:
        with path.open("rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if header_length > MAX_SAFETENSORS_HEADER:
                return None  # not a safetensors file at all
            if 8 + header_length > path.stat().st_size:
                return 8 + header_length  # cut inside the header: the data alone would make it longer
            header = json.loads(file.read(header_length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return 8 + header_length + max(ends, default=0)


# Config fields that count something; a value below 1 fails only deep inside model code.
SIZE_FIELD = re.compile(r"size|dim|layer|head|vocab|position|^d_|^n_")
# Layer counts past any published model; the check below builds every layer (on the meta device, ~1 ms each).
LAYER_COUNT = re.compile(r"^(num_.*layers|n_layers?|.*_layers)$")
MAX_LAYERS = 1024


def scratch_config(fields: dict[str, Any]) -> PretrainedConfig:
    fields = dict(fields)
    model_type = fields.pop("model_type")
    default = _default_config(model_type)
    _reject_unknown_fields(model_type, default, fields)
    _reject_impossible_values(default, fields)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except CONFIG_ERRORS as err:
        raise UserError(f"model.config: {_reason(err)}") from None
    check_buildable(config)
    return config


def _default_config(model_type: Any) -> PretrainedConfig:
    try:
        return AutoConfig.for_model(model_type)
    except CONFIG_ERRORS:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        hint = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING_NAMES), n=1, cutoff=0.5)
        raise UserError(
            f"model.config.model_type: unknown model type '{model_type}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        ) from None


def _reject_unknown_fields(model_type: str, default: PretrainedConfig, fields: dict[str, Any]) -> None:
    # transformers accepts any keyword silently; a typo here would quietly build another model.
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    unknown = [k for k in fields if k not in known]
    if unknown:
        hints = [difflib.get_close_matches(k, sorted(known), n=1) for k in unknown]
        described = [f"'model.config.{k}'" + (f" (did you mean 'model.config.{h[0]}'?)" if h else "") for k, h in zip(unknown, hints)]
        raise UserError(f"unknown {model_type} config field {', '.join(described)}")


def _reject_impossible_values(default: PretrainedConfig, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"model.config.{key}: must be a finite number, not {value}")
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if value <= 0 and _counts_something(default, key):
            raise UserError(f"model.config.{key}: must be at least 1, not {value}")
        if value > MAX_LAYERS and LAYER_COUNT.match(key):
            raise UserError(f"model.config.{key}: at most {MAX_LAYERS} layers, not {value}")


def _counts_something(default: PretrainedConfig, key: str) -> bool:
    fallback = getattr(default, key, None)
    sentinel = isinstance(fallback, int) and fallback <= 0  # e.g. -1 for "off", as the family's own default
    return bool(SIZE_FIELD.search(key)) and not sentinel


def check_buildable(config: PretrainedConfig) -> None:
    """Build the model on the meta device (no memory, no weights): a width that the head count does not
    divide, an unknown activation and the like fail here, before anything is written."""
    import torch
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    heads, groups = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(groups, int) and groups > 0 and heads % groups:
        # builds fine, then fails in the first forward pass
        raise UserError(f"model.config: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({groups})")
    if config.model_type not in MODEL_MAPPING_NAMES:
        return
    try:
        with torch.device("meta"):
            transformers.AutoModel.from_config(copy.deepcopy(config))
    except Exception as err:  # noqa: BLE001 - model code raises any type for a config it cannot build
        raise UserError(f"model.config: cannot build a {config.model_type} model from these fields: {_reason(err)}") from None


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
        what = ("data.max_source_length" if not max_target_length else
                "data.max_source_length + data.max_target_length" if family == DECODER_ONLY else
                "data.max_source_length/max_target_length")
        raise UserError(f"{what} = {needed} exceeds the model's {limit} positions")


def check_vocabulary(explicit: dict[str, Any] | None, tokenizer: Any) -> None:
    """A scratch config's vocabulary (`explicit`: model.config) must hold every token; finetune asks as
    soon as the tokenizer exists, before the run writes anything."""
    if explicit and "vocab_size" in explicit and explicit["vocab_size"] < len(tokenizer):
        raise UserError(f"model.config.vocab_size={explicit['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} "
                        f"tokens; raise it or leave it out (it then follows the tokenizer)")


def align_with_tokenizer(config: PretrainedConfig, tokenizer: Any, explicit: dict[str, Any]) -> PretrainedConfig:
    """A scratch config takes its vocabulary size and special-token ids from the tokenizer."""
    check_vocabulary(explicit, tokenizer)
    updates = {"vocab_size": explicit.get("vocab_size", len(tokenizer))}
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if key not in explicit and getattr(tokenizer, key, None) is not None:
            updates[key] = getattr(tokenizer, key)
    if getattr(config, "is_encoder_decoder", False) and "decoder_start_token_id" not in explicit:
        updates["decoder_start_token_id"] = tokenizer.pad_token_id
    for key, value in updates.items():
        setattr(config, key, value)
    return config


def build_model(model: ModelSection, config: PretrainedConfig, encoding: Encoding, tokenizer: Any,
                load_kwargs: dict[str, Any] | None = None):
    """load_kwargs: extra from_pretrained arguments (a quantized LoRA base)."""
    auto_class = getattr(transformers, encoding.auto_class)
    if model.config is not None:
        built = auto_class.from_config(align_with_tokenizer(config, tokenizer, model.config), **kernel_choices(model))
    else:
        built = auto_class.from_pretrained(
            model.name_or_path, config=config, revision=model.revision, trust_remote_code=model.trust_remote_code,
            **{"dtype": "float32", **kernel_choices(model), **(load_kwargs or {})},
        )
        if built.get_input_embeddings().num_embeddings < len(tokenizer):
            built.resize_token_embeddings(len(tokenizer))
    freeze_unsaved(built)
    align_generation(getattr(built, "generation_config", None), tokenizer)
    if model.gradient_checkpointing:
        built.gradient_checkpointing_enable()
    return built


def freeze_unsaved(model: Any) -> list[str]:
    """Parameters the architecture leaves out of save_pretrained (`_keys_to_ignore_on_save`, e.g. Marian's
    sinusoidal positions, recomputed on load) stay as loaded: trained, the saved model would not be the
    evaluated one. A model built from its config freezes them itself; from_pretrained leaves them trainable."""
    unsaved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    frozen = [name for name, parameter in model.named_parameters() if name in unsaved and parameter.requires_grad]
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    if frozen:
        log.info(f"frozen {', '.join(frozen)}: {type(model).__name__} does not save them (they are recomputed "
                 f"on load), so they stay as loaded")
    return frozen


def align_generation(generation: Any, tokenizer: Any) -> None:
    """The generation config saved with the model names the saved tokenizer's special tokens: it pads as the
    tokenizer pads, and stops at the tokenizer's eos (which ends every training target)."""
    if generation is None:
        return
    changes = []  # logged where the checkpoint said otherwise (unset values are filled in silently)
    pad, eos, bos = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    if pad is not None and generation.pad_token_id != pad:
        if generation.pad_token_id is not None:
            changes.append(f"pad_token_id {generation.pad_token_id} -> {pad} ({tokenizer.pad_token})")
        generation.pad_token_id = pad
    stops = generation.eos_token_id
    stops = [] if stops is None else list(stops) if isinstance(stops, (list, tuple)) else [stops]
    if eos is not None and eos not in stops:
        changes.append(f"eos_token_id {generation.eos_token_id} -> {[*stops, eos] if stops else eos}")
        generation.eos_token_id = [*stops, eos] if stops else eos
    if bos is not None and generation.bos_token_id not in (None, bos):
        changes.append(f"bos_token_id {generation.bos_token_id} -> {bos}")
        generation.bos_token_id = bos
    if changes:
        log.info(f"generation config set to the tokenizer's tokens: {'; '.join(changes)}")


def kernel_choices(model: ModelSection) -> dict[str, Any]:
    """model.dtype and model.attn_implementation, as from_pretrained / from_config take them; unset,
    transformers decides the attention kernel and the weights load in float32 (hftk's bit-exact default;
    a bf16 checkpoint would otherwise train in bf16 without asking)."""
    choices: dict[str, Any] = {}
    if model.dtype is not None:
        choices["dtype"] = model.dtype
    if model.attn_implementation is not None:
        choices["attn_implementation"] = model.attn_implementation
    return choices


KERNEL_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                  "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def check_kernel(model: ModelSection, config: PretrainedConfig, encoding: Encoding) -> None:
    """An attention kernel the family or this machine cannot run is bad input, found before loading."""
    import importlib.util

    kernel = model.attn_implementation
    if kernel is None or kernel == "eager":
        return
    mapping = getattr(transformers, encoding.auto_class)._model_mapping
    model_class = mapping.get(type(config), None)  # a lazy mapping: get() needs its default
    if model_class is not None and not getattr(model_class, KERNEL_SUPPORT[kernel], False):
        instead = "sdpa or eager" if getattr(model_class, "_supports_sdpa", False) else "eager"
        raise UserError(f"model.attn_implementation: {model_class.__name__} does not support {kernel}; use {instead}")
    if kernel.startswith("flash_attention"):
        package = "flash_attn_interface" if kernel == "flash_attention_3" else "flash_attn"
        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec(package) is None:
            raise UserError(f"model.attn_implementation: {kernel} needs a CUDA GPU and the {package} package; "
                            f"use sdpa")


# Decoder-only families whose forward builds its causal mask from position_ids when no attention mask is
# given (transformers' masking_utils), so packed examples never see each other; each is checked by
# tests/unit/test_packing.py. Others (OPT derives positions from the attention mask, BLOOM's ALiBi
# ignores position ids) would let them.
PACKING_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")
# Encoder-decoder families whose masks and positions hftk.train.packed_forward routes (T5's relative bias
# needs no positions; BART's learned and Marian's sinusoidal tables get each example's own), each checked
# by tests/unit/test_packing_seq2seq.py.
SEQ2SEQ_PACKING_FAMILIES = ("t5", "bart", "marian")
# The kernels that take that mask. transformers' flash-attention path finds packed examples only in a
# single flattened row, and hftk packs several rows per batch.
PACKING_KERNELS = (None, "eager", "sdpa")


def check_packing(model: ModelSection, config: PretrainedConfig, family: str) -> None:
    """train.packing on a model that would let packed examples attend to each other is bad input."""
    if family == ENCODER_DECODER:
        why = "packed examples are kept apart by block-diagonal masks and per-example positions that hftk routes in"
        supported, verb = SEQ2SEQ_PACKING_FAMILIES, "take"
    elif family == DECODER_ONLY:
        why = "packed examples are kept apart only by a decoder-only model's causal mask built from position ids"
        supported, verb = PACKING_FAMILIES, "build"
    else:
        raise UserError(f"train.packing: packing lays several examples in one row of a decoder-only or "
                        f"encoder-decoder model; this {config.model_type} model is {family}; set train.packing=false")
    if config.model_type not in supported:
        raise UserError(f"train.packing: {why}, which {config.model_type} models do not {verb} (packing supports "
                        f"{', '.join(supported)}); set train.packing=false")
    if model.attn_implementation not in PACKING_KERNELS:
        raise UserError(f"train.packing: {why}; model.attn_implementation={model.attn_implementation} does not keep "
                        f"packed rows of a batch apart; use sdpa or eager")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _reason(err: BaseException) -> str:
    """The line that says what is wrong: huggingface_hub's validation errors put it last, after a preamble."""
    if isinstance(err, KeyError):  # e.g. an activation name that transformers does not know
        return f"unknown value {err}"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1] if lines[0].endswith(":") else lines[0]
    return re.sub(r"^[A-Za-z]*(Error|Exception): ", "", last)


def first_size(config: Any, *names: str) -> int:
    """The first of these config fields that is set (families name the same size differently), or 0."""
    return next((int(getattr(config, n)) for n in names if getattr(config, n, None)), 0)
