"""Each task's pre- and post-processing on literal rows, with small tokenizers and no model."""

from __future__ import annotations

import json

import pytest
import torch

from hftk.errors import UserError
from hftk.recipe import DataSection, TokenizerTraining
from hftk.tasks import get_task
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY, EXAMPLE_INDEX, IGNORE_INDEX
from hftk.tasks.dialogue import chat_tokens
from hftk.tasks.extractive_qa import best_answer
from hftk.tasks.squad_schema import flatten_nested_squad, repair_answer_starts
from hftk.tokenizer import train_tokenizer

CONTEXT = ("On Monday, Ana Costa, the mayor of Oslo, spoke to reporters. Ana Costa said the city plans to "
           "open a new library next year. Critics said the timing was poor. Supporters welcomed the move.")
QA = {"id": ["a", "b"], "question": ["Who is the mayor of Oslo?", "Who is the mayor of Lima?"],
      "context": [CONTEXT, CONTEXT],
      "answers": [{"text": ["Ana Costa"], "answer_start": [11]}, {"text": [], "answer_start": []}]}
WMT = {"translation": [{"en": "The red cat.", "fr": "Le chat rouge."}, {"en": "The dog.", "fr": "Le chien."}]}
CHATS = {"messages": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                       {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"},
                       {"role": "assistant", "content": "Santiago."}]]}


@pytest.fixture(scope="module")
def tokenizers():
    texts = [CONTEXT, *QA["question"], "The red cat. Le chat rouge. The dog. Le chien. Capital of Peru? Lima."] * 30
    spec = TokenizerTraining(vocab_size=300, min_frequency=1)
    return {f: train_tokenizer(texts, spec, f) for f in (ENCODER_DECODER, DECODER_ONLY, ENCODER_ONLY)}


def data(**kwargs) -> DataSection:
    return DataSection(**{"train": {"path": "x.jsonl"}, **kwargs})


# --- translation ---------------------------------------------------------------------------------

def test_translation_reads_wmt_rows_and_plain_columns(tokenizers):
    task = get_task("translation")
    section = data(source_lang="en", target_lang="fr")
    assert task.columns(section) == ["translation"]
    assert task.references(WMT, section) == [["Le chat rouge."], ["Le chien."]]
    plain = data(source_column="en_text", target_column="fr_text")
    assert task.columns(plain) == ["en_text", "fr_text"]
    features = task.preprocess(WMT, tokenizers[ENCODER_DECODER], section, ENCODER_DECODER, True)
    assert tokenizers[ENCODER_DECODER].decode(features["labels"][0], skip_special_tokens=True) == "Le chat rouge."


def test_translation_needs_languages_present_in_rows():
    task = get_task("translation")
    with pytest.raises(UserError, match="source_lang and data.target_lang"):
        task.columns(data())
    problems = task.row_problems(WMT, data(source_lang="en", target_lang="de"))
    assert problems[0] == "'translation' has no language 'de' (it has: en, fr)"


def test_translation_prompt_for_decoder_only(tokenizers):
    tok = tokenizers[DECODER_ONLY]
    task = get_task("translation")
    features = task.preprocess(WMT, tok, data(source_lang="en", target_lang="fr"), DECODER_ONLY, False)
    prompt = tok.decode(features["prompt_input_ids"][0], skip_special_tokens=True)
    assert prompt == "Translate English to French:\nThe red cat.\nFrench:"
    target = [t for t in features["labels"][0] if t != IGNORE_INDEX]
    assert tok.decode(target, skip_special_tokens=True) == " Le chat rouge."


# --- generative QA -------------------------------------------------------------------------------

