"""Optimizers and schedules from config, through optax.

>>> from ftjax.train import default_config
>>> tx, schedule = build_optimizer(default_config().optim, total_steps=1000)
>>> trainable = {"lora_a": jnp.zeros((8, 4)), "norm": None}   # None: frozen, as `split` gives
>>> opt_state = tx.init(trainable)
>>> sorted({x.shape for x in jax.tree.leaves(opt_state)})   # step counts and Adam moments
[(), (8, 4)]

The optimizer only ever sees the `trainable` tree, so frozen weights get no
optimizer state (the memory half of PEFT's promise). A method may train some
adapter children at a multiple of the learning rate (LoRA+: `b` at 16x);
`build_optimizer(..., lr_scales=method.lr_scales())` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_optim_config(cfg, total_steps: int | None = None) -> None:
    """Names, types and ranges of every optimizer field; each failure is a
    ConfigError naming `optim.<field>`. `total_steps` (train.steps), when
    given, bounds the warm-up."""
    unknown = sorted(set(cfg.keys()) - set(default_optim_config().keys()))
    if unknown:
        raise ConfigError(
            f"optim.{unknown[0]}: no such optimizer field; fields: "
            f"{', '.join(sorted(default_optim_config().keys()))}"
        )
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule={cfg.schedule!r}; expected one of {', '.join(SCHEDULES)}"
        )
    if not _number(cfg.lr) or cfg.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.lr!r}; expected a positive learning rate")
    ranges = {
        "end_lr_fraction": (0.0, 1.0, "a fraction in [0, 1]"),
        "weight_decay": (0.0, None, "a number >= 0"),
        "b1": (0.0, 1.0, "a number in [0, 1]"),
        "b2": (0.0, 1.0, "a number in [0, 1]"),
        "momentum": (0.0, 1.0, "a number in [0, 1]"),
        "clip_norm": (0.0, None, "a number >= 0 (0: no clipping)"),
    }
    for key, (lo, hi, expected) in ranges.items():
        value = cfg.get(key)
        if not _number(value) or value < lo or (hi is not None and value > hi):
            raise ConfigError(f"optim.{key}={value!r}; expected {expected}")
    if not _number(cfg.eps) or cfg.eps <= 0:
        raise ConfigError(f"optim.eps={cfg.eps!r}; expected a positive number")
    for key, lo in (("warmup_steps", 0), ("accum_steps", 1)):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ConfigError(f"optim.{key}={value!r}; expected an integer >= {lo}")
    if total_steps is not None and cfg.warmup_steps > total_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.warmup_steps} is larger than "
            f"train.steps={total_steps}; expected warmup_steps <= steps"
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
    skipped, as are the vector children (DoRA magnitude) of adapter leaves. In
    scanned layers every array has a leading layer axis, so a matrix there has
    three dimensions (a stacked norm scale is still a vector per layer)."""
    from ftjax.models.registry import locate_layer
    from ftjax.peft.base import path_str

    def leaf_mask(keypath, x):
        where = locate_layer(path_str(keypath).split("/"))
        matrix = 3 if where is not None and where[1] is None else 2
        if is_weight_leaf(x):
            return jax.tree.map(lambda c: jnp.ndim(c) >= matrix, x)
        return jnp.ndim(x) >= matrix

    return jax.tree_util.tree_map_with_path(leaf_mask, params, is_leaf=is_weight_leaf)


def scale_children(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates of the named children of every weight leaf
    (`{"b": 16.0}`: LoRA's `b`), leaving plain arrays and other children alone.

    Chained after an optimizer, this trains those children at `scale` times the
    learning rate: with SGD (momentum or not), AdamW and Lion the update, weight
    decay included, is linear in the learning rate, so `scale * update(lr)` is
    `update(scale * lr)` (LoRA+'s parameter groups). So is Adafactor's, except
    its weight decay, which optax adds after the learning rate: that term is
    scaled too. Stateless: the optimizer state is that of the optimizer alone.

    >>> from ftjax.peft import LoraWeight
    >>> tx = optax.chain(optax.sgd(0.1), scale_children({"b": 4.0}))
    >>> grads = {"k": LoraWeight(None, jnp.ones(2), jnp.ones(2)), "norm": jnp.ones(2)}
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["k"].a, updates["k"].b, updates["norm"]
    (Array([-0.1, -0.1], dtype=float32), Array([-0.4, -0.4], dtype=float32), Array([-0.1, -0.1], dtype=float32))
    """
    scales = dict(scales)

    def scale(leaf):
        if not is_weight_leaf(leaf):
            return leaf
        changes = {
            name: getattr(leaf, name) * factor
            for name, factor in scales.items()
            if name in leaf.children and getattr(leaf, name) is not None
        }
        return leaf.replace(**changes) if changes else leaf

    def update(updates, params=None):
        del params
        return jax.tree.map(scale, updates, is_leaf=is_weight_leaf)

    return optax.stateless(update)


def build_optimizer(
    cfg, total_steps: int, *, lr_scales: Mapping[str, float] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) for `cfg` = `default_optim_config()` with overrides.

    `lr_scales`: learning-rate multipliers of weight-leaf children by name
    (`method.lr_scales()`, see `scale_children`); a configuration without any
    other than 1 builds exactly the optimizer (and state) it always did."""
    validate_optim_config(cfg)
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
    scales = {k: float(v) for k, v in (lr_scales or {}).items() if float(v) != 1.0}
    if scales:
        opt = optax.chain(opt, scale_children(scales))
    if cfg.clip_norm and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule
