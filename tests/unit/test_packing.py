"""Packing: a packed batch trains every example exactly as if it ran alone (same per-example losses,
same token count) for every family hftk packs for, and the layout is deterministic and never pads more
than one example per row."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from hftk.errors import UserError
from hftk.models import PACKING_FAMILIES, check_packing
from hftk.objective import model_inputs, padding_counts, token_counts, token_loss_sums
from hftk.recipe import ModelSection
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, IGNORE_INDEX, TOKEN_MASK
from hftk.tasks.text_to_text import TextToTextCollator
from hftk.train.mfu import squared_lengths
from hftk.train.packing import PackedCollator, first_fit, pack

VOCAB = 64
LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": VOCAB}
# One tiny config per family in PACKING_FAMILIES; dropout is off in eval mode.
TINY = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": VOCAB},
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": {**LLAMA_LIKE, "head_dim": 8},
    "gemma": {**LLAMA_LIKE, "head_dim": 8},
}
# fp32: a packed example's loss matches its loss alone to float rounding (measured ~1e-7 relative).
CLOSE = {"rel": 1e-5, "abs": 1e-5}
# OPT derives positions from the attention mask: outside PACKING_FAMILIES, and shown to leak below.
OPT = {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "max_position_embeddings": 128, "word_embed_proj_dim": 32, "vocab_size": VOCAB}


def tiny_model(family: str, kernel: str = "sdpa", config: dict | None = None):
    torch.manual_seed(0)
    fields = {**(config or TINY[family]), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    built = transformers.AutoConfig.for_model(family, **fields)
    return transformers.AutoModelForCausalLM.from_config(built, attn_implementation=kernel).float().eval()


def examples(count: int = 7, seed: int = 0) -> list[dict[str, list[int]]]:
    """Prompt + completion rows as the decoder-only tasks make them (the prompt's labels ignored), and
    every third row text_generation's (labels = ids). Lengths from 3 to 40, so several share a row of 64;
    random ids, so no two rows are alike."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        prompt, completion = (0 if index % 3 == 0 else rng.randint(2, 25)), rng.randint(3, 15)
        ids = [rng.randrange(3, VOCAB) for _ in range(prompt + completion)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def alone(model, row: dict) -> float:
    """The example's summed token loss in a batch of its own, unpadded, as unpacked training runs it."""
    batch = TextToTextCollator(0)([row])
    with torch.no_grad():
        return token_loss_sums(model, batch, DECODER_ONLY).item()


def packed_losses(model, rows: list[dict], batch: dict, **forward) -> list[float]:
    """Each example's summed token loss inside the packed batch, found by its ids in the packed rows."""
    with torch.no_grad():
        logits = model(**{**model_inputs(batch), **forward}).logits
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    found = {}
    for r in range(batch["input_ids"].shape[0]):
        starts = [p for p in range(batch["input_ids"].shape[1]) if batch["position_ids"][r, p] == 0]
        for start, end in zip(starts, starts[1:] + [batch["input_ids"].shape[1]]):
            ids = batch["input_ids"][r, start:end][batch[TOKEN_MASK][r, start:end] == 1].tolist()
            # the loss of predicting token t sits at t - 1
            found[tuple(ids)] = token_losses[r, start:end - 1].sum().item()
    return [found.get(tuple(row["input_ids"]), float("nan")) for row in rows]


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_packed_batch_gives_each_example_its_loss_alone(family, kernel):
    model = tiny_model(family, kernel)
    rows = examples()
    batch = PackedCollator(0, 64)(rows)
    assert batch["input_ids"].shape[0] < len(rows), "nothing was packed: the test would prove nothing"
    expected = [alone(model, row) for row in rows]
    assert packed_losses(model, rows, batch) == pytest.approx(expected, **CLOSE)
    # The loop's figures: the row sums add up to the same total over the same token count.
    with torch.no_grad():
        assert token_loss_sums(model, batch, DECODER_ONLY).sum().item() == pytest.approx(sum(expected), rel=1e-5)
    unpacked = TextToTextCollator(0)(rows)
    assert token_counts(batch, DECODER_ONLY).sum() == token_counts(unpacked, DECODER_ONLY).sum()


def test_the_comparison_catches_examples_that_see_each_other():
    """Three ways packed examples would see each other, each caught by the same comparison."""
    rows = examples()
    batch = PackedCollator(0, 64)(rows)
    gpt2 = tiny_model("gpt2")

    def leaks(model, batch, **forward):
        return packed_losses(model, rows, batch, **forward) != pytest.approx([alone(model, row) for row in rows],
                                                                            **CLOSE)

    assert not leaks(gpt2, batch)

    # positions that run on across examples: no boundaries for transformers to find
    running = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    assert leaks(gpt2, running)
    # a cache, as a decoder builds by default, turns the detection off: model_inputs asks for none
    assert model_inputs(batch)["use_cache"] is False
    assert leaks(gpt2, batch, use_cache=True)
    # a family whose positions come from the attention mask (hence not in PACKING_FAMILIES)
    assert leaks(tiny_model("opt", config=OPT), batch)


def test_collated_layout():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
            {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]}]
    batch = PackedCollator(0, 6)(rows)
    # Longest first; rows of 5 pad least (2 rows of 5, against 3 rows of 4 or 2 rows of 6).
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 0], [5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 12, 13, -100], [-100, 6, 7, -100, 9]]
    assert batch[TOKEN_MASK].tolist() == [[1, 1, 1, 1, 0], [1] * 5]
    assert "attention_mask" not in batch and "attention_mask" not in model_inputs(batch)
    assert padding_counts(batch).tolist() == [1, 10]
    assert squared_lengths(batch).item() == 4 ** 2 + 2 ** 2 + 3 ** 2  # attention works within each example


