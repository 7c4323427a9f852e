"""The Llama decoder family in one config-driven module: Llama 2, Llama 3/3.1
(with `llama3` rope scaling), Mistral (sliding window), Qwen2 (q/k/v biases),
Qwen3 (q/k RMSNorm). Parameter names follow the Hugging Face module names so
that `hf.py`'s mapping reads as a rename.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.models.config import ModelConfig
from ftjax.models.decoder import DecoderInputs, apply_layers, decoder_inputs, finish_cache


def _linear(cfg: ModelConfig, features: int, use_bias: bool, name: str) -> layers.Linear:
    return layers.Linear(
        features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
    )


class LlamaAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs, layer_cache, deterministic):
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_size
        q = _linear(cfg, cfg.num_heads * hd, cfg.attention_bias, "q_proj")(x, deterministic)
        k = _linear(cfg, cfg.num_kv_heads * hd, cfg.attention_bias, "k_proj")(x, deterministic)
        v = _linear(cfg, cfg.num_kv_heads * hd, cfg.attention_bias, "v_proj")(x, deterministic)
        q = q.reshape(b, t, cfg.num_heads, hd)
        k = k.reshape(b, t, cfg.num_kv_heads, hd)
        v = v.reshape(b, t, cfg.num_kv_heads, hd)
        if cfg.qk_norm:
            norm = lambda name: layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q = layers.apply_rope(q, inputs.cos, inputs.sin)
        k = layers.apply_rope(k, inputs.cos, inputs.sin)
        k, v, new_cache = layers.update_kv_cache(layer_cache, k, v, inputs.cache_index)
        causal = inputs.cache_index is None  # no cache: the mask is causal by position
        out = layers.dot_product_attention(
            q, k, v, inputs.mask, hd**-0.5, causal, kernel=cfg.attention
        )
        out = out.reshape(b, t, cfg.num_heads * hd)
        return _linear(cfg, cfg.hidden_size, cfg.o_proj_bias, "o_proj")(
            out, deterministic
        ), new_cache


class LlamaMLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        act = layers.activation(cfg.hidden_act)
        gate = _linear(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x, deterministic)
        up = _linear(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x, deterministic)
        return _linear(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(
            act(gate) * up, deterministic
        )


class LlamaDecoderLayer(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True  # an attribute, not an argument, so nn.scan/remat see a constant

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs, layer_cache):
        cfg, deterministic = self.cfg, self.deterministic
        norm = lambda name: layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        h, new_cache = LlamaAttention(cfg, name="self_attn")(
            norm("input_layernorm")(x), inputs, layer_cache, deterministic
        )
        x = x + h
        x = x + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x), deterministic)
        return x, new_cache


class LlamaModel(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, inputs: DecoderInputs, cache, deterministic):
        cfg = self.cfg
        x = layers.Embed(
            cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name="embed_tokens"
        )(input_ids)
        x, new_cache = apply_layers(
            self, LlamaDecoderLayer, "layers", x, inputs, cache, deterministic
        )
        return layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x), new_cache


class LlamaForCausalLM(nn.Module):
    """`model.apply({"params": p}, input_ids, attention_mask=None, positions=None)`
    returns float32 logits (batch, seq, vocab). With `cache=` (see
    `layers.init_kv_cache`) it returns `(logits, new_cache)` for incremental decoding.
    `segment_ids` (packed sequences) keep attention inside each segment."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        segment_ids=None,
        cache=None,
        deterministic: bool = True,
    ):
        cfg = self.cfg
        inputs = decoder_inputs(cfg, input_ids, attention_mask, positions, segment_ids, cache)
        model = LlamaModel(cfg, name="model")
        x, new_cache = model(input_ids, inputs, cache, deterministic)
        if cfg.tie_word_embeddings:
            logits = model.variables["params"]["embed_tokens"]["embedding"]
            logits = jnp.matmul(x, layers.materialize(logits, x.dtype).T)
        else:
            logits = _linear(cfg, cfg.vocab_size, False, "lm_head")(x, deterministic)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, finish_cache(cache, new_cache, inputs, input_ids.shape[1])
