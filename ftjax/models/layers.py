"""Building blocks shared by every model family.

Every projection in ftjax goes through `linear`: a plain array kernel is a
matmul, and any other leaf applies itself. That single dispatch point is what
lets `ftjax.peft` add weight types (LoRA, DoRA, NF4-quantized, ...) without the
models knowing about them. The protocol a leaf implements is two methods:

    leaf.apply_linear(x, *, dtype, rng) -> x @ W_effective   (rng: dropout or None)
    leaf.materialize(dtype=None)        -> W_effective as a plain array

and, optionally, `leaf.effective_bias(bias) -> b_effective` for a leaf that
also changes its layer's bias (IA3 scales a key or value projection's whole
output, bias included): `linear` adds that instead of `bias`, and
`materialize_params` writes it in place of the sibling `bias`.

Leaves must be pytrees whose children all carry the same leading axes as the
kernel they replace, so that `nn.scan` over stacked layers slices them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ModelError

# The attention kernels live in `attention.py`; re-exported for existing callers.
from ftjax.models.attention import (  # noqa: F401
    CAUSAL_BLOCK_MIN,
    CAUSAL_BLOCKS_MAX,
    MaskParts,
    causal_block_attention,
    dot_product_attention,
)

Array = jax.Array


def is_weight_leaf(x) -> bool:
    """True for adapter / quantized leaves that apply themselves."""
    return hasattr(x, "apply_linear") and hasattr(x, "materialize")


def materialize(kernel, dtype=None):
    """The effective dense weight of any kernel leaf."""
    if is_weight_leaf(kernel):
        return kernel.materialize(dtype)
    return kernel if dtype is None else jnp.asarray(kernel, dtype)


def linear(x: Array, kernel, bias=None, *, dtype=None, rng=None) -> Array:
    """`x @ kernel + bias`, dispatching on the kernel leaf type."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    if is_weight_leaf(kernel):
        y = kernel.apply_linear(x, dtype=dtype, rng=rng)
        if bias is not None and hasattr(kernel, "effective_bias"):
            bias = kernel.effective_bias(bias)
    else:
        y = jnp.matmul(x, jnp.asarray(kernel, dtype))
    if bias is not None:
        y = y + jnp.asarray(bias, dtype)
    return y


def materialize_params(params):
    """Plain params: every weight leaf replaced by its dense kernel and, for a
    leaf with `effective_bias`, the sibling `bias` by the one it implies."""
    merged = jax.tree.map(
        lambda x: materialize(x) if is_weight_leaf(x) else x, params, is_leaf=is_weight_leaf
    )
    return _fold_biases(params, merged)


def _fold_biases(params, merged):
    if not isinstance(params, dict):
        return merged
    out = {k: _fold_biases(v, merged[k]) for k, v in params.items()}
    kernel, bias = params.get("kernel"), params.get("bias")
    if bias is not None and is_weight_leaf(kernel) and hasattr(kernel, "effective_bias"):
        out["bias"] = kernel.effective_bias(bias)
    return out


def einsum(spec: str, x: Array, kernel, *, dtype=None) -> Array:
    """einsum with a kernel leaf; non-array leaves are materialized first."""
    dtype = dtype or x.dtype
    return jnp.einsum(spec, x.astype(dtype), materialize(kernel, dtype))


def get_param(module: nn.Module, name: str, init_fn, shape, dtype):
    """Returns an existing parameter as is (whatever leaf type), or creates it.

    `Module.param` would shape-check an existing value against `init_fn`, which
    fails for leaves such as a quantized kernel whose first child is packed codes.
    Shapes are validated where weights enter (`hf.py`) instead.
    """
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init_fn, shape, dtype)


def dropout_rng(module: nn.Module, deterministic: bool):
    """An rng for stochastic leaves (LoRA dropout) in training mode, else None."""
    if deterministic or not module.has_rng("dropout"):
        return None
    return module.make_rng("dropout")


