"""Optimizers and schedules from config, through optax.

>>> tx, schedule = build_optimizer(cfg.optim, total_steps=1000)
>>> opt_state = tx.init(trainable)

The optimizer only ever sees the `trainable` tree, so frozen weights get no
optimizer state (the memory half of PEFT's promise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ftjax.errors import ConfigError  # noqa: F401  (re-exported)
from ftjax.models.layers import is_weight_leaf

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def default_optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3,
            end_lr_fraction=0.0,  # final lr of the decay as a fraction of lr
            schedule="cosine",
            warmup_steps=0,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            momentum=0.9,  # sgd
            clip_norm=1.0,  # 0 disables global-norm clipping
            accum_steps=1,  # micro-batches per step, accumulated inside the step
        )
    )


def build_schedule(cfg, total_steps: int) -> optax.Schedule:
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule={cfg.schedule!r}; expected one of {', '.join(SCHEDULES)}"
        )
    warmup = int(cfg.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    end = cfg.lr * cfg.end_lr_fraction
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_fraction)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: biases, norm scales and other vectors are
    skipped, as are the vector children (DoRA magnitude) of adapter leaves."""

    def leaf_mask(x):
        if is_weight_leaf(x):
            return jax.tree.map(lambda c: jnp.ndim(c) >= 2, x)
        return jnp.ndim(x) >= 2

    return jax.tree.map(leaf_mask, params, is_leaf=is_weight_leaf)


def build_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) for `cfg` = `default_optim_config()` with overrides."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if cfg.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.lr}; expected a positive learning rate")
    if int(cfg.accum_steps) < 1:
        raise ConfigError(f"optim.accum_steps={cfg.accum_steps}; expected an integer >= 1")
    schedule = build_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    elif cfg.name == "lion":
        opt = optax.lion(
            schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    elif cfg.name == "adafactor":
        opt = optax.adafactor(
            schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask
        )
    else:
        opt = optax.sgd(schedule, momentum=cfg.momentum or None)
        if cfg.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask), opt)
    if cfg.clip_norm and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule
