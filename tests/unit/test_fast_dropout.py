"""Counter-based dropout masks: torch's dropout in distribution, seeded by torch's generator, and the
same attention as torch's kernel."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.profiler import ProfilerActivity, profile

from hftk.train.fast_dropout import CounterDropout, applies, attention_math, install


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drops_at_the_rate_and_scales_the_rest(p):
    x = torch.rand(1 << 20) + 0.5
    with CounterDropout():
        y = F.dropout(x, p, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p))


def test_masks_are_uncorrelated_within_and_across_calls():
    mode = CounterDropout()
    torch.manual_seed(0)
    first, second = (mode.keep_mask(torch.Size([1024, 1024]), 0.1).float() for _ in range(2))
    noise = 4 / 1024  # four standard errors of a correlation over 1M pairs
    for a, b in ((first[:, :-1], first[:, 1:]), (first[:-1], first[1:]), (first, second)):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < noise


def test_masks_come_from_torchs_generator():
    x = torch.ones(4096)
    state = torch.get_rng_state()
    with CounterDropout():
        a = F.dropout(x, 0.3)
        b = F.dropout(x, 0.3)
    torch.set_rng_state(state)  # what a resume restores
    with CounterDropout():
        again = F.dropout(x, 0.3)
    assert torch.equal(a, again)
    assert not torch.equal(a, b)


def test_gradient_is_the_mask():
    x = torch.randn(64, 32, requires_grad=True)
    with CounterDropout():
        y = torch.nn.Dropout(0.25)(x)
    y.sum().backward()
    expected = torch.where(y != 0, 1 / 0.75, 0.0)
    assert torch.allclose(x.grad, expected)


def test_evaluation_and_a_zero_rate_return_the_input():
    x = torch.randn(128)
    with CounterDropout():
        assert torch.equal(F.dropout(x, 0.5, training=False), x)
        assert torch.equal(F.dropout(x, 0.0), x)


@pytest.mark.parametrize("case", ["none", "bool", "float", "causal", "gqa", "empty_row"])
def test_attention_math_is_torchs_attention(case):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    kwargs = {}
    if case == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, 7, 9) > 0.3
    if case == "float":
        kwargs["attn_mask"] = torch.randn(1, 4, 7, 9)
    if case == "causal":
        k, v = k[:, :, :7], v[:, :, :7]
        kwargs["is_causal"] = True
    if case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    if case == "empty_row":
        mask = torch.ones(2, 1, 7, 9, dtype=torch.bool)
        mask[:, :, 3] = False
        kwargs["attn_mask"] = mask
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3, **kwargs)
    got = attention_math(q, k, v, kwargs.get("attn_mask"), kwargs.get("is_causal", False), 0.3,
                         kwargs.get("enable_gqa", False), lambda weights: weights)
    assert torch.allclose(got, expected, atol=1e-5)


def test_attention_dropout_keeps_the_expected_output():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    exact = F.scaled_dot_product_attention(q, k, v)
    with CounterDropout():
        draws = torch.stack([F.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(4000)])
    assert not torch.allclose(draws[0], exact, atol=1e-3)  # the weights really were dropped
    assert torch.allclose(draws.mean(0), exact, atol=0.05)


def _tiny(family):
    if family == "t5":
        config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
                                       num_decoder_layers=1, dropout_rate=0.1, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config)
        inputs = {"input_ids": torch.randint(1, 50, (4, 12)), "labels": torch.randint(1, 50, (4, 5))}
    else:
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
        inputs = {"input_ids": torch.randint(1, 50, (4, 12))}
        inputs["labels"] = inputs["input_ids"]
    return model, inputs


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_an_installed_model_trains_without_torchs_serial_draws(family):
    torch.manual_seed(0)
    model, inputs = _tiny(family)
    install(model)
    model.eval()
    with torch.no_grad():
        eval_loss = model(**inputs).loss
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.manual_seed(1)
        loss = model(**inputs).loss
    assert "aten::bernoulli_" not in {event.key for event in prof.key_averages()}
    assert loss.item() != eval_loss.item()  # dropout was on
    torch.manual_seed(1)
    assert model(**inputs).loss.item() == loss.item()  # and seeded
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_applies_only_to_cpu_runs_without_gradient_checkpointing():
    on, off = SimpleNamespace(fast_dropout=True), SimpleNamespace(fast_dropout=False)
    plain, checkpointed = SimpleNamespace(gradient_checkpointing=False), SimpleNamespace(gradient_checkpointing=True)
    assert applies(on, plain, "cpu")
    assert not applies(off, plain, "cpu")
    assert not applies(on, checkpointed, "cpu")
    assert not applies(on, plain, "cuda")
