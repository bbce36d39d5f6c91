"""How the model, optimizer and data are spread over the processes: one Strategy per kind of launch.

The loop, checkpointing and generation ask a strategy only what the `Strategy` protocol states. Accelerate
runs single device, DDP, DeepSpeed and GPU FSDP; hftk runs FSDP2 on CPUs and tensor parallelism itself,
since Accelerate refuses both there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hftk.errors import UserError
from hftk.logs import log
from hftk.parallel import comm_hooks, tensor_parallel
from hftk.parallel.launch import cpu_fsdp_requested, reshard_after_forward
from hftk.parallel.tensor_parallel import Sizes


class Strategy(Protocol):
    """What the rest of hftk asks of a strategy. Each is built before any model loads, so its __init__
    refuses recipe settings it cannot honour while that is still bad input."""

    counts_tokens: bool  # whether this process's target tokens count in the global token total

    def prepare(self, accelerator: Any, model: Any, make_optimizer: Callable[[Any], Any],
                loader: Any) -> tuple[Any, Any, Any]:
        """The model, its optimizer (made from the prepared model) and the training loader, ready to train."""

    def data_processes(self, accelerator: Any) -> int:
        """How many processes read different batches (the global batch is this times the per-device one)."""

    def prepare_loader(self, accelerator: Any, loader: Any) -> Any:
        """A loader split over the processes that read different batches."""

    def full_state_dict(self, accelerator: Any, model: Any) -> dict:
        """The whole model's weights, gathered, without tied copies (for save_pretrained)."""

    def save_extra(self, accelerator: Any, folder: Path, model: Any, optimizer: Any) -> None:
        """What Accelerate's save_state does not hold (sharded states, hook residuals), into a checkpoint."""

    def load_extra(self, accelerator: Any, folder: Path, model: Any, optimizer: Any) -> None:
        """The counterpart of save_extra, after Accelerate's load_state."""


def shards_parameters(accelerator: Any, model: Any) -> bool:
    """With sharded parameters (ZeRO-3, FSDP) every process must run as many forward passes as the
    slowest one while generating, or the parameter all-gathers deadlock."""
    if accelerator.num_processes == 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return bool(plugin and plugin.zero_stage == 3) or isinstance(model, FSDPModule) or accelerator.is_fsdp2


def forward_in_mixed_precision(accelerator: Any, model: Any) -> None:
    """Runs the model's forward under the launch's mixed precision, as Accelerate's prepare() does for a
    model it wraps. The strategies that shard the model themselves (FSDP2 on CPUs, tensor parallelism)
    never hand it to prepare(), and without this a bf16 launch or train.bf16 trained in fp32."""
    if accelerator.mixed_precision == "no":
        return
    import functools

    forward = model.forward

    @functools.wraps(forward)
    def forward_under_autocast(*args: Any, **kwargs: Any) -> Any:
        with accelerator.autocast():
            return forward(*args, **kwargs)

    model.forward = forward_under_autocast


def without_tied_copies(model: Any, state_dict: dict | None) -> dict | None:
    """Gathered state dicts repeat a tied weight under every alias as separate copies, which
    save_pretrained cannot recognise as tied; keep the names named_parameters() keeps."""
    if state_dict is None:
        return None
    keep = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: value for name, value in state_dict.items() if name in keep}


class AccelerateStrategy:
    """Single device, DDP, DeepSpeed and GPU FSDP: Accelerate's prepare() does it all."""

    counts_tokens = True

    def __init__(self, settings: Any, accelerator: Any):
        from accelerate.utils import DistributedType

        self.settings = settings  # the recipe's ParallelSection
        self.hook_state = None
        ddp = accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
        comm_hooks.check_supported(settings, accelerator, ddp)

    def prepare(self, accelerator: Any, model: Any, make_optimizer: Any, loader: Any):
        model, optimizer, loader = accelerator.prepare(model, make_optimizer(model), loader)
        self.hook_state = comm_hooks.register(model, self.settings)
        return model, optimizer, loader

    def data_processes(self, accelerator: Any) -> int:
        """How many processes read different batches (the global batch is this times the per-device one)."""
        return accelerator.num_processes

    def prepare_loader(self, accelerator: Any, loader: Any) -> Any:
        return accelerator.prepare(loader)

    def full_state_dict(self, accelerator: Any, model: Any) -> dict:
        # get_state_dict gathers ZeRO-3 / FSDP shards.
        return without_tied_copies(accelerator.unwrap_model(model), accelerator.get_state_dict(model))

    def save_extra(self, accelerator: Any, folder: Any, model: Any, optimizer: Any) -> None:
        comm_hooks.save_state(self.hook_state, folder, accelerator.process_index)

    def load_extra(self, accelerator: Any, folder: Any, model: Any, optimizer: Any) -> None:
        comm_hooks.load_state(self.hook_state, folder, accelerator.process_index)


