"""The one train step and eval step shared by full tuning and every PEFT method.

Both are module-level pure functions of (state, batch); `parallel.py` compiles
them for a device layout. Gradients are taken with respect to
`state.trainable` only: the frozen tree is a closed-over constant of the loss,
so it gets no gradient buffers and no optimizer state.

The loss is a token-level mean over the whole (global) batch: micro-batches and
devices sum their token losses and divide by the batch's total count of loss
tokens, so k accumulated micro-batches give exactly the gradient of one batch
k times as large, whatever the padding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ftjax import peft


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


def token_losses(logits, targets, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """Per-token cross-entropy (+ z-loss on log Z) in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if label_smoothing:
        # Cross-entropy against (1-eps) one-hot + eps uniform, as torch does.
        uniform = log_z - jnp.mean(logits, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    if z_loss:
        nll = nll + z_loss * jnp.square(log_z)
    return nll


def _forward(model, params, batch, rng, deterministic):
    rngs = {} if rng is None else {"dropout": rng}
    return model.apply(
        {"params": params},
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        deterministic=deterministic,
        rngs=rngs,
    )


def _loss_sum(trainable, frozen, batch, rng, model, cfg: StepConfig):
    params = peft.combine(trainable, frozen)
    logits = _forward(model, params, batch, rng, deterministic=False)
    mask = batch["loss_mask"].astype(jnp.float32)
    losses = token_losses(logits, batch["targets"], cfg.label_smoothing, cfg.z_loss)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(correct * mask)


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
    return new_state, metrics


def eval_step(trainable, frozen, batch, *, model, axis_name=None):
    """Sums for exact token-level metrics: (loss_sum, correct_sum, count)."""
    params = peft.combine(trainable, frozen)
    logits = _forward(model, params, batch, None, deterministic=True)
    mask = batch["loss_mask"].astype(jnp.float32)
    losses = token_losses(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    out = {
        "loss_sum": jnp.sum(losses * mask),
        "correct_sum": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }
    return out if axis_name is None else jax.lax.psum(out, axis_name)
