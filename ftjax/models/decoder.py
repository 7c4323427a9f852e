"""What every decoder family shares around its layers: the attention mask,
rotary tables and KV-cache bookkeeping computed once per call, and the layer
stack applied as a Python loop or under `nn.scan` (stacked params), with
optional activation checkpointing."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.models.config import ModelConfig


class DecoderInputs(NamedTuple):
    mask: jax.Array  # (batch, 1, q, kv) bool
    positions: jax.Array  # (batch, q) rotary / learned positions
    cos: Any  # (batch, q, head_dim) or None
    sin: Any
    cache_index: Any  # write offset into the KV cache, or None
    kv_valid: Any  # (batch, kv) bool, kept in the cache for later steps


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `max_len` positions (prompt plus generated tokens)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_size)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "index": jnp.zeros((), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
    }


def decoder_inputs(
    cfg, input_ids, attention_mask, positions, segment_ids, cache, *, rotary: bool = False
) -> DecoderInputs:
    """Mask, positions and cache offsets for one call; with `rotary`, the
    rotary tables of `cfg.rope_theta`/`cfg.rope_scaling` too (families with
    learned positions leave them None)."""
    b, t = input_ids.shape
    if attention_mask is not None:
        attention_mask = attention_mask.astype(bool)
    if cache is None:
        index = None
        q_index = jnp.broadcast_to(jnp.arange(t), (b, t))
        kv_index, kv_valid = q_index, attention_mask
    else:
        index = cache["index"]
        q_index = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        kv_index = jnp.broadcast_to(jnp.arange(cache["valid"].shape[1]), cache["valid"].shape)
        new_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
        kv_valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, index))
    if positions is None:
        positions = q_index
    mask = layers.attention_mask(
        q_index, kv_index, kv_valid, segment_ids, segment_ids, cfg.sliding_window
    )
    cos = sin = None
    if rotary:
        inv_freq = layers.rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling_dict)
        cos, sin = layers.rope_cos_sin(positions, inv_freq)
    return DecoderInputs(mask, positions, cos, sin, index, kv_valid)


def finish_cache(cache, new_kv, inputs: DecoderInputs, num_new: int) -> dict:
    return {**new_kv, "index": cache["index"] + num_new, "valid": inputs.kv_valid}


def apply_layers(parent: nn.Module, layer_cls, name: str, x, inputs, cache, deterministic):
    """Runs cfg.num_layers copies of `layer_cls(cfg, deterministic)`.

    Unscanned, layer i's params live under f"{name}_{i}"; scanned, all layers'
    params are stacked on a leading axis under `name` (one compiled body, the
    form that scales to deep models)."""
    cfg = parent.cfg
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    cls = layer_cls
    if cfg.remat:
        # Recompute each layer's activations in the backward pass; only the
        # residual stream between layers is kept.
        cls = nn.remat(cls, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0),
            length=cfg.num_layers,
        )
        return scanned(cfg, deterministic, name=name)(x, inputs, kv)
    new_layers = []
    for i in range(cfg.num_layers):
        layer_kv = None if kv is None else jax.tree.map(lambda a, i=i: a[i], kv)
        x, layer_new = cls(cfg, deterministic, name=f"{name}_{i}")(x, inputs, layer_kv)
        new_layers.append(layer_new)
    new_kv = None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *new_layers)
    return x, new_kv
