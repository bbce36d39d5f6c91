"""Routes a packed encoder-decoder batch's masks and positions (hftk.tasks.base.PACKED_SEQ2SEQ_INPUTS)
into T5, BART and Marian, whose forward takes one attention mask for the encoder and hands that same mask
to the decoder's cross-attention, and builds its positions as 0..L-1 per row.

Installed once on the unwrapped model (`install`). A forward pre-hook on the model takes the packed
tensors out of its inputs (they arrive as keyword arguments, through DDP, DeepSpeed or FSDP), holds
them for the forward's duration and drops them after, even on an error; without them (evaluation,
generation) the model runs exactly as transformers wrote it.

- The encoder stack's attention_mask and the decoder stack's attention_mask and encoder_attention_mask
  are replaced by forward pre-hooks; transformers' mask builders pass a prepared 4D mask through as is.
- Learned (BART) and sinusoidal (Marian) position tables are looked up at each example's own
  positions. Their forward is replaced on the instance, not hooked afterwards: the table is read
  inside the module's call, where ZeRO-3 and FSDP have gathered it. T5's relative bias depends only on
  the distance between two positions, which packing does not change within an example.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from hftk.tasks.base import (
    CROSS_MASK,
    DECODER_MASK,
    ENCODER_MASK,
    PACKED_SEQ2SEQ_INPUTS,
    SOURCE_POSITIONS,
    TARGET_POSITIONS,
)

_current: dict[str, torch.Tensor] = {}


def _take(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    _current.clear()
    _current.update({key: kwargs.pop(key) for key in PACKED_SEQ2SEQ_INPUTS if key in kwargs})
    return args, kwargs


def _drop(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
    _current.clear()


def _mask(key: str, module: Any) -> torch.Tensor:
    """The boolean mask (True: attend) as the attention kernel takes it: eager adds masks to its scores."""
    mask = _current[key]
    if module.config._attn_implementation != "eager":
        return mask
    dtype = next(module.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _encoder_masks(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if _current:
        kwargs["attention_mask"] = _mask(ENCODER_MASK, module)
    return args, kwargs


def _decoder_masks(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if _current:
        kwargs["attention_mask"] = _mask(DECODER_MASK, module)
        kwargs["encoder_attention_mask"] = _mask(CROSS_MASK, module)
    return args, kwargs


def _own_positions(table: Any, key: str) -> None:
    """Replace the table's forward: at the packed positions inside a packed forward, else its own."""
    original = table.forward
    offset = getattr(table, "offset", 0)  # BART's table starts 2 rows in

    def forward(self, *args, **kwargs):
        if not _current:
            return original(*args, **kwargs)
        return torch.nn.Embedding.forward(self, _current[key] + offset)

    table.forward = types.MethodType(forward, table)


def install(model: Any) -> None:
    """Hooks on the unwrapped model, its encoder and decoder stacks, and its position tables where it
    has them. Once per model."""
    if getattr(model, "_hftk_packed_forward", False):
        return
    model._hftk_packed_forward = True
    model.register_forward_pre_hook(_take, with_kwargs=True)
    model.register_forward_hook(_drop, with_kwargs=True, always_call=True)
    encoder, decoder = model.get_encoder(), model.get_decoder()
    encoder.register_forward_pre_hook(_encoder_masks, with_kwargs=True)
    decoder.register_forward_pre_hook(_decoder_masks, with_kwargs=True)
    for stack, key in ((encoder, SOURCE_POSITIONS), (decoder, TARGET_POSITIONS)):
        table = getattr(stack, "embed_positions", None)
        if table is not None:
            _own_positions(table, key)