def test_generative_qa_keeps_the_question_whole(tokenizers):
    tok = tokenizers[ENCODER_DECODER]
    task = get_task("generative_qa")
    features = task.preprocess(QA, tok, data(max_source_length=40), ENCODER_DECODER, True)
    source = tok.decode(features["input_ids"][0], skip_special_tokens=True)
    assert source.startswith("question: Who is the mayor of Oslo? context: On")
    assert len(features["input_ids"][0]) <= 40
    assert tok.decode(features["labels"][0], skip_special_tokens=True) == "Ana Costa"
    assert tok.decode(features["labels"][1], skip_special_tokens=True) == ""  # unanswerable: generate nothing
    with pytest.raises(UserError, match="leaves no room for the context"):
        task.preprocess(QA, tok, data(max_source_length=5), ENCODER_DECODER, True)


# --- extractive QA -------------------------------------------------------------------------------

def test_extractive_qa_windows_point_at_the_answer(tokenizers):
    tok = tokenizers[ENCODER_ONLY]
    task = get_task("extractive_qa")
    features = task.preprocess(QA, tok, data(max_source_length=32, doc_stride=8), ENCODER_ONLY, False)
    assert len(features["input_ids"]) > 2, "a long context is split into several windows"
    assert all(len(ids) <= 32 for ids in features["input_ids"])
    answered = [i for i, (s, e) in enumerate(zip(features["start_positions"], features["end_positions"])) if s > 0]
    assert answered and all(features[EXAMPLE_INDEX][i] == 0 for i in answered)
    i = answered[0]
    offsets = features["offsets"][i]
    start, end = features["start_positions"][i], features["end_positions"][i]
    assert CONTEXT[offsets[start][0]:offsets[end][1]] == "Ana Costa"
    unanswerable = [i for i, e in enumerate(features[EXAMPLE_INDEX]) if e == 1]
    assert all(features["start_positions"][i] == 0 for i in unanswerable)


def test_best_answer_and_squad_v2_no_answer():
    offsets = torch.tensor([[-1, -1], [0, 2], [3, 9], [10, 14]])
    logits = torch.full((2, 4), -5.0)
    logits[0, 2], logits[1, 3] = 4.0, 4.0  # span tokens 2..3 -> "Costa Oslo"[3:14]
    context = "On Costa's Oslo"
    assert best_answer(context, [(logits, offsets)]) == context[3:14]
    logits[0, 0], logits[1, 0] = 9.0, 9.0  # the no-answer position now scores higher
    assert best_answer(context, [(logits, offsets)]) == ""
    reversed_span = torch.full((2, 4), -5.0)
    reversed_span[0, 3], reversed_span[1, 1] = 4.0, 4.0
    assert best_answer(context, [(reversed_span, offsets)]) != context[3:14]


def test_answer_start_repair():
    texts, starts, repaired, dropped = repair_answer_starts("the cat and the dog", ["dog", "cow", "cat"], [0, 0, 4])
    assert (texts, starts, repaired, dropped) == (["dog", "cat"], [16, 4], 1, 1)


def test_extractive_qa_repairs_rows_and_reports(caplog):
    import datasets

    rows = {"question": ["q1", "q2", "q3"], "context": ["abc def", "abc def", "abc def"],
            "answers": [{"text": ["def"], "answer_start": [0]}, {"text": ["xyz"], "answer_start": [0]},
                        {"text": [], "answer_start": []}]}
    caplog.set_level("INFO", logger="hftk")
    fixed = get_task("extractive_qa").repair(datasets.Dataset.from_dict(rows), data(), "data.train")
    assert fixed["answers"] == [{"text": ["def"], "answer_start": [4]}, {"text": [], "answer_start": []}]
    assert "data.train: repaired 1 answer_start offsets, dropped 1 answers" in caplog.text


def test_answers_must_have_the_squad_shape():
    bad = dict(QA, answers=[{"text": "Ana Costa", "answer_start": 11}] * 2)
    assert all("SQuAD shape" in p for p in get_task("extractive_qa").row_problems(bad, data()))


