"""Model FLOPs utilisation: the FLOPs the model's own arithmetic needs for the tokens trained, over
what the device could do in that time.

FLOPs are counted on non-pad tokens, per family (Kaplan et al. / PaLM accounting): 6 per weight per
token (forward 2, backward 4) for the weights a token passes through, plus 12 * layers * attention
width * context per token for the attention products. The peak comes from a table for known GPUs,
else from a timed matrix product on this device (the best seen, kept per device, dtype and thread count).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from hftk.models import first_size
from hftk.objective import token_mask
from hftk.tasks.base import DECODER_ONLY, ENCODER_DECODER, IGNORE_INDEX, SOURCE_POSITIONS, TARGET_POSITIONS
from hftk.train.packing import CROSS_PAIRS

# Dense bf16 / fp16 tensor-core peaks (fp32 peaks are far lower and come from the probe).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


@dataclass(frozen=True, kw_only=True)
class FlopCounter:
    family: str
    encoder_weights: int  # weights each encoder (or only) token passes through
    decoder_weights: int  # weights each decoder token passes through (output head included)
    encoder_layers: int
    decoder_layers: int
    width: int  # attention width: heads x head size

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training FLOPs of one micro-batch, on its device (no host wait)."""
        source = token_mask(batch).sum(dim=1).double()
        flops = 6 * self.encoder_weights * source.sum() + 12 * self.encoder_layers * self.width * squared_lengths(batch)
        if self.family == ENCODER_DECODER:
            labelled = batch["labels"] != IGNORE_INDEX
            target = labelled.sum(dim=1).double()
            if CROSS_PAIRS in batch:  # packed: sums over each row's examples
                pairs = ((2 * batch[TARGET_POSITIONS] + 1) * labelled).sum().double() + batch[CROSS_PAIRS].sum()
            else:
                pairs = (target ** 2 + target * source).sum()
            flops = flops + 6 * self.decoder_weights * target.sum() \
                + 12 * self.decoder_layers * self.width * pairs  # self + cross
        return flops


def squared_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over examples of length squared: what attention costs. A packed row holds several examples,
    each attending within itself; its positions restart per example, and the positions 0..L-1 of one
    example add up to L^2 as sum(2p + 1)."""
    mask = token_mask(batch)
    positions = batch.get("position_ids", batch.get(SOURCE_POSITIONS))
    if positions is None:
        return (mask.sum(dim=1).double() ** 2).sum()
    return ((2 * positions + 1) * mask).sum().double()


def _count(module: Any, skip: set[int]) -> int:
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def flop_counter(model: Any, family: str) -> FlopCounter:
    """From the unwrapped model before sharding (the full weight count on every process)."""
    config = model.config
    heads = first_size(config, "num_attention_heads", "num_heads", "n_head")
    head_size = first_size(config, "d_kv", "head_dim") or first_size(config, "hidden_size", "d_model", "n_embd") // max(heads, 1)
    layers = first_size(config, "num_hidden_layers", "num_layers", "n_layer")
    lookups = {id(p) for module in (model.get_input_embeddings(),) for p in module.parameters()}
    output = model.get_output_embeddings() if family != "encoder-only" else None
    head = output.weight.numel() if output is not None else 0  # a tied head is a lookup and a product
    if family == ENCODER_DECODER:
        encoder, decoder = model.get_encoder(), model.get_decoder()
        return FlopCounter(family=family, encoder_weights=_count(encoder, lookups),
                           decoder_weights=_count(decoder, lookups) + head, encoder_layers=layers,
                           decoder_layers=first_size(config, "num_decoder_layers", "decoder_layers") or layers,
                           width=heads * head_size)
    body = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    if output is not None and id(output.weight) not in lookups:
        body -= head  # an untied head was counted in the body already
    weights = body + head if family == DECODER_ONLY else body
    return FlopCounter(family=family, encoder_weights=weights, decoder_weights=0, encoder_layers=layers,
                       decoder_layers=0, width=heads * head_size)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s one process can reach on this device in this dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return tflops * 1e12
    return _probed(device, dtype)


def _probed(device: torch.device, dtype: torch.dtype) -> float:
    from hftk.cache import cache_root

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    key = f"{name}-{str(dtype).removeprefix('torch.')}-torch{torch.__version__}"
    path = cache_root() / "peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    # Probe every run and keep the best ever seen: a probe taken while other work shared the device
    # reads low, and a low peak kept for good would overstate every later run's MFU.
    measured = _matmul_probe(device, dtype)
    if measured > known.get(key, 0.0):
        known[key] = measured
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_text(json.dumps(known, indent=2) + "\n")
            os.replace(partial, path)  # other processes may probe at the same time
        except OSError:
            pass  # a read-only cache only costs the probe again next run
    return known[key]


def _matmul_probe(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """The best of repeated square matrix products: what this device sustains on dense work."""
    generator = torch.Generator().manual_seed(0)  # never the global one: dropout draws from it
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - started))
    return best


def training_dtype(accelerator: Any) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision), torch.float32)
