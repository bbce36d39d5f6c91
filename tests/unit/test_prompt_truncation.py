"""Decoder-only prompts: whole when they fit; a long source is cut from its end, the template kept whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from hftk.errors import UserError
from hftk.recipe import DataSection, TokenizerTraining
from hftk.tasks import get_task
from hftk.tasks.base import DECODER_ONLY, IGNORE_INDEX
from hftk.tokenizer import train_tokenizer

CONTEXT = ("On Monday, Ana Costa, the mayor of Oslo, spoke to reporters. Ana Costa said the city plans to "
           "open a new library next year. Critics said the timing was poor. Supporters welcomed the move.")
QUESTION = "Who is the mayor of Oslo?"
TRAINING_TEXT = (f"summarize: {CONTEXT}\nSummary: Oslo will open a library.\nTranslate English to French:\nThe red cat.\n"
                 f"French: Le chat rouge.\ncontext: {CONTEXT}\nquestion: {QUESTION}\nanswer: Ana Costa")
SOURCES = ["The red cat.", CONTEXT.split(". ")[0] + ".", CONTEXT, f"summarize: {CONTEXT}\n\n{CONTEXT}"]
LONG_SOURCE = " ".join([CONTEXT] * 4)
BYTE_LEVEL = ["gpt2-style", "hftk-scratch"]
ALL_TOKENIZERS = [*BYTE_LEVEL, "llama-style"]


@dataclass
class Case:
    task: str
    data: dict[str, Any]
    head: str
    lead: str  # what the task puts before the source inside the source part
    tail: str

    def rows(self, source: str) -> dict[str, list[Any]]:
        if self.task == "summarization":
            return {"document": [source], "summary": ["Oslo will open a library."]}
        if self.task == "translation":
            return {"translation": [{"en": source, "fr": "Le chat rouge."}]}
        return {"id": ["a"], "question": [QUESTION], "context": [source],
                "answers": [{"text": ["Ana Costa"], "answer_start": [11]}]}

    def prompt(self, source: str) -> str:
        return self.head + self.lead + source + self.tail


CASES = {
    "summarization": Case("summarization", {}, "", "", "\nSummary:"),
    "translation": Case("translation", {"source_lang": "en", "target_lang": "fr"},
                        "Translate English to French:\n", "", "\nFrench:"),
    "generative_qa": Case("generative_qa", {}, "context:", " ", f"\nquestion: {QUESTION}\nanswer:"),
}


def gpt2_style(texts: list[str]) -> Any:
    """Byte-level BPE whose one special token is bos, eos and pad at once, as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def llama_style(texts: list[str]) -> Any:
    """SentencePiece-like (a leading "▁" on the first word) with its own <s>, added before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def tokenizers():
    texts = [TRAINING_TEXT] * 30
    scratch = train_tokenizer(texts, TokenizerTraining(vocab_size=400, min_frequency=1), DECODER_ONLY)
    return {"gpt2-style": gpt2_style(texts), "hftk-scratch": scratch, "llama-style": llama_style(texts)}


def data(**kwargs) -> DataSection:
    return DataSection(train={"path": "x.jsonl"}, **kwargs)


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_prefix(tokenizer: Any) -> list[int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [bos] if bos is not None and bos != eos else []


def prompts_of(case: Case, tokenizer: Any, source: str, max_source_length: int) -> list[list[int]]:
    """The prompt ids the model reads in training (the unlearned labels) and in evaluation."""
    section = data(max_source_length=max_source_length, **case.data)
    task = get_task(case.task)
    train = task.preprocess(case.rows(source), tokenizer, section, DECODER_ONLY, True)
    evaluation = task.preprocess(case.rows(source), tokenizer, section, DECODER_ONLY, False)
    unlearned = train["labels"][0].index(next(x for x in train["labels"][0] if x != IGNORE_INDEX))
    return [train["input_ids"][0][:unlearned], evaluation["prompt_input_ids"][0]]


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
@pytest.mark.parametrize("task", CASES)
def test_prompt_that_fits_reaches_the_model_whole(tokenizers, task, name):
    tokenizer, case = tokenizers[name], CASES[task]
    prefix = bos_prefix(tokenizer)
    for source in SOURCES:
        expected = case.prompt(source)
        length = len(prefix) + len(ids(tokenizer, expected))
        # From an exact fit up to twice the prompt: limit/2 .. limit-1 is where cut prompts hid.
        for limit in sorted({length, length + 1, length + length // 4, length * 3 // 2, 2 * length - 1}):
            for prompt in prompts_of(case, tokenizer, source, limit):
                assert prompt == prefix + ids(tokenizer, expected), (source, limit)
                assert tokenizer.decode(prompt, skip_special_tokens=True) == expected


@pytest.mark.parametrize("name", BYTE_LEVEL)
@pytest.mark.parametrize("task", CASES)
def test_parts_tokenize_like_the_joined_prompt(tokenizers, task, name):
    tokenizer, case = tokenizers[name], CASES[task]
    for source in SOURCES:
        for section in (data(**case.data), data(source_prefix="summarize: ", **case.data)):
            parts = get_task(task).prompts(case.rows(source), section, DECODER_ONLY)[0]
            separate = ids(tokenizer, parts.head) + ids(tokenizer, parts.source) + ids(tokenizer, parts.tail)
            assert separate == ids(tokenizer, parts.text)


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
@pytest.mark.parametrize("task", CASES)
def test_long_source_is_cut_from_its_end_and_the_template_kept(tokenizers, task, name):
    tokenizer, case = tokenizers[name], CASES[task]
    prefix, head, tail = bos_prefix(tokenizer), ids(tokenizer, case.head), ids(tokenizer, case.tail)
    source = ids(tokenizer, case.lead + LONG_SOURCE)
    room = 12
    limit = len(prefix) + len(head) + room + len(tail)
    for prompt in prompts_of(case, tokenizer, LONG_SOURCE, limit):
        assert len(prompt) == limit
        assert prompt == prefix + head + source[:room] + tail  # the cue is the last thing before the completion
        if name in BYTE_LEVEL:
            text = tokenizer.decode(prompt, skip_special_tokens=True)
            assert text == case.head + tokenizer.decode(source[:room]) + case.tail
            assert text.startswith(case.head + case.lead + "On Monday, Ana Costa")


@pytest.mark.parametrize("name", ["gpt2-style", "llama-style"])
@pytest.mark.parametrize("task", CASES)
def test_template_without_room_is_a_user_error(tokenizers, task, name):
    tokenizer, case = tokenizers[name], CASES[task]
    template = len(bos_prefix(tokenizer)) + len(ids(tokenizer, case.head)) + len(ids(tokenizer, case.tail))
    with pytest.raises(UserError, match=rf"^data\.max_source_length={template} leaves no room for the \w+"):
        prompts_of(case, tokenizer, CONTEXT, template)
    assert all(len(p) == template + 1 for p in prompts_of(case, tokenizer, CONTEXT, template + 1))


def test_generative_qa_names_the_context_when_the_question_fills_the_prompt(tokenizers):
    with pytest.raises(UserError, match="leaves no room for the context"):
        prompts_of(CASES["generative_qa"], tokenizers["gpt2-style"], CONTEXT, 5)
