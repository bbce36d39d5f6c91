"""Several sources and streams, without training: the mixture's draws, the recipe's rules, the checks of
every source's rows (exit 2, one line naming the source), a stream's judged head, file digests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hftk.errors import UserError
from hftk.recipe import validate_recipe
from hftk.train.mixing import MixtureSampler, examples_by_source, quotas
from tests.conftest import ROOT, run_hftk, tiny_recipe, write_recipe


def test_quotas_add_up_and_follow_the_weights():
    assert quotas([0.75, 0.25], 64) == [48, 16]
    assert quotas([1, 1, 1], 10) == [4, 3, 3]
    assert sum(quotas([0.2, 0.3, 0.5], 101)) == 101


def test_an_epoch_draws_each_source_its_share_exactly_and_every_stretch_within_two():
    sampler = MixtureSampler([32, 32], [0.75, 0.25], seed=3)
    order = np.array(list(sampler))
    source = sampler.source_of(order)
    assert len(order) == 64 and np.bincount(source).tolist() == [48, 16]
    for length in range(1, 65):  # any number of steps taken holds each source close to its share
        assert abs((source[:length] == 0).sum() - 0.75 * length) <= 2, length


def test_a_source_that_runs_out_repeats_only_after_all_of_it_was_drawn():
    sampler = MixtureSampler([10, 30], [0.5, 0.5], seed=0)  # source 0 gets 20 draws of its 10 examples
    first = [int(i) for i in sampler.order(0) if i < 10]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    # source 1 (30 examples, 20 draws an epoch) continues in the next epoch where this one stopped
    second = [int(i) - 10 for e in (0, 1) for i in sampler.order(e) if i >= 10]
    assert sorted(second[:30]) == list(range(30))


def test_the_order_is_a_function_of_seed_and_epoch():
    a, b = MixtureSampler([20, 5], [1, 3], seed=7), MixtureSampler([20, 5], [1, 3], seed=7)
    assert (a.order(2) == b.order(2)).all()
    assert not (a.order(0) == a.order(1)).all()
    assert not (a.order(0) == MixtureSampler([20, 5], [1, 3], seed=8).order(0)).all()


def test_examples_by_source_counts_finished_epochs_and_the_consumed_part_of_this_one():
    sampler = MixtureSampler([32, 32], [0.75, 0.25], seed=1)
    assert examples_by_source(["a", "b"], [32, 32], sampler, 2, 0, 8) == {"a": 96, "b": 32}
    part = examples_by_source(["a", "b"], [32, 32], sampler, 1, 3, 8)  # 24 examples into epoch 1
    head = sampler.source_of(sampler.order(1)[:24])
    assert part == {"a": 48 + int((head == 0).sum()), "b": 16 + int((head == 1).sum())}
    assert examples_by_source(["only"], [50], None, 1, 2, 8) == {"only": 66}


def _sources(tmp_path, wiki_rows=None):
    """news in the recipe's columns, wiki in its own (article / highlights / uid)."""
    rows = [json.loads(line) for line in (ROOT / "data/summarize/train.jsonl").read_text().splitlines()[:40]]
    news, wiki = tmp_path / "news.jsonl", tmp_path / "wiki.jsonl"
    news.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    wiki_rows = wiki_rows or [{"uid": r["id"], "article": r["document"], "highlights": r["summary"]} for r in rows[20:]]
    wiki.write_text("".join(json.dumps(r) + "\n" for r in wiki_rows))
    return [{"path": str(news), "weight": 0.75},
            {"path": str(wiki), "weight": 0.25, "source_column": "article", "target_column": "highlights",
             "id_column": "uid"}]


def test_validate_checks_every_source_under_its_own_columns(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data={"train": _sources(tmp_path)}))
    ok = run_hftk("validate", str(path), "--no-cache")
    assert ok.returncode == 0, ok.stderr
    assert "train: 40 rows" in ok.stdout


def test_a_bad_row_in_the_second_source_is_exit_2_naming_it(tmp_path):
    rows = [{"uid": i, "article": "some text", "highlights": "short"} for i in range(5)]
    rows[3]["highlights"] = None
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data={"train": _sources(tmp_path, rows)}))
    result = run_hftk("validate", str(path), "--no-cache")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hftk: error: data.train.1 ('wiki'): 1 of 5 rows are bad"), lines
    assert "'highlights' is missing or null" in lines[0]


