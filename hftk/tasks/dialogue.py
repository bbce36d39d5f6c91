"""Dialogue on OpenAI-style `messages` lists ({role, content}).

Decoder-only: the tokenizer's chat template renders the conversation and the loss falls on the
assistant turns only (a scratch tokenizer gets CHAT_TEMPLATE). Encoder-decoder: the history as
text to the last assistant reply. Evaluation generates the last reply from everything before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hftk import metrics
from hftk.errors import UserError
from hftk.recipe import DataSection
from hftk.tasks.base import DECODER_ONLY
from hftk.tasks.text_to_text import (
    IGNORE_INDEX,
    TEXT_TO_TEXT_ENCODINGS,
    TextToTextCollator,
    decode_generated,
    encode_pairs,
    predict_by_generation,
)

ROLES = {"system", "user", "assistant"}
# For tokenizers without one: each turn is "<|role|>\n" + content + eos, so generation stops at eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Dialogue:
    name = "dialogue"

    def encodings(self):
        return TEXT_TO_TEXT_ENCODINGS

    @staticmethod
    def _column(data: DataSection) -> str:
        return data.messages_column or "messages"

    def columns(self, data: DataSection) -> list[str]:
        return [self._column(data)]

    def check_rows(self, rows: dict[str, list[Any]], data: DataSection, where: str) -> None:
        column = self._column(data)
        for messages in rows[column]:
            if not isinstance(messages, list) or not messages:
                raise UserError(f"{where}: column '{column}' must hold non-empty lists of {{role, content}} messages")
            for message in messages:
                if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                    raise UserError(f"{where}: every message needs a role ({', '.join(sorted(ROLES))}) and text "
                                    f"content; found {str(message)[:80]}")
            if messages[-1]["role"] != "assistant":
                raise UserError(f"{where}: every conversation must end with an assistant turn to learn and score")

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


def history_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_tokens(tokenizer: Any, messages: list[dict], last_turn_only: bool) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant replies.

    The conversation is rendered turn by turn; each new piece of text is tokenized on its own, so
    the boundary between what the model reads and what it must write is exact for any template."""
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
                raise UserError("the tokenizer's chat template does not render a conversation as the sum of its turns; "
                                "hftk cannot tell the assistant's tokens apart")
            piece = tokenizer(text[len(rendered):], add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if is_target else [IGNORE_INDEX] * len(piece))
            rendered = text
    return ids, labels
