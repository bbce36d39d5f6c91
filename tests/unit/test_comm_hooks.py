"""The top-k hook's payload, one process at a time: what it sends decodes to exactly the chosen entries,
what it does not send stays in the residual, and the plan's byte count is the payload's length.
(tests/integration/test_compression.py runs the hooks on 2 real processes.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hftk.parallel import comm_hooks
from hftk.planning.scaling import TensorShape, ddp_collectives
from hftk.recipe import ParallelSection

# At 1%: 1,000 entries send 10 (int32 positions, 40 bytes, beat a 125-byte bitmap); 8 and 3 entries
# send 1 each (a 1-byte bitmap beats 4 bytes of position).
SIZES = (1000, 8, 3)


class Bucket:
    """What the hook reads of a dist.GradBucket: the gradients back to back, and their parameters."""

    def __init__(self, parameters: list[torch.nn.Parameter], gradients: list[torch.Tensor]):
        self._parameters, self._buffer = parameters, torch.cat(gradients)

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._parameters

    def is_last(self) -> bool:
        return True


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}",
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def parameters(sizes: tuple[int, ...] = SIZES) -> torch.nn.Module:
    module = torch.nn.Module()
    for i, size in enumerate(sizes):
        module.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(size)))
    return module


@pytest.fixture
def model() -> torch.nn.Module:
    return parameters()


def gradients(seed: int, sizes: tuple[int, ...] = SIZES) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator) for size in sizes]


def step(state: comm_hooks.ErrorFeedback, model: torch.nn.Module, grads: list[torch.Tensor],
         sent: list[int] | None = None) -> list[torch.Tensor]:
    """One hook call on a bucket of `grads`; the averaged gradients it leaves, split per tensor."""
    original = dist.all_gather

    def counting(outputs, payload, *args, **kwargs):
        sent.append(payload.numel())
        return original(outputs, payload, *args, **kwargs)

    bucket = Bucket(list(model.parameters()), [g.clone() for g in grads])
    if sent is not None:
        dist.all_gather = counting
    try:
        averaged = comm_hooks.topk_hook(state, bucket).wait()
    finally:
        dist.all_gather = original
    return list(averaged.split([g.numel() for g in grads]))


def test_bitmaps_round_trip():
    mask = torch.rand(1003, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(comm_hooks._unpack_bits(comm_hooks._pack_bits(mask))[:1003], mask)


def test_positions_take_the_smaller_form():
    assert [comm_hooks.topk_uses_bitmap(comm_hooks.topk_count(0.01, n), n) for n in SIZES] == [False, True, True]
    assert comm_hooks.topk_uses_bitmap(comm_hooks.topk_count(0.3, 1000), 1000)  # 125 bytes < 1,200


@pytest.mark.parametrize(("ratio", "sizes"), [(0.01, SIZES), (0.3, SIZES), (0.01, (1000,))],
                         ids=["int32-and-bitmaps", "bitmaps", "int32"])
def test_topk_sends_the_largest_entries_and_keeps_the_rest(world_of_one, ratio, sizes):
    model = parameters(sizes)
    state = comm_hooks.ErrorFeedback(model, topk_ratio=ratio, start_iter=0)
    first = gradients(1, sizes)
    averaged = step(state, model, first)
    for position, (gradient, result) in enumerate(zip(first, averaged)):
        chosen = gradient.abs().topk(comm_hooks.topk_count(ratio, gradient.numel())).indices
        expected = torch.zeros_like(gradient).index_copy_(0, chosen, gradient[chosen].to(torch.bfloat16).float())
        assert torch.equal(result, expected)  # a world of one: the average is what this process sent
        assert torch.equal(result + state.residuals[position], gradient)  # nothing lost, rounding included
    # The next step chooses among gradient + residual.
    second = gradients(2, sizes)
    corrected = [g + state.residuals[i] for i, g in enumerate(second)]
    averaged = step(state, model, second)
    for position, (target, result) in enumerate(zip(corrected, averaged)):
        assert torch.equal(result + state.residuals[position], target)
        assert torch.count_nonzero(result) == comm_hooks.topk_count(ratio, target.numel())


def test_warm_up_sends_plain_gradients_then_compresses(world_of_one, model):
    state = comm_hooks.ErrorFeedback(model, topk_ratio=0.01, start_iter=1)
    grads = gradients(3)
    assert all(torch.equal(a, g) for a, g in zip(step(state, model, grads), grads))
    assert state.residuals == {} and state.iteration == 1
    assert torch.count_nonzero(step(state, model, grads)[0]) == 10
    assert state.__getstate__()["iteration"] == 2


@pytest.mark.parametrize("ratio", [0.01, 0.3, 1.0])
def test_plan_counts_the_payload_the_hook_sends(world_of_one, model, ratio):
    sent: list[int] = []
    step(comm_hooks.ErrorFeedback(model, topk_ratio=ratio, start_iter=0), model, gradients(4), sent)
    shapes = [TensorShape(n, n, 4, True) for n in SIZES]
    [planned] = ddp_collectives(shapes, "topk", ParallelSection(comm_hook="topk", topk_ratio=ratio))
    assert sent == [planned.payload]
    assert planned.payload == sum(comm_hooks.topk_payload_bytes(ratio, n) for n in SIZES)


def test_ratio_falls_exponentially_to_the_target_after_the_plain_steps(world_of_one, model):
    state = comm_hooks.ErrorFeedback(model, topk_ratio=0.01, start_iter=1, decay_steps=4, decay_from=0.5)
    sent_per_step = [int(torch.count_nonzero(step(state, model, gradients(10 + i))[0])) for i in range(7)]
    ratios = [0.5, 0.5 * 0.02 ** 0.25, 0.5 * 0.02 ** 0.5, 0.5 * 0.02 ** 0.75, 0.01, 0.01]
    assert sent_per_step == [1000] + [comm_hooks.topk_count(r, 1000) for r in ratios]
    assert sent_per_step[1:] == [500, 189, 71, 27, 10, 10]


def test_momentum_correction_sends_the_accumulated_velocity_and_masks_what_it_sent(world_of_one, model):
    state = comm_hooks.ErrorFeedback(model, topk_ratio=0.1, momentum=0.9)
    first, second = gradients(5), gradients(6)
    sent = step(state, model, first)
    assert all(torch.equal(s + state.residuals[i], g) for i, (s, g) in enumerate(zip(sent, first)))
    assert all(torch.equal(state.velocities[i], g.masked_fill(s != 0, 0)) for i, (s, g) in enumerate(zip(sent, first)))
    # Next step: residual + (0.9 x masked velocity + gradient).
    accumulated = [state.residuals[i] + (0.9 * state.velocities[i] + g) for i, g in enumerate(second)]
    for i, (s, target) in enumerate(zip(step(state, model, second), accumulated)):
        assert torch.allclose(s + state.residuals[i], target, atol=1e-6)


def test_a_restored_state_continues_bit_identically(world_of_one, model, tmp_path):
    settings = {"topk_ratio": 0.01, "start_iter": 1, "decay_steps": 3, "decay_from": 0.5, "momentum": 0.9}
    unbroken = comm_hooks.ErrorFeedback(model, **settings)
    for i in range(3):
        step(unbroken, model, gradients(20 + i))
    comm_hooks.save_state(unbroken, tmp_path, 0)
    resumed = comm_hooks.ErrorFeedback(model, **settings)
    comm_hooks.load_state(resumed, tmp_path, 0)
    for i in range(3, 6):
        expected, got = step(unbroken, model, gradients(20 + i)), step(resumed, model, gradients(20 + i))
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
