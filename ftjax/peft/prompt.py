"""The weight leaves of prompt tuning and prefix tuning, and what they are
sized by.

Both methods add one top-level entry to the params tree that the model
families read (`ftjax.models.decoder`: `VIRTUAL_TOKENS`, `KV_PREFIX`):

    PromptWeight(table)                      the table itself trains
    PrefixMlpWeight(embedding, w1, b1, w2, b2)
        = tanh(embedding @ w1 + b1) @ w2 + b2    (Li & Liang's reparametrization)

`materialize()` gives the (n, width) array the model uses, so `peft.merge`
turns a `PrefixMlpWeight` into the plain prefix that HF PEFT files hold. They
are leaves (not plain arrays) so that `split` trains their children without a
method-specific selector and the run exports them as adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.models import registry
from ftjax.peft.base import PeftError, WeightLeaf, register_leaf
from ftjax.peft.targets import family


class _TableLeaf(WeightLeaf):
    """`apply_linear` completes the `layers.py` protocol; the families only
    ever materialize these leaves."""

    def apply_linear(self, x, *, dtype, rng):
        del rng
        return jnp.matmul(x.astype(dtype), self.materialize(dtype))

    def split_parts(self):
        # Everything trains. The frozen side keeps a copy without children
        # (not None), so that `combine(trainable, frozen)` meets the same node.
        return self, self.replace(**{name: None for name in self.children})


@register_leaf
class PromptWeight(_TableLeaf):
    """A trainable table used as is: prompt tuning's (n, hidden) virtual-token
    embeddings, or prefix tuning's (n, num_layers * 2 * kv_width) prefix."""

    children = ("table",)
    trainable_children = ("table",)

    def __init__(self, table):
        self._set(table=table)

    def materialize(self, dtype=None):
        return self.table if dtype is None else jnp.asarray(self.table, dtype)


@register_leaf
class PrefixMlpWeight(_TableLeaf):
    """Prefix tuning's reparametrized prefix: an (n, hidden) embedding through
    a two-layer tanh MLP, `tanh(e @ w1 + b1) @ w2 + b2`, computed in float32."""

    children = ("embedding", "w1", "b1", "w2", "b2")
    trainable_children = children

    def __init__(self, embedding, w1, b1, w2, b2):
        self._set(embedding=embedding, w1=w1, b1=b1, w2=w2, b2=b2)

    def materialize(self, dtype=None):
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        hidden = jnp.tanh(f32(self.embedding) @ f32(self.w1) + f32(self.b1))
        out = hidden @ f32(self.w2) + f32(self.b2)
        return out.astype(dtype or self.embedding.dtype)


def virtual_family(params, method: str) -> registry.FamilySpec:
    """The params' model family, which must take virtual tokens."""
    spec = family(params, field=f"method.name ({method})")
    if not spec.takes_virtual_tokens:
        raise PeftError(
            f"method.name: {method} needs a model family that takes virtual tokens "
            f"(FamilySpec.kv_width); {spec.name!r} declares none"
        )
    return spec


def token_embedding(params, spec: registry.FamilySpec):
    """The (vocab, hidden) token embedding table of `params`."""
    node = params
    for key in spec.tied_embedding:
        node = node[key]
    return node


def prefix_dims(params, spec: registry.FamilySpec) -> tuple[int, int]:
    """`(num_layers, kv_width)` of the params' decoder stack, scanned or not."""
    container, layer = spec.layers
    stack = params[container]
    if layer in stack:  # scanned: one stacked layer, leading axis = layers
        stacked = stack[layer]
        num_layers = jax.tree.leaves(stacked)[0].shape[0]
        return num_layers, spec.kv_width(stacked)
    names = [k for k in stack if k.startswith(f"{layer}_") and k[len(layer) + 1 :].isdigit()]
    return len(names), spec.kv_width(stack[f"{layer}_0"])
