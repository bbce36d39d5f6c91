"""Tokenizers: loaded from a model directory or Hub id, or trained offline on the training split."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from typing import Any

from hftk.cache import cache_root
from hftk.errors import UserError
from hftk.recipe import ModelSection, TokenizerTraining
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER

# Ids 0..3 are fixed so a scratch encoder-decoder can start decoding from <pad> (T5's convention).
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]


def load_tokenizer(model: ModelSection, config: Any = None) -> Any:
    """`config`: the model's resolved config, for a folder whose config.json does not name its model type."""
    from transformers import AutoTokenizer

    name = (model.tokenizer and model.tokenizer.name_or_path) or model.name_or_path
    extra = {} if config is None or (model.tokenizer and model.tokenizer.name_or_path) else {"config": config}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model.trust_remote_code, revision=model.revision,
                                                  **extra)
    except (OSError, ValueError, ImportError) as err:  # ImportError: a Hub tokenizer needing a missing package
        raise UserError(f"cannot load the tokenizer from '{name}': {str(err).strip().splitlines()[0]}") from None
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        # GPT-2 and Llama tokenizers ship without one; padding is masked out, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def training_key(spec: TokenizerTraining, family: str, data_fingerprint: str) -> str:
    blob = json.dumps({"spec": spec.model_dump(), "family": family, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], spec: TokenizerTraining, family: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if spec.lowercase else [])
    backend.normalizer = normalizers.Sequence(steps)
    # Byte-level, as GPT-2: every byte has a token, so newlines, accents and emoji never become <unk>
    # and decode() gives back the text exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # its bars print blank lines on stdout off a terminal
    backend.train_from_iterator(texts, trainer)
    ids = {tok: backend.token_to_id(tok) for tok in SPECIAL_TOKENS}
    template = None
    if family == ENCODER_DECODER:
        # Like T5: every encoded text ends with </s>.
        template = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])]
        )
    elif family != DECODER_ONLY:
        # Encoders see <s> question </s> context </s>, as RoBERTa does.
        template = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
        )
    # trim_offsets: a token's character span leaves out its leading space (answer spans in QA).
    trim = processors.ByteLevel(trim_offsets=True)
    backend.post_processor = processors.Sequence([trim, template]) if template else trim
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def trained_tokenizer(texts: Iterable[str], spec: TokenizerTraining, family: str, key: str, is_main: bool) -> Any:
    """Train once per (data, settings) and cache; the main process trains, the others load."""
    from transformers import AutoTokenizer

    target = cache_root() / "tokenizers" / key
    if not (target / "tokenizer.json").is_file():
        if not is_main:
            raise RuntimeError(f"tokenizer cache {target} missing; the main process should have trained it first")
        tmp = target.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer(texts, spec, family).save_pretrained(tmp)
        if target.exists():  # another run trained the same tokenizer meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    return AutoTokenizer.from_pretrained(str(target))
