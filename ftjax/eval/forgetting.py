"""Forgetting as numbers: how a general eval set's metrics moved from the base
model to the fine-tuned one. `metric_change` is the only place in ftjax where
a drop or an increase is computed; the study evaluation, the LLM harness and
the report all use it (directly or through `forgetting`).

Signs are chosen so that a positive number means "forgot": loss-like metrics
report their increase (`loss_increase`), accuracy-like ones their drop
(`exact_match_drop`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ftjax.errors import ConfigError

# Metrics whose direction is known. A name with a suffix (the harness's
# filters: `exact_match_strict-match`) takes the direction of its known prefix.
LOWER_IS_BETTER = ("loss", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                   "mse")  # fmt: skip
HIGHER_IS_BETTER = (
    "accuracy",
    "token_accuracy",
    "acc",
    "acc_norm",
    "acc_per_token",
    "exact_match",
    "score",  # a mean of accuracy-like scores (the harness's task groups)
    "f1",
    "bleu",
    "mcc",
    "macro_f1",
    "pearson",
    "spearman",
    "paraphrase_margin",
)
_BY_LENGTH = sorted(LOWER_IS_BETTER + HIGHER_IS_BETTER, key=len, reverse=True)


def lower_is_better(metric: str) -> bool | None:
    """True for loss-like metrics, False for accuracy-like ones, None when the
    direction of `metric` is unknown.

    >>> lower_is_better("loss"), lower_is_better("exact_match_strict-match"), lower_is_better("x")
    (True, False, None)
    """
    for known in (metric, *(k for k in _BY_LENGTH if metric.startswith(k + "_"))):
        if known in LOWER_IS_BETTER:
            return True
        if known in HIGHER_IS_BETTER:
            return False
    return None


def metric_change(metric: str, before: float, after: float) -> tuple[str, float] | None:
    """(name, value) of how `metric` moved from `before` to `after`, positive
    when the model got worse: `<metric>_increase` for loss-like metrics,
    `<metric>_drop` for accuracy-like ones; None for a metric whose direction
    is unknown.

    >>> metric_change("loss", 2.0, 2.5)
    ('loss_increase', 0.5)
    >>> metric_change("exact_match", 0.75, 0.5)
    ('exact_match_drop', 0.25)
    """
    lower = lower_is_better(metric)
    if lower is None:
        return None
    b, a = float(before), float(after)
    return (f"{metric}_increase", a - b) if lower else (f"{metric}_drop", b - a)


def forgetting(
    before: Mapping[str, Mapping[str, float]],
    after: Mapping[str, Mapping[str, float]],
    sets: Sequence[str] | None = None,
) -> dict:
    """Per eval set, the change of each metric of known direction from
    `before` to `after`, plus the mean over sets under "mean". Both inputs map
    set name -> metrics (as `evaluate_sets` returns them).

    >>> forgetting({"wiki": {"loss": 2.0, "accuracy": 0.40}},
    ...            {"wiki": {"loss": 2.25, "accuracy": 0.25}})
    {'wiki': {'loss_before': 2.0, 'loss_after': 2.25, 'loss_increase': 0.25, 'accuracy_before': 0.4, 'accuracy_after': 0.25, 'accuracy_drop': 0.15000000000000002}, 'mean': {'accuracy_drop': 0.15000000000000002, 'loss_increase': 0.25}}
    """
    if sets is None:
        sets = [s for s in before if s in after]
        if not sets:
            raise ValueError(
                f"no eval set in common: before has {sorted(before)}, after has {sorted(after)}"
            )
    if "mean" in sets:
        raise ConfigError('an eval set may not be named "mean": that key holds the averages')
    out: dict = {}
    for name in sets:
        for side, metrics in (("before", before), ("after", after)):
            if name not in metrics:
                raise KeyError(f"eval set {name!r} is missing from the {side} metrics")
        row = {}
        for metric in before[name]:
            if metric not in after[name]:
                continue
            change = metric_change(metric, before[name][metric], after[name][metric])
            if change is None:
                continue
            row.update({f"{metric}_before": float(before[name][metric]),
                        f"{metric}_after": float(after[name][metric]), change[0]: change[1]})  # fmt: skip
        if not row:
            raise ValueError(
                f"eval set {name!r} has no metric that both sides report "
                f"(known: {', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)})"
            )
        out[name] = row
    changes = sorted(
        {k for row in out.values() for k in row if not k.endswith(("_before", "_after"))}
    )
    out["mean"] = {k: float(np.mean([row[k] for row in out.values() if k in row])) for k in changes}
    return out
