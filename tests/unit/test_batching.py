"""Length-grouped order: every example once, reproducible, the same optimizer-step groups however a
step is split over processes and micro-batches, and less padding than a plain shuffle."""

from __future__ import annotations

import random

import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from hftk.train.batching import LengthGroupedSampler, grouped_order

LENGTHS = [random.Random(i).randint(5, 200) for i in range(1000)]


def test_every_example_once_and_reproducible_per_epoch():
    order = grouped_order(LENGTHS, 32, seed=7)
    assert sorted(order) == list(range(len(LENGTHS)))
    assert order == grouped_order(LENGTHS, 32, seed=7)
    sampler = LengthGroupedSampler(LENGTHS, 32, seed=7)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # and the same one again for the same epoch (resume)


def test_a_step_is_the_same_examples_however_it_is_split():
    """One process with batch 32 against 2 processes x batch 8 x 2 accumulation steps."""
    sampler = LengthGroupedSampler(LENGTHS, 32, seed=3)
    whole = [set(b) for b in BatchSampler(sampler, 32, drop_last=False)]
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 8, drop_last=False), num_processes=2, process_index=rank))
              for rank in range(2)]
    steps = len(shards[0]) // 2
    for step in range(steps - 1):  # the last may be padded by Accelerate's even_batches
        micro = [shards[rank][2 * step + k] for rank in range(2) for k in range(2)]
        assert set().union(*map(set, micro)) == whole[step]


def test_less_padding_than_a_shuffle():
    def padding(order: list[int]) -> float:
        padded = total = 0
        for start in range(0, len(order), 32):
            batch = [LENGTHS[i] for i in order[start:start + 32]]
            padded += max(batch) * len(batch) - sum(batch)
            total += max(batch) * len(batch)
        return padded / total

    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(grouped_order(LENGTHS, 32, seed=0)) < 0.2 * padding(shuffled)
