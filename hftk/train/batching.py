"""Length-grouped training order: batches of examples of similar length waste less compute on padding.

Deterministic in (seed, epoch) and identical on every process, so Accelerate's batch sharding and
skip_first_batches (resume) see the same order a single process would. Groups are one optimizer
step's examples (per-device batch x accumulation steps x data-parallel processes), so one process
with batch 2B, two with B each, and one with B and 2 accumulation steps train on the same examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

# As transformers' LengthGroupedSampler: sort within windows of 50 batches, so the order stays random
# at the scale of an epoch while neighbours have similar lengths.
MEGABATCH_BATCHES = 50


class LengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int):
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.lengths, self.global_batch, self.seed + self.epoch))


def grouped_order(lengths: Sequence[int], global_batch: int, seed: int) -> list[int]:
    """Every index once: shuffled, sorted longest-first inside each window of 50 global batches, cut
    into global batches whose order is then shuffled; a short last batch (if any) stays last, as it
    would without grouping."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = global_batch * MEGABATCH_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])  # stable: ties keep random order
        batches.extend(chunk[j:j + global_batch] for j in range(0, len(chunk), global_batch))
    short = [b for b in batches if len(b) < global_batch]
    full = [b for b in batches if len(b) == global_batch]
    shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in shuffled + short for i in batch]


def example_lengths(features, family: str) -> list[int]:
    """Tokens each example puts through the model: its inputs, plus its labels for an encoder-decoder
    (a decoder-only example's labels are its inputs). Read from the Arrow columns, not the rows."""
    import pyarrow.compute as pc

    from hftk.tasks.base import ENCODER_DECODER

    table = features.with_format("arrow")
    lengths = pc.list_value_length(table["input_ids"])
    if family == ENCODER_DECODER:
        lengths = pc.add(lengths, pc.list_value_length(table["labels"]))
    return lengths.to_pylist()
