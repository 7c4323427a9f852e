"""Deterministic, resumable batches: the mixture order of each epoch, packing
into rows, and the arrays the trainer reads.

The stream of rows is a pure function of (config, seed): epoch e draws each
source's quota of examples from that source's own endless chain of seeded
permutations, shuffles them together, and packs them into rows; epochs follow
each other without a gap. Global batch `step` is rows
`[step * batch_size, (step + 1) * batch_size)` of that stream, so resuming at
step N needs only N (no iterator state), and process i of n reads only its
contiguous block of those rows.

A batch is a dict of numpy arrays shaped (batch, seq):

    input_ids       int32    tokens; padding holds the pad id
    targets         int32    next token of the same segment (pad id where none)
    loss_mask       float32  1 where `targets` is trained on; 0 for prompt tokens,
                             padding and the last token of every segment
    positions       int32    0, 1, ... restarting in every packed segment
    segment_ids     int32    1, 2, ... per packed example; 0 is padding
    attention_mask  int32    segment_ids > 0
"""

from __future__ import annotations

import collections

import numpy as np

from ftjax.data.errors import DataError
from ftjax.data.sources import seeded_rng
from ftjax.data.tokenize import Examples

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "attention_mask")
# The dtype of each key (the table above): what the planner compiles the step for.
BATCH_DTYPES = {
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "attention_mask": np.int32,
}


