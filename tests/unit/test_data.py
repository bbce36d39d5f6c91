"""Raw loading and the tokenization cache, with real datasets caches."""

from __future__ import annotations

import json

import pytest

from hftk import data
from hftk.errors import UserError
from hftk.recipe import DataSection, TokenizerTraining
from hftk.tasks import get_task
from hftk.tasks.base import ENCODER_DECODER
from hftk.tokenizer import train_tokenizer


@pytest.fixture()
def files(tmp_path):
    rows = [{"id": str(i), "document": f"Document number {i} is here.", "summary": f"Number {i}."} for i in range(20)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    return tmp_path


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_local_formats_load_and_check(files, suffix):
    section = DataSection(train={"path": str(files / f"rows.{suffix}")})
    splits = data.load_checked(get_task("summarization"), section, ["train"])
    assert len(splits["train"]) == 20 and splits["train"][0]["summary"] == "Number 0."


def test_max_train_samples_selects_the_first_rows(files):
    section = DataSection(train={"path": str(files / "rows.jsonl")}, max_train_samples=5)
    assert len(data.load_checked(get_task("summarization"), section, ["train"])["train"]) == 5


def test_unsupported_extension(files):
    (files / "rows.txt").write_text("hello")
    with pytest.raises(UserError, match="not a .json, .jsonl, .csv or .parquet file"):
        data.load_split(DataSection(train={"path": str(files / "rows.txt")}).train, "train")


def test_tokenized_cache_key_follows_tokenizer_and_lengths(files):
    task = get_task("summarization")
    raw = data.load_checked(task, DataSection(train={"path": str(files / "rows.jsonl")}), ["train"])["train"]
    texts = list(raw["document"]) * 5
    tok_a = train_tokenizer(texts, TokenizerTraining(vocab_size=100, min_frequency=1), ENCODER_DECODER)
    tok_b = train_tokenizer(texts, TokenizerTraining(vocab_size=100, min_frequency=1, lowercase=True), ENCODER_DECODER)

    def cached(tokenizer, length):
        section = DataSection(train={"path": "x.jsonl"}, max_source_length=length)
        return data.tokenize(raw, task, tokenizer, section, ENCODER_DECODER, training=True)

    first = cached(tok_a, 8)
    assert cached(tok_a, 8)._fingerprint == first._fingerprint  # same inputs: the cache is reused
    assert cached(tok_a, 6)._fingerprint != first._fingerprint
    assert cached(tok_b, 8)._fingerprint != first._fingerprint
    assert first.cache_files, "tokenized rows should live in the datasets cache"
    assert max(len(ids) for ids in cached(tok_a, 6)["input_ids"]) == 6


def test_tokenized_cache_key_follows_the_preprocessing_code(files, monkeypatch):
    task = get_task("summarization")
    raw = data.load_checked(task, DataSection(train={"path": str(files / "rows.jsonl")}), ["train"])["train"]
    tokenizer = train_tokenizer(list(raw["document"]) * 5, TokenizerTraining(vocab_size=100, min_frequency=1),
                                ENCODER_DECODER)
    section = DataSection(train={"path": "x.jsonl"})
    before = data.tokenize(raw, task, tokenizer, section, ENCODER_DECODER, training=True)._fingerprint
    monkeypatch.setattr(data, "preprocessing_code_fingerprint", lambda: "another hftk version")
    after = data.tokenize(raw, task, tokenizer, section, ENCODER_DECODER, training=True)._fingerprint
    assert before != after
