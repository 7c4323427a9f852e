"""Loss, perplexity and token accuracy over named eval sets.

A set's loss is the sum of its token losses divided by its number of loss
tokens, not the mean of per-batch means: batches with more padding would
otherwise weigh as much as full ones. Each batch is reduced to three sums on
the device (one jitted function per batch shape); the sums are added up on the
host in float64.

Batches are dicts of arrays (batch, seq) as the data pipeline yields them:
`input_ids`, `targets` (the next token at each position), `loss_mask` (1 on
the tokens that count), and optionally `attention_mask`, `positions`,
`segment_ids` (packed sequences).

In the examples, `model` and `params` are a tiny random Llama and `batch` one
batch of 11 loss tokens (set up by tests/test_doctests.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import DataError

REQUIRED_KEYS = ("input_ids", "targets", "loss_mask")
# Model inputs passed through when a batch has them.
MODEL_KEYS = ("attention_mask", "positions", "segment_ids", "token_type_ids")
# A metric's name in flat summary keys (`<prefix>/<set>/<name>`): the token
# accuracy is `token_accuracy` there, beside the exact match of generated answers.
SUMMARY_NAMES = {
    "loss": "loss",
    "perplexity": "perplexity",
    "accuracy": "token_accuracy",
    "exact_match": "exact_match",
    # Classification (ftjax.eval.classification) and the sentence-embedding
    # probe (ftjax.eval.embeddings): the share of rows (sentences) right is
    # their `accuracy`, apart from the token accuracy above.
    "share_correct": "accuracy",
    "f1": "f1",
    "macro_f1": "macro_f1",
    "mcc": "mcc",
    "pearson": "pearson",
    "spearman": "spearman",
    "mse": "mse",
    "paraphrase_margin": "paraphrase_margin",
}
# Summary name -> the key of a metrics dict (the inverse of SUMMARY_NAMES).
METRIC_KEYS = {summary: key for key, summary in SUMMARY_NAMES.items()}


def perplexity(loss: float) -> float:
    """exp(loss), the one perplexity of every report; inf where exp overflows
    (a loss above ~709), not a made-up finite cap.

    >>> perplexity(2.0)
    7.38905609893065
    """
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under `logits`, per position, in float32.

    >>> logits = jnp.zeros((1, 2, 4))            # uniform over 4 tokens
    >>> token_log_probs(logits, jnp.array([[1, 3]]))
    Array([[-1.3862944, -1.3862944]], dtype=float32)
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def model_inputs(batch: Mapping) -> dict:
    """The keyword arguments of `model.apply` that a batch provides."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch and batch[k] is not None}


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_sums(params, batch, *, model):
    logits = model.apply({"params": params}, batch["input_ids"], **model_inputs(batch))
    weight = batch["loss_mask"].astype(jnp.float32)
    counted = weight > 0
    if getattr(getattr(model, "cfg", None), "is_regression", False):  # a regression head: MSE
        err = logits[..., 0] - batch["targets"].astype(jnp.float32)
        loss_sum = jnp.sum(jnp.where(counted, err * err * weight, 0.0))
        return {"loss_sum": loss_sum, "correct_sum": jnp.zeros(()), "weight_sum": jnp.sum(weight)}
    nll = -token_log_probs(logits, batch["targets"])
    # `where`, not a product: padded query rows may hold non-finite logits.
    loss_sum = jnp.sum(jnp.where(counted, nll * weight, 0.0))
    correct = jnp.argmax(logits, axis=-1) == batch["targets"]
    correct_sum = jnp.sum(jnp.where(counted, correct * weight, 0.0))
    return {"loss_sum": loss_sum, "correct_sum": correct_sum, "weight_sum": jnp.sum(weight)}


def batch_sums(model, params, batch: Mapping) -> dict:
    """Device-side sums for one batch: `loss_sum`, `correct_sum`, `weight_sum`.

    `loss_mask` may be fractional; it weighs each token's loss and correctness.
    """
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"eval batch is missing {missing}; it has {sorted(batch)}")
    arrays = {k: jnp.asarray(batch[k]) for k in REQUIRED_KEYS + MODEL_KEYS if k in batch}
    return _batch_sums(params, arrays, model=model)


