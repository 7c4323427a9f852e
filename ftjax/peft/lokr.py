"""LoKr (LyCORIS; Edalati et al., 2022, "KronA"): a Kronecker-product update.

`LokrWeight(w, w1, a1, b1, w2, a2, b2, scale, rank, decompose_both, factor)`
stands for the kernel

    w + scale * kron(F1, F2)        F1 = w1 or a1 @ b1,  F2 = w2 or a2 @ b2

in JAX layout: `w` `(in, out)`, `F1` `(in_m, out_l)`, `F2` `(in_n, out_k)`
with `in = in_m · in_n`, `out = out_l · out_k` split by PEFT's
`factorization` (`kron_shapes`). A factor is either full (`w1`, and the
other two children `None`) or low-rank (`a1` `(in_m, r)`, `b1` `(r, out_l)`,
and `w1` `None`); PEFT's rule picks: `F2` is low-rank when
`r < max(in_n, out_k) / 2`, `F1` only with `decompose_both` and
`r < max(in_m, out_l) / 2`. `scale = alpha / r`. HF PEFT stores the torch
transposes: `lokr_w1 = w1ᵀ`, `lokr_w1_a = b1ᵀ`, `lokr_w1_b = a1ᵀ` (same for 2).

PEFT's default init (`init_lokr`): `F1 = 0` (`lokr_w1`, or `lokr_w1_a`), the
rest kaiming-uniform, so the model starts unchanged. Applied to `x` the leaf
never forms the update: `x` reshaped to `(…, in_m, in_n)` is contracted with
`F1` and `F2` (`kron(F1, F2)[m·in_n + n, o·out_k + k] = F1[m, o] · F2[n, k]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft.base import WeightLeaf, register_leaf
from ftjax.peft.loha import kaiming


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """`(m, n)` with `m · n = dimension`, `m <= n`: HF PEFT's (and LyCORIS')
    rule, `m = factor` when it divides, else the divisor pair nearest the
    square root with `m <= factor` (any, for -1).

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def kron_shapes(fan_in, fan_out, rank, *, decompose_both=False, factor=-1):
    """`((in_m, out_l), (in_n, out_k), low_rank_1, low_rank_2)`: the JAX-layout
    shapes of the two Kronecker factors and whether each is low-rank, as
    PEFT's `LoKrLayer.update_layer` decides them for a linear layer."""
    in_m, in_n = factorization(fan_in, factor)
    out_l, out_k = factorization(fan_out, factor)
    low1 = bool(decompose_both and rank < max(out_l, in_m) / 2)
    low2 = bool(rank < max(out_k, in_n) / 2)
    return (in_m, out_l), (in_n, out_k), low1, low2


@register_leaf
class LokrWeight(WeightLeaf):
    """`w + scale * kron(F1, F2)` (see the module docstring).

    >>> w1, w2 = jnp.asarray([[1.0, 2.0]]), jnp.eye(2)
    >>> leaf = LokrWeight(jnp.zeros((2, 4)), w1, None, None, w2, None, None, 1.0, 1)
    >>> leaf.materialize()
    Array([[1., 0., 2., 0.],
           [0., 1., 0., 2.]], dtype=float32)
    >>> layers.linear(jnp.asarray([[1.0, 3.0]]), leaf)
    Array([[1., 3., 2., 6.]], dtype=float32)
    """

    children = ("w", "w1", "a1", "b1", "w2", "a2", "b2")
    trainable_children = ("w1", "a1", "b1", "w2", "a2", "b2")
    static = ("scale", "rank", "decompose_both", "factor")

    def __init__(self, w, w1, a1, b1, w2, a2, b2, scale, rank, decompose_both=False, factor=-1):
        self._set(w=w, w1=w1, a1=a1, b1=b1, w2=w2, a2=a2, b2=b2, scale=float(scale),
                  rank=int(rank), decompose_both=bool(decompose_both), factor=int(factor))  # fmt: skip

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    def factors(self, dtype):
        """`(F1, F2)` in `dtype`, shapes `(..., in_m, out_l)`, `(..., in_n, out_k)`."""
        f = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        f1 = f(self.w1) if self.w1 is not None else f(self.a1) @ f(self.b1)
        f2 = f(self.w2) if self.w2 is not None else f(self.a2) @ f(self.b2)
        return f1, f2

    def apply_linear(self, x, *, dtype, rng):
        y = layers.linear(x, self.w, dtype=dtype, rng=rng)
        f1, f2 = self.factors(dtype)
        (in_m, out_l), (in_n, out_k) = f1.shape, f2.shape
        h = x.reshape(x.shape[:-1] + (in_m, in_n))
        h = jnp.einsum("...mn,mo,nk->...ok", h, f1, f2)
        return y + h.reshape(x.shape[:-1] + (out_l * out_k,)) * jnp.asarray(self.scale, dtype)

    def delta(self, dtype=jnp.float32):
        """`scale * kron(F1, F2)`, shape `(..., in, out)` (stacked leaves too)."""
        f1, f2 = self.factors(dtype)
        lead = f1.shape[:-2]
        (in_m, out_l), (in_n, out_k) = f1.shape[-2:], f2.shape[-2:]
        kron = jnp.einsum("...mo,...nk->...mnok", f1, f2)
        return kron.reshape(lead + (in_m * in_n, out_l * out_k)) * jnp.asarray(self.scale, dtype)

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        return (layers.materialize(self.w, jnp.float32) + self.delta(jnp.float32)).astype(dtype)


def init_lokr(rng, w, rank: int, *, scale: float, decompose_both=False, factor=-1, dtype=None):
    """A fresh `LokrWeight` around `w` (`(..., in, out)`) with PEFT's default
    init: `F1 = 0` (`w1 = 0`, or `b1 = 0` with `a1 ~ U(±1/sqrt(in_m))`), and
    `w2 ~ U(±1/sqrt(in_n))` or `a2 ~ U(±1/sqrt(in_n))`, `b2 ~ U(±1/sqrt(r))`.

    >>> leaf = init_lokr(jax.random.key(0), jnp.zeros((64, 32)), 2, scale=1.0)
    >>> leaf.w1.shape, leaf.a2.shape, leaf.b2.shape, float(abs(leaf.delta()).max())
    ((8, 4), (8, 2), (2, 8), 0.0)
    """
    shape = tuple(w.shape)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    dtype = jnp.dtype(dtype or w.dtype)
    (in_m, out_l), (in_n, out_k), low1, low2 = kron_shapes(
        fan_in, fan_out, rank, decompose_both=decompose_both, factor=factor
    )
    k1, k2, k3 = jax.random.split(rng, 3)
    w1 = a1 = b1 = w2 = a2 = b2 = None
    if low1:
        a1 = kaiming(k1, lead + (in_m, rank), in_m, dtype)
        b1 = jnp.zeros(lead + (rank, out_l), dtype)
    else:
        w1 = jnp.zeros(lead + (in_m, out_l), dtype)
    if low2:
        a2 = kaiming(k2, lead + (in_n, rank), in_n, dtype)
        b2 = kaiming(k3, lead + (rank, out_k), rank, dtype)
    else:
        w2 = kaiming(k2, lead + (in_n, out_k), in_n, dtype)
    return LokrWeight(w, w1, a1, b1, w2, a2, b2, scale, rank, decompose_both, factor)
