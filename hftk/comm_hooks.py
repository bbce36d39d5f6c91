"""DDP gradient communication compression, registered on the DDP module after prepare().

The hook's state (the error feedback of int8, top-k and PowerSGD, PowerSGD's warm-start matrices:
they differ on every process) is saved per process inside each checkpoint.
"""

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

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
    if settings.comm_hook in ("int8", "topk"):
        state = ErrorFeedback(model, settings.topk_ratio)
        model.register_comm_hook(state, int8_hook if settings.comm_hook == "int8" else topk_hook)
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

    def __init__(self, model: Any, topk_ratio: float):
        self.positions = {id(p): i for i, p in enumerate(model.parameters())}
        self.topk_ratio = topk_ratio
        self.residuals: dict[int, torch.Tensor] = {}

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

    def __getstate__(self) -> dict:
        return {"residuals": self.residuals}

    def __setstate__(self, saved: dict) -> None:
        self.residuals = saved["residuals"]


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


def topk_hook(state: ErrorFeedback, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Each gradient tensor sends its k = ceil(ratio x size) largest-magnitude entries (values and
    positions; the same k on every process); what is left is carried to the next step."""
    buffer = bucket.buffer()
    values, indices, offset = [], [], 0
    for position, gradient in state.tensors(bucket):
        corrected = state.corrected(position, gradient)
        k = math.ceil(state.topk_ratio * corrected.numel())
        chosen = corrected.abs().topk(k).indices
        values.append(corrected[chosen].float())
        indices.append((chosen + offset).to(torch.int32))
        state.residuals[position] = corrected.index_fill_(0, chosen, 0)
        offset += corrected.numel()
    sent = sum(v.numel() for v in values)

    def average(gathered: list[torch.Tensor]) -> torch.Tensor:
        dense = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        for payload in gathered:  # rank order on every process: all get the same bits
            where = payload[4 * sent:].view(torch.int32).long()
            dense.index_add_(0, where, payload[:4 * sent].view(torch.float32))
        buffer.copy_(dense.div_(len(gathered)))
        return buffer

    return _all_gather(_as_bytes(torch.cat(values), torch.cat(indices)), average)


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
