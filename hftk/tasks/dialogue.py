"""Dialogue on OpenAI-style `messages` lists ({role, content}).

Decoder-only: the tokenizer's chat template renders the conversation, which is tokenized as one text,
and the loss falls on the assistant turns only: on the template's generation blocks where it has them
(`{% generation %}`, as transformers' assistant mask reads them), else on the text each assistant turn
adds. A tokenizer without a template gets CHAT_TEMPLATE. Encoder-decoder: the history as
text to the last assistant reply. Evaluation generates the last reply from everything before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import metrics
from hftk.errors import UserError
from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY, IGNORE_INDEX, TaskDefaults, has_text
from hftk.tasks.text_to_text import (
    TEXT_TO_TEXT_ENCODINGS,
    TextToTextCollator,
    decode_generated,
    encode_pairs,
    predict_by_generation,
)

ROLES = {"system", "user", "assistant"}
# For tokenizers without one: BOS (where the tokenizer has one of its own), then each turn as
# "<|role|>\n" + content + eos + "\n", so generation stops at eos. The loss falls on an assistant's content
# and eos (its generation block), not on the role line the prompt ends with nor the newline after eos.
# (Newlines sit inside expressions: transformers renders with trim_blocks, which drops one after a tag.)
CHAT_TEMPLATE = (
    "{% if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
GENERATION_BLOCK = "{% generation %}"


class Dialogue(TaskDefaults):
    name = "dialogue"
    headline_metric = "rougeL"

    def encodings(self):
        return TEXT_TO_TEXT_ENCODINGS

    @staticmethod
    def _column(data: DataSection) -> str:
        return data.messages_column or "messages"

    def columns(self, data: DataSection) -> list[str]:
        return [self._column(data)]

    def row_problems(self, rows: dict[str, list[Any]], data: DataSection) -> list[str | None]:
        column = self._column(data)
        return [conversation_problem(messages, column) for messages in rows[column]]

    def has_source(self, rows: dict[str, list[Any]], data: DataSection) -> list[bool]:
        return [isinstance(messages, list) and any(isinstance(m, dict) and has_text(m.get("content")) for m in messages)
                for messages in rows[self._column(data)]]

    def source_label(self, data: DataSection) -> str:
        return f"message content in '{self._column(data)}'"

    def texts(self, rows: dict[str, list[Any]], data: DataSection):
        for messages in rows[self._column(data)]:
            yield from (m["content"] for m in messages)

    def prepare_tokenizer(self, tokenizer: Any) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHAT_TEMPLATE
        return tokenizer

    def preprocess(self, rows, tokenizer, data: DataSection, family: str, training: bool):
        conversations = rows[self._column(data)]
        if family != DECODER_ONLY:
            sources = [history_text(m[:-1]) for m in conversations]
            targets = [m[-1]["content"] for m in conversations]
            return encode_pairs(sources, targets, tokenizer, family, data.max_source_length, data.max_target_length,
                                training)
        limit = data.max_source_length + data.max_target_length
        features: dict[str, list] = {"input_ids": [], "labels": []}
        if not training:
            features["prompt_input_ids"] = []
        for messages in conversations:
            ids, labels = chat_tokens(tokenizer, messages, last_turn_only=not training)
            if not training:
                prompt_length = labels.index(next(x for x in labels if x != IGNORE_INDEX))
                features["prompt_input_ids"].append(ids[:prompt_length][-data.max_source_length:])
            # Keep the end of a long conversation: the turns the model must answer come last.
            features["input_ids"].append(ids[-limit:])
            features["labels"].append(labels[-limit:])
        return features

    def collator(self, tokenizer: Any, family: str, decoder_inputs: Callable | None = None):
        return TextToTextCollator(tokenizer.pad_token_id, decoder_inputs)

    predict = staticmethod(predict_by_generation)
    decode = staticmethod(decode_generated)

    def references(self, rows: dict[str, list[Any]], data: DataSection) -> list[str]:
        return [m[-1]["content"] for m in rows[self._column(data)]]

    def compute_metrics(self, predictions: list[str], references: list[str], source: str) -> dict[str, float]:
        return metrics.rouge(predictions, references, source)

    def example_scores(self, predictions: list[str], references: list[str]) -> list[dict[str, float]]:
        return metrics.rouge_per_example(predictions, references)


def conversation_problem(messages: Any, column: str) -> str | None:
    if messages is None:
        return f"'{column}' is missing or null"
    if not isinstance(messages, list):
        return f"column '{column}' must hold lists of {{role, content}} messages, found {type(messages).__name__}"
    if not messages:
        return "a conversation with no messages"
    bad = next((m for m in messages if not _is_message(m)), None)
    if bad is not None:
        return (f"every message needs a role ({', '.join(sorted(ROLES))}) and text content; "
                f"found {str(bad)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    if messages[-1]["role"] != "assistant":
        return "the conversation must end with an assistant turn to learn and score"
    return None


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)


def history_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_tokens(tokenizer: Any, messages: list[dict], last_turn_only: bool) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, as apply_chat_template gives them, and labels that keep
    only the assistant's tokens (with last_turn_only, the last reply's)."""
    if GENERATION_BLOCK in (tokenizer.chat_template or ""):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        if not any(mask):
            raise UserError("the tokenizer's chat template puts no assistant reply in its generation blocks; "
                            "hftk would have nothing to learn")
    elif getattr(tokenizer, "is_fast", False):
        text, spans = _assistant_spans(tokenizer, messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        mask = _overlaps(encoded["offset_mapping"], spans)
    else:
        return _piecewise_tokens(tokenizer, messages, last_turn_only)
    runs = _runs(mask)
    keep = runs[-1:] if last_turn_only else runs
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop in keep:
        labels[start:stop] = ids[start:stop]
    return ids, labels


def _assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the characters each assistant turn adds after its generation prompt:
    the template rendered turn by turn, each rendering a prefix of the next."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (after.startswith(prompt) and text.startswith(after)):
            raise _not_additive()
        spans.append((len(prompt), len(after)))
    return text, spans


def _not_additive() -> UserError:
    return UserError("the tokenizer's chat template does not render a conversation as the sum of its turns; "
                     "hftk cannot tell the assistant's tokens apart (a template with {% generation %} blocks can)")


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token that overlaps a span, as transformers' assistant mask counts them."""
    return [int(any(start < stop_ and stop > start_ for start_, stop_ in spans)) for start, stop in offsets]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each stretch of 1s: one per assistant reply."""
    runs, start = [], None
    for i, value in enumerate([*mask, 0]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _piecewise_tokens(tokenizer: Any, messages: list[dict], last_turn_only: bool) -> tuple[list[int], list[int]]:
    """For a tokenizer without offsets: each new piece of rendered text tokenized on its own."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        pieces = []
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            pieces.append((prompt, False))
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        learn = message["role"] == "assistant" and (i == last_assistant or not last_turn_only)
        pieces.append((after, learn))
        for text, is_target in pieces:
            if not text.startswith(rendered):
                raise _not_additive()
            piece = tokenizer(text[len(rendered):], add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if is_target else [IGNORE_INDEX] * len(piece))
            rendered = text
    return ids, labels