class BatchLayout:
    """The batch geometry every pipeline shares: sequence length, global and
    eval batch sizes, and this process's rows of each (`process_slice`)."""

    def _init_layout(self, cfg, tokenizer, process_index: int, process_count: int) -> None:
        from ftjax.data.tokenize import pad_id

        self.tokenizer = tokenizer
        self.seq_len = int(cfg.seq_len)
        self.global_batch_size = int(cfg.batch_size)
        self.eval_batch_size = int(cfg.eval_batch_size or cfg.batch_size)
        self._part = process_slice(self.global_batch_size, process_index, process_count)
        self._eval_part = process_slice(self.eval_batch_size, process_index, process_count)
        self.local_batch_size = self._part.stop - self._part.start
        self.pad_id = pad_id(tokenizer)


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that process `process_index` of `process_count` owns.

    >>> process_slice(8, 1, 2)
    slice(4, 8, None)
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, {process_count})")
    if batch_size % process_count:
        raise DataError(
            f"data.batch_size={batch_size} is not divisible by process_count={process_count}; "
            "expected a multiple"
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def mixture_quotas(sizes, weights, epoch_examples: int = 0) -> np.ndarray:
    """Examples each source contributes to one epoch: the weights normalized,
    times the epoch size (default: all sizes summed), rounded by largest
    remainder; every source with weight > 0 gets at least one.

        >>> mixture_quotas([1000, 100], [0.8, 0.2]).tolist()
        [880, 220]
    """
    sizes, weights = np.asarray(sizes, np.int64), np.asarray(weights, np.float64)
    total = int(epoch_examples or sizes[weights > 0].sum())
    share = weights / weights.sum() * total
    quotas = np.floor(share).astype(np.int64)
    remainder = share - quotas
    for i in np.argsort(-remainder, kind="stable")[: total - quotas.sum()]:
        quotas[i] += 1
    return np.where(weights > 0, np.maximum(quotas, 1), 0)


def epoch_order(sizes, quotas, seed: int, epoch: int, keys: list[str], starts=None) -> np.ndarray:
    """Example ids (into the concatenated pool of all sources) of one epoch, in
    training order. Source i's examples are the positions
    `[epoch * quota, (epoch + 1) * quota)` of an endless chain of seeded
    permutations of its examples, so every example is used before any repeats."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if starts is None else starts
    picks = []
    for size, quota, key, start in zip(sizes, quotas, keys, starts, strict=True):
        if quota == 0:
            continue
        lo, hi = epoch * quota, (epoch + 1) * quota
        chain = [
            seeded_rng(seed, "source-pass", key, p).permutation(size)
            for p in range(lo // size, (hi - 1) // size + 1)
        ]
        chain = np.concatenate(chain)
        offset = (lo // size) * size
        picks.append(start + chain[lo - offset : hi - offset])
    order = np.concatenate(picks)
    return order[seeded_rng(seed, "epoch-shuffle", epoch).permutation(len(order))]


def pack_rows(
    order: np.ndarray, lengths: np.ndarray, seq_len: int, packing: bool, open_rows: int = 8
) -> list[list[int]]:
    """Groups examples (in `order`) into rows of at most `seq_len` tokens.

    Packing is first-fit over the last `open_rows` unfinished rows, which keeps
    rows nearly full while staying close to the shuffled order; without packing
    every example is its own row.

        >>> pack_rows(np.array([0, 1, 2]), np.array([5, 4, 3]), seq_len=8, packing=True)
        [[0, 2], [1]]
    """
    if not packing:
        return [[int(i)] for i in order]
    lens = lengths.tolist()
    done, rows, free = [], [], []
    for ex in order.tolist():
        n = lens[ex]
        for j, room in enumerate(free):
            if room >= n:
                rows[j].append(ex)
                free[j] = room - n
                if free[j] == 0:
                    done.append(rows.pop(j))
                    free.pop(j)
                break
        else:
            if len(rows) == open_rows:
                done.append(rows.pop(0))
                free.pop(0)
            rows.append([ex])
            free.append(seq_len - n)
    return done + rows


def assemble(pool: Examples, rows: list[list[int]], seq_len: int, pad_id: int) -> dict:
    """The batch arrays (see the module docstring) for rows of example ids."""
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, np.int32)
    targets = np.full((b, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((b, seq_len), np.float32)
    positions = np.zeros((b, seq_len), np.int32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    for r, ids in enumerate(rows):
        t = 0
        for s, ex in enumerate(ids, start=1):
            toks, labs = pool.tokens_of(ex), pool.labels_of(ex)
            n = len(toks)
            input_ids[r, t : t + n] = toks
            # Targets stay inside the segment: its last token predicts nothing.
            targets[r, t : t + n - 1] = toks[1:]
            loss_mask[r, t : t + n - 1] = labs[1:]
            positions[r, t : t + n] = np.arange(n)
            segment_ids[r, t : t + n] = s
            t += n
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "positions": positions,
        "segment_ids": segment_ids,
        "attention_mask": (segment_ids > 0).astype(np.int32),
    }


class RowSchedule:
    """The endless, deterministic stream of training rows of a mixture.

    Row r's epoch is found from the row counts of the epochs before it; those
    counts are computed once (from token lengths only) and kept, and the last
    few epoch layouts are cached.
    """

    def __init__(self, pool: Examples, sizes, quotas, keys, *, seq_len, packing, seed):
        self.pool, self.sizes, self.quotas, self.keys = pool, list(sizes), list(quotas), keys
        self.seq_len, self.packing, self.seed = seq_len, packing, seed
        self._lengths = pool.lengths
        self._row_starts = [0]  # first global row of each epoch computed so far
        self._layouts: collections.OrderedDict[int, list[list[int]]] = collections.OrderedDict()

    def layout(self, epoch: int) -> list[list[int]]:
        """Rows of example ids of one epoch."""
        if epoch in self._layouts:
            self._layouts.move_to_end(epoch)
            return self._layouts[epoch]
        order = epoch_order(self.sizes, self.quotas, self.seed, epoch, self.keys)
        rows = pack_rows(order, self._lengths, self.seq_len, self.packing)
        self._layouts[epoch] = rows
        if len(self._layouts) > 3:
            self._layouts.popitem(last=False)
        return rows

    def _epoch_of(self, row: int) -> int:
        while self._row_starts[-1] <= row:
            epoch = len(self._row_starts) - 1
            self._row_starts.append(self._row_starts[-1] + len(self.layout(epoch)))
        return int(np.searchsorted(self._row_starts, row, side="right")) - 1

    def rows(self, start: int, stop: int) -> list[list[int]]:
        """Global rows [start, stop) of the stream."""
        out = []
        row = start
        while row < stop:
            epoch = self._epoch_of(row)
            layout = self.layout(epoch)
            lo = row - self._row_starts[epoch]
            take = layout[lo : lo + (stop - row)]
            out.extend(take)
            row += len(take)
        return out


def eval_rows(n: int, batch_size: int, step: int, part: slice) -> list[int]:
    """Example indices of this process's rows of eval batch `step`; -1 fills the
    last batch past the end."""
    ids = np.arange(step * batch_size, (step + 1) * batch_size)[part]
    return [int(i) if i < n else -1 for i in ids]