class CpuFsdpStrategy:
    """FSDP on CPUs: PyTorch's fully_shard over Gloo, since Accelerate's FSDP will not run there.

    Each transformer block is its own shard group; the root group holds the rest, so tied
    embeddings (T5, GPT-2) share one group. Model and optimizer shards are checkpointed with
    torch.distributed.checkpoint, one file set per process.
    """

    SHARDED = "sharded_state"
    counts_tokens = True

    def __init__(self, settings: Any, accelerator: Any):
        comm_hooks.check_supported(settings, accelerator, ddp=False)

    def prepare(self, accelerator: Any, model: Any, make_optimizer: Any, loader: Any):
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or [])
        reshard = reshard_after_forward()
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        # The root's state is set up by its first forward; an evaluation before any training step
        # (train.eval_on_start) enters through the encoder instead, which FSDP2 refuses: set it up now.
        model._get_fsdp_state()._lazy_init()
        forward_in_mixed_precision(accelerator, model)
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        log.info(f"fully_shard over {accelerator.num_processes} processes: this one holds {local} of {total} parameters")
        # Only the loader goes through prepare(): Accelerate would wrap the sharded model in DDP.
        return model, make_optimizer(model), accelerator.prepare(loader)

    def data_processes(self, accelerator: Any) -> int:
        """How many processes read different batches (the global batch is this times the per-device one)."""
        return accelerator.num_processes

    def prepare_loader(self, accelerator: Any, loader: Any) -> Any:
        return accelerator.prepare(loader)

    def full_state_dict(self, accelerator: Any, model: Any) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return without_tied_copies(model, full)

    def _states(self, model: Any, optimizer: Any) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save_extra(self, accelerator: Any, folder: Any, model: Any, optimizer: Any) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(model, optimizer), checkpoint_id=str(folder / self.SHARDED))

    def load_extra(self, accelerator: Any, folder: Any, model: Any, optimizer: Any) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        states = self._states(model, optimizer)
        dcp.load(states, checkpoint_id=str(folder / self.SHARDED))
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])


class TensorParallelStrategy(CpuFsdpStrategy):
    """TP (and FSDP2 over the data dimension) through transformers; sharded checkpoints through
    torch.distributed.checkpoint like CPU FSDP."""

    def __init__(self, settings: Any, accelerator: Any, sizes: Sizes, config: Any):
        super().__init__(settings, accelerator)  # refuses communication hooks
        if accelerator.num_processes != sizes.processes:
            raise UserError(
                f"parallelism_config: tp_size={sizes.tp} x dp_shard_size={sizes.dp_shard} needs {sizes.processes} "
                f"processes, this launch has {accelerator.num_processes}; launch with --num_processes {sizes.processes}"
            )
        tensor_parallel.check_model(config, sizes)
        if accelerator.mixed_precision == "fp16":  # no loss scaler: the optimizer is not Accelerate's
            raise UserError("tensor parallelism trains in fp32 or bf16, not fp16; launch with --mixed_precision bf16 "
                            "or set train.bf16=true")
        self.sizes = sizes
        self.data_rank = accelerator.process_index // sizes.tp  # the mesh is (fsdp, tp), tp innermost
        self.counts_tokens = accelerator.process_index % sizes.tp == 0  # one process per TP group

    def prepare(self, accelerator: Any, model: Any, make_optimizer: Any, loader: Any):
        from transformers.distributed import DistributedConfig
        from transformers.distributed.utils import initialize_distributed_mesh

        config = DistributedConfig(tp_size=self.sizes.tp, fsdp_size=self.sizes.dp_shard)
        model = model.to(accelerator.device)
        _, meshes = initialize_distributed_mesh(config)  # over the process group Accelerate started
        # Every process built the same weights; each keeps its own slice (no communication).
        model = type(model).maybe_distribute_model(model, config, meshes)
        # hftk gathers the whole model itself when saving; transformers would gather it a second time.
        model.config.distributed_config = None
        forward_in_mixed_precision(accelerator, model)
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        log.info(f"tensor parallel {self.sizes.tp} x data shards {self.sizes.dp_shard}: this process holds "
                 f"{local} of {total} parameters")
        return model, make_optimizer(model), self.prepare_loader(accelerator, loader)

    def data_processes(self, accelerator: Any) -> int:
        return self.sizes.dp_shard  # the processes of one TP group read the same batches

    def prepare_loader(self, accelerator: Any, loader: Any) -> Any:
        """Split over the data dimension only: the processes of one TP group get the same batches."""
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(
            loader, accelerator.device, num_processes=self.sizes.dp_shard, process_index=self.data_rank,
            put_on_device=True, rng_types=accelerator.rng_types.copy(), even_batches=accelerator.even_batches,
            use_seedable_sampler=accelerator.use_seedable_sampler,
        )


def strategy_for(settings: Any, accelerator: Any, config: Any) -> Strategy:
    """The strategy for this launch; refuses recipe settings it cannot honour (before any model loads)."""
    sizes = tensor_parallel.requested()
    if sizes is not None:
        return TensorParallelStrategy(settings, accelerator, sizes, config)
    return (CpuFsdpStrategy if cpu_fsdp_requested() else AccelerateStrategy)(settings, accelerator)