def summarize(sums: Mapping[str, float], name: str = "eval set") -> dict:
    """loss / perplexity / accuracy / tokens from accumulated sums
    (`loss_sum`, `correct_sum`, `weight_sum`): the one reduction of token sums
    to metrics, for the training loop's evaluation and for this module's.

    >>> summarize({"loss_sum": 20.0, "correct_sum": 5.0, "weight_sum": 10.0})
    {'loss': 2.0, 'perplexity': 7.38905609893065, 'accuracy': 0.5, 'tokens': 10.0}
    """
    tokens = float(sums["weight_sum"])
    if tokens <= 0:
        raise DataError(f"{name} has no loss tokens (its loss_mask sums to 0)")
    loss = float(sums["loss_sum"]) / tokens
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "accuracy": float(sums["correct_sum"]) / tokens,
        "tokens": tokens,
    }


def evaluate_batches(
    model, params, batches: Iterable[Mapping], *, max_batches: int | None = None, name="eval set"
) -> dict:
    """Token-weighted loss, perplexity and next-token accuracy over `batches`.

    >>> r = evaluate_batches(model, params, [batch, batch])
    >>> sorted(r)
    ['accuracy', 'batches', 'loss', 'perplexity', 'tokens']
    >>> r["batches"], r["tokens"], r["perplexity"] == perplexity(r["loss"])
    (2, 22.0, True)
    """
    pending = []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        pending.append(batch_sums(model, params, batch))  # dispatched, not awaited
    if not pending:
        raise DataError(f"{name} yielded no batches")
    host = jax.device_get(pending)
    totals = {k: float(np.sum([np.float64(h[k]) for h in host])) for k in host[0]}
    return {**summarize(across_processes(totals), name), "batches": len(host)}


def across_processes(totals: Mapping[str, float]) -> dict[str, float]:
    """Sums over every process of a multi-process job (each process reads its
    own rows of every eval batch); the totals themselves in one process."""
    if jax.process_count() == 1:
        return dict(totals)
    from jax.experimental import multihost_utils

    keys = sorted(totals)
    gathered = multihost_utils.process_allgather(np.array([totals[k] for k in keys], np.float64))
    return dict(zip(keys, np.asarray(gathered).reshape(-1, len(keys)).sum(0).tolist()))


def evaluate_sets(
    model, params, named_batches: Mapping[str, Iterable[Mapping]], *, max_batches=None
) -> dict[str, dict]:
    """`evaluate_batches` for each named eval set; a dict ready for eval.json.

    >>> r = evaluate_sets(model, params, {"task": [batch], "general": [batch, batch]})
    >>> list(r), r["task"]["loss"] == r["general"]["loss"], r["general"]["tokens"]
    (['task', 'general'], True, 22.0)
    """
    return {
        name: evaluate_batches(
            model, params, batches, max_batches=max_batches, name=f"eval set {name!r}"
        )
        for name, batches in named_batches.items()
    }


def flatten_sets(
    sets: Mapping[str, Mapping[str, float]], prefix: str, metrics: Iterable[str] | None = None
) -> dict[str, float]:
    """{set: {metric: value}} -> {"<prefix>/<set>/<summary name>": value}, for
    the metrics named in `SUMMARY_NAMES` (those in `metrics` if given).

    >>> flatten_sets({"target": {"loss": 1.5, "accuracy": 0.6, "tokens": 9.0}}, "final")
    {'final/target/loss': 1.5, 'final/target/token_accuracy': 0.6}
    """
    keep = SUMMARY_NAMES if metrics is None else [m for m in SUMMARY_NAMES if m in metrics]
    return {
        f"{prefix}/{name}/{SUMMARY_NAMES[m]}": float(values[m])
        for name, values in sets.items()
        for m in keep
        if m in values
    }


def unflatten_sets(flat: Mapping, prefix: str) -> dict[str, dict[str, float]]:
    """The inverse of `flatten_sets`: {set: {metric: value}} from the
    `<prefix>/<set>/<summary name>` keys of `flat` (other keys are ignored).

    >>> unflatten_sets({"eval/target/loss": 1.5, "eval/target/token_accuracy": 0.6,
    ...                 "eval/loss": 1.5, "lr": 0.1}, "eval")
    {'target': {'loss': 1.5, 'accuracy': 0.6}}
    """
    metric_of = {v: k for k, v in SUMMARY_NAMES.items()}
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        head, _, rest = key.partition("/")
        name, _, metric = rest.rpartition("/")
        if head == prefix and name and metric in metric_of:
            out.setdefault(name, {})[metric_of[metric]] = value
    return out
