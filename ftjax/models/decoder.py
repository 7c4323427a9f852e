"""What every decoder family shares around its layers: the attention mask,
rotary tables and KV-cache bookkeeping computed once per call, the layer
stack applied as a Python loop or under `nn.scan` (stacked params), with
optional activation checkpointing, and the output head applied outside the
module (`output_head`, `head_logits`) for the chunked loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import attention, layers
from ftjax.models.config import ModelConfig
from ftjax.models.registry import get_family


class DecoderInputs(NamedTuple):
    mask: jax.Array  # (batch, 1, q, kv) bool
    positions: jax.Array  # (batch, q) rotary / learned positions
    cos: Any  # (batch, q, head_dim) or None
    sin: Any
    cache_index: Any  # write offset into the KV cache, or None
    kv_valid: Any  # (batch, kv) bool, kept in the cache for later steps
    segment_ids: Any = None  # (batch, q) packed-example ids, or None


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
    return DecoderInputs(mask, positions, cos, sin, index, kv_valid, segment_ids)


def finish_cache(cache, new_kv, inputs: DecoderInputs, num_new: int) -> dict:
    return {**new_kv, "index": cache["index"] + num_new, "valid": inputs.kv_valid}


# Names of the activations the "attention", "offload" and "full_offload"
# policies keep (`checkpoint_name` in each family's layer).
ATTENTION_OUT, MLP_HIDDEN, LAYER_INPUT = "attention_out", "mlp_hidden", "layer_input"


def causal_lm_outputs(x, head, inputs: DecoderInputs, cache, new_cache, return_hidden: bool):
    """What every family's `*ForCausalLM.__call__` returns: the final hidden
    states with `return_hidden` (no KV cache: the chunked loss applies the head
    itself), else float32 logits `head(x)`, and with a cache the updated cache."""
    if return_hidden:
        if cache is not None:
            raise ValueError("return_hidden=True is for calls without a KV cache")
        return x
    logits = head(x).astype(jnp.float32)
    if cache is None:
        return logits
    return logits, finish_cache(cache, new_cache, inputs, x.shape[1])


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `ModelConfig.remat` value (None: save
    nothing inside the layer)."""
    policies = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "dots":
        # Projections' outputs are kept; norms, activations, rotary and the
        # attention softmax are recomputed.
        return policies.dots_with_no_batch_dims_saveable
    if name == "attention":
        return policies.save_only_these_names(ATTENTION_OUT)
    if name == "offload":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[ATTENTION_OUT, MLP_HIDDEN],
            offload_src="device",
            offload_dst="pinned_host",
        )
    if name == "full_offload":
        # The named layer input is what the scan keeps per layer; offloaded,
        # the stack of them lives in host memory and comes back layer by layer.
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(f"no remat policy {name!r}")  # ModelConfig validated it


def attend(cfg: ModelConfig, q, k, v, inputs: DecoderInputs):
    """Scaled dot-product attention of one layer through `cfg.attention`'s
    kernel (`attention.dot_product_attention`); q (B, T, N, H), k/v (B, S, K, H)."""
    causal = inputs.cache_index is None  # no cache: the mask is causal by position
    parts = None
    if causal:
        parts = attention.MaskParts(inputs.kv_valid, inputs.segment_ids, cfg.sliding_window)
    return attention.dot_product_attention(
        q,
        k,
        v,
        inputs.mask,
        q.shape[-1] ** -0.5,
        causal,
        kernel=cfg.attention,
        parts=parts,
        residual_name=ATTENTION_OUT,
    )


def apply_layers(parent: nn.Module, layer_cls, name: str, x, inputs, cache, deterministic):
    """Runs cfg.num_layers copies of `layer_cls(cfg, deterministic)`.

    Unscanned, layer i's params live under f"{name}_{i}"; scanned, all layers'
    params are stacked on a leading axis under `name` (one compiled body, the
    form that scales to deep models)."""
    cfg = parent.cfg
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    cls = layer_cls
    if cfg.remat != "none":
        # Recompute each layer's activations in the backward pass, except what
        # the policy saves; the residual stream between layers is always kept.
        cls = nn.remat(cls, prevent_cse=not cfg.scan_layers, policy=remat_policy(cfg.remat))
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


# ----------------------------------------------------------------------------- output head


class OutputHead(NamedTuple):
    """The output head's weight leaf (a plain array or any weight leaf:
    LoraWeight, quantized, ...) and whether it is the tied embedding (vocab, in),
    used transposed, rather than a kernel (in, vocab)."""

    weight: Any
    tied: bool


def output_head(cfg: ModelConfig, params) -> OutputHead:
    """Where the output head of `cfg`'s family lives in `params` (the spec's
    `head_kernel` / `tied_embedding`)."""
    spec = get_family(cfg.model_type)
    if not spec.returns_hidden:
        raise ValueError(f"family {spec.name!r} declares no head_kernel or tied_embedding")
    tied = spec.head_kernel is None or cfg.tie_word_embeddings
    node = params
    for key in spec.tied_embedding if tied else spec.head_kernel:
        node = node[key]
    return OutputHead(node, tied)


def head_logits(cfg: ModelConfig, head: OutputHead, hidden, *, rng=None):
    """float32 logits of final hidden states (`model.apply(..., return_hidden=True)`,
    or a chunk of them), computed as the family modules compute them: in
    `cfg.dtype`, an untied head through `layers.linear` (so a LoRA head applies
    itself, with dropout when `rng` is given), a tied one as `hidden @ embedding.T`
    of the materialized embedding."""
    dtype = jnp.dtype(cfg.dtype)
    if head.tied:
        logits = jnp.matmul(hidden.astype(dtype), layers.materialize(head.weight, dtype).T)
    else:
        logits = layers.linear(hidden, head.weight, dtype=dtype, rng=rng)
    return logits.astype(jnp.float32)
