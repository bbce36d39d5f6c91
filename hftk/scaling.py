"""Scale on paper: the bytes each process hands to collectives per optimizer step, for every strategy
and DDP communication hook as hftk runs them, and a step-time estimate on 1 to 1024 devices.

Bytes per step are the payloads of the collectives (what a process passes to all_reduce, all_gather
or reduce_scatter), counted from the model's parameter shapes:

- DDP: one all_reduce of every trainable gradient (in the parameters' dtype) per optimizer step;
  no_sync skips the other micro-batches. fp16/bf16 halve it; int8 and top-k all_gather each
  tensor's 1-byte codes and 4-byte scale, or its k = ceil(ratio x size) float32 values and int32
  positions; PowerSGD all_reduces the P and Q factors of the tensors worth compressing (PyTorch's
  test: (rows + cols) x rank x min_compression_rate < rows x cols) and the rest uncompressed, after
  `powersgd_start_iter` steps of plain all_reduce.
- ZeRO and FSDP: trainable gradients reduce_scattered, parameters all_gathered (each process hands
  in its 1/n shard), in the precision the config trains in. ZeRO-1 reduces once per optimizer step
  and ZeRO-2 in every micro-batch's backward, and both gather the updated parameters after the
  step. ZeRO-3 and FSDP gather every parameter twice per micro-batch (forward, backward; FSDP with
  reshard_after_forward off once); ZeRO-3 reduces in every micro-batch, FSDP once per optimizer step.
- Every strategy also all_reduces the step's int64 count of target tokens (the loss normalisation).

Time follows the alpha-beta model of ring collectives on n devices with bandwidth B per device and
latency alpha per hop: all_reduce 2(n-1)/n x bytes / B + 2(n-1) alpha; all_gather of b bytes from
each process (n-1) x b / B + (n-1) alpha; reduce_scatter of a b-byte input (n-1)/n x b / B +
(n-1) alpha; DDP hooks run once per 25 MiB bucket, sharded collectives are taken as 25 MiB each.
A step is compute (6 x parameters x tokens per process / device FLOP/s) plus communication, with no
overlap: an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DEVICE_COUNTS = (1, 2, 8, 64, 1024)
HOOKS = ("none", "fp16", "bf16", "int8", "topk", "powersgd")
SHARDED = ("zero1", "zero2", "zero3", "fsdp_shard_grad_op", "fsdp")
BUCKET_BYTES = 25 * 2**20  # DDP's bucket_cap_mb; also taken as the size of one sharded collective
TOKEN_COUNT_BYTES = 8  # the int64 target-token count each step all-reduces


@dataclass(frozen=True)
class TensorShape:
    """What the collectives need to know of one parameter."""

    numel: int
    rows: int  # shape[0]: PowerSGD views a gradient as rows x (numel / rows)
    element_size: int
    trainable: bool


def tensor_shapes(model: Any) -> list[TensorShape]:
    """Each parameter once (tied weights are one parameter), in the model's order."""
    return [TensorShape(p.numel(), p.shape[0] if p.dim() else 1, p.element_size(), p.requires_grad)
            for p in model.parameters()]


@dataclass(frozen=True)
class Collective:
    op: str  # all_reduce | all_gather | reduce_scatter
    payload: float  # bytes this process hands in per optimizer step, all calls together
    calls: int = 1


def _calls(payload: float) -> int:
    return max(1, math.ceil(payload / BUCKET_BYTES))


def _collective(op: str, payload: float, repeats: int = 1) -> Collective:
    return Collective(op, payload * repeats, _calls(payload) * repeats)


def ddp_collectives(shapes: list[TensorShape], hook: str, parallel: Any) -> list[Collective]:
    """The gradient collectives of one DDP optimizer step under `hook` (steady state); a hook runs
    once per DDP bucket."""
    trained = [s for s in shapes if s.trainable]
    entries = sum(s.numel for s in trained)
    gradient_bytes = sum(s.numel * s.element_size for s in trained)
    buckets = _calls(gradient_bytes)
    if hook == "none":
        return [Collective("all_reduce", gradient_bytes, buckets)]
    if hook in ("fp16", "bf16"):
        return [Collective("all_reduce", 2 * entries, buckets)]
    if hook == "int8":
        return [Collective("all_gather", entries + 4 * len(trained), buckets)]
    if hook == "topk":
        # The same expression as the hook's k, so the float rounding matches too.
        sent = sum(math.ceil(parallel.topk_ratio * s.numel) for s in trained)
        return [Collective("all_gather", 8 * sent, buckets)]
    if hook == "powersgd":
        return powersgd_collectives(trained, parallel.powersgd_rank, parallel.powersgd_min_compression_rate, buckets)
    raise ValueError(f"unknown communication hook {hook!r}")


def powersgd_collectives(trained: list[TensorShape], rank: int, min_compression_rate: float,
                         buckets: int) -> list[Collective]:
    """The uncompressed rest, then P, then Q, each all-reduced in the gradients' dtype per bucket."""
    rest = p_size = q_size = 0
    for shape in trained:
        rows, cols = shape.rows, shape.numel // shape.rows
        r = min(rows, cols, rank)
        if (rows + cols) * r * min_compression_rate < rows * cols:
            p_size, q_size = p_size + rows * r, q_size + cols * r
        else:
            rest += shape.numel
    size = trained[0].element_size if trained else 4
    return [Collective("all_reduce", n * size, buckets) for n in (rest, p_size, q_size)]


