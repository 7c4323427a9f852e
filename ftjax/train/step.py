"""The one train step and eval step shared by full tuning and every PEFT method.

Both are module-level pure functions of (state, batch); `parallel.py` compiles
them for a device layout. Gradients are taken with respect to
`state.trainable` only: the frozen tree is a closed-over constant of the loss,
so it gets no gradient buffers and no optimizer state.

The loss is a token-level mean over the whole (global) batch: micro-batches and
devices sum their token losses and divide by the batch's total count of loss
tokens, so k accumulated micro-batches give exactly the gradient of one batch
k times as large, whatever the padding.

Where one sequence's float32 logits would be large (`StepConfig.loss_chunk`,
`train.loss_chunk`), the loss takes the model's final hidden states and
applies the output head a chunk of positions at a time (`ftjax.train.loss`),
so the full logits exist in neither pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ftjax import peft
from ftjax.models.decoder import head_logits, output_head
from ftjax.models.registry import get_family
from ftjax.train.loss import (
    chunked_loss_sums,
    loss_sums,
    regression_sums,
    resolve_loss_chunk,
    token_losses,  # noqa: F401  (re-exported; it lived here)
)


class TrainState(NamedTuple):
    """A run's state; built by `ftjax.train.state` (the one builder, which
    holds the seed convention), advanced by `train_step`."""

    step: jax.Array  # int32 scalar
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array  # PRNG key data (uint32), advanced every step
    skipped: jax.Array  # int32: updates skipped by the NaN/Inf guard


class StepConfig(NamedTuple):
    """Static settings of the step (hashable: part of the compiled program)."""

    accum_steps: int = 1
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    axis_name: str | None = None  # set under pmap: gradients are summed over it
    # Positions per chunk of the chunked loss: -1 auto (chunk only where one
    # sequence's float32 logits exceed loss.AUTO_CHUNK_BYTES), 0 dense, N > 0.
    loss_chunk: int = -1
    # The method's loss term on the trainable tree (`Method.penalty()`), or None.
    penalty: Callable[[Any], jax.Array] | None = None


def _forward(model, params, batch, rng, deterministic, **kwargs):
    rngs = {} if rng is None else {"dropout": rng}
    if "token_type_ids" in batch:  # sentence pairs of an encoder's classification data
        kwargs["token_type_ids"] = batch["token_type_ids"]
    return model.apply(
        {"params": params},
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        deterministic=deterministic,
        rngs=rngs,
        **kwargs,
    )


def _chunk_length(model, batch, loss_chunk: int) -> int:
    """The chunk length for this model and batch (0: dense); static at trace time."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:  # not a registered family's module: nothing to chunk by
        return 0
    supported = get_family(cfg.model_type).returns_hidden
    seq_len = batch["targets"].shape[-1]
    return resolve_loss_chunk(loss_chunk, seq_len, cfg.vocab_size, supported=supported)


def _sums(params, batch, rng, model, *, deterministic, chunk, label_smoothing=0.0, z_loss=0.0):
    """(masked loss sum, masked correct count) of `batch`, dense or chunked."""
    if not chunk:
        logits = _forward(model, params, batch, rng, deterministic)
        return _logit_sums(model, logits, batch, label_smoothing, z_loss)
    hidden = _forward(model, params, batch, rng, deterministic, return_hidden=True)
    cfg = model.cfg
    # A stochastic head leaf (LoRA dropout) draws from its own stream of the step's key.
    head_rng = None if deterministic or rng is None else jax.random.fold_in(rng, 0x4EAD)
    return chunked_loss_sums(
        lambda head, h, r: head_logits(cfg, head, h, rng=r),
        output_head(cfg, params),
        hidden,
        batch["targets"],
        batch["loss_mask"],
        chunk=chunk,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        rng=head_rng,
    )


def _is_regression(model) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(cfg is not None and getattr(cfg, "is_regression", False))


def _logit_sums(model, logits, batch, label_smoothing=0.0, z_loss=0.0):
    """(loss sum, correct sum) of dense logits: MSE for a regression head."""
    if _is_regression(model):
        return regression_sums(logits[..., 0], batch["targets"], batch["loss_mask"])
    return loss_sums(logits, batch["targets"], batch["loss_mask"], label_smoothing, z_loss)


