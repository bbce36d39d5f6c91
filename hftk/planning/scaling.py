"""Scale on paper: the bytes each process hands to collectives per optimizer step, for every strategy
and DDP communication hook as hftk runs them, and a step-time estimate on 1 to 1024 devices.

Bytes per step are the payloads of the collectives (what a process passes to all_reduce, all_gather
or reduce_scatter), counted from the model's parameter shapes:

- DDP: one all_reduce of every trainable gradient (in the parameters' dtype) per optimizer step;
  no_sync skips the other micro-batches. fp16/bf16 halve it; int8 and top-k all_gather each
  tensor's 1-byte codes and 4-byte scale, or its k = ceil(ratio x size) bfloat16 values and their
  positions (int32, or a bitmap where that is smaller), after `topk_start_iter` steps of plain
  all_reduce and `topk_decay_steps` of a larger, falling ratio; PowerSGD all_reduces the P and Q factors of the tensors worth compressing (PyTorch's
  test: (rows + cols) x rank x min_compression_rate < rows x cols) and the rest uncompressed, after
  `powersgd_start_iter` steps of plain all_reduce.
- ZeRO and FSDP: trainable gradients reduce_scattered, parameters all_gathered (each process hands
  in its 1/n shard), in the precision the config trains in. ZeRO-1 reduces once per optimizer step
  and ZeRO-2 in every micro-batch's backward, and both gather the updated parameters after the
  step. ZeRO-3 and FSDP gather every parameter twice per micro-batch (forward, backward; FSDP with
  reshard_after_forward off once); ZeRO-3 reduces in every micro-batch, FSDP once per optimizer step.
- Tensor parallelism (tp: every device in one TP group; fsdp_tp: TP groups of the config's tp_size, 2
  where it has none, and FSDP2 over the data shards), for a family whose transformers model has a TP
  plan (`tp_plan`: `base_model_tp_plan` and the head's own entry); other families get no TP rows. The
  processes of a TP group share one batch, so the collectives carry activations: per micro-batch each
  layer of the plan hands its group what its style inserts (TP_STYLES below; for Llama, every rowwise
  layer and the vocab-parallel embedding all-reduce their output in forward, every colwise layer its
  input gradient in backward, and lm_head all-gathers its slice of the logits), at the padded shape
  (batch x longest length) of the run's mean micro-batch, in the parameters' dtype except linear
  outputs under mixed precision (activation_collectives says which). fsdp_tp adds FSDP2 as transformers applies it, one group per module of the model's
  fsdp plan: each group's shard of the TP slices gathered in every micro-batch's forward (and again in
  backward where the plan frees it), gradients reduce_scattered once per optimizer step. Clipping
  (train.max_grad_norm) all-reduces one norm per sharded gradient, once per mesh dimension it is
  sharded over. benchmarks/tp_comm_bytes.py counts a real run's collectives; tests/integration/
  test_plan_tp_comm.py checks tp.yaml and fsdp_tp.yaml against it to the byte.
- Every strategy also all_reduces the step's int64 count of target tokens (the loss normalisation).

Time follows the alpha-beta model of ring collectives on n devices with bandwidth B per device and
latency alpha per hop: all_reduce 2(n-1)/n x bytes / B + 2(n-1) alpha; all_gather of b bytes from
each process (n-1) x b / B + (n-1) alpha; reduce_scatter of a b-byte input (n-1)/n x b / B +
(n-1) alpha; DDP hooks run once per 25 MiB bucket, sharded collectives are taken as 25 MiB each.
A collective of a TP or data-shard group counts that group's size as n. A step is compute (6 x
parameters x tokens per process / device FLOP/s; a TP process computes 1/tp of its group's batch)
plus communication, with no overlap: an upper bound, and for TP's activation collectives the case
itself, since each layer waits on its own.
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
    group: int = 0  # processes taking part; 0: all of them


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
        from hftk.parallel.comm_hooks import topk_payload_bytes  # the hook's own arithmetic, rounding included

        return [Collective("all_gather", sum(topk_payload_bytes(parallel.topk_ratio, s.numel) for s in trained),
                           buckets)]
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


# Tensor-parallel styles of transformers' plans (transformers/distributed/tensor_parallel.py), by what a
# layer hands to the TP group's collectives for one micro-batch of T token positions:
#   colwise                          backward: all_reduce of the input gradient (T x in)
#   colwise_gather_output/_rep       forward: all_gather of this shard's output (T x out/tp); backward as colwise
#   rowwise                          forward: all_reduce of the partial output (T x out)
#   rowwise_split_input/_rep         forward as rowwise; backward: all_gather of the input gradient (T x in/tp)
#   embedding_rowwise                forward: all_reduce of the partial lookup (T x dim)
#   embedding_colwise                forward: all_gather of this slice of each vector (T x dim/tp)
#   replicated_with_grad_allreduce   backward: all_reduce of its parameters' gradients
COLWISE = ("colwise", "colwise_gather_output", "colwise_rep")
GATHERED_OUTPUT = ("colwise_gather_output", "colwise_rep")
ROWWISE = ("rowwise", "rowwise_split_input", "rowwise_rep")
SPLIT_INPUT = ("rowwise_split_input", "rowwise_rep")
EMBEDDING = ("embedding_rowwise", "embedding_colwise")
GRADIENT_ALL_REDUCE = "replicated_with_grad_allreduce"
TP_STYLES = (*COLWISE, *ROWWISE, *EMBEDDING, GRADIENT_ALL_REDUCE)


@dataclass(frozen=True)
class TpLayer:
    """One module of the model's tensor-parallel plan."""

    style: str
    in_width: int  # in_features of a linear layer (0 for an embedding)
    out_width: int  # out_features, or an embedding's vector size
    gradient_entries: int = 0  # replicated_with_grad_allreduce: its trained parameters' elements