def test_nested_squad_file_flattens(tmp_path):
    nested = {"version": "v2.0", "data": [{"title": "News", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q1", "question": "Who?", "answers": [{"text": "Ana Costa", "answer_start": 11}], "is_impossible": False},
        {"id": "q2", "question": "Why?", "answers": [], "plausible_answers": [{"text": "x", "answer_start": 0}],
         "is_impossible": True}]}]}]}
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(nested))
    rows = flatten_nested_squad(path)
    assert rows[0]["answers"] == {"text": ["Ana Costa"], "answer_start": [11]} and rows[0]["title"] == "News"
    assert rows[1]["answers"] == {"text": [], "answer_start": []}
    from hftk import data as data_module

    loaded = data_module.load_split(data(train={"path": str(path)}).train, "train")
    assert loaded.num_rows == 2 and loaded[1]["id"] == "q2"


# --- dialogue ------------------------------------------------------------------------------------

def test_dialogue_loss_only_on_assistant_turns(tokenizers):
    task = get_task("dialogue")
    tok = task.prepare_tokenizer(tokenizers[DECODER_ONLY])
    _, labels = chat_tokens(tok, CHATS["messages"][0], last_turn_only=False)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "Lima.</s>Santiago.</s>"  # no loss on the role lines nor the newline after each eos
    _, last = chat_tokens(tok, CHATS["messages"][0], last_turn_only=True)
    assert tok.decode([t for t in last if t != IGNORE_INDEX]) == "Santiago.</s>"
    features = task.preprocess(CHATS, tok, data(), DECODER_ONLY, False)
    prompt = tok.decode(features["prompt_input_ids"][0])
    assert prompt.startswith("<s><|")  # the fallback template carries BOS
    assert prompt.endswith("<|user|>\nAnd Chile?</s>\n<|assistant|>\n")


def test_dialogue_rows_need_roles():
    task = get_task("dialogue")
    [no_role] = task.row_problems({"messages": [[{"speaker": "user", "content": "hi"}]]}, data())
    assert no_role.startswith("every message needs a role")
    ends_with_user = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]
    [not_last] = task.row_problems({"messages": [ends_with_user]}, data())
    assert "must end with an assistant turn" in not_last


def test_dialogue_encoder_decoder_history(tokenizers):
    tok = tokenizers[ENCODER_DECODER]
    features = get_task("dialogue").preprocess(CHATS, tok, data(), ENCODER_DECODER, True)
    assert tok.decode(features["input_ids"][0], skip_special_tokens=True).endswith("user: And Chile?")
    assert tok.decode(features["labels"][0], skip_special_tokens=True) == "Santiago."


# --- text generation -----------------------------------------------------------------------------

def test_text_blocks_are_whole_and_joined_with_eos(tokenizers):
    tok = tokenizers[DECODER_ONLY]
    rows = {"text": [CONTEXT, "The red cat.", CONTEXT]}
    features = get_task("text_generation").preprocess(rows, tok, data(max_source_length=16), DECODER_ONLY, False)
    assert features["input_ids"] and all(len(b) == 16 for b in features["input_ids"])
    assert features["labels"] == features["input_ids"]
    assert any(tok.eos_token_id in b for b in features["input_ids"])
    assert features[EXAMPLE_INDEX][0] == 0 and features[EXAMPLE_INDEX] == sorted(features[EXAMPLE_INDEX])


# --- row checks ----------------------------------------------------------------------------------

GOOD_CHAT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
GOOD_ANSWERS = {"text": ["Ana"], "answer_start": [0]}

