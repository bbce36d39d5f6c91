"""hftk's FLOP count per family against torch's own FlopCounterMode over a real forward and backward
(unpadded batches, so every position is a real token)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from hftk.objective import token_loss_sums
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY
from hftk.train.mfu import flop_counter, peak_flops

B, S, T = 4, 48, 16


def _t5():
    config = T5Config(vocab_size=300, d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=3,
                      decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config)
    labels = torch.randint(2, 300, (B, T))
    return model, ENCODER_DECODER, {"input_ids": torch.randint(2, 300, (B, S)), "attention_mask": torch.ones(B, S, dtype=torch.long),
                                    "labels": labels, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels)}


def _gpt2():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=128))
    ids = torch.randint(2, 300, (B, S))
    return model, DECODER_ONLY, {"input_ids": ids, "attention_mask": torch.ones(B, S, dtype=torch.long), "labels": ids}


def _bert():
    model = BertForQuestionAnswering(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=256, max_position_embeddings=128))
    return model, ENCODER_ONLY, {"input_ids": torch.randint(2, 300, (B, S)), "attention_mask": torch.ones(B, S, dtype=torch.long),
                                 "start_positions": torch.randint(0, S, (B,)), "end_positions": torch.randint(0, S, (B,))}


@pytest.mark.parametrize("build", [_t5, _gpt2, _bert], ids=["t5", "gpt2", "bert"])
def test_counted_flops_match_torch_flop_counter(build):
    torch.manual_seed(0)
    model, family, batch = build()
    model.config._attn_implementation = "eager"  # FlopCounterMode sees the attention products as matmuls
    counted = flop_counter(model, family)(batch).item()
    with FlopCounterMode(display=False) as mode:
        token_loss_sums(model, batch, family).sum().backward()
    measured = mode.get_total_flops()
    # The count leaves out softmax, norms and the QA head's few products; within 15% of torch's count.
    print(family, counted / measured)
    assert measured > 0 and abs(counted - measured) / measured < 0.15, (counted, measured)


def test_padding_is_not_counted():
    torch.manual_seed(0)
    model, family, batch = _gpt2()
    full = flop_counter(model, family)(batch).item()
    batch["attention_mask"][:, S // 2:] = 0
    half = flop_counter(model, family)(batch).item()
    assert 0.2 * full < half < 0.55 * full


def test_peak_keeps_the_best_probe_seen(tmp_path, monkeypatch):
    monkeypatch.setenv("HFTK_CACHE", str(tmp_path))
    state = torch.get_rng_state()
    first = peak_flops(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), state)  # the probe leaves dropout's generator alone
    assert first > 1e8  # any CPU does more than 0.1 GFLOP/s
    cache = tmp_path / "peak_flops.json"
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 1.0}))  # a probe taken while the machine was busy
    assert peak_flops(torch.device("cpu"), torch.float32) > 1e8  # raised by the next probe
    cache.write_text(json.dumps({key: 1e18}))  # a better moment than this one
    assert peak_flops(torch.device("cpu"), torch.float32) == 1e18
