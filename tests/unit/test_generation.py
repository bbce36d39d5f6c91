"""Evaluation that runs an encoder-decoder's encoder once gives the same loss and text as the plain
path (a full forward for the loss, then generate() with its own encoder run)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from transformers import T5Config, T5ForConditionalGeneration

from hftk.generation import generate, shares_encoder_run
from hftk.objective import token_loss_sums
from hftk.recipe import EvalSection
from hftk.tasks import get_task
from hftk.tasks.base import ENCODER_DECODER
from hftk.tasks.text_to_text import predict_by_generation


class Tokenizer:
    pad_token_id = 0


def test_one_encoder_run_gives_the_plain_paths_loss_and_tokens():
    torch.manual_seed(0)
    config = T5Config(vocab_size=50, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1)
    model = T5ForConditionalGeneration(config).eval()
    accelerator = Accelerator(cpu=True)
    rows = [{"input_ids": [5, 6, 7, 8, 9, 1], "labels": [11, 12, 1]},
            {"input_ids": [13, 14, 1], "labels": [15, 16, 17, 18, 1]}]
    batch = get_task("summarization").collator(Tokenizer(), ENCODER_DECODER,
                                               model.prepare_decoder_input_ids_from_labels)(rows)
    settings = EvalSection(max_new_tokens=7, num_beams=1)
    assert shares_encoder_run(accelerator, model, ENCODER_DECODER)
    with torch.no_grad():
        shared = predict_by_generation(accelerator, model, batch, Tokenizer(), settings, ENCODER_DECODER)
        plain_loss = token_loss_sums(model, batch, ENCODER_DECODER)
        plain_tokens = generate(accelerator, model, batch, ENCODER_DECODER, settings, Tokenizer())
    assert torch.allclose(shared["loss"], plain_loss, rtol=0, atol=1e-6)
    assert torch.equal(shared["tokens"], plain_tokens)
    assert shared["tokens"].shape[1] > 1  # generation really ran

    beams = EvalSection(max_new_tokens=7, num_beams=3)
    with torch.no_grad():
        shared = predict_by_generation(accelerator, model, batch, Tokenizer(), beams, ENCODER_DECODER)
        plain_tokens = generate(accelerator, model, batch, ENCODER_DECODER, beams, Tokenizer())
    assert torch.equal(shared["tokens"], plain_tokens)
