"""Forgetting as numbers: how a general eval set's metrics moved from the base
model to the fine-tuned one.

Signs are chosen so that a positive number means "forgot": loss and perplexity
report their increase, accuracies (token accuracy, multiple-choice `acc` /
`acc_norm`, `exact_match`) their drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# metric -> name of its change, and whether larger values are better.
LOWER_IS_BETTER = {"loss": "loss_increase", "perplexity": "perplexity_increase"}
HIGHER_IS_BETTER = {
    "accuracy": "accuracy_drop",
    "acc": "acc_drop",
    "acc_norm": "acc_norm_drop",
    "acc_per_token": "acc_per_token_drop",
    "exact_match": "exact_match_drop",
}


def forgetting(
    before: Mapping[str, Mapping[str, float]],
    after: Mapping[str, Mapping[str, float]],
    sets: Sequence[str] | None = None,
) -> dict:
    """Per eval set, the change of each known metric from `before` to `after`,
    plus the mean over sets under "mean". Both inputs map set name -> metrics
    (as `evaluate_sets` returns them).

    >>> forgetting({"wiki": {"loss": 2.0, "accuracy": 0.40}},
    ...            {"wiki": {"loss": 2.3, "accuracy": 0.35}})
    {'wiki': {'loss_before': 2.0, 'loss_after': 2.3, 'loss_increase': 0.3,
              'accuracy_before': 0.4, 'accuracy_after': 0.35, 'accuracy_drop': 0.05},
     'mean': {'loss_increase': 0.3, 'accuracy_drop': 0.05}}
    """
    if sets is None:
        sets = [s for s in before if s in after]
        if not sets:
            raise ValueError(
                f"no eval set in common: before has {sorted(before)}, after has {sorted(after)}"
            )
    if "mean" in sets:
        raise ValueError('an eval set may not be named "mean": that key holds the averages')
    out: dict = {}
    for name in sets:
        for side, metrics in (("before", before), ("after", after)):
            if name not in metrics:
                raise KeyError(f"eval set {name!r} is missing from the {side} metrics")
        row = {}
        for metric in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER):
            if metric not in before[name] or metric not in after[name]:
                continue
            b, a = float(before[name][metric]), float(after[name][metric])
            change = a - b if metric in LOWER_IS_BETTER else b - a
            label = LOWER_IS_BETTER.get(metric) or HIGHER_IS_BETTER[metric]
            row.update({f"{metric}_before": b, f"{metric}_after": a, label: change})
        if not row:
            raise ValueError(
                f"eval set {name!r} has no metric that both sides report "
                f"(known: {', '.join((*LOWER_IS_BETTER, *HIGHER_IS_BETTER))})"
            )
        out[name] = row
    changes = sorted(
        {k for row in out.values() for k in row if not k.endswith(("_before", "_after"))}
    )
    out["mean"] = {k: float(np.mean([row[k] for row in out.values() if k in row])) for k in changes}
    return out