def sharded_collectives(strategy: str, shapes: list[TensorShape], precision: Any, processes: int,
                        accumulation: int) -> list[Collective]:
    """Gradient reduce_scatter and parameter all_gather of ZeRO / FSDP on `processes` devices."""
    gradients = sum(s.numel for s in shapes if s.trainable) * precision.gradients
    trained_shard = math.ceil(sum(s.numel for s in shapes if s.trainable) * precision.weights / processes)
    every_shard = math.ceil(sum(s.numel for s in shapes) * precision.weights / processes)
    if strategy == "zero1":
        return [_collective("reduce_scatter", gradients), _collective("all_gather", trained_shard)]
    if strategy == "zero2":
        return [_collective("reduce_scatter", gradients, accumulation), _collective("all_gather", trained_shard)]
    if strategy == "zero3":
        return [_collective("all_gather", every_shard, 2 * accumulation),
                _collective("reduce_scatter", gradients, accumulation)]
    gathers = 2 if strategy == "fsdp" else 1  # fsdp_shard_grad_op keeps the gathered weights for backward
    return [_collective("all_gather", every_shard, gathers * accumulation), _collective("reduce_scatter", gradients)]


def step_collectives(strategy: str, hook: str, shapes: list[TensorShape], parallel: Any, precision: Any,
                     processes: int, accumulation: int) -> list[Collective]:
    """Everything one process hands to collectives in one optimizer step; nothing on one device."""
    if processes == 1:
        return []
    gradients = (ddp_collectives(shapes, hook, parallel) if strategy == "ddp"
                 else sharded_collectives(strategy, shapes, precision, processes, accumulation))
    return [Collective("all_reduce", TOKEN_COUNT_BYTES), *gradients]


def ring_wire_bytes(collective: Collective, processes: int) -> float:
    """Bytes one process sends on a ring."""
    n = processes
    if collective.op == "all_reduce":
        return 2 * (n - 1) / n * collective.payload
    if collective.op == "all_gather":
        return (n - 1) * collective.payload
    return (n - 1) / n * collective.payload  # reduce_scatter


def ring_seconds(collective: Collective, processes: int, bytes_per_second: float, latency: float) -> float:
    hops = (2 if collective.op == "all_reduce" else 1) * (processes - 1) * collective.calls
    return ring_wire_bytes(collective, processes) / bytes_per_second + hops * latency


@dataclass
class Interconnect:
    bandwidth_gbps: float = 100.0  # gigabits per second per device
    latency_us: float = 5.0  # alpha: one hop of a ring
    tflops: float = 100.0  # achieved dense TFLOP/s per device

    @property
    def bytes_per_second(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8


@dataclass
class ScaleRow:
    strategy: str
    comm_hook: str
    processes: int
    bytes_per_step: int  # handed to collectives by one process
    wire_bytes_per_step: int  # sent by one process on a ring
    communication_seconds: float
    step_seconds: float
    tokens_per_second: float  # all processes together
    scaling_efficiency: float  # compute / step time


@dataclass
class ScalePlan:
    interconnect: Interconnect
    compute_seconds_per_step: float  # per process, at the recipe's per-device batch
    tokens_per_process_step: float
    comm_hook: str  # the recipe's
    rows: list[ScaleRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def scale_row(strategy: str, hook: str, processes: int, collectives: list[Collective], link: Interconnect,
              compute: float, tokens: float) -> ScaleRow:
    communication = sum(ring_seconds(c, processes, link.bytes_per_second, link.latency_us * 1e-6)
                        for c in collectives)
    step = compute + communication
    return ScaleRow(strategy, hook, processes, round(sum(c.payload for c in collectives)),
                    round(sum(ring_wire_bytes(c, processes) for c in collectives)), communication, step,
                    tokens * processes / step if step else 0.0, compute / step if step else 1.0)


def scale_plan(shapes: list[TensorShape], parallel: Any, precision: Any, accumulation: int,
               tokens_per_process_step: float, link: Interconnect, device_counts: tuple[int, ...]) -> ScalePlan:
    """Every (strategy, hook) at every device count; the per-device batch stays the recipe's."""
    parameters = sum(s.numel for s in shapes)
    compute = 6 * parameters * tokens_per_process_step / (link.tflops * 1e12)
    plan = ScalePlan(link, compute, tokens_per_process_step, parallel.comm_hook)
    combinations = [("ddp", hook) for hook in HOOKS] + [(strategy, "none") for strategy in SHARDED]
    for strategy, hook in combinations:
        for n in device_counts:
            collectives = step_collectives(strategy, hook, shapes, parallel, precision, n, accumulation)
            plan.rows.append(scale_row(strategy, hook, n, collectives, link, compute, tokens_per_process_step))
    plan.notes.append(f"powersgd: PyTorch's hook all-reduces in full (as none) for its first "
                      f"{parallel.powersgd_start_iter} steps (parallel.powersgd_start_iter)")
    plan.notes.append("int8 and topk gather every process's payload: their bytes on the wire grow with n, "
                      "an all_reduce's do not")
    return plan
