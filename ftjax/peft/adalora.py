"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning"): a LoRA update in SVD form whose rank is
pruned during training, one weight leaf per adapted kernel.

`AdaLoraWeight(w, a, e, b, alpha)` stands for the kernel

    w + (a * e) @ b * alpha / (r + 1e-5)        (JAX layout: w (in, out))

with `a` `(in, r)` the right singular vectors (PEFT's `lora_A`, transposed),
`e` `(r,)` the singular values (`lora_E`, stored `(r, 1)` there) and `b`
`(r, out)` the left ones (`lora_B`, transposed); all three train. As in HF
PEFT, `r` is the initial rank (PEFT's `ranknum` buffer, which keeps that
value after ranks are pruned, so pruning never rescales the others) and
`1e-5` its guard against a zero rank. A pruned triplet is one whose
singular value is exactly 0, which is how PEFT masks it too; its `a` and `b`
columns stay and keep training, so the allocator may bring it back
(`ftjax.peft.adalora_allocator`).

PEFT's init: `e = 0` (the model starts unchanged), `a`, `b` ~ N(0, 0.02²).
`orthogonality_penalty` is PEFT's regularizer, which keeps `a` and `b`
near orthonormal so that `e` stays a meaningful measure of each triplet.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft.base import WeightLeaf, register_leaf
from ftjax.peft.lora import dropout as lora_dropout

# PEFT adds it to `ranknum` in the forward and in the merge.
RANKNUM_EPS = 1e-5
# PEFT's init of the singular vectors (`reset_lora_parameters`).
INIT_STD = 0.02


def adalora_scale(alpha: float, rank: int) -> float:
    """`alpha / (r + 1e-5)`, PEFT's `scaling / ranknum` for a positive alpha."""
    return float(alpha) / (float(rank) + RANKNUM_EPS)


@register_leaf
class AdaLoraWeight(WeightLeaf):
    """`w + (a * e) @ b * alpha / (r + 1e-5)` (see the module docstring).

    >>> w, a, b = jnp.zeros((3, 2)), jnp.ones((3, 2)), jnp.ones((2, 2))
    >>> leaf = AdaLoraWeight(w, a, jnp.asarray([1.0, 0.0]), b, alpha=2.0)
    >>> layers.linear(jnp.ones((1, 3)), leaf).round(4)   # 3 * 1 * 2 / 2: one live triplet
    Array([[3., 3.]], dtype=float32)
    >>> leaf.kept().tolist()
    [True, False]
    """

    children = ("w", "a", "e", "b")
    trainable_children = ("a", "e", "b")
    static = ("alpha", "dropout")

    def __init__(self, w, a, e, b, alpha: float = 8.0, dropout: float = 0.0):
        self._set(w=w, a=a, e=e, b=b, alpha=float(alpha), dropout=float(dropout))

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def rank(self) -> int:
        """The initial rank r (pruned triplets included)."""
        return int(self.e.shape[-1])

    @property
    def scale(self) -> float:
        return adalora_scale(self.alpha, self.rank)

    def kept(self):
        """The triplets that are not pruned (`e != 0`), shape `(..., r)`."""
        return self.e != 0

    def apply_linear(self, x, *, dtype, rng):
        y = layers.linear(x, self.w, dtype=dtype, rng=rng)
        h = jnp.matmul(lora_dropout(x, self.dropout, rng), jnp.asarray(self.a, dtype))
        # Singular values and scale act on the r-wide activation, the cheapest place.
        h = h * (jnp.asarray(self.e, dtype) * jnp.asarray(self.scale, dtype))
        return y + jnp.matmul(h, jnp.asarray(self.b, dtype))

    def delta(self, dtype=jnp.float32):
        """The dense update `(a * e) @ b * scale`, shape `(..., in, out)`."""
        a = jnp.asarray(self.a, dtype) * jnp.asarray(self.e, dtype)[..., None, :]
        return jnp.matmul(a, jnp.asarray(self.b, dtype)) * jnp.asarray(self.scale, dtype)

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        w = layers.materialize(self.w, jnp.float32)
        return (w + self.delta(jnp.float32)).astype(dtype)


def init_adalora(
    rng, w, rank: int, *, alpha: float = 8.0, dropout: float = 0.0, dtype=None
) -> AdaLoraWeight:
    """A fresh `AdaLoraWeight` around kernel `w` (`(..., in, out)`) with PEFT's
    init: `a`, `b` ~ N(0, 0.02²), `e = 0`.

    >>> leaf = init_adalora(jax.random.key(0), jnp.zeros((2, 4, 3)), 5)
    >>> leaf.a.shape, leaf.e.shape, leaf.b.shape, float(abs(leaf.e).max())
    ((2, 4, 5), (2, 5), (2, 5, 3), 0.0)
    """
    shape = tuple(w.shape)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    dtype = jnp.dtype(dtype or w.dtype)
    ka, kb = jax.random.split(rng)
    a = INIT_STD * jax.random.normal(ka, lead + (fan_in, rank), jnp.float32)
    b = INIT_STD * jax.random.normal(kb, lead + (rank, fan_out), jnp.float32)
    e = jnp.zeros(lead + (rank,), dtype)
    return AdaLoraWeight(w, a.astype(dtype), e, b.astype(dtype), alpha=alpha, dropout=dropout)


def is_adalora(x) -> bool:
    return isinstance(x, AdaLoraWeight)


def adalora_leaves(tree) -> list[AdaLoraWeight]:
    """The AdaLoRA leaves of a params (or trainable) tree, in tree order."""
    return [x for x in jax.tree.leaves(tree, is_leaf=is_adalora) if is_adalora(x)]


def _gram_distances(p, contract: int):
    """`‖G − I‖_F` per stacked matrix, `G` the `(r, r)` Gram matrix of `p`
    over its axis `contract` (-2 for `a` (in, r), -1 for `b` (r, out))."""
    p = jnp.asarray(p, jnp.float32)
    if contract == -2:
        gram = jnp.einsum("...ir,...is->...rs", p, p)
    else:
        gram = jnp.einsum("...ro,...so->...rs", p, p)
    diff = gram - jnp.eye(gram.shape[-1], dtype=gram.dtype)
    squared = jnp.sum(diff * diff, axis=(-2, -1))
    # sqrt's gradient at 0 is infinite; an exactly orthonormal matrix gets 0
    # (the subgradient torch's norm gives) instead of NaN.
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def orthogonality_penalty(trainable, weight: float):
    """PEFT's regularizer: `weight` times the mean, over every `lora_A` and
    `lora_B` matrix (each stacked layer counted apart), of `‖A Aᵀ − I‖_F`
    and `‖Bᵀ B − I‖_F` — the Frobenius norm itself, not its square, as PEFT
    adds it to the loss. In the JAX layout `A Aᵀ = aᵀ a` and `Bᵀ B = b bᵀ`.

    >>> leaf = AdaLoraWeight(None, jnp.eye(3, 2), jnp.ones(2), jnp.eye(2, 3))
    >>> float(orthogonality_penalty({"k": leaf}, 0.5))   # orthonormal: no penalty
    0.0
    """
    total, count = jnp.zeros((), jnp.float32), 0
    for leaf in adalora_leaves(trainable):
        for child, contract in (("a", -2), ("b", -1)):
            p = getattr(leaf, child)
            if p is None:
                continue
            total = total + jnp.sum(_gram_distances(p, contract))
            count += math.prod(p.shape[:-2])
    return weight * total / max(count, 1)
