"""Data statistics: a JSON-ready dict for `summary.json` and one log line.

stats = pipeline.stats
stats["loss_token_share"], stats["packing_efficiency"]
print(stats_line(stats))
# data: 2 sources, 1,900 train / 100 eval examples | 41,200 tokens, 23.1% trained | ...
"""

from __future__ import annotations

import numpy as np

# Per-source counters that are summed into the totals.
COUNTERS = (
    "read",
    "train_examples",
    "eval_examples",
    "tokens",
    "loss_tokens",
    "truncated",
    "eval_truncated",
    "empty_dropped",
    "no_loss_dropped",
    "duplicates_dropped",
    "eval_overlap_dropped",
)


def source_stats(counts: dict, train, weight_share: float, quota: int) -> dict:
    """Per-source statistics from its filter counters and final train examples."""
    tokens = int(train.lengths.sum())
    loss_tokens = int(train.target_counts().sum())
    return {
        **{k: int(counts.get(k, 0)) for k in COUNTERS},
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "loss_token_share": loss_tokens / tokens if tokens else 0.0,
        "mixture_share": float(weight_share),
        "examples_per_epoch": int(quota),
    }


def total_stats(per_source: dict[str, dict], epoch0_rows: list[list[int]], lengths, seq_len: int,
                batch_size: int) -> dict:  # fmt: skip
    """Totals over sources plus packing figures of the first epoch's layout."""
    totals = {k: sum(s[k] for s in per_source.values()) for k in COUNTERS}
    used = int(sum(int(lengths[i]) for row in epoch0_rows for i in row))
    slots = len(epoch0_rows) * seq_len
    n_examples = sum(len(row) for row in epoch0_rows)
    return {
        **totals,
        "loss_token_share": totals["loss_tokens"] / totals["tokens"] if totals["tokens"] else 0.0,
        "packing_efficiency": used / slots if slots else 0.0,
        "examples_per_row": n_examples / len(epoch0_rows) if epoch0_rows else 0.0,
        "rows_per_epoch": len(epoch0_rows),
        "steps_per_epoch": len(epoch0_rows) / batch_size,
        "mean_example_tokens": float(np.mean(lengths)) if len(lengths) else 0.0,
        "sources": per_source,
    }


def stats_line(stats: dict) -> str:
    """One line for the training log.

    `Pipeline.stats_line()` calls it; `build_pipeline` shows one.
    """
    s = stats
    return (
        f"data: {len(s['sources'])} source(s), {s['train_examples']:,} train / "
        f"{s['eval_examples']:,} eval examples | {s['tokens']:,} tokens, "
        f"{100 * s['loss_token_share']:.1f}% trained | {s['truncated']:,} truncated, "
        f"{s['empty_dropped'] + s['no_loss_dropped']:,} empty dropped, "
        f"{s['duplicates_dropped'] + s['eval_overlap_dropped']:,} duplicates dropped | "
        f"packing {100 * s['packing_efficiency']:.1f}% ({s['examples_per_row']:.1f} examples/row), "
        f"{s['steps_per_epoch']:.1f} steps/epoch"
    )