def test_a_missing_column_in_one_source_names_that_source(tmp_path):
    sources = _sources(tmp_path)
    sources[1]["source_column"] = "body"
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data={"train": sources}))
    result = run_hftk("validate", str(path), "--no-cache")
    assert result.returncode == 2 and "data.train.1 ('wiki'): missing column 'body'" in result.stderr


@pytest.mark.parametrize(("data", "train", "message"), [
    ({"train": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]}, {}, "give every source a weight"),
    ({"train": [{"path": "x/a.jsonl"}, {"path": "y/a.jsonl"}]}, {}, "several sources are labelled 'a'"),
    ({"train": "a.jsonl", "validation": [{"path": "v.jsonl", "weight": 2}]}, {}, "leave it out of data.validation"),
    ({"train": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 1}]}, {"group_by_length": True},
     "would undo the sources' weights"),
    ({"train": "a.jsonl", "streaming": True}, {"max_steps": None}, "data.streaming needs train.max_steps"),
    ({"train": [{"path": "a.jsonl", "sorce_column": "x"}]}, {}, "did you mean 'data.train.0.source_column'"),
])
def test_recipe_rules_for_sources(tmp_path, data, train, message):
    recipe = tiny_recipe(tmp_path, data=data, train=train)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_recipe(recipe)


def test_a_single_source_recipe_reads_as_before(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path))
    assert recipe.to_dict()["data"]["train"] == {"path": str(ROOT / "data/summarize/train.jsonl")}
    assert [s.default_label() for s in recipe.data.sources("train")] == ["train"]


def test_a_malformed_csv_carries_the_parsers_detail_on_hftks_line(tmp_path):
    bad = tmp_path / "rows.csv"
    bad.write_text("document,summary\n" + "".join(f"text {i},sum {i}\n" for i in range(5)) + "a,b,c\n")
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data={"train": str(bad), "validation": None}))
    result = run_hftk("validate", str(path), "--no-cache")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"hftk: error: data.train: cannot read {bad}: line 7: expected 2 fields, saw 3"], lines


def _stream_file(tmp_path, bad_at):
    rows = [json.loads(line) for line in (ROOT / "data/summarize/train.jsonl").read_text().splitlines()[:80]]
    rows[bad_at]["summary"] = None
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("bad_at", "status"), [(10, 2), (60, 0)])
def test_validate_judges_the_first_rows_of_a_stream(tmp_path, bad_at, status):
    data = {"train": str(_stream_file(tmp_path, bad_at)), "streaming": True, "stream_check_rows": 50}
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data=data))
    result = run_hftk("validate", str(path), "--no-cache")
    assert result.returncode == status, result.stderr
    if status:
        assert result.stderr.strip().splitlines() == [
            ("hftk: error: data.train: 1 of 50 rows are bad; first at row 10: 'summary' is missing or null "
             "(set data.drop_bad_rows=true to skip them)")]
    else:
        assert "train: a stream, its first 50 rows judged" in result.stdout


def test_a_files_digest_is_remembered_by_its_identity(tmp_path):
    import os

    from hftk.file_digest import file_sha256

    path = tmp_path / "rows.jsonl"
    path.write_text("abc\n")
    first = file_sha256(path)
    stat = path.stat()
    path.write_text("xyz\n")  # same size; the time put back: the remembered digest answers unread
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path) == first
    path.write_text("xyz!\n")  # another size: read again
    assert file_sha256(path) != first


def test_translation_sources_in_other_shapes_map_onto_the_recipes_pairs(tmp_path):
    from hftk import sources
    from hftk.recipe import DataSection
    from hftk.tasks import get_task

    wmt = tmp_path / "wmt.jsonl"
    wmt.write_text(json.dumps({"translation": {"en": "a cat", "fr": "un chat"}}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"english": "a dog", "french": "un chien"}) + "\n")
    swapped = tmp_path / "swapped.jsonl"  # fr -> en pairs, read the other way round
    swapped.write_text(json.dumps({"pair": {"fr": "un oiseau", "en": "a bird"}}) + "\n")
    section = DataSection(source_lang="en", target_lang="fr", train=[
        {"path": str(wmt)}, {"path": str(plain), "source_column": "english", "target_column": "french"},
        {"path": str(swapped), "translation_column": "pair"}])
    split = sources.load_checked(get_task("translation"), section, ["train"])["train"]
    assert split.rows["translation"] == [{"en": "a cat", "fr": "un chat"}, {"en": "a dog", "fr": "un chien"},
                                         {"en": "a bird", "fr": "un oiseau"}]
    assert [label for label, _, _ in split.row_ranges()] == ["wmt", "plain", "swapped"]
