"""VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation"):
frozen random projections shared by every adapted layer, and two trainable
vectors per layer.

`VeraWeight(w, a, b, lambda_d, lambda_b)` stands for the kernel

    w + (a * lambda_d) @ (b * lambda_b)        (JAX layout: w (in, out))

with `a` `(in, r)` and `b` `(r, out)` frozen, `lambda_d` `(r,)` and
`lambda_b` `(out,)` trainable: in the paper's notation
`ΔW = Λ_b B Λ_d A` with `A = aᵀ`, `B = bᵀ`. As in HF PEFT, one pair of
projections `A` `(r, in_max)`, `B` `(out_max, r)` is drawn for the largest
input and output sizes among the targets, and a layer uses the leading
`A[:, :in]` and `B[:out]` (`ftjax.peft.methods.vera` slices them; each leaf
holds its slices, so a checkpoint stores them once per layer). PEFT's init:
`lambda_b = 0` (the model starts unchanged) and `lambda_d = d_initial` (0.1).
Applied to `x`, the leaf computes `x @ w + ((x @ a) * lambda_d) @ b * lambda_b`
without forming the `(in, out)` update.
"""

from __future__ import annotations

import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft.base import WeightLeaf, register_leaf


@register_leaf
class VeraWeight(WeightLeaf):
    """`w + (a * lambda_d) @ (b * lambda_b)` (see the module docstring).

    >>> w, a, b = jnp.zeros((3, 2)), jnp.ones((3, 4)), jnp.ones((4, 2))
    >>> leaf = VeraWeight(w, a, b, jnp.full(4, 0.5), jnp.asarray([1.0, 2.0]))
    >>> layers.linear(jnp.ones((1, 3)), leaf)
    Array([[ 6., 12.]], dtype=float32)
    >>> leaf.materialize()[0]
    Array([2., 4.], dtype=float32)
    """

    children = ("w", "a", "b", "lambda_d", "lambda_b")
    trainable_children = ("lambda_d", "lambda_b")

    def __init__(self, w, a, b, lambda_d, lambda_b):
        self._set(w=w, a=a, b=b, lambda_d=lambda_d, lambda_b=lambda_b)

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def apply_linear(self, x, *, dtype, rng):
        y = layers.linear(x, self.w, dtype=dtype, rng=rng)
        h = jnp.matmul(x, jnp.asarray(self.a, dtype)) * jnp.asarray(self.lambda_d, dtype)
        return y + jnp.matmul(h, jnp.asarray(self.b, dtype)) * jnp.asarray(self.lambda_b, dtype)

    def delta(self, dtype=jnp.float32):
        """The update `(a * lambda_d) @ (b * lambda_b)`, shape `(..., in, out)`."""
        a = jnp.asarray(self.a, dtype) * jnp.asarray(self.lambda_d, dtype)[..., None, :]
        b = jnp.asarray(self.b, dtype) * jnp.asarray(self.lambda_b, dtype)[..., None, :]
        return jnp.matmul(a, b)

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        w = layers.materialize(self.w, jnp.float32)
        return (w + self.delta(jnp.float32)).astype(dtype)


def vera_projections(rng, rank: int, fan_in: int, fan_out: int, dtype=jnp.float32):
    """The shared `(a, b)` of shapes `(fan_in, r)`, `(r, fan_out)` (the largest
    sizes among the targets), drawn as HF PEFT draws its `vera_A` `(r, in)`
    and `vera_B` `(out, r)`: kaiming-uniform with gain sqrt(2) over each
    one's torch fan-in, `U(±sqrt(6 / in))` and `U(±sqrt(6 / r))`."""
    import jax

    ka, kb = jax.random.split(rng)
    bound_a, bound_b = (6.0 / fan_in) ** 0.5, (6.0 / rank) ** 0.5
    a = jax.random.uniform(ka, (fan_in, rank), jnp.float32, -bound_a, bound_a)
    b = jax.random.uniform(kb, (rank, fan_out), jnp.float32, -bound_b, bound_b)
    return a.astype(dtype), b.astype(dtype)


def init_vera(w, a, b, *, d_initial: float = 0.1, dtype=None) -> VeraWeight:
    """A fresh `VeraWeight` around kernel `w` (`(..., in, out)`), taking the
    leading `in` rows of the shared `a` and `out` columns of `b`, broadcast
    over `w`'s stacked-layer axes; `lambda_d = d_initial`, `lambda_b = 0`.

    >>> leaf = init_vera(jnp.zeros((2, 4, 3)), jnp.ones((5, 8)), jnp.ones((8, 6)))
    >>> leaf.a.shape, leaf.b.shape, leaf.lambda_d.shape, leaf.lambda_b.shape
    ((2, 4, 8), (2, 8, 3), (2, 8), (2, 3))
    """
    shape = tuple(w.shape)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    rank = a.shape[-1]
    dtype = jnp.dtype(dtype or w.dtype)
    # Copies: leaves must not share buffers (the train step donates the frozen
    # tree, and one buffer cannot be donated twice).
    a = jnp.array(
        jnp.broadcast_to(jnp.asarray(a[:fan_in], dtype), lead + (fan_in, rank)), copy=True
    )
    b = jnp.array(
        jnp.broadcast_to(jnp.asarray(b[:, :fan_out], dtype), lead + (rank, fan_out)), copy=True
    )
    return VeraWeight(
        w, a, b, jnp.full(lead + (rank,), d_initial, dtype), jnp.zeros(lead + (fan_out,), dtype)
    )
