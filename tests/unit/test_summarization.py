"""Summarization preprocessing on literal rows, with a small tokenizer and no model."""

from __future__ import annotations

import pytest

from hftk.recipe import DataSection, TokenizerTraining
from hftk.tasks import get_task
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, IGNORE_INDEX
from hftk.tokenizer import train_tokenizer

ROWS = {"document": ["The mayor of Oslo said the city will open a library.", "Rain fell in Lima."],
        "summary": ["Oslo will open a library.", "Rain in Lima."]}


@pytest.fixture(scope="module")
def tokenizers():
    texts = ROWS["document"] * 20 + ROWS["summary"] * 20
    spec = TokenizerTraining(vocab_size=120, min_frequency=1)
    return {family: train_tokenizer(texts, spec, family) for family in (ENCODER_DECODER, DECODER_ONLY)}


def data(**kwargs) -> DataSection:
    return DataSection(train={"path": "unused.jsonl"}, **kwargs)


def test_encoder_decoder_features(tokenizers):
    tokenizer = tokenizers[ENCODER_DECODER]
    task = get_task("summarization")
    features = task.preprocess(ROWS, tokenizer, data(max_source_length=6, max_target_length=16), ENCODER_DECODER, True)
    assert [len(ids) for ids in features["input_ids"]] == [6, min(6, len(tokenizer(ROWS["document"][1]).input_ids))]
    assert all(ids[-1] == tokenizer.eos_token_id for ids in features["input_ids"])  # truncation keeps </s>
    assert tokenizer.decode(features["labels"][1], skip_special_tokens=True) == "Rain in Lima."


def test_source_prefix_and_default_xsum_columns(tokenizers):
    task = get_task("summarization")
    assert task.columns(data()) == ["document", "summary"]
    assert task.columns(data(source_column="text", target_column="abstract")) == ["text", "abstract"]
    assert task.sources(ROWS, data(source_prefix="summarize: "), ENCODER_DECODER)[1] == "summarize: Rain fell in Lima."


def test_decoder_only_puts_loss_on_the_summary_only(tokenizers):
    tokenizer = tokenizers[DECODER_ONLY]
    task = get_task("summarization")
    features = task.preprocess(ROWS, tokenizer, data(max_source_length=64, max_target_length=16), DECODER_ONLY, False)
    ids, labels, prompt = features["input_ids"][1], features["labels"][1], features["prompt_input_ids"][1]
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[len(prompt):], skip_special_tokens=True).strip() == "Rain in Lima."


def test_collator_pads_dynamically_and_left_pads_prompts(tokenizers):
    tokenizer = tokenizers[DECODER_ONLY]
    task = get_task("summarization")
    features = task.preprocess(ROWS, tokenizer, data(), DECODER_ONLY, False)
    rows = [{k: v[i] for k, v in features.items()} for i in range(2)]
    batch = task.collator(tokenizer, DECODER_ONLY)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (2, longest)  # the longest row, never max_source_length
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    short = int(batch["prompt_attention_mask"].sum(1).argmin())
    assert batch["prompt_attention_mask"][short, 0] == 0 and batch["prompt_attention_mask"][short, -1] == 1