# task, recipe data keys, rows (one column dict), the problem of each row (None: good)
ROW_CASES = {
    "summarization": ("summarization", {}, {"document": ["a doc", None, "a doc", 3, "a doc"],
                                            "summary": ["a sum", "a sum", None, "a sum", ["a", "list"]]},
                      [None, "'document' is missing or null", "'summary' is missing or null",
                       "column 'document' must hold text, found int", "column 'summary' must hold text, found list"]),
    "translation wmt": ("translation", {"source_lang": "en", "target_lang": "fr"},
                        {"translation": [{"en": "a", "fr": "b"}, {"en": "a", "fr": None}, None, "en: a",
                                         {"en": 5, "fr": "b"}]},
                        [None, "'translation' has no language 'fr' (it has: en)", "'translation' is missing or null",
                         "column 'translation' must hold {language: text} objects, found str",
                         "column 'translation.en' must hold text, found int"]),
    "translation columns": ("translation", {"source_column": "en", "target_column": "fr"},
                            {"en": ["a", "a", None], "fr": ["b", 2.5, "b"]},
                            [None, "column 'fr' must hold text, found float", "'en' is missing or null"]),
    "extractive qa": ("extractive_qa", {}, {"question": ["q?", "q?", None, "q?"], "context": ["Ana", "Ana", "Ana", 7],
                                            "answers": [GOOD_ANSWERS, {"text": ["Ana"], "answer_start": ["0"]},
                                                        GOOD_ANSWERS, GOOD_ANSWERS]},
                      [None, "column 'answers' must be in the SQuAD shape", "'question' is missing or null",
                       "column 'context' must hold text, found int"]),
    "generative qa": ("generative_qa", {}, {"question": ["q?", "q?"], "context": ["Ana", "Ana"],
                                            "answers": [{"text": [], "answer_start": []}, None]},
                      [None, "'answers' is missing or null"]),
    "dialogue": ("dialogue", {}, {"messages": [GOOD_CHAT, [], None, [{"role": "user", "content": "Hi?"}],
                                               [{"role": "user", "content": None}, GOOD_CHAT[1]]]},
                 [None, "a conversation with no messages", "'messages' is missing or null", "no assistant turn",
                  "every message needs a role"]),
    "text generation": ("text_generation", {}, {"text": ["some text", "", None, {"a": 1}]},
                        [None, None, "'text' is missing or null", "column 'text' must hold text, found dict"]),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_problems_name_each_bad_row(case):
    name, keys, rows, expected = ROW_CASES[case]
    problems = get_task(name).row_problems(rows, data(**keys))
    assert len(problems) == len(expected)
    for problem, wanted in zip(problems, expected):
        assert (problem is None) if wanted is None else (problem is not None and problem.startswith(wanted)), problems


def test_blank_or_unreadable_sources_are_not_sources():
    section = data()
    assert get_task("summarization").has_source({"document": ["", " \n", None, "x"], "summary": ["a"] * 4},
                                                section) == [False, False, False, True]
    wmt = {"translation": [{"en": " ", "fr": "b"}, None, {"en": "a", "fr": ""}]}
    assert get_task("translation").has_source(wmt, data(source_lang="en", target_lang="fr")) == [False, False, True]
    qa = {"question": ["q?", "q?"], "context": ["", "Ana"], "answers": [GOOD_ANSWERS] * 2}
    assert get_task("generative_qa").has_source(qa, section) == [False, True]
    chats = {"messages": [[{"role": "assistant", "content": " "}], None, GOOD_CHAT]}
    assert get_task("dialogue").has_source(chats, section) == [False, False, True]
    assert get_task("text_generation").has_source({"text": ["\t", 3, "x"]}, section) == [False, False, True]
    assert get_task("extractive_qa").source_label(section) == "'context'"


@pytest.mark.parametrize("name", ["translation", "summarization", "extractive_qa", "generative_qa", "text_generation",
                                  "dialogue"])
def test_every_task_implements_the_whole_protocol(name):
    """The rest of hftk asks a task only what Task states, with no getattr fallbacks: each member is there."""
    import inspect

    from hftk.tasks.base import Task

    task = get_task(name)
    members = {m for m in vars(Task) if not m.startswith("_")} | set(Task.__annotations__)
    missing = sorted(m for m in members if not hasattr(task, m))
    assert missing == [], f"{name} lacks {missing}"
    for member in members:
        wanted = getattr(Task, member, None)
        if callable(wanted):
            params = list(inspect.signature(wanted).parameters)[1:]
            assert list(inspect.signature(getattr(task, member)).parameters)[:len(params)] == params, (name, member)
