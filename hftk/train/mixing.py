"""Drawing training examples from several sources in set proportions, and counting what was drawn.

An epoch of the mixture has as many draws as all sources hold together (E). Source i gets k_i of
them, its weight's share of E (largest remainders, so the k_i add up to E): every epoch holds exactly
those counts. A source's draws walk through successive seeded permutations of its examples; a source
that runs out (k_i above its size, or the epochs adding up past it) starts its next permutation, so it
repeats only once all of it has been drawn, and a source drawn less than its size continues in the next
epoch where this one stopped. The draws are interleaved stratified: draw j of source i sits at
(j + u) / k_i with u uniform in [0, 1), so any stretch of steps holds each source within one example of
its share. Everything is a function of (seed, epoch): identical on every process, and a resume
(Accelerate's skip_first_batches) sees the order an unbroken run saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def quotas(weights: Sequence[float], total: int) -> list[int]:
    """Draws per source in an epoch of `total`: each weight's share, rounded by largest remainder."""
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    remainders = shares - counts
    for i in np.argsort(-remainders, kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class MixtureSampler(Sampler[int]):
    """Indices into the sources' features laid end to end (source i at offsets[i])."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        self.sizes = list(sizes)
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.total = sum(self.sizes)
        self.quotas = quotas(weights, self.total)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch).tolist())

    def order(self, epoch: int) -> np.ndarray:
        draws, keys = [], []
        stagger = np.random.default_rng([self.seed, epoch, 1])
        for source, (size, quota) in enumerate(zip(self.sizes, self.quotas)):
            drawn = self._draws(source, size, epoch * quota, quota)
            draws.append(self.offsets[source] + drawn)
            keys.append((np.arange(quota) + stagger.random(quota)) / max(quota, 1))
        return np.concatenate(draws)[np.argsort(np.concatenate(keys), kind="stable")]

    def _draws(self, source: int, size: int, start: int, count: int) -> np.ndarray:
        """Positions start..start+count of the source's endless stream of permutations."""
        positions = np.arange(start, start + count)
        passes = positions // size
        out = np.empty(count, dtype=np.int64)
        for number in np.unique(passes):
            permutation = np.random.default_rng([self.seed, source, int(number), 2]).permutation(size)
            chosen = passes == number
            out[chosen] = permutation[positions[chosen] % size]
        return out

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.offsets), indices, side="right") - 1


def examples_by_source(labels: Sequence[str], sizes: Sequence[int], sampler: Sampler | None, epoch: int,
                       batches_in_epoch: int, global_batch: int) -> dict[str, int]:
    """Examples drawn per source by a run at (epoch, batches_in_epoch): every finished epoch's draws, plus
    the part of this epoch's order that the consumed batches covered (each process's batches_in_epoch
    micro-batches of the per-device size, on every data-parallel process)."""
    offsets = np.cumsum([0, *sizes[:-1]])
    total = sum(sizes)
    per_epoch = np.asarray(getattr(sampler, "quotas", sizes), dtype=np.int64)
    consumed = min(batches_in_epoch * global_batch, total)
    counts = per_epoch * epoch
    if consumed:
        if len(sizes) == 1:
            counts = counts + consumed
        else:
            sampler.set_epoch(epoch)
            prefix = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))[:consumed]
            counts = counts + np.bincount(np.searchsorted(offsets, prefix, side="right") - 1, minlength=len(sizes))
    return {label: int(count) for label, count in zip(labels, counts)}