class Linear(nn.Module):
    """A projection whose kernel may be any weight leaf. Param names follow flax
    (`kernel` of shape (in, out), `bias`)."""

    features: int
    use_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kernel = get_param(
            self,
            "kernel",
            nn.initializers.normal(self.init_std),
            (x.shape[-1], self.features),
            jnp.dtype(self.param_dtype),
        )
        bias = None
        if self.use_bias:
            bias = get_param(
                self, "bias", nn.initializers.zeros, (self.features,), jnp.dtype(self.param_dtype)
            )
        return linear(
            x, kernel, bias, dtype=jnp.dtype(self.dtype), rng=dropout_rng(self, deterministic)
        )


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as Hugging Face does."""

    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        scale = get_param(
            self, "scale", nn.initializers.ones, (x.shape[-1],), jnp.dtype(self.param_dtype)
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        pdt = jnp.dtype(self.param_dtype)
        scale = get_param(self, "scale", nn.initializers.ones, (x.shape[-1],), pdt)
        bias = get_param(self, "bias", nn.initializers.zeros, (x.shape[-1],), pdt)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)).astype(
            self.dtype
        )


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def setup(self):
        self.embedding = get_param(
            self,
            "embedding",
            nn.initializers.normal(self.init_std),
            (self.num_embeddings, self.features),
            jnp.dtype(self.param_dtype),
        )

    def __call__(self, ids):
        table = materialize(self.embedding, jnp.dtype(self.dtype))
        return jnp.take(table, ids, axis=0)

    def attend(self, x):
        """Tied output head: logits = x @ embedding.T."""
        table = materialize(self.embedding, jnp.dtype(self.dtype))
        return jnp.matmul(x.astype(self.dtype), table.T)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ModelError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies (float64 numpy, so they are exact constants), with
    Llama 3's frequency-dependent scaling or linear position interpolation."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default" or not scaling:
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled)
    raise ModelError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


def rope_cos_sin(positions: Array, inv_freq: np.ndarray):
    """cos/sin tables of shape positions.shape + (head_dim,), in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: (batch, seq, heads, head_dim); rotate-half convention of HF Llama."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention


def attention_mask(
    q_index: Array,
    kv_index: Array,
    kv_valid: Array | None = None,
    q_segment: Array | None = None,
    kv_segment: Array | None = None,
    sliding_window: int | None = None,
) -> Array:
    """Boolean mask (batch, 1, q, kv): causal by sequence index, padding of the
    keys, no attention across packed segments, optional sliding window.

    q_index (batch, q) and kv_index (batch, kv) are indices into the key/value
    sequence (not rotary positions, which restart per packed segment).
    """
    mask = kv_index[:, None, :] <= q_index[:, :, None]
    if sliding_window is not None:
        mask &= q_index[:, :, None] - kv_index[:, None, :] < sliding_window
    if kv_valid is not None:
        mask &= kv_valid[:, None, :].astype(bool)
    if q_segment is not None and kv_segment is not None:
        mask &= q_segment[:, :, None] == kv_segment[:, None, :]
    return mask[:, None, :, :]


def update_kv_cache(layer_cache, k, v, index):
    """Writes this step's keys/values at `index` of a preallocated per-layer cache
    and returns the full cached k/v to attend over (or k/v themselves without one).

    `layer_cache` may also (or only) hold `"prefix"`: this layer's (2, n,
    kv_heads, head_dim) keys and values of prefix tuning, put before the
    returned k/v and never written to the cache (`decoder.read_virtual`)."""
    if layer_cache is None:
        return k, v, None
    new = None
    if "k" in layer_cache:
        ck = jax.lax.dynamic_update_slice(
            layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0)
        )
        cv = jax.lax.dynamic_update_slice(
            layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0)
        )
        k, v, new = ck.astype(k.dtype), cv.astype(v.dtype), {"k": ck, "v": cv}
    prefix = layer_cache.get("prefix")
    if prefix is not None:
        shape = (k.shape[0],) + prefix.shape[1:]
        k = jnp.concatenate([jnp.broadcast_to(prefix[0].astype(k.dtype), shape), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix[1].astype(v.dtype), shape), v], axis=1)
    return k, v, new
