"""What every decoder family shares around its layers: the attention mask,
rotary tables and KV-cache bookkeeping computed once per call, the layer
stack applied as a Python loop or under `nn.scan` (stacked params), with
optional activation checkpointing, the output head applied outside the
module (`output_head`, `head_logits`) for the chunked loss, and virtual
tokens (`read_virtual`).

Virtual tokens. Two optional top-level params change what a call sees, so
that prompt tuning and prefix tuning need nothing in the attention modules:

    params[VIRTUAL_TOKENS]  (n, hidden): embeddings placed before the input's
                            (prompt tuning); they run through every layer
    params[KV_PREFIX]       (n, num_layers * 2 * kv_width): per layer, keys and
                            values every query attends to first (prefix
                            tuning), HF PEFT's flat layout: layer l's keys
                            are columns [(2l) * kv_width, (2l+1) * kv_width)

Either may be a plain array or a weight leaf (materialized once per call).
As in HF PEFT, the real tokens' positions start at n, the virtual positions
are always attended (never padding), and the model returns outputs for the
real tokens only, so targets and loss masks need no change. A KV cache holds
prompt-tuning tokens after the call that prepended them (the cache then
carries `CACHE_VIRTUAL`, and later calls do not prepend again); a prefix is
never cached, it is attended from the params at every call. Every example
of a packed row (`segment_ids`) sees the virtual tokens as if it were alone
(positions restart at n); with prompt tuning such a mask is passed to the
attention kernel densely (splash and cuDNN take segment ids only). Without
these params the program is the one it always was."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.errors import ModelError
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
    prompt: Any = None  # (n, hidden) virtual tokens this call prepends, or None
    prefix: Any = None  # (num_layers, 2, n, kv_heads, head_dim) keys/values, or None
    # (batch, q) segment ids of a packed row whose examples all see prompt
    # tuning's tokens, a mask `attention.MaskParts` cannot describe: kernels
    # then take the dense mask. (An array, not a flag: remat and scan trace it.)
    shared_segments: Any = None


# The top-level params of virtual tokens (module docstring) and the cache entry
# saying that a cache already holds the prompt-tuning tokens (their count).
VIRTUAL_TOKENS, KV_PREFIX, CACHE_VIRTUAL = "virtual_tokens", "kv_prefix", "virtual_tokens"


class Virtual(NamedTuple):
    """The virtual tokens of one call, in the compute dtype: `prompt` (n,
    hidden) or `prefix` (num_layers, 2, n, kv_heads, head_dim)."""

    prompt: Any = None
    prefix: Any = None

    @property
    def length(self) -> int:
        return (self.prompt if self.prompt is not None else self.prefix[0, 0]).shape[0]


def read_virtual(module: nn.Module) -> Virtual | None:
    """The virtual-token params of a family's top-level module (None without
    any); shapes are checked against `module.cfg`."""
    cfg = module.cfg
    present = [k for k in (VIRTUAL_TOKENS, KV_PREFIX) if module.has_variable("params", k)]
    if not present:
        return None
    if len(present) == 2:
        raise ModelError(f"params hold both {VIRTUAL_TOKENS!r} and {KV_PREFIX!r}; use one")
    dtype = jnp.dtype(cfg.dtype)
    value = layers.materialize(module.get_variable("params", present[0]), dtype)
    if present[0] == VIRTUAL_TOKENS:
        if value.ndim != 2 or value.shape[1] != cfg.hidden_size:
            raise ModelError(
                f"params[{VIRTUAL_TOKENS!r}] has shape {value.shape}; expected "
                f"(num_virtual_tokens, {cfg.hidden_size})"
            )
        return Virtual(prompt=value)
    kv, hd = cfg.num_kv_heads, cfg.head_size
    width = cfg.num_layers * 2 * kv * hd
    if value.ndim != 2 or value.shape[1] != width:
        raise ModelError(
            f"params[{KV_PREFIX!r}] has shape {value.shape}; expected (num_virtual_tokens, "
            f"{width}) = num_layers {cfg.num_layers} x 2 x kv heads {kv} x head size {hd}"
        )
    n = value.shape[0]
    return Virtual(prefix=value.reshape(n, cfg.num_layers, 2, kv, hd).transpose(1, 2, 0, 3, 4))


def virtual_length(params) -> int:
    """How many virtual tokens `params` put before every sequence (0: none)."""
    for key in (VIRTUAL_TOKENS, KV_PREFIX):
        if isinstance(params, dict) and params.get(key) is not None:
            return jax.eval_shape(layers.materialize, params[key]).shape[0]
    return 0


def cached_virtual_length(params) -> int:
    """KV-cache positions a first call with `params` fills before its input:
    the prompt-tuning tokens (a prefix is attended, not cached)."""
    has_prompt = isinstance(params, dict) and params.get(VIRTUAL_TOKENS) is not None
    return virtual_length(params) if has_prompt else 0


def prepend_virtual(inputs: DecoderInputs, x):
    """The input embeddings `x` (batch, t, hidden) with this call's prompt-tuning
    tokens in front (what a family applies right after its token embedding)."""
    if inputs.prompt is None:
        return x
    prompt = jnp.broadcast_to(inputs.prompt.astype(x.dtype), (x.shape[0],) + inputs.prompt.shape)
    return jnp.concatenate([prompt, x], axis=1)


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
    cfg,
    input_ids,
    attention_mask,
    positions,
    segment_ids,
    cache,
    *,
    rotary: bool = False,
    virtual: Virtual | None = None,
) -> DecoderInputs:
    """Mask, positions and cache offsets for one call; with `rotary`, the
    rotary tables of `cfg.rope_theta`/`cfg.rope_scaling` too (families with
    learned positions leave them None). `virtual` (`read_virtual`): the real
    tokens' positions start after the virtual ones; prompt-tuning tokens join
    the sequence (unless the cache holds them), a prefix adds key columns."""
    b, t = input_ids.shape
    if attention_mask is not None:
        attention_mask = attention_mask.astype(bool)
    prompt = prefix = None
    packed = None  # the segment ids of a packed row that shares prompt tokens
    if virtual is not None:
        offset, prefix = virtual.length, virtual.prefix
        if virtual.prompt is not None and (cache is None or CACHE_VIRTUAL not in cache):
            prompt = virtual.prompt
            n = prompt.shape[0]
            if attention_mask is not None:
                attention_mask = jnp.concatenate([jnp.ones((b, n), bool), attention_mask], 1)
            if positions is not None:
                first = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n))
                positions = jnp.concatenate([first, positions + n], axis=1)
            t += n
            if segment_ids is not None:
                if cache is not None:
                    raise ModelError("segment_ids: packed rows are for calls without a KV cache")
                packed, segment_ids = segment_ids, None
        elif positions is not None:
            positions = positions + offset
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
        # Prompt-tuning tokens are sequence (and cache) entries already; a
        # prefix sits before index 0.
        positions = q_index if prefix is None else q_index + prefix.shape[2]
    window = None if packed is not None else cfg.sliding_window
    mask = layers.attention_mask(q_index, kv_index, kv_valid, segment_ids, segment_ids, window)
    if packed is not None:
        mask &= _shared_prompt_mask(q_index, positions, packed, prompt.shape[0], cfg.sliding_window)
    if prefix is not None:
        n = prefix.shape[2]
        # A sliding window counts from the query's cache position: its index,
        # or in a packed row its position in its own example.
        q_pos = q_index if segment_ids is None else positions - n
        mask = jnp.concatenate([_prefix_mask(q_pos, n, cfg.sliding_window), mask], -1)
    cos = sin = None
    if rotary:
        inv_freq = layers.rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling_dict)
        cos, sin = layers.rope_cos_sin(positions, inv_freq)
    return DecoderInputs(
        mask, positions, cos, sin, index, kv_valid, segment_ids, prompt, prefix, packed
    )


def _shared_prompt_mask(q_index, positions, segment_ids, n: int, sliding_window):
    """(batch, 1, q, q) of a packed row after n prompt-tuning tokens: a query
    sees the keys of its own example and the virtual tokens, each example as
    if alone (a window counts from the query's position in its example)."""
    b = segment_ids.shape[0]
    seg = jnp.concatenate([jnp.full((b, n), -1, segment_ids.dtype), segment_ids], axis=1)
    same = seg[:, :, None] == seg[:, None, :]
    virtual = jnp.arange(seg.shape[1]) < n  # key columns of the prompt
    if sliding_window is not None:
        same &= q_index[:, :, None] - q_index[:, None, :] < sliding_window
        virtual = virtual & (positions[:, :, None] - jnp.arange(seg.shape[1]) < sliding_window)
    return (same | virtual)[:, None]


def _prefix_mask(q_index, n: int, sliding_window):
    """(batch, 1, q, n): which prefix keys each query sees. The prefix holds
    cache positions 0..n-1 before the sequence (as PEFT passes it to HF), so
    only a sliding window hides any of it."""
    visible = jnp.ones(q_index.shape + (n,), bool)
    if sliding_window is not None:
        visible = q_index[:, :, None] + n - jnp.arange(n) < sliding_window
    return visible[:, None]


def finish_cache(cache, new_kv, inputs: DecoderInputs, num_new: int) -> dict:
    out = {**new_kv, "index": cache["index"] + num_new, "valid": inputs.kv_valid}
    if CACHE_VIRTUAL in cache:
        out[CACHE_VIRTUAL] = cache[CACHE_VIRTUAL]
    elif inputs.prompt is not None:
        out[CACHE_VIRTUAL] = jnp.int32(inputs.prompt.shape[0])
    return out


# Names of the activations the "attention", "offload" and "full_offload"
# policies keep (`checkpoint_name` in each family's layer).
ATTENTION_OUT, MLP_HIDDEN, LAYER_INPUT = "attention_out", "mlp_hidden", "layer_input"


def causal_lm_outputs(x, head, inputs: DecoderInputs, cache, new_cache, return_hidden: bool):
    """What every family's `*ForCausalLM.__call__` returns: the final hidden
    states with `return_hidden` (no KV cache: the chunked loss applies the head
    itself), else float32 logits `head(x)`, and with a cache the updated cache.
    Positions of prompt-tuning tokens are dropped: no one predicts from them."""
    num_new = x.shape[1]
    if inputs.prompt is not None:
        x = x[:, inputs.prompt.shape[0] :]
    if return_hidden:
        if cache is not None:
            raise ValueError("return_hidden=True is for calls without a KV cache")
        return x
    logits = head(x).astype(jnp.float32)
    if cache is None:
        return logits
    return logits, finish_cache(cache, new_cache, inputs, num_new)


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
    # No cache and no prefix: queries and keys are the same positions, causal.
    causal = inputs.cache_index is None and k.shape[1] == q.shape[1]
    parts = None
    if causal and inputs.shared_segments is None:
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
    if inputs.prefix is not None:  # each layer's own slice (`layers.update_kv_cache`)
        kv = {**(kv or {}), "prefix": inputs.prefix}
    if inputs.prompt is not None or inputs.prefix is not None:
        inputs = inputs._replace(prompt=None, prefix=None)  # not broadcast into the layers
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
    new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_layers)
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
