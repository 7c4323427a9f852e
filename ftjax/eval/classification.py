"""Classification and regression metrics (the GLUE set): accuracy, F1,
Matthews correlation, Pearson and Spearman correlation. The only
implementation of each in ftjax; `train.loop.evaluate` reports them for every
eval set of a classification run (`eval/<set>/<metric>`).

All are computed in float64 numpy from the confusion matrix or the paired
values; the tests check them against scikit-learn and scipy, the references
GLUE's own scoring uses.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


def confusion(labels, predictions, num_classes: int | None = None) -> np.ndarray:
    """`C[i, j]` = examples of true class i predicted as j (float64)."""
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    k = int(num_classes or max(labels.max(initial=0), predictions.max(initial=0)) + 1)
    out = np.zeros((k, k), np.float64)
    np.add.at(out, (labels, predictions), 1.0)
    return out


def accuracy(labels, predictions) -> float:
    c = confusion(labels, predictions)
    return float(np.trace(c) / max(c.sum(), 1.0))


def f1(labels, predictions, positive: int = 1) -> float:
    """F1 of the `positive` class (MRPC and QQP's F1); 0 when it is never
    predicted nor present."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    tp = float(np.sum((predictions == positive) & (labels == positive)))
    fp = float(np.sum((predictions == positive) & (labels != positive)))
    fn = float(np.sum((predictions != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(labels, predictions) -> float:
    """The mean over classes present in labels or predictions of each one's F1."""
    classes = np.union1d(np.asarray(labels), np.asarray(predictions))
    return float(np.mean([f1(labels, predictions, int(c)) for c in classes]))


def matthews(labels, predictions) -> float:
    """Matthews correlation (Gorodkin's K-class form; the binary MCC for two
    classes), CoLA's metric; 0 when a marginal is constant."""
    c = confusion(labels, predictions)
    n = c.sum()
    correct = np.trace(c)
    true_per_class, pred_per_class = c.sum(axis=1), c.sum(axis=0)
    cov_yp = correct * n - np.dot(true_per_class, pred_per_class)
    cov_yy = n * n - np.dot(true_per_class, true_per_class)
    cov_pp = n * n - np.dot(pred_per_class, pred_per_class)
    denom = np.sqrt(cov_yy * cov_pp)
    return 0.0 if denom == 0 else float(cov_yp / denom)


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return 0.0 if denom == 0 else float(np.sum(dx * dy) / denom)


def ranks(x) -> np.ndarray:
    """1-based ranks, ties given their mean rank (as Spearman's correlation needs)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    out = np.empty(len(x), np.float64)
    start = 0
    while start < len(x):
        stop = start
        while stop + 1 < len(x) and sorted_x[stop + 1] == sorted_x[start]:
            stop += 1
        out[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return out


def spearman(x, y) -> float:
    return pearson(ranks(x), ranks(y))


def class_scores(labels, predictions) -> dict[str, float]:
    """accuracy, mcc, and f1 (binary: of class 1) or macro_f1 (more classes)."""
    out = {"accuracy": accuracy(labels, predictions), "mcc": matthews(labels, predictions)}
    if max(int(np.max(labels, initial=0)), int(np.max(predictions, initial=0))) <= 1:
        out["f1"] = f1(labels, predictions)
    else:
        out["macro_f1"] = macro_f1(labels, predictions)
    return out


def regression_scores(labels, predictions) -> dict[str, float]:
    err = np.asarray(predictions, np.float64) - np.asarray(labels, np.float64)
    return {
        "pearson": pearson(predictions, labels),
        "spearman": spearman(predictions, labels),
        "mse": float(np.mean(err * err)) if len(err) else 0.0,
    }


def score_eval_set(
    labels: np.ndarray,
    example_index: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    label_kind: str,
) -> dict[str, float]:
    """The metrics of one eval set from its batches' (`example_index`,
    per-row `predictions`) of every process; rows that only fill a batch
    (index -1) are dropped. `labels` are the set's, by example index."""
    import jax

    index = np.concatenate([np.asarray(i).reshape(-1) for i in example_index])
    preds = np.concatenate([np.asarray(p).reshape(len(np.asarray(i).reshape(-1)), -1)
                            for i, p in zip(example_index, predictions)])  # fmt: skip
    if jax.process_count() > 1:  # each process scored its own rows
        from jax.experimental import multihost_utils

        width = preds.shape[1]
        index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
        preds = np.asarray(multihost_utils.process_allgather(preds)).reshape(len(index), width)
    keep = index >= 0
    index, preds = index[keep], preds[keep]
    order = np.argsort(index, kind="stable")
    index, preds = index[order], preds[order]
    index, first = np.unique(index, return_index=True)  # a row seen twice counts once
    preds = preds[first]
    truth = np.asarray(labels)[index]
    if label_kind == "regression":
        return regression_scores(truth, preds[:, 0])
    if label_kind == "token":  # every labeled token (a word's first sub-token) counts once
        scored = truth >= 0
        return class_scores(truth[scored], preds[scored].astype(np.int64))
    return class_scores(truth, preds[:, 0].astype(np.int64))


def evaluate_classifier(model, params, batches, labels: np.ndarray, label_kind: str) -> dict:
    """Loss, token accuracy and the metrics of `class_scores` /
    `regression_scores` of `params` on an eval set's batches (with
    `example_index`), in one pass on this host's devices."""
    from ftjax.eval.metrics import across_processes, summarize

    step = _compiled(model)
    rows, preds, totals = [], [], {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
    for batch in batches:
        sums, pred = step(params, {k: v for k, v in batch.items() if k not in ("valid",
                                   "example_index")})  # fmt: skip
        totals["loss_sum"] += float(sums[0])
        totals["correct_sum"] += float(sums[1])
        totals["weight_sum"] += float(np.sum(batch["loss_mask"]))
        rows.append(batch["example_index"])
        preds.append(np.asarray(pred))
    summary = summarize(across_processes(totals))
    scores = score_eval_set(labels, rows, preds, label_kind)
    return {"loss": summary["loss"], "token_accuracy": summary["accuracy"], **scores}


@functools.lru_cache(maxsize=8)
def _compiled(model):
    """One compiled eval function per model (base and tuned share it)."""
    import jax

    from ftjax.train.step import eval_sums_and_predictions

    return jax.jit(lambda p, b: eval_sums_and_predictions(model, p, b))