def _predictions(model, logits):
    """Per-target predictions of a classification model: the argmax class, or
    the regression value (what `ftjax.eval.classification` scores)."""
    return logits[..., 0] if _is_regression(model) else jnp.argmax(logits, -1).astype(jnp.int32)


def eval_sums_and_predictions(model, params, batch):
    """((loss sum, correct sum), per-row predictions) of a classification
    batch with plain params, from one forward pass (ftjax.eval.classification)."""
    logits = _forward(model, params, batch, None, True)
    return _logit_sums(model, logits, batch), _predictions(model, logits)


def _loss_sum(trainable, frozen, batch, rng, model, cfg: StepConfig):
    params = peft.combine(trainable, frozen)
    return _sums(
        params,
        batch,
        rng,
        model,
        deterministic=False,
        chunk=_chunk_length(model, batch, cfg.loss_chunk),
        label_smoothing=cfg.label_smoothing,
        z_loss=cfg.z_loss,
    )


def _micro_batches(batch, k: int):
    return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def _global_sum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def train_step(state: TrainState, batch: dict, *, model, tx, cfg: StepConfig = StepConfig()):
    """One optimizer update on `batch`; returns (new_state, metrics)."""
    rng = jax.random.wrap_key_data(state.rng)
    rng, step_rng = jax.random.split(rng)
    if cfg.axis_name is not None:  # different dropout masks on each device
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(cfg.axis_name))
    count = _global_sum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), cfg.axis_name)
    denom = jnp.maximum(count, 1.0)

    def micro_grad(micro, micro_rng):
        def loss_fn(trainable):
            total, correct = _loss_sum(trainable, state.frozen, micro, micro_rng, model, cfg)
            return total / denom, correct

        (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        return loss, correct, grads

    if cfg.accum_steps == 1:
        loss, correct, grads = micro_grad(batch, step_rng)
    else:
        micros = _micro_batches(batch, cfg.accum_steps)
        rngs = jax.random.split(step_rng, cfg.accum_steps)
        zeros = jax.tree.map(jnp.zeros_like, state.trainable)

        def body(carry, xs):
            loss_acc, correct_acc, grad_acc = carry
            loss, correct, grads = micro_grad(*xs)
            return (
                loss_acc + loss,
                correct_acc + correct,
                jax.tree.map(jnp.add, grad_acc, grads),
            ), None

        (loss, correct, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), (micros, rngs))
    if cfg.axis_name is not None:
        loss, correct, grads = jax.lax.psum((loss, correct, grads), cfg.axis_name)
    penalty = None
    if cfg.penalty is not None:
        # A function of the parameters alone: added once, not per micro-batch or device.
        penalty, penalty_grads = jax.value_and_grad(cfg.penalty)(state.trainable)
        grads = jax.tree.map(jnp.add, grads, penalty_grads)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.trainable)
    new_trainable = optax.apply_updates(state.trainable, updates)
    # NaN/Inf guard: keep the old parameters and optimizer state, count the skip.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state._replace(
        step=state.step + 1,
        trainable=keep(new_trainable, state.trainable),
        opt_state=keep(new_opt_state, state.opt_state),
        rng=jax.random.key_data(rng),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "token_accuracy": correct / denom,
        "grad_norm": grad_norm,
        "loss_tokens": count,
        "skipped": new_state.skipped,
    }
    if penalty is not None:
        metrics["penalty"] = penalty
    return new_state, metrics


def eval_step(trainable, frozen, batch, *, model, axis_name=None, loss_chunk: int = -1):
    """Sums for exact token-level metrics: (loss_sum, correct_sum, count).
    `loss_chunk` as `StepConfig.loss_chunk`."""
    params = peft.combine(trainable, frozen)
    rows = None
    if getattr(getattr(model, "cfg", None), "task", ""):
        # A task head: per-row predictions too (for F1, MCC, correlations), one pass.
        (loss_sum, correct_sum), rows = eval_sums_and_predictions(model, params, batch)
    else:
        chunk = _chunk_length(model, batch, loss_chunk)
        loss_sum, correct_sum = _sums(params, batch, None, model, deterministic=True, chunk=chunk)
    out = {
        "loss_sum": loss_sum,
        "correct_sum": correct_sum,
        "count": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
    }
    out = out if axis_name is None else jax.lax.psum(out, axis_name)
    if rows is not None:
        out["predictions"] = rows  # each row's own, not summed
    return out
