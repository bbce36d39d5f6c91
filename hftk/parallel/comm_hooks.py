"""DDP gradient communication compression, registered on the DDP module after prepare().

The hook's state (the error feedback of int8, top-k and PowerSGD, PowerSGD's warm-start matrices:
they differ on every process) is saved per process inside each checkpoint.
"""

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from hftk.errors import UserError
from hftk.recipe import ParallelSection


def check_supported(settings: ParallelSection, accelerator: Any, ddp: bool) -> None:
    if settings.comm_hook != "none" and not (ddp and accelerator.num_processes > 1):
        raise UserError(
            f"parallel.comm_hook={settings.comm_hook} compresses DDP gradients, but this launch is "
            f"{accelerator.distributed_type} with {accelerator.num_processes} process(es); use a DDP config "
            "(accelerate_configs/ddp.yaml) or parallel.comm_hook=none"
        )


def register(model: Any, settings: ParallelSection) -> Any:
    """Registers the hook on a DDP module; returns the hook state to checkpoint (or None)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    if settings.comm_hook == "none":
        return None
    if settings.comm_hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=settings.powersgd_rank,
            start_powerSGD_iter=settings.powersgd_start_iter,
            min_compression_rate=settings.powersgd_min_compression_rate,
        )
        model.register_comm_hook(state, powersgd_hook_in_order)
        return state
    if settings.comm_hook == "int8":
        state = ErrorFeedback(model)
        model.register_comm_hook(state, int8_hook)
        return state
    if settings.comm_hook == "topk":
        state = ErrorFeedback(model, settings.topk_ratio, settings.topk_start_iter, settings.topk_decay_steps,
                              settings.topk_decay_from, settings.topk_momentum)
        model.register_comm_hook(state, topk_hook)
        return state
    hook = default_hooks.fp16_compress_hook if settings.comm_hook == "fp16" else bfloat16_all_reduce_hook
    model.register_comm_hook(None, hook)
    return None


# Real (not postponed) annotations: DDP checks the hook's signature against dist.GradBucket.
def powersgd_hook_in_order(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's PowerSGD hook, one bucket's collectives at a time.

    The hook starts its second and third collectives from the callbacks of the first, on Gloo's worker
    thread, while the backward pass starts the next bucket's from the main thread. Gloo numbers
    collectives in the order each process starts them, so the two threads can number them differently
    on different processes: the run hangs, or Gloo aborts with "received data size doesn't match"
    (tests/integration/test_compression.py, with many small buckets). Waiting here for the bucket's whole
    chain gives every process the same order; a hook with one collective per bucket needs no wait.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    future = powerSGD_hook.powerSGD_hook(state, bucket)
    future.wait()
    return future


def bfloat16_all_reduce_hook(process_group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce gradients as bfloat16. DDP refuses any hook *named* bf16_compress_hook off NCCL/XCCL,
    while Gloo reduces bfloat16 fine; this is the same cast-reduce-cast with no backend check."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())

    def decompress(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        buffer.copy_(future.value()[0])  # in place: no second full-precision copy
        return buffer

    return dist.all_reduce(compressed, group=group, async_op=True).get_future().then(decompress)


class ErrorFeedback:
    """What a lossy hook did not send, per gradient tensor, added to that tensor's next gradient.

    Kept per parameter (by its position in the model), not per bucket: DDP regroups its buckets after
    the first step and a resumed DDP starts from the first grouping again, so a bucket index does not
    name the same gradients across a resume. Compressed tensor by tensor, the result does not depend
    on the grouping at all, and a resumed run stays bit-identical to an unbroken one.
    """

    def __init__(self, model: Any, topk_ratio: float = 1.0, start_iter: int = 0, decay_steps: int = 0,
                 decay_from: float = 1.0, momentum: float = 0.0):
        self.positions = {id(p): i for i, p in enumerate(model.parameters())}
        self.topk_ratio = topk_ratio
        self.start_iter = start_iter
        self.decay_steps = decay_steps
        self.decay_from = max(decay_from, topk_ratio)
        self.momentum = momentum
        self.iteration = 0  # optimizer steps communicated so far (DDP calls hooks on the last micro-batch only)
        self.residuals: dict[int, torch.Tensor] = {}
        self.velocities: dict[int, torch.Tensor] = {}  # momentum correction's local velocity (momentum > 0)

    def step_ratio(self, bucket: dist.GradBucket) -> float | None:
        """This step's top-k ratio (None: a plain step); counts the step once its last bucket is in.

        After the plain steps the ratio falls exponentially from decay_from to topk_ratio over
        decay_steps steps (Deep Gradient Compression's warm-up): the same on every process, so every
        payload of a step has one size."""
        compressed = self.iteration - self.start_iter
        if bucket.is_last():
            self.iteration += 1
        if compressed < 0:
            return None
        if compressed >= self.decay_steps:
            return self.topk_ratio
        return self.decay_from * (self.topk_ratio / self.decay_from) ** (compressed / self.decay_steps)

    def tensors(self, bucket: dist.GradBucket) -> list[tuple[int, torch.Tensor]]:
        """(parameter position, flat gradient) for each tensor of the bucket, in buffer order."""
        parameters = bucket.parameters()
        buffer = bucket.buffer()
        sizes = [p.numel() for p in parameters]
        if sum(sizes) != buffer.numel():  # the buffer is the bucket's gradients back to back
            raise RuntimeError(f"DDP bucket of {buffer.numel()} entries holds gradients of {sum(sizes)}")
        return [(self.positions[id(p)], flat) for p, flat in zip(parameters, buffer.split(sizes))]

    def corrected(self, position: int, gradient: torch.Tensor) -> torch.Tensor:
        """This step's gradient plus what earlier steps left unsent (a new tensor)."""
        residual = self.residuals.get(position)
        return gradient + residual if residual is not None else gradient.clone()

    def accumulated(self, position: int, gradient: torch.Tensor) -> torch.Tensor:
        """What top-k chooses from: the corrected gradient, or with momentum correction the residual
        plus the local velocity (u = momentum x u + g), so that momentum is applied before, not
        after, sparsification (a new tensor; the velocity is updated in place)."""
        if not self.momentum:
            return self.corrected(position, gradient)
        velocity = self.velocities.get(position)
        velocity = gradient.clone() if velocity is None else velocity.mul_(self.momentum).add_(gradient)
        self.velocities[position] = velocity
        return self.corrected(position, velocity)

    def sent(self, position: int, accumulated: torch.Tensor, chosen: torch.Tensor, value: torch.Tensor) -> None:
        """Keeps what was not sent (and the rounding of what was); momentum factor masking: a sent
        entry's velocity restarts from zero, so it is not sent again through the momentum alone."""
        self.residuals[position] = accumulated.index_add_(0, chosen, value.to(accumulated.dtype), alpha=-1)
        if self.momentum:
            self.velocities[position].index_fill_(0, chosen, 0)

    def __getstate__(self) -> dict:
        return {"residuals": self.residuals, "iteration": self.iteration, "velocities": self.velocities}

    def __setstate__(self, saved: dict) -> None:
        self.residuals = saved["residuals"]
        self.iteration = saved["iteration"]
        self.velocities = saved.get("velocities", {})  # saved before momentum correction existed: none


def _as_bytes(*tensors: torch.Tensor) -> torch.Tensor:
    # One collective per bucket whatever the dtypes inside; the bytes only travel, never add up.
    return torch.cat([t.contiguous().view(torch.uint8) for t in tensors])


def _all_gather(payload: torch.Tensor, finish: Any) -> torch.futures.Future[torch.Tensor]:
    """all_gather into a list this closure keeps: the future's own value is shaped differently on Gloo
    and NCCL (torch's quantization hooks index it as a nested list and fail on Gloo)."""
    group = dist.group.WORLD
    gathered = [torch.empty_like(payload) for _ in range(group.size())]
    work = dist.all_gather(gathered, payload, group=group, async_op=True)
    return work.get_future().then(lambda _: finish(gathered))


def int8_hook(state: ErrorFeedback, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Each gradient tensor as int8 with its own scale (max |value| / 127); the rounding error is
    carried to the next step. Every process dequantizes all the others' and averages locally."""
    buffer = bucket.buffer()
    codes, scales, sizes = [], [], []
    for position, gradient in state.tensors(bucket):
        corrected = state.corrected(position, gradient)
        scale = corrected.abs().max().float() / 127
        code = torch.round(corrected / torch.where(scale > 0, scale, 1)).clamp_(-127, 127).to(torch.int8)
        state.residuals[position] = corrected - code.to(corrected.dtype) * scale.to(corrected.dtype)
        codes.append(code)
        scales.append(scale)
        sizes.append(code.numel())
    count = buffer.numel()

    def average(gathered: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(count, dtype=torch.float32, device=buffer.device)
        repeats = torch.tensor(sizes, device=buffer.device)
        for payload in gathered:  # rank order on every process: all get the same bits
            scale = payload[:4 * len(sizes)].view(torch.float32).repeat_interleave(repeats)
            total += payload[4 * len(sizes):].view(torch.int8).float() * scale
        buffer.copy_(total.div_(len(gathered)))
        return buffer

    # Scales first: a float32 view needs a 4-byte-aligned start.
    return _all_gather(_as_bytes(torch.stack(scales), torch.cat(codes)), average)


TOPK_VALUES = torch.bfloat16  # error feedback carries the rounding, as it carries what is not sent


def topk_count(ratio: float, numel: int) -> int:
    """Entries a tensor sends per step; the same on every process, so every payload has one size."""
    return math.ceil(ratio * numel)


def topk_uses_bitmap(k: int, numel: int) -> bool:
    """A tensor's positions travel as a bitmap (1 bit per entry) where that is smaller than int32 positions."""
    return math.ceil(numel / 8) < 4 * k


def topk_payload_bytes(ratio: float, numel: int) -> int:
    """Bytes one gradient tensor puts in the top-k payload: bf16 values and their positions."""
    k = topk_count(ratio, numel)
    return 2 * k + min(4 * k, math.ceil(numel / 8))


_BITS = 2 ** torch.arange(8, dtype=torch.int16)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(mask.to(torch.int16), (0, -mask.numel() % 8))
    return (padded.view(-1, 8) * _BITS.to(mask.device)).sum(1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    return (packed.to(torch.int16).unsqueeze(1).bitwise_and(_BITS.to(packed.device)) != 0).flatten()


def topk_hook(state: ErrorFeedback, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Each gradient tensor sends its k = ceil(ratio x size) largest-magnitude entries as bfloat16, with
    their positions as int32 or as a bitmap, whichever is smaller; what is left (the unsent entries and
    the rounding of the sent ones) is carried to the next step. Plain all-reduce before
    `topk_start_iter`, then a ratio falling to `topk_ratio`: early gradients change fastest, and an
    entry waiting in the residual then costs most (benchmarks/RESULTS.md)."""
    buffer = bucket.buffer()
    ratio = state.step_ratio(bucket)
    if ratio is None:
        return default_hooks.allreduce_hook(None, bucket)  # what DDP does with no hook
    listed, bitmaps, listed_values, bitmap_values = [], [], [], []
    # A bitmapped tensor's set bit at i (counting over the padded bitmaps) is bucket position i + shift.
    shifts, counts, offset, bit_offset = [], [], 0, 0
    for position, gradient in state.tensors(bucket):
        corrected = state.accumulated(position, gradient)
        k = topk_count(ratio, corrected.numel())
        chosen = corrected.abs().topk(k, sorted=False).indices.sort().values  # in position order
        value = corrected[chosen].to(TOPK_VALUES)
        if topk_uses_bitmap(k, corrected.numel()):
            bitmaps.append(_pack_bits(torch.zeros_like(corrected, dtype=torch.bool).index_fill_(0, chosen, True)))
            bitmap_values.append(value)
            shifts.append(offset - bit_offset)
            counts.append(k)
            bit_offset += 8 * bitmaps[-1].numel()
        else:
            listed.append((chosen + offset).to(torch.int32))
            listed_values.append(value)
        state.sent(position, corrected, chosen, value)
        offset += corrected.numel()
    n_listed, n_bitmapped = sum(t.numel() for t in listed), sum(t.numel() for t in bitmap_values)
    shift = torch.tensor(shifts, dtype=torch.long).repeat_interleave(torch.tensor(counts, dtype=torch.long))
    shift = shift.to(buffer.device)

    def average(gathered: list[torch.Tensor]) -> torch.Tensor:
        dense = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        for payload in gathered:  # rank order on every process: all get the same bits
            values = payload[4 * n_listed:4 * n_listed + 2 * (n_listed + n_bitmapped)].view(TOPK_VALUES).float()
            if n_listed:
                dense.index_add_(0, payload[:4 * n_listed].view(torch.int32).long(), values[:n_listed])
            if n_bitmapped:
                bits = _unpack_bits(payload[6 * n_listed + 2 * n_bitmapped:])
                dense.index_add_(0, bits.nonzero().squeeze(1) + shift, values[n_listed:])
        buffer.copy_(dense.div_(len(gathered)))
        return buffer

    # int32 positions first, then bf16 values, then bitmaps: each view starts aligned to its dtype.
    return _all_gather(_as_bytes(*listed, *listed_values, *bitmap_values, *bitmaps), average)


def _path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"comm_hook_state_{rank}.pt"


def save_state(state: Any, folder: Path, rank: int) -> None:
    if state is not None:
        torch.save(state.__getstate__(), _path(folder, rank))


def load_state(state: Any, folder: Path, rank: int) -> None:
    if state is None:
        return
    path = _path(folder, rank)
    if not path.is_file():
        raise UserError(f"{folder} has no communication hook state for process {rank}; it was saved without this hook")
    state.__setstate__(torch.load(path, weights_only=False))
