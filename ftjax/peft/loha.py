"""LoHa (Hyeon-Woo et al., 2022, "FedPara"; LyCORIS): a low-rank Hadamard
product update.

`LohaWeight(w, a1, b1, a2, b2, scale)` stands for the kernel

    w + scale * (a1 @ b1) * (a2 @ b2)          (JAX layout: w (in, out))

with `a1`, `a2` `(in, r)` and `b1`, `b2` `(r, out)`: the element-wise product
of two rank-r matrices has rank up to r², for 2·r·(in + out) parameters.
`scale = alpha / r`. HF PEFT's `hada_w1_a` `(out, r)` is `b1ᵀ`, `hada_w1_b`
`(r, in)` is `a1ᵀ` (and likewise for `w2`). PEFT's init, followed by
`init_loha`: `hada_w2_b = 0` (so `a2 = 0` and the model starts unchanged),
the others kaiming-uniform (`U(±1/sqrt(fan_in))` of each torch tensor).
Like PEFT, the leaf forms the `(in, out)` update to apply itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft.base import WeightLeaf, register_leaf


@register_leaf
class LohaWeight(WeightLeaf):
    """`w + scale * (a1 @ b1) * (a2 @ b2)` (see the module docstring).

    >>> one = jnp.ones((2, 1))
    >>> leaf = LohaWeight(jnp.zeros((2, 2)), one, one.T, 2 * one, one.T, 0.5)
    >>> leaf.materialize()
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
    """

    children = ("w", "a1", "b1", "a2", "b2")
    trainable_children = ("a1", "b1", "a2", "b2")
    static = ("scale",)

    def __init__(self, w, a1, b1, a2, b2, scale: float):
        self._set(w=w, a1=a1, b1=b1, a2=a2, b2=b2, scale=float(scale))

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def rank(self) -> int:
        return int(self.a1.shape[-1])

    def delta(self, dtype=jnp.float32):
        """`scale * (a1 @ b1) * (a2 @ b2)`, shape `(..., in, out)`."""
        f = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        return (
            (f(self.a1) @ f(self.b1)) * (f(self.a2) @ f(self.b2)) * jnp.asarray(self.scale, dtype)
        )

    def apply_linear(self, x, *, dtype, rng):
        y = layers.linear(x, self.w, dtype=dtype, rng=rng)
        return y + jnp.matmul(x, self.delta(dtype))

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        return (layers.materialize(self.w, jnp.float32) + self.delta(jnp.float32)).astype(dtype)


def kaiming(rng, shape, fan_in: int, dtype):
    """torch's `kaiming_uniform_(a=sqrt(5))`: `U(±1/sqrt(fan_in))`."""
    bound = 1.0 / fan_in**0.5
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)


def init_loha(rng, w, rank: int, *, scale: float, dtype=None) -> LohaWeight:
    """A fresh `LohaWeight` around `w` (`(..., in, out)`) with PEFT's init:
    `a2 = 0`, `a1 ~ U(±1/sqrt(in))`, `b1`, `b2 ~ U(±1/sqrt(r))`.

    >>> leaf = init_loha(jax.random.key(0), jnp.zeros((6, 4)), 2, scale=1.0)
    >>> leaf.a1.shape, leaf.b2.shape, float(abs(leaf.delta()).max())
    ((6, 2), (2, 4), 0.0)
    """
    shape = tuple(w.shape)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    dtype = jnp.dtype(dtype or w.dtype)
    k1, k2, k3 = jax.random.split(rng, 3)
    return LohaWeight(
        w,
        kaiming(k1, lead + (fan_in, rank), fan_in, dtype),
        kaiming(k2, lead + (rank, fan_out), rank, dtype),
        jnp.zeros(lead + (fan_in, rank), dtype),
        kaiming(k3, lead + (rank, fan_out), rank, dtype),
        scale,
    )
