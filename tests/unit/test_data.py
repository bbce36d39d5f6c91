"""Raw loading and the tokenization cache, with real datasets caches."""

from __future__ import annotations

import json

import datasets
import pytest

from hftk import data
from hftk.errors import UserError
from hftk.recipe import DataSection, TokenizerTraining
from hftk.tasks import get_task
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER
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


# --- every row checked ---------------------------------------------------------------------------

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _summaries(count=200):
    return [{"id": str(i), "document": f"Document number {i} is here.", "summary": f"Number {i}."}
            for i in range(count)]


def test_a_bad_row_past_the_first_hundred_is_found(tmp_path):
    rows = _summaries()
    rows[150]["summary"] = None
    rows[180]["document"] = 7
    section = DataSection(train={"path": str(_jsonl(tmp_path / "rows.jsonl", rows))})
    with pytest.raises(UserError) as caught:
        data.load_checked(get_task("summarization"), section, ["train"])
    assert str(caught.value) == ("data.train: 2 of 200 rows are bad; first at row 150: 'summary' is missing or null "
                                 "(set data.drop_bad_rows=true to skip them)")


def test_drop_bad_rows_keeps_the_good_ones_and_logs(tmp_path, caplog):
    rows = _summaries()
    rows[120]["summary"] = ["not", "text"]
    section = DataSection(train={"path": str(_jsonl(tmp_path / "rows.jsonl", rows))}, drop_bad_rows=True)
    caplog.set_level("INFO", logger="hftk")
    train = data.load_checked(get_task("summarization"), section, ["train"])["train"]
    assert len(train) == 199 and "119" in train["id"] and "120" not in train["id"]
    assert "data.train: dropped 1 bad rows of 200 (first at row 120: column 'summary' must hold text" in caplog.text


def test_every_row_bad_is_refused_even_when_dropping(tmp_path):
    rows = [dict(r, summary=None) for r in _summaries(5)]
    section = DataSection(train={"path": str(_jsonl(tmp_path / "rows.jsonl", rows))}, drop_bad_rows=True)
    with pytest.raises(UserError, match="5 of 5 rows are bad; first at row 0: .* would leave no row"):
        data.load_checked(get_task("summarization"), section, ["train"])


def test_a_split_with_only_blank_sources_is_refused(tmp_path):
    rows = [dict(r, document=" ") for r in _summaries(5)]
    section = DataSection(train={"path": str(_jsonl(tmp_path / "rows.jsonl", rows))})
    with pytest.raises(UserError, match=r"every 'document' is empty or blank \(5 rows\)"):
        data.load_checked(get_task("summarization"), section, ["train"])


def test_csv_missing_cells_are_bad_rows(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(_summaries())
    frame.loc[140, "summary"] = None
    frame.to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(UserError, match="first at row 140: 'summary' is missing or null"):
        data.load_checked(get_task("summarization"), DataSection(train={"path": str(tmp_path / "rows.csv")}), ["train"])


def test_mixed_types_in_a_large_json_lines_file_are_named(tmp_path):
    """Past datasets' first 10 MB chunk, a column mixing text and numbers would load as JSON text."""
    long_text = "word " * 1000
    rows = [{"document": long_text, "summary": f"Number {i}."} for i in range(2300)]
    rows[2250]["summary"] = 5
    section = DataSection(train={"path": str(_jsonl(tmp_path / "big.jsonl", rows))})
    assert (tmp_path / "big.jsonl").stat().st_size > 11 << 20
    with pytest.raises(UserError, match="column 'summary' holds text in some rows and numbers"):
        data.load_checked(get_task("summarization"), section, ["train"])


def test_row_check_cache_follows_the_checking_code(files, monkeypatch):
    task = get_task("summarization")
    raw = data.load_split(DataSection(train={"path": str(files / "rows.jsonl")}).train, "train")
    section = DataSection(train={"path": "x.jsonl"})
    before = data.judge_rows(raw, task, section)
    assert data.judge_rows(raw, task, section)._fingerprint == before._fingerprint
    monkeypatch.setattr(data, "preprocessing_code_fingerprint", lambda: "another hftk version")
    assert data.judge_rows(raw, task, section)._fingerprint != before._fingerprint


def test_row_check_runs_on_several_workers(files):
    raw = data.load_split(DataSection(train={"path": str(files / "rows.jsonl")}).train, "train")
    section = DataSection(train={"path": "x.jsonl"}, preprocessing_num_workers=2)
    verdicts = data.judge_rows(raw, get_task("summarization"), section)
    assert verdicts[data.PROBLEM] == [None] * 20 and all(verdicts[data.HAS_SOURCE])


def test_text_too_short_for_one_block_is_refused():
    task = get_task("text_generation")
    raw = datasets.Dataset.from_dict({"text": ["A short line.", "Another one."]})
    tokenizer = train_tokenizer(["A short line.", "Another one."] * 20, TokenizerTraining(vocab_size=100,
                                                                                         min_frequency=1), DECODER_ONLY)
    section = DataSection(train={"path": "x.jsonl"}, max_source_length=64)
    with pytest.raises(UserError, match=r"data.train: its 2 rows tokenize to less than one block of "
                                        r"data.max_source_length=64 tokens"):
        data.tokenize(raw, task, tokenizer, section, DECODER_ONLY, training=True)
    short_blocks = DataSection(train={"path": "x.jsonl"}, max_source_length=4)
    assert len(data.tokenize(raw, task, tokenizer, short_blocks, DECODER_ONLY, training=True)) > 0
