"""LoRA through peft: plan the adapter from the config alone, wrap the built model, count what
trains, save the adapter, merge it into its base, and load a saved adapter for evaluation."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hftk.errors import UserError
from hftk.recipe import LoraSection

ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"

# peft's task type for each head hftk trains; AutoPeftModelFor... refuses an adapter saved for another.
PEFT_TASK_TYPES = {
    "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "AutoModelForCausalLM": "CAUSAL_LM",
    "AutoModelForQuestionAnswering": "QUESTION_ANS",
}
PEFT_ADDS_QA_HEAD = ("qa_outputs",)
# Module path parts that mark an attention block, across the families transformers ships.
ATTENTION_MARKERS = ("attn", "attention")


@dataclass(frozen=True)
class AdapterPlan:
    """The adapter's settings with every default resolved against the model's modules."""

    settings: LoraSection
    target_modules: list[str]
    modules_to_save: list[str]
    task_type: str

    def lora_config(self) -> Any:
        from peft import LoraConfig

        s = self.settings
        # peft's question-answering model adds its own head (qa_outputs) to modules_to_save; named here as
        # well, adapter_config.json would list it twice.
        to_save = [m for m in self.modules_to_save if self.task_type != "QUESTION_ANS" or m not in PEFT_ADDS_QA_HEAD]
        return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=self.target_modules,
                          modules_to_save=to_save or None, use_dora=s.use_dora,
                          use_rslora=s.use_rslora, init_lora_weights=s.init_lora_weights, task_type=self.task_type)


def plan_adapter(settings: LoraSection | None, config: Any, auto_class: str) -> AdapterPlan | None:
    """Resolve and check the adapter before any weight loads: the model is built on the meta device."""
    if settings is None:
        return None
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise UserError("lora: training an adapter needs peft (pip install peft)")
    check_quantize(settings.quantize)
    if auto_class not in PEFT_TASK_TYPES:
        raise UserError(f"lora: hftk cannot train an adapter for a {auto_class} head")
    model = _meta_model(config, auto_class)
    names = [name for name, _ in model.named_modules() if name]
    targets = settings.target_modules or default_targets(config.model_type, model)
    _check_present("lora.target_modules", targets, names, config.model_type)
    to_save = settings.modules_to_save if settings.modules_to_save is not None else default_modules_to_save(model, auto_class)
    _check_present("lora.modules_to_save", to_save, names, config.model_type)
    return AdapterPlan(settings, list(targets), list(to_save), PEFT_TASK_TYPES[auto_class])


def check_quantize(quantize: str) -> None:
    if quantize == "none":
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"lora.quantize: {quantize} loads the base through bitsandbytes, which needs a CUDA GPU; "
                        f"none is visible here (set lora.quantize=none)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"lora.quantize: {quantize} needs bitsandbytes (pip install bitsandbytes)") from None


def _meta_model(config: Any, auto_class: str) -> Any:
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(copy.deepcopy(config))


def _matches(key: str, name: str) -> bool:
    return name == key or name.endswith("." + key)  # how peft matches a list of names


def _check_present(key: str, wanted: list[str], names: list[str], model_type: str) -> None:
    missing = [w for w in wanted if not any(_matches(w, name) for name in names)]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise UserError(f"{key}: a {model_type} model has no module named {', '.join(missing)} "
                        f"(its module names include {', '.join(leaves[:25])})")


def default_targets(model_type: str, model: Any) -> list[str]:
    """peft's choice for the family when the model has those modules, else the projections found
    inside attention blocks (names that also occur outside attention, like BERT's `dense`, are left out)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    names = [name for name, _ in model.named_modules() if name]
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if known and all(any(_matches(k, name) for name in names) for k in known):
        return list(known)
    found = attention_projections(model)
    if not found:
        raise UserError(f"lora.target_modules: no attention projections found in a {model_type} model; "
                        f"name the modules to adapt")
    return found


def attention_projections(model: Any) -> list[str]:
    import torch
    from transformers.pytorch_utils import Conv1D

    inside: dict[str, bool] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            *path, leaf = name.split(".")
            in_attention = any(marker in part.lower() for part in path for marker in ATTENTION_MARKERS)
            inside[leaf] = inside.get(leaf, True) and in_attention
    return sorted(leaf for leaf, always in inside.items() if always)


def default_modules_to_save(model: Any, auto_class: str) -> list[str]:
    """A task head on top of an encoder (extractive QA's qa_outputs) starts untrained on a base that
    lacks it, so it trains in full; language-model heads share the pretrained embeddings and stay frozen."""
    if auto_class != "AutoModelForQuestionAnswering":
        return []
    body = getattr(model, "base_model_prefix", None)
    return [name for name, child in model.named_children()
            if name != body and any(True for _ in child.parameters())]


def quantized_loading(settings: LoraSection | None, device: Any) -> dict[str, Any]:
    """from_pretrained arguments for a QLoRA base: quantized as it loads, straight onto this process's GPU."""
    if settings is None or settings.quantize == "none":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    if settings.quantize == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quantization, "device_map": {"": device}}


def wrap(model: Any, plan: AdapterPlan, gradient_checkpointing: bool) -> Any:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if plan.settings.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    return passing_every_input(get_peft_model(model, plan.lora_config()))


def passing_every_input(model: Any) -> Any:
    """peft's question-answering wrapper names its forward's arguments and leaves token_type_ids out of
    the call to the model: BERT's segment ids would be lost, and the adapter would train and score another
    model than the merged one. Its forward becomes PeftModel's, which passes every input through."""
    from peft import PeftModelForQuestionAnswering

    if type(model) is PeftModelForQuestionAnswering:
        model.__class__ = _question_answering_adapter()
    return model


@functools.cache
def _question_answering_adapter() -> type:
    from peft import PeftModel, PeftModelForQuestionAnswering

    return type("QuestionAnsweringAdapter", (PeftModelForQuestionAnswering,), {"forward": PeftModel.forward})


def count_parameters(model: Any) -> dict[str, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # counts 4-bit weights at their real size
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": int(trainable), "total_parameters": int(total)}


def save_adapter(accelerator: Any, model: Any, state_dict: dict, tokenizer: Any, output_dir: Path) -> None:
    """adapter_config.json and adapter_model.safetensors (adapter and modules_to_save tensors only)."""
    model.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def save_merged(output_dir: Path, base: Any, tokenizer: Any) -> Path:
    """The adapter merged into a freshly loaded full-precision base (whatever strategy or quantization
    trained it), saved where plain transformers loads it."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()
    target = Path(output_dir) / MERGED
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def base_of(folder: str | Path) -> str:
    """The base a saved adapter loads onto, as its adapter_config.json names it."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"--model: cannot read {path}: {err}") from None
    if not base:
        raise UserError(f"--model: {path} does not name its base model (base_model_name_or_path)")
    return base


def load_adapter(folder: str | Path, base: Any) -> Any:
    from peft import PeftModel

    return passing_every_input(PeftModel.from_pretrained(base, str(folder)))
