"""DoRA: weight-decomposed LoRA, as a weight leaf.

`DoraWeight(w, a, b, m, scale)` stands for

    W' = m * V / ||V||_col,   V = w + scale * a @ b,

with `m` of shape `(..., out)` (one magnitude per output feature, trainable)
and the column norm taken over the input axis (axis -2 of an `(in, out)`
kernel). As in the DoRA paper and HF PEFT, `||V||_col` is treated as a constant
in the backward pass (`stop_gradient`), which is what makes DoRA affordable.

The forward mirrors HF PEFT, including how dropout enters:

    y = x @ w + (g - 1) * (dropout(x) @ w) + g * scale * (dropout(x) @ a) @ b,
    g = m / ||V||_col

which, without dropout, is `g * (x @ w + scale * (x @ a) @ b) = x @ W'`.

`compute="factored"` never forms `a @ b`: the column norm is expanded as
`||w||^2 + 2s <a^T w, b> + s^2 <b, (a^T a) b>` (per column), which needs only
`(r, out)`-sized products. `compute="merged"` forms `V` and uses `x @ W'`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft.base import PeftError, register_leaf
from ftjax.peft.lora import LoraWeight, dropout, init_lora


def column_norm(w, a, b, scale: float, *, factored: bool = True):
    """`||w + scale * a @ b||` over the input axis (-2), in float32, shape `(..., out)`.

    >>> column_norm(jnp.eye(2), jnp.zeros((2, 1)), jnp.zeros((1, 2)), 1.0)
    Array([1., 1.], dtype=float32)
    >>> column_norm(jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)), 1.0)   # columns (2, 1)
    Array([2.236068, 2.236068], dtype=float32)
    """
    w, a, b = (jnp.asarray(t, jnp.float32) for t in (w, a, b))
    if not factored:
        return jnp.linalg.norm(w + scale * jnp.matmul(a, b), axis=-2)
    at_w = jnp.einsum("...ir,...io->...ro", a, w)
    at_a = jnp.einsum("...ir,...is->...rs", a, a)
    sq = (
        jnp.sum(w * w, axis=-2)
        + 2.0 * scale * jnp.sum(at_w * b, axis=-2)
        + scale * scale * jnp.sum(b * jnp.matmul(at_a, b), axis=-2)
    )
    # Rounding can push a (near-)zero column's square slightly negative.
    return jnp.sqrt(jnp.maximum(sq, 0.0))


@register_leaf
class DoraWeight(LoraWeight):
    """The DoRA kernel `m * (w + s a@b) / ||w + s a@b||_col` (see module docstring).

    >>> leaf = init_dora(jax.random.key(0), 3 * jnp.eye(4), 2, scale=1.0)
    >>> leaf.m      # the column norms of the kernel
    Array([3., 3., 3., 3.], dtype=float32)
    """

    children = ("w", "a", "b", "m")
    trainable_children = ("a", "b", "m")
    static = LoraWeight.static

    def __init__(
        self, w, a, b, m, scale=1.0, dropout=0.0, compute="auto", init=None, freeze_a=False
    ):
        if compute == "auto":  # DoRA's gain needs the column norm: factored it is
            compute = "factored"
        if compute == "hybrid":
            raise PeftError("method.compute: 'hybrid' is LoRA's; DoRA takes factored or merged")
        super().__init__(w, a, b, scale, dropout, compute, init, freeze_a)
        self._set(m=m)

    def _gain(self, w_dense):
        """`m / ||V||_col` with the norm held constant for differentiation."""
        norm = column_norm(w_dense, self.a, self.b, self.scale, factored=self.compute == "factored")
        return jnp.asarray(self.m, jnp.float32) / jax.lax.stop_gradient(norm)

    def apply_linear(self, x, *, dtype, rng):
        if self.compute == "merged":
            return jnp.matmul(x, self.materialize(dtype))
        w = layers.materialize(self.w, dtype)  # dequantized once for both uses below
        gain = self._gain(w).astype(dtype)
        base = jnp.matmul(x, w)
        xd = dropout(x, self.dropout, rng)
        h = jnp.matmul(xd, jnp.asarray(self.a, dtype)) * jnp.asarray(self.scale, dtype)
        low_rank = jnp.matmul(h, jnp.asarray(self.b, dtype))
        if xd is x:
            return gain * (base + low_rank)
        return base + (gain - 1) * jnp.matmul(xd, w) + gain * low_rank

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        w = layers.materialize(self.w, jnp.float32)
        v = w + self.delta(jnp.float32)
        return (v * self._gain(w)[..., None, :]).astype(dtype)


def from_lora(leaf: LoraWeight) -> DoraWeight:
    """DoRA over a LoRA leaf, with `m` set so that the kernel is unchanged:
    `m = ||w + s a@b||_col` (the base's column norms when `b = 0`)."""
    w = layers.materialize(leaf.w, jnp.float32)
    m = column_norm(w, leaf.a, leaf.b, leaf.scale).astype(leaf.a.dtype)
    return DoraWeight(
        leaf.w, leaf.a, leaf.b, m, leaf.scale, leaf.dropout, leaf.compute, leaf.init, leaf.freeze_a
    )


def init_dora(key, w, rank: int, *, scale: float, **kwargs) -> DoraWeight:
    """`init_lora` (same arguments) followed by `from_lora`."""
    return from_lora(init_lora(key, w, rank, scale=scale, **kwargs))
