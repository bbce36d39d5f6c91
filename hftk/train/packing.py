"""Packing (train.packing): the examples of a training batch laid back to back in fewer rows, so a batch
holds fewer padded positions than with one example per row.

Decoder-only (PackedCollator): rows of at most the block length (the longest example the task's lengths
allow). Each example's position_ids restart at 0 and no attention mask is given: transformers then reads
the example boundaries from the position ids (masking_utils.find_packed_sequence_indices) and masks
attention across them, so an example sees only its own tokens, as if it sat alone in its row.

Encoder-decoder (PackedSeq2SeqCollator): source rows and target rows, with the three attention masks and
each example's own positions built here and routed into the model by hftk.train.packed_forward.

The collators pack whatever examples the sampler hands them, so the order, the resume point and the
split over processes stay those of unpacked training; only the layout of each micro-batch changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hftk.recipe import DataSection
from hftk.tasks.base import (
    CROSS_MASK,
    DECODER_MASK,
    ENCODER_MASK,
    IGNORE_INDEX,
    SOURCE_POSITIONS,
    TARGET_POSITIONS,
    TOKEN_MASK,
)


def block_length(task: Any, data: DataSection) -> int:
    """The longest sequence one decoder-only example of the task can be: prompt plus target, or a
    text_generation block."""
    return data.max_source_length + (data.max_target_length if task.uses_target_length else 0)


# Row lengths tried per batch, evenly spaced from its longest example to the block length.
CAPACITIES = 5


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens: each example, in order,
    goes to the first row with room for it, else starts a new row (alone if it is longer than
    `capacity`)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for index, length in enumerate(lengths):
        row = next((r for r, filled in enumerate(used) if filled + length <= capacity), None)
        if row is None:
            rows.append([index])
            used.append(length)
        else:
            rows[row].append(index)
            used[row] += length
    return rows


def pack(lengths: Sequence[int], block_length: int) -> list[list[int]]:
    """Rows of example indices, longest examples first (first-fit decreasing), in the row length that
    leaves the fewest positions (rows x longest row) among CAPACITIES lengths from the longest example
    to the block length; the shortest on a tie, as attention grows with the square of a row's length.

    Several lengths, not the block length alone: rows padded to a full block can pad more than one
    example per row does (measured on generative_qa_llama: 32% of positions against 14%); a row as
    long as the longest example never can. Deterministic: a function of the lengths and their order."""
    longest = max(lengths)
    top = max(block_length, longest)
    capacities = sorted({longest + (top - longest) * k // (CAPACITIES - 1) for k in range(CAPACITIES)})
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the sampler's order
    best: tuple[int, list[list[int]]] | None = None
    for capacity in capacities:
        rows = [[order[j] for j in row] for row in first_fit([lengths[i] for i in order], capacity)]
        positions = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best is None or positions < best[0]:
            best = (positions, rows)
    return best[1]


class PackedCollator:
    """Training rows (input_ids, labels) to packed rows: input_ids, position_ids, labels and TOKEN_MASK,
    right-padded to the longest packed row.

    An example's first label is ignored: in a packed row it would be predicted from the previous
    example's last token (unpacked, the shift drops it anyway, so every example trains on the same
    tokens either way, and the loss's token count is unchanged). Padding continues as one more short
    sequence whose positions restart at 0: no example attends to it, and its labels are ignored."""

    def __init__(self, pad_token_id: int, block_length: int):
        self.pad_token_id = pad_token_id
        self.block_length = block_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        packed = pack(lengths, self.block_length)
        width = max(sum(lengths[i] for i in row) for row in packed)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": [], TOKEN_MASK: []}
        for row in packed:
            ids, positions, labels = [], [], []
            for i in row:
                ids += rows[i]["input_ids"]
                positions += range(lengths[i])
                labels += [IGNORE_INDEX, *rows[i]["labels"][1:]][:lengths[i]]
            fill = width - len(ids)
            batch[TOKEN_MASK].append([1] * len(ids) + [0] * fill)
            batch["input_ids"].append(ids + [self.pad_token_id] * fill)
            batch["position_ids"].append(positions + list(range(fill)))
            batch["labels"].append(labels + [IGNORE_INDEX] * fill)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


# Encoder-decoder packing (train.packing on T5, BART, Marian): the examples of a micro-batch share rows
# of source tokens and rows of target tokens; masks keep each example to itself.
CROSS_PAIRS = "packed_cross_pairs"  # [rows]: sum over a row's examples of target x source length (FLOP count)


def balanced_rows(lengths: Sequence[tuple[int, int]], order: Sequence[int], count: int) -> list[list[int]]:
    """`count` rows of example indices: each example in `order` goes to the row that grows the widest
    source row plus the widest target row least (the emptier row on a tie), so rows come out even."""
    rows: list[list[int]] = [[] for _ in range(count)]
    sources, targets = [0] * count, [0] * count
    widest_source = widest_target = 0
    for index in order:
        source, target = lengths[index]
        best, best_cost = 0, None
        for r in range(count):  # a plain loop: this runs for every example of every batch
            s, t = sources[r] + source, targets[r] + target
            cost = (max(widest_source, s)) + (max(widest_target, t)), s + t
            if best_cost is None or cost < best_cost:
                best, best_cost = r, cost
        rows[best].append(index)
        sources[best] += source
        targets[best] += target
        widest_source, widest_target = max(widest_source, sources[best]), max(widest_target, targets[best])
    return [row for row in rows if row]


# Packed rows may be up to this many times the block (max_source_length, max_target_length) long: within
# one block, examples near the maximum length cannot share a row, and a third of the positions can stay
# padded (measured on the summarize recipe: 8.5% padded at 1x, 1.8% at 2x).
ROW_BLOCKS = 2
# The padding a layout aims below: of the layouts under it, the one with the most (shortest) rows wins,
# as attention grows with the square of a row's length.
PADDING_TARGET = 0.05


def _padding(lengths: Sequence[tuple[int, int]], rows: list[list[int]]) -> tuple[float, int]:
    widths = [max(sum(lengths[i][side] for i in row) for row in rows) for side in (0, 1)]
    positions = len(rows) * sum(widths)
    return 1 - sum(s + t for s, t in lengths) / positions, positions


def pack_pairs(lengths: Sequence[tuple[int, int]], block: tuple[int, int]) -> list[list[int]]:
    """Rows of example indices for (source, target) lengths, each side of a row at most ROW_BLOCKS
    blocks (or its longest example) long: longest examples first, spread evenly (balanced_rows) over a
    number of rows from the fewest that can hold them to twice as many. The most rows whose padding stays
    under PADDING_TARGET win; where no count gets there, the fewest positions. Deterministic: a function
    of the lengths and their order."""
    capacity = [max(block[side] * ROW_BLOCKS, max(pair[side] for pair in lengths)) for side in (0, 1)]
    fewest = max(-(-sum(pair[side] for pair in lengths) // capacity[side]) for side in (0, 1))
    order = sorted(range(len(lengths)), key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))
    fewest_positions: tuple[int, list[list[int]]] | None = None
    chosen = None
    for count in range(fewest, min(2 * fewest, len(lengths)) + 1):  # rows from full length down to half
        rows = balanced_rows(lengths, order, count)
        if any(sum(lengths[i][side] for i in row) > capacity[side] for row in rows for side in (0, 1)):
            continue
        padding, positions = _padding(lengths, rows)
        if fewest_positions is None or positions < fewest_positions[0]:
            fewest_positions = (positions, rows)
        if padding < PADDING_TARGET:
            chosen = rows
    return chosen or (fewest_positions[1] if fewest_positions else [[i] for i in order])


def _segments(lengths: list[int], width: int) -> list[int]:
    """Each position's example within its row; padding counts as one more example."""
    segments = [slot for slot, length in enumerate(lengths) for _ in range(length)]
    return segments + [len(lengths)] * (width - len(segments))


class PackedSeq2SeqCollator:
    """Training rows (input_ids, labels) of an encoder-decoder model to packed rows: input_ids,
    TOKEN_MASK, labels and decoder_input_ids (each example's own shift, so it starts from the decoder
    start token), the three block-diagonal masks and per-example positions (PACKED_SEQ2SEQ_INPUTS,
    which hftk.train.packed_forward routes into the model).

    Every label trains, as unpacked: the loss's token count is unchanged. Padding is one more example
    in each row, attending only to itself; a padded target position sees the whole source row, so no
    attention row is empty (its labels are ignored)."""

    def __init__(self, pad_token_id: int, decoder_inputs: Any, block: tuple[int, int]):
        self.pad_token_id = pad_token_id
        self.decoder_inputs = decoder_inputs
        self.block = block

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sources = [r["input_ids"] for r in rows]
        targets = [r["labels"] for r in rows]
        width = max(len(t) for t in targets)
        shifted = self.decoder_inputs(torch.tensor([t + [IGNORE_INDEX] * (width - len(t)) for t in targets])).tolist()
        packed = pack_pairs([(len(s), len(t)) for s, t in zip(sources, targets)], self.block)
        source_width = max(sum(len(sources[i]) for i in row) for row in packed)
        target_width = max(sum(len(targets[i]) for i in row) for row in packed)
        batch: dict[str, list] = {key: [] for key in ("input_ids", TOKEN_MASK, "labels", "decoder_input_ids",
                                                       SOURCE_POSITIONS, TARGET_POSITIONS, CROSS_PAIRS)}
        source_segments, target_segments, target_tokens = [], [], []
        for row in packed:
            ids, labels, decoder_ids, source_positions, target_positions = [], [], [], [], []
            for i in row:
                ids += sources[i]
                labels += targets[i]
                decoder_ids += shifted[i][:len(targets[i])]
                source_positions += range(len(sources[i]))
                target_positions += range(len(targets[i]))
            fill, target_fill = source_width - len(ids), target_width - len(labels)
            batch["input_ids"].append(ids + [self.pad_token_id] * fill)
            batch[TOKEN_MASK].append([1] * len(ids) + [0] * fill)
            batch["labels"].append(labels + [IGNORE_INDEX] * target_fill)
            batch["decoder_input_ids"].append(decoder_ids + [self.pad_token_id] * target_fill)
            batch[SOURCE_POSITIONS].append(source_positions + list(range(fill)))
            batch[TARGET_POSITIONS].append(target_positions + list(range(target_fill)))
            batch[CROSS_PAIRS].append(sum(len(sources[i]) * len(targets[i]) for i in row))
            source_segments.append(_segments([len(sources[i]) for i in row], source_width))
            target_segments.append(_segments([len(targets[i]) for i in row], target_width))
            target_tokens.append([True] * len(labels) + [False] * target_fill)
        out = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        source, target = torch.tensor(source_segments), torch.tensor(target_segments)
        steps = torch.arange(target_width)
        causal = steps[:, None] >= steps[None, :]
        out[ENCODER_MASK] = (source[:, :, None] == source[:, None, :]).unsqueeze(1)
        out[DECODER_MASK] = ((target[:, :, None] == target[:, None, :]) & causal).unsqueeze(1)
        padded_target = ~torch.tensor(target_tokens)[:, :, None]
        out[CROSS_MASK] = ((target[:, :, None] == source[:, None, :]) | padded_target).unsqueeze(1)
        return out
