"""(IA)^3 (Liu et al., 2022): a frozen kernel and a trainable per-feature scale.

`IA3Weight(w, l, feedforward)` stands for the kernel `w * l` with `l`
broadcast over the output features (`l` of shape `(..., out)`), or, for a
*feedforward* layer, over the input features (`l` of shape `(..., in)`,
`diag(l) @ w`). Applied to `x` it computes, as HF PEFT's IA3 layers do,

    (x @ w + bias) * l          (keys, values: the layer's output is rescaled)
    (x * l) @ w + bias          (feedforward: the MLP's down projection input)

so that a key or value layer's bias is scaled too (`effective_bias`, which
`ftjax.models.layers.linear` and `merge` use). `l` starts at ones: the adapted
model equals the base model at step 0. The leaf never forms `w * l` to apply
itself; `materialize` (merging) does.
"""

from __future__ import annotations

import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft.base import WeightLeaf, register_leaf


@register_leaf
class IA3Weight(WeightLeaf):
    """The kernel `w` with its output (or, `feedforward`, input) features
    scaled by the trainable vector `l` (see the module docstring).

    >>> w = jnp.ones((3, 2))
    >>> layers.linear(jnp.ones((1, 3)), IA3Weight(w, jnp.asarray([2.0, 0.5])))
    Array([[6. , 1.5]], dtype=float32)
    >>> layers.linear(jnp.ones((1, 3)), IA3Weight(w, jnp.asarray([1.0, 0.0, 2.0]), True))
    Array([[3., 3.]], dtype=float32)
    """

    children = ("w", "l")
    trainable_children = ("l",)
    static = ("feedforward",)

    def __init__(self, w, l, feedforward: bool = False):  # noqa: E741  (the paper's name)
        self._set(w=w, l=l, feedforward=bool(feedforward))

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    def _scale(self, dtype):
        return jnp.asarray(self.l, dtype)

    def apply_linear(self, x, *, dtype, rng):
        if self.feedforward:
            return layers.linear(x * self._scale(dtype), self.w, dtype=dtype, rng=rng)
        return layers.linear(x, self.w, dtype=dtype, rng=rng) * self._scale(dtype)

    def effective_bias(self, bias):
        """The bias of the adapted layer: a key/value layer's output, bias
        included, is scaled; a feedforward layer's bias is not."""
        if self.feedforward:
            return bias
        return (jnp.asarray(bias, jnp.float32) * jnp.asarray(self.l, jnp.float32)).astype(
            bias.dtype
        )

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        w = layers.materialize(self.w, jnp.float32)
        l = jnp.asarray(self.l, jnp.float32)  # noqa: E741
        scaled = w * (l[..., :, None] if self.feedforward else l[..., None, :])
        return scaled.astype(dtype)


def init_ia3(w, *, feedforward: bool = False, dtype="float32") -> IA3Weight:
    """A fresh `IA3Weight` around kernel `w` (shape `(..., in, out)`): `l` of
    ones, one per output feature (per input feature when `feedforward`),
    with `w`'s leading (stacked-layer) axes.

    `dtype` defaults to float32 whatever the kernel's: near 1 a bfloat16 `l`
    cannot move by less than 2^-8, which would round typical updates away.

    >>> leaf = init_ia3(jnp.zeros((4, 6)), feedforward=True)
    >>> leaf.l.shape, leaf.l.dtype, float(leaf.l.min())
    ((4,), dtype('float32'), 1.0)
    """
    shape = tuple(w.shape)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    size = fan_in if feedforward else fan_out
    return IA3Weight(w, jnp.ones(lead + (size,), jnp.dtype(dtype or w.dtype)), feedforward)