@dataclass(frozen=True)
class TpParameter:
    """One parameter as TP and then FSDP2 over the data shards split it."""

    shape: tuple[int, ...]
    element_size: int
    trainable: bool
    tp_dim: int | None  # the dimension the TP plan shards; None: whole on every process of a TP group
    fsdp_group: int  # index into TensorParallelLayout.fsdp_reshards

    def local_shape(self, tp: int) -> tuple[int, ...]:
        """This process's TP slice (DTensor gives the first processes ceil(size / tp))."""
        if self.tp_dim is None:
            return self.shape
        return tuple(-(-size // tp) if dim == self.tp_dim else size for dim, size in enumerate(self.shape))

    def fsdp_shard(self, tp: int, shards: int) -> int:
        """Elements of this process's FSDP2 shard: dim 0 of the TP slice, padded to a multiple of `shards`."""
        local = self.local_shape(tp) or (1,)
        return -(-local[0] // shards) * math.prod(local[1:])


@dataclass(frozen=True)
class TensorParallelLayout:
    """What TP collectives need to know of a model (hftk.planning.tp_layout reads it)."""

    layers: list[TpLayer]
    parameters: list[TpParameter]
    fsdp_reshards: list[bool]  # per FSDP2 group: freed after forward and gathered again for backward
    heads: int  # key/value heads: the TP size must divide them
    unmodelled: list[str] = field(default_factory=list)  # plan styles whose collectives are not counted


def activation_collectives(layers: list[TpLayer], tp: int, tokens: float, element_size: int,
                           output_size: int | None = None) -> list[Collective]:
    """The TP group's collectives of one micro-batch (forward and backward) of `tokens` positions, in the
    parameters' dtype, except what a linear layer outputs under mixed precision (`output_size` bytes per
    value: autocast computes it in half precision). Measured under bf16 (benchmarks/tp_comm_bytes.py):
    rowwise outputs and lm_head's gathered logits travel in bf16; embedding outputs and every input
    gradient in backward stay fp32 (TP redistributes a linear layer's input before autocast casts it)."""
    output_size = output_size or element_size
    sums: dict[str, list[float]] = {}

    def add(op: str, payload: float) -> None:
        entry = sums.setdefault(op, [0.0, 0])
        entry[0] += payload
        entry[1] += 1

    for layer in layers:
        if layer.style in COLWISE:
            add("all_reduce", tokens * layer.in_width * element_size)
        if layer.style in GATHERED_OUTPUT:
            add("all_gather", tokens * -(-layer.out_width // tp) * output_size)
        if layer.style in ROWWISE:
            add("all_reduce", tokens * layer.out_width * output_size)
        if layer.style in SPLIT_INPUT:
            add("all_gather", tokens * -(-layer.in_width // tp) * element_size)
        if layer.style == "embedding_rowwise":
            add("all_reduce", tokens * layer.out_width * element_size)
        if layer.style == "embedding_colwise":
            add("all_gather", tokens * -(-layer.out_width // tp) * element_size)
        if layer.style == GRADIENT_ALL_REDUCE and layer.gradient_entries:
            add("all_reduce", layer.gradient_entries * element_size)
    return [Collective(op, payload, calls, group=tp) for op, (payload, calls) in sums.items()]


def fsdp_over_tp_collectives(parameters: list[TpParameter], reshards: list[bool], tp: int, shards: int,
                             accumulation: int) -> list[Collective]:
    """FSDP2 over the data shards, each group of the model's fsdp plan on its own: every group gathered in
    each micro-batch's forward, the freed ones again in its backward; gradients reduce_scattered once per
    optimizer step (the other micro-batches skip the sync)."""
    gather = reduce = 0.0
    gathers = reduces = 0
    for group, reshard in enumerate(reshards):
        members = [p for p in parameters if p.fsdp_group == group]
        if not members:
            continue
        shard_bytes = sum(p.fsdp_shard(tp, shards) * p.element_size for p in members)
        times = (2 if reshard else 1) * accumulation
        gather, gathers = gather + shard_bytes * times, gathers + times
        trained = [p for p in members if p.trainable]
        if trained:
            reduce += sum(p.fsdp_shard(tp, shards) * shards * p.element_size for p in trained)
            reduces += 1
    return [Collective("all_gather", gather, gathers, group=shards),
            Collective("reduce_scatter", reduce, reduces, group=shards)]


def clipping_collectives(parameters: list[TpParameter], tp: int, shards: int) -> list[Collective]:
    """The gradient norm of clipping: one norm per sharded (DTensor) gradient, all-reduced once per mesh
    dimension it is sharded over; what is whole on every process needs none."""
    trained = [p for p in parameters if p.trainable]
    split = [p.element_size for p in trained if p.tp_dim is not None]
    whole = [p.element_size for p in trained if p.tp_dim is None]
    collectives = [Collective("all_reduce", sum(split), group=tp)] if split else []
    if shards > 1:
        collectives += [Collective("all_reduce", sum(split), group=shards)] if split else []
        collectives += [Collective("all_reduce", sum(whole), group=shards)] if whole else []
    return collectives


@dataclass(frozen=True)
class TensorParallelRun:
    """A TP layout with what a run feeds it."""

    layout: TensorParallelLayout
    tp_size: int  # of the fsdp_tp rows: the config's tp_size (2 where the config has none)
    micro_batch_positions: float  # padded positions (batch x longest length) of a mean micro-batch
    clips: bool  # train.max_grad_norm is set
    activation_element_size: int | None = None  # bytes of a linear output under mixed precision; None: no autocast


def tp_step_collectives(run: TensorParallelRun, tp: int, shards: int, accumulation: int) -> list[Collective]:
    """One optimizer step of `tp` x `shards` processes: the token count, every micro-batch's activation
    collectives in the TP group, FSDP2's over the data shards, and clipping's norm."""
    if tp * shards == 1:
        return []
    element_size = max((p.element_size for p in run.layout.parameters), default=4)
    per_micro_batch = activation_collectives(run.layout.layers, tp, run.micro_batch_positions, element_size,
                                             run.activation_element_size)
    collectives = [Collective("all_reduce", TOKEN_COUNT_BYTES),
                   *(Collective(c.op, c.payload * accumulation, c.calls * accumulation, c.group)
                     for c in per_micro_batch)]
    if shards > 1:
        collectives += fsdp_over_tp_collectives(run.layout.parameters, run.layout.fsdp_reshards, tp, shards,
                                                accumulation)
    if run.clips:
        collectives += clipping_collectives(run.layout.parameters, tp, shards)
    return collectives


def tp_layouts(run: TensorParallelRun, device_counts: tuple[int, ...]) -> list[tuple[str, int, int, int]]:
    """(strategy, devices, tp, data shards) of the TP rows: "tp" puts every device in one TP group (where
    that many divide the heads), "fsdp_tp" keeps TP groups of run.tp_size and shards the data over the rest."""
    rows = [("tp", n, n, 1) for n in device_counts if run.layout.heads % n == 0]
    return rows + [("fsdp_tp", n, run.tp_size, n // run.tp_size) for n in device_counts
                   if n % run.tp_size == 0 and run.layout.heads % run.tp_size == 0]


def ring_wire_bytes(collective: Collective, processes: int) -> float:
    """Bytes one process sends on a ring (of the collective's group)."""
    n = collective.group or processes
    if collective.op == "all_reduce":
        return 2 * (n - 1) / n * collective.payload
    if collective.op == "all_gather":
        return (n - 1) * collective.payload
    return (n - 1) / n * collective.payload  # reduce_scatter


def ring_seconds(collective: Collective, processes: int, bytes_per_second: float, latency: float) -> float:
    hops = (2 if collective.op == "all_reduce" else 1) * ((collective.group or processes) - 1) * collective.calls
    return ring_wire_bytes(collective, processes) / bytes_per_second + hops * latency


@dataclass
class Interconnect:
    bandwidth_gbps: float = 100.0  # gigabits per second per device
    latency_us: float = 5.0  # alpha: one hop of a ring
    tflops: float = 100.0  # achieved dense TFLOP/s per device

    @property
    def bytes_per_second(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8


@dataclass(kw_only=True)
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
    tp_size: int = 1  # processes of one tensor-parallel group (tp and fsdp_tp rows)


@dataclass
class ScalePlan:
    interconnect: Interconnect
    compute_seconds_per_step: float  # per process, at the recipe's per-device batch
    tokens_per_process_step: float
    comm_hook: str  # the recipe's
    rows: list[ScaleRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # "probe": measured here by `hftk plan --probe`; "tflops": 6 x parameters x tokens at interconnect.tflops
    compute_source: str = "tflops"


def scale_row(strategy: str, hook: str, processes: int, collectives: list[Collective], link: Interconnect,
              compute: float, tokens: float, tp_size: int = 1) -> ScaleRow:
    communication = sum(ring_seconds(c, processes, link.bytes_per_second, link.latency_us * 1e-6)
                        for c in collectives)
    step = compute + communication
    return ScaleRow(strategy=strategy, comm_hook=hook, processes=processes,
                    bytes_per_step=round(sum(c.payload for c in collectives)),
                    wire_bytes_per_step=round(sum(ring_wire_bytes(c, processes) for c in collectives)),
                    communication_seconds=communication, step_seconds=step,
                    tokens_per_second=tokens * processes / step if step else 0.0,
                    scaling_efficiency=compute / step if step else 1.0, tp_size=tp_size)


def scale_plan(shapes: list[TensorShape], parallel: Any, precision: Any, accumulation: int,
               tokens_per_process_step: float, link: Interconnect, device_counts: tuple[int, ...],
               tensor_parallel: TensorParallelRun | None = None,
               measured_step_seconds: float | None = None) -> ScalePlan:
    """Every (strategy, hook) at every device count; the per-device batch stays the recipe's (a TP group's
    batch under TP). TP rows only for a model with a tensor-parallel plan. The compute of a step is the
    one-process step `hftk plan --probe` measured here, or else 6 x parameters x tokens at link.tflops."""
    parameters = sum(s.numel for s in shapes)
    if measured_step_seconds is not None:
        compute, source = measured_step_seconds, "probe"
    else:
        compute, source = 6 * parameters * tokens_per_process_step / (link.tflops * 1e12), "tflops"
    plan = ScalePlan(link, compute, tokens_per_process_step, parallel.comm_hook, compute_source=source)
    combinations = [("ddp", hook) for hook in HOOKS] + [(strategy, "none") for strategy in SHARDED]
    for strategy, hook in combinations:
        for n in device_counts:
            collectives = step_collectives(strategy, hook, shapes, parallel, precision, n, accumulation)
            plan.rows.append(scale_row(strategy, hook, n, collectives, link, compute, tokens_per_process_step))
    plan.notes.append(f"powersgd: PyTorch's hook all-reduces in full (as none) for its first "
                      f"{parallel.powersgd_start_iter} steps (parallel.powersgd_start_iter)")
    plan.notes.append(f"topk: plain all_reduce (as none) for its first {parallel.topk_start_iter} steps "
                      "(parallel.topk_start_iter)" + (
                          f", then a ratio falling from {parallel.topk_decay_from:g} to {parallel.topk_ratio:g} over "
                          f"{parallel.topk_decay_steps} steps (parallel.topk_decay_steps); the table counts the "
                          "steps after" if parallel.topk_decay_steps else ""))
    plan.notes.append("int8 and topk gather every process's payload: their bytes on the wire grow with n, "
                      "an all_reduce's do not")
    if tensor_parallel is not None:
        add_tp_rows(plan, tensor_parallel, accumulation, compute, device_counts)
    return plan


def add_tp_rows(plan: ScalePlan, run: TensorParallelRun, accumulation: int, compute: float,
                device_counts: tuple[int, ...]) -> None:
    """A TP group shares one batch: each process computes 1/tp of it, and its layers' collectives wait on
    (and hold up) that compute, so they count in full."""
    for strategy, n, tp, shards in tp_layouts(run, device_counts):
        collectives = tp_step_collectives(run, tp, shards, accumulation)
        plan.rows.append(scale_row(strategy, "none", n, collectives, plan.interconnect, compute / tp,
                                   plan.tokens_per_process_step / tp, tp))
    plan.notes.append(f"tp, fsdp_tp: activations of {run.micro_batch_positions:,.0f} padded positions per "
                      f"micro-batch (the recipe's per-device batch, as the data splits over this launch)"
                      f"; fsdp_tp keeps TP groups of {run.tp_size}; tp needs the device count to divide the "
                      f"model's {run.layout.heads} key/value heads")
    if run.layout.unmodelled:
        plan.notes.append(f"tp: the plan's {', '.join(run.layout.unmodelled)} layers are not counted")
