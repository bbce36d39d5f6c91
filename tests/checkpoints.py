"""Local checkpoint folders laid out as the Hub's are, for tests that cannot download.

Each folder holds the tokenizer files in the format the real checkpoint ships (a SentencePiece model
trained here for T5, Marian and Llama; byte-level BPE vocab.json + merges.txt for GPT-2 and BART;
a WordPiece vocab.txt for BERT), tokenizer_config.json, special_tokens_map.json, generation_config.json,
and the real model's config.json shrunk to 2 layers and small widths, with random weights written by
save_pretrained. "old" folders have no tokenizer.json (older Hub uploads); "new" folders add the
tokenizer.json that transformers converts the same files to.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# The same conversation format with the assistant's reply in a generation block (assistant-only loss,
# as transformers' return_assistant_tokens_mask reads it).
LLAMA2_GENERATION_TEMPLATE = LLAMA2_CHAT_TEMPLATE.replace(
    "{{ ' '  + content.strip() + ' ' + eos_token }}",
    "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}")


def corpus() -> list[str]:
    """Every text of the bundled data, for training the tokenizers."""
    texts: list[str] = []
    for name in ("summarize", "translate", "qa", "dialogue"):
        for line in (ROOT / "data" / name / "train.jsonl").read_text().splitlines()[:1500]:
            row = json.loads(line)
            if "translation" in row:
                texts.extend(row["translation"].values())
            elif "messages" in row:
                texts.extend(m["content"] for m in row["messages"])
            else:
                texts.extend(str(row[k]) for k in ("document", "summary", "context", "question") if k in row)
    return texts


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _sentencepiece(texts: list[str], vocab_size: int, **options: Any) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
                                   minloglevel=2, **options)
    return model.getvalue()


def _byte_level_bpe(texts: list[str], vocab_size: int, special: list[str]) -> tuple[dict[str, int], list[str]]:
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=special,
                                show_progress=False)
    model = json.loads(trainer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def _save_model(folder: Path, config: dict[str, Any], model_class: str, generation: dict[str, Any] | None,
                seed: int = 0) -> None:
    """Random weights for the shrunk config, then config.json as the Hub has it (save_pretrained's own
    rewrite would add fields the real file does not have)."""
    import torch
    import transformers

    fields = {k: v for k, v in config.items() if k not in ("architectures",)}
    model_type = fields.pop("model_type")
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(transformers.AutoConfig.for_model(model_type, **fields))
    with torch.no_grad():  # weights of a trained model's size (1/sqrt(width)), so what it writes depends on its input
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    _write_json(folder / "config.json", config)
    (folder / "generation_config.json").unlink(missing_ok=True)
    if generation is not None:
        _write_json(folder / "generation_config.json", generation)


def new_layout(old: Path, folder: Path) -> Path:
    """The same checkpoint plus the tokenizer.json transformers converts its files to (newer uploads)."""
    from transformers import AutoTokenizer

    shutil.copytree(old, folder)
    converted = folder.parent / f".{folder.name}.converted"
    AutoTokenizer.from_pretrained(old).save_pretrained(converted)
    shutil.copy(converted / "tokenizer.json", folder / "tokenizer.json")
    shutil.rmtree(converted)
    return folder


def with_chat_template(old: Path, folder: Path, template: str | None) -> Path:
    """The same checkpoint with another chat template in tokenizer_config.json (None: none at all)."""
    shutil.copytree(old, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    if template is not None:
        settings["chat_template"] = template
    _write_json(folder / "tokenizer_config.json", settings)
    return folder


def t5(folder: Path, texts: list[str]) -> Path:
    """t5-small: spiece.model (unigram; pad 0, eos 1, unk 2, no bos), 100 sentinels, its task prefixes."""
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(_sentencepiece(
        texts, 400, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>"))
    sentinels = [f"<extra_id_{i}>" for i in range(100)]
    _write_json(folder / "special_tokens_map.json", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                                                     "additional_special_tokens": sentinels})
    _write_json(folder / "tokenizer_config.json", {"model_max_length": 512, "extra_ids": 100,
                                                   "tokenizer_class": "T5Tokenizer"})
    prefixes = {"summarization": {"early_stopping": True, "length_penalty": 2.0, "max_length": 200, "min_length": 30,
                                  "no_repeat_ngram_size": 3, "num_beams": 4, "prefix": "summarize: "},
                "translation_en_to_de": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                                         "prefix": "translate English to German: "},
                "translation_en_to_fr": {"early_stopping": True, "max_length": 300, "num_beams": 4,
                                         "prefix": "translate English to French: "}}
    config = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 64, "d_kv": 8, "d_model": 32,
              "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
              "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
              "num_heads": 4, "num_layers": 2, "output_past": True, "pad_token_id": 0,
              "relative_attention_num_buckets": 32, "task_specific_params": prefixes, "vocab_size": 512}
    _save_model(folder, config, "T5ForConditionalGeneration",
                {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0})
    return folder


def marian(folder: Path, texts: list[str]) -> Path:
    """opus-mt-tc-big-fr-en: source.spm and target.spm, a shared vocab.json (</s> 0, <unk> 1, <pad> last),
    sinusoidal positions that save_pretrained leaves out. Marian has no tokenizer.json on the Hub."""
    import sentencepiece as spm

    folder.mkdir(parents=True)
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(_sentencepiece(texts, 400, model_type="unigram"))
    processor = spm.SentencePieceProcessor(model_file=str(folder / "source.spm"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        if piece not in vocab and piece not in ("<s>",):
            vocab[piece] = len(vocab)
    vocab["<pad>"] = len(vocab)
    pad = vocab["<pad>"]
    _write_json(folder / "vocab.json", vocab)
    _write_json(folder / "special_tokens_map.json", {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    _write_json(folder / "tokenizer_config.json", {"source_lang": "fr", "target_lang": "en", "separate_vocabs": False,
                                                   "model_max_length": 512, "tokenizer_class": "MarianTokenizer",
                                                   "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    config = {"activation_dropout": 0.0, "activation_function": "relu", "architectures": ["MarianMTModel"],
              "attention_dropout": 0.0, "bad_words_ids": [[pad]], "bos_token_id": 0, "d_model": 32,
              "decoder_attention_heads": 4, "decoder_ffn_dim": 64, "decoder_layers": 2, "decoder_start_token_id": pad,
              "decoder_vocab_size": len(vocab), "dropout": 0.1, "encoder_attention_heads": 4, "encoder_ffn_dim": 64,
              "encoder_layers": 2, "eos_token_id": 0, "forced_eos_token_id": 0, "init_std": 0.02,
              "is_encoder_decoder": True, "max_position_embeddings": 128, "model_type": "marian",
              "normalize_embedding": False, "pad_token_id": pad, "scale_embedding": True,
              "share_encoder_decoder_embeddings": True, "static_position_embeddings": True, "use_cache": True,
              "vocab_size": len(vocab)}
    _save_model(folder, config, "MarianMTModel",
                {"bad_words_ids": [[pad]], "bos_token_id": 0, "decoder_start_token_id": pad, "eos_token_id": 0,
                 "forced_eos_token_id": 0, "max_length": 512, "num_beams": 4, "pad_token_id": pad})
    return folder


def bart(folder: Path, texts: list[str]) -> Path:
    """facebook/bart-base: byte-level BPE vocab.json + merges.txt (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last)."""
    folder.mkdir(parents=True)
    vocab, merges = _byte_level_bpe(texts, 600, ["<s>", "<pad>", "</s>", "<unk>"])
    vocab["<mask>"] = len(vocab)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                     "sep_token": "</s>", "pad_token": "<pad>", "cls_token": "<s>",
                                                     "mask_token": "<mask>"})
    _write_json(folder / "tokenizer_config.json", {"model_max_length": 1024, "tokenizer_class": "BartTokenizer"})
    config = {"activation_function": "gelu", "architectures": ["BartModel"], "bos_token_id": 0, "d_model": 32,
              "decoder_attention_heads": 4, "decoder_ffn_dim": 64, "decoder_layers": 2, "decoder_start_token_id": 2,
              "dropout": 0.1, "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "encoder_layers": 2,
              "eos_token_id": 2, "forced_bos_token_id": 0, "forced_eos_token_id": 2, "is_encoder_decoder": True,
              "max_position_embeddings": 128, "model_type": "bart", "no_repeat_ngram_size": 3, "num_beams": 4,
              "pad_token_id": 1, "scale_embedding": False,
              "task_specific_params": {"summarization": {"length_penalty": 1.0, "max_length": 128, "min_length": 12,
                                                         "num_beams": 4}},
              "vocab_size": len(vocab)}
    _save_model(folder, config, "BartForConditionalGeneration",
                {"bos_token_id": 0, "decoder_start_token_id": 2, "early_stopping": True, "eos_token_id": 2,
                 "forced_bos_token_id": 0, "forced_eos_token_id": 2, "no_repeat_ngram_size": 3, "num_beams": 4,
                 "pad_token_id": 1})
    return folder


def gpt2(folder: Path, texts: list[str]) -> Path:
    """gpt2: byte-level BPE vocab.json + merges.txt, <|endoftext|> last (bos = eos = unk), no pad token."""
    folder.mkdir(parents=True)
    vocab, merges = _byte_level_bpe(texts, 600, ["<|endoftext|>"])
    vocab = {token: i for i, token in enumerate([t for t in sorted(vocab, key=vocab.get) if t != "<|endoftext|>"])}
    vocab["<|endoftext|>"] = len(vocab)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_json(folder / "tokenizer_config.json", {"model_max_length": 1024})
    eos = vocab["<|endoftext|>"]
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
              "bos_token_id": eos, "embd_pdrop": 0.1, "eos_token_id": eos, "initializer_range": 0.02,
              "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 128, "n_embd": 32, "n_head": 4,
              "n_layer": 2, "n_positions": 128, "resid_pdrop": 0.1,
              "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
              "vocab_size": len(vocab)}
    _save_model(folder, config, "GPT2LMHeadModel", {"bos_token_id": eos, "eos_token_id": eos})
    return folder


def llama(folder: Path, texts: list[str], chat_template: str | None = LLAMA2_CHAT_TEMPLATE) -> Path:
    """Llama-2-chat: tokenizer.model (BPE with byte fallback; <unk> 0, <s> 1, </s> 2), no pad token, its chat
    template in tokenizer_config.json, and generation_config.json with pad 0 and sampling on."""
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(_sentencepiece(
        texts, 500, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False))
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", tokens)
    settings = {"add_bos_token": True, "add_eos_token": False, **tokens, "pad_token": None, "legacy": False,
                "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "LlamaTokenizer",
                "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        settings["chat_template"] = chat_template
    _write_json(folder / "tokenizer_config.json", settings)
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 256,
              "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
              "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
              "torch_dtype": "float16", "use_cache": True, "vocab_size": 512}
    _save_model(folder, config, "LlamaForCausalLM",
                {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
                 "temperature": 0.6, "top_p": 0.9})
    return folder


def bert(folder: Path, texts: list[str]) -> Path:
    """bert-base-uncased: WordPiece vocab.txt ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103 as
    there), lower-casing, weights of a masked-LM head (extractive QA adds its own head)."""
    from tokenizers import BertWordPieceTokenizer

    folder.mkdir(parents=True)
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(texts, vocab_size=600, min_frequency=2, show_progress=False,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    learned = [t for t in sorted(trainer.get_vocab(), key=trainer.get_vocab().get)
               if t not in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + learned
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    _write_json(folder / "tokenizer_config.json", {"do_lower_case": True, "model_max_length": 512})
    config = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 256, "model_type": "bert",
              "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0,
              "position_embedding_type": "absolute", "type_vocab_size": 2, "use_cache": True,
              "vocab_size": len(words)}
    _save_model(folder, config, "BertForMaskedLM", None)
    return folder


FAMILIES = {"t5": t5, "marian": marian, "bart": bart, "gpt2": gpt2, "llama": llama, "bert": bert}


def build(root: Path, name: str, texts: list[str]) -> Path:
    """FAMILY-old (no tokenizer.json), FAMILY-new (the same plus tokenizer.json; not Marian, which has
    none on the Hub), llama-generation (a chat template with generation blocks, new layout) or llama-base
    (no chat template); a folder another one derives from is built first, once."""
    folder = root / name
    if folder.exists():
        return folder
    family, _, variant = name.partition("-")
    if variant == "old":
        return FAMILIES[family](folder, texts)
    if variant == "new" and family != "marian":
        return new_layout(build(root, f"{family}-old", texts), folder)
    if name == "llama-generation":
        return new_layout(with_chat_template(build(root, "llama-old", texts), root / ".llama-generation",
                                             LLAMA2_GENERATION_TEMPLATE), folder)
    if name == "llama-base":
        return with_chat_template(build(root, "llama-old", texts), folder, None)
    raise ValueError(f"no checkpoint named {name}")


NAMES = [*(f"{f}-old" for f in FAMILIES), *(f"{f}-new" for f in FAMILIES if f != "marian"), "llama-generation",
         "llama-base"]
