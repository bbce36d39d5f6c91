"""Encoder-decoder packing (train.packing on T5, BART, Marian): a packed micro-batch gives the same
loss and gradients as the same examples one per row, no example sees another, generation is untouched,
and the layout holds every example once within the row lengths."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from hftk.models import SEQ2SEQ_PACKING_FAMILIES, check_packing
from hftk.objective import padding_counts, token_counts, token_loss_sums
from hftk.recipe import ModelSection
from hftk.tasks.base import ENCODER_DECODER, SOURCE_POSITIONS, TARGET_POSITIONS, TOKEN_MASK
from hftk.tasks.text_to_text import TextToTextCollator
from hftk.train import packed_forward
from hftk.train.mfu import flop_counter
from hftk.train.packing import ROW_BLOCKS, PackedSeq2SeqCollator, pack_pairs

VOCAB = 96
SMALL = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 128}
# One tiny config per family in SEQ2SEQ_PACKING_FAMILIES, dropout 0: packed and unpacked layouts draw
# different dropout masks, so only the arithmetic can be compared step for step.
TINY = {
    "t5": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
           "dropout_rate": 0.0},
    "bart": {**SMALL, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "bos_token_id": 2,
             "forced_eos_token_id": None},
    "marian": {**SMALL, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0},
}
# fp32: measured at most 5e-7 apart (loss) and 4e-7 of the largest gradient entry.
CLOSE = 1e-5
BLOCK = (40, 16)  # data.max_source_length, data.max_target_length


def tiny_model(family: str, kernel: str):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, pad_token_id=0, decoder_start_token_id=0,
                                               eos_token_id=1, **TINY[family])
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation=kernel).float()
    packed_forward.install(model)
    return model.train()


def examples(count: int = 12, seed: int = 0) -> list[dict[str, list[int]]]:
    """Sources of 3 to 30 tokens and targets of 2 to 12: several share a row of BLOCK."""
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 30))],
             "labels": [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]} for _ in range(count)]


def loss_and_gradient(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = token_loss_sums(model, batch, ENCODER_DECODER).sum() / token_counts(batch, ENCODER_DECODER).sum()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def collators(model):
    shift = model.prepare_decoder_input_ids_from_labels
    return TextToTextCollator(0, shift), PackedSeq2SeqCollator(0, shift, BLOCK)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("family", SEQ2SEQ_PACKING_FAMILIES)
def test_a_packed_batch_trains_as_the_same_examples_one_per_row(family, kernel):
    model = tiny_model(family, kernel)
    rows = examples()
    plain, packed = (collate(rows) for collate in collators(model))
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # really packed
    assert token_counts(packed, ENCODER_DECODER).sum() == token_counts(plain, ENCODER_DECODER).sum()
    (loss, gradient), (packed_loss, packed_gradient) = loss_and_gradient(model, plain), loss_and_gradient(model, packed)
    assert abs(packed_loss - loss) <= CLOSE * loss
    assert (packed_gradient - gradient).abs().max() <= CLOSE * gradient.abs().max()


def logits_by_example(model, rows) -> list[torch.Tensor]:
    """Each example's target logits from a packed batch, found by its own target tokens."""
    packed = collators(model)[1](rows)
    with torch.no_grad():
        inputs = {k: v for k, v in packed.items() if k not in ("labels", TOKEN_MASK, "packed_cross_pairs")}
        logits = model(**inputs, use_cache=False).logits
    out = []
    for row in rows:
        target = torch.tensor(row["labels"])
        for r in range(packed["labels"].shape[0]):
            starts = [p for p in range(packed["labels"].shape[1] - len(target) + 1)
                      if packed[TARGET_POSITIONS][r, p] == 0 and torch.equal(packed["labels"][r, p:p + len(target)], target)]
            if starts:
                out.append(logits[r, starts[0]:starts[0] + len(target)])
                break
    assert len(out) == len(rows)
    return out


@pytest.mark.parametrize("family", SEQ2SEQ_PACKING_FAMILIES)
def test_changing_one_example_moves_no_other_examples_logits(family):
    model = tiny_model(family, "sdpa").eval()
    rows = examples()
    changed = [dict(row) for row in rows]
    changed[0] = {"input_ids": [7] * len(rows[0]["input_ids"]), "labels": rows[0]["labels"]}
    before, after = logits_by_example(model, rows), logits_by_example(model, changed)
    assert not torch.allclose(before[0], after[0], atol=1e-4)  # the change is seen by its own example
    for one, other in zip(before[1:], after[1:]):
        torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", SEQ2SEQ_PACKING_FAMILIES)
def test_generation_is_untouched_by_the_routing(family):
    """After a packed training forward, the routed model generates what the same weights generate
    without any routing installed."""
    rows = examples(4)
    routed = tiny_model(family, "sdpa")
    loss_and_gradient(routed, collators(routed)[1](rows))  # no optimizer step: the weights stay
    plain_model = transformers.AutoModelForSeq2SeqLM.from_config(routed.config, attn_implementation="sdpa").float()
    plain_model.load_state_dict(routed.state_dict())
    batch = TextToTextCollator(0)(rows)
    generated = [model.eval().generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=6, do_sample=False) for model in (routed, plain_model)]
    assert torch.equal(*generated)


def test_rows_hold_every_example_once_within_the_row_lengths():
    rng = random.Random(3)
    for _ in range(50):
        lengths = [(rng.randint(1, 40), rng.randint(1, 16)) for _ in range(rng.randint(1, 40))]
        rows = pack_pairs(lengths, BLOCK)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        for side in (0, 1):
            longest = max(pair[side] for pair in lengths)
            assert max(sum(lengths[i][side] for i in row) for row in rows) <= max(ROW_BLOCKS * BLOCK[side], longest)
        assert pack_pairs(lengths, BLOCK) == rows  # a function of the lengths alone


def test_packing_pads_less_and_counts_the_same_work():
    model = tiny_model("t5", "sdpa")
    rows = examples(32, seed=1)
    plain, packed = (collate(rows) for collate in collators(model))
    padded, total = padding_counts(packed).tolist()
    plain_padded, plain_total = padding_counts(plain).tolist()
    # random lengths pair badly (the recipes' data pads 1-3% packed: tests/integration/test_packing.py)
    assert padded / total < 0.5 * plain_padded / plain_total
    flops = flop_counter(model, ENCODER_DECODER)  # FLOPs count the examples' own attention, not the rows'
    assert flops(packed) == flops(plain)
    # every example's positions restart at 0, in the source and the target rows
    assert (packed[SOURCE_POSITIONS] == 0).sum() >= len(rows) and (packed[TARGET_POSITIONS] == 0).sum() >= len(rows)


def test_encoder_decoder_families_outside_the_routed_ones_are_refused():
    section = ModelSection(config={"model_type": "pegasus"}, tokenizer={"name_or_path": "t"})
    with pytest.raises(Exception, match="which pegasus models do not take"):
        check_packing(section, transformers.AutoConfig.for_model("pegasus"), ENCODER_DECODER)
    for family in SEQ2SEQ_PACKING_FAMILIES:
        for kernel in (None, "sdpa", "eager"):
            check_packing(ModelSection(config={"model_type": family}, attn_implementation=kernel,
                                       tokenizer={"name_or_path": "t"}),
                          transformers.AutoConfig.for_model(family), ENCODER_DECODER)