def test_rows_hold_every_example_once_and_never_pad_more_than_one_per_row():
    rng = random.Random(1)
    for _ in range(300):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 40))]
        block = rng.randint(max(lengths) // 2, 250)
        rows = pack(lengths, block)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= max(block, max(lengths)) for row in rows)
        positions = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        assert positions <= len(lengths) * max(lengths)
        assert pack(lengths, block) == rows  # the same batch packs the same way on a resume


def test_first_fit_keeps_order_and_room():
    assert first_fit([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]
    assert first_fit([9, 2], 6) == [[0], [1]]  # longer than a row: alone, and nothing joins it


def test_families_checked_here_are_those_packing_allows():
    assert set(TINY) == set(PACKING_FAMILIES)


@pytest.mark.parametrize(("model_type", "family", "kernel", "message"), [
    ("pegasus", ENCODER_DECODER, None, "which pegasus models do not take (packing supports t5, bart, marian)"),
    ("bert", "encoder-only", None, "this bert model is encoder-only"),
    ("opt", DECODER_ONLY, None, "which opt models do not build"),
    ("llama", DECODER_ONLY, "flash_attention_2", "model.attn_implementation=flash_attention_2 does not keep"),
])
def test_models_that_would_mix_packed_examples_are_refused(model_type, family, kernel, message):
    section = ModelSection(config={"model_type": model_type}, attn_implementation=kernel,
                           tokenizer={"name_or_path": "t"})
    with pytest.raises(UserError, match="^train.packing: ") as raised:
        check_packing(section, transformers.AutoConfig.for_model(model_type), family)
    assert message in str(raised.value)


def test_models_that_keep_packed_examples_apart_are_accepted():
    for kernel in (None, "sdpa", "eager"):
        section = ModelSection(config={"model_type": "gpt2"}, attn_implementation=kernel, tokenizer={"name_or_path": "t"})
        check_packing(section, transformers.AutoConfig.for_model("gpt2"), DECODER_ONLY)
