"""GPT-2: learned positions, pre-LayerNorm blocks with biases, tanh-GELU MLP,
fused q/k/v projection (`c_attn`), output head tied to the token embedding.

HF stores GPT-2's projections as Conv1D weights of shape (in, out), which is
already the flax kernel layout."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.models.config import ModelConfig
from ftjax.models.decoder import DecoderInputs, apply_layers, decoder_inputs, finish_cache


def _linear(cfg: ModelConfig, features: int, name: str) -> layers.Linear:
    return layers.Linear(features, True, cfg.dtype, cfg.param_dtype, name=name)


def _layernorm(cfg: ModelConfig, name: str) -> layers.LayerNorm:
    return layers.LayerNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)


class GPT2Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs, layer_cache, deterministic):
        cfg = self.cfg
        b, t, d = x.shape
        hd = cfg.head_size
        qkv = _linear(cfg, 3 * d, "c_attn")(x, deterministic)
        q, k, v = (a.reshape(b, t, cfg.num_heads, hd) for a in jnp.split(qkv, 3, axis=-1))
        k, v, new_cache = layers.update_kv_cache(layer_cache, k, v, inputs.cache_index)
        causal = inputs.cache_index is None  # no cache: the mask is causal by position
        out = layers.dot_product_attention(
            q, k, v, inputs.mask, hd**-0.5, causal, kernel=cfg.attention
        )
        return _linear(cfg, d, "c_proj")(out.reshape(b, t, d), deterministic), new_cache


class GPT2MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        h = _linear(cfg, cfg.intermediate_size, "c_fc")(x, deterministic)
        h = layers.activation(cfg.hidden_act)(h)
        return _linear(cfg, cfg.hidden_size, "c_proj")(h, deterministic)


class GPT2Block(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs, layer_cache):
        cfg = self.cfg
        h, new_cache = GPT2Attention(cfg, name="attn")(
            _layernorm(cfg, "ln_1")(x), inputs, layer_cache, self.deterministic
        )
        x = x + h
        x = x + GPT2MLP(cfg, name="mlp")(_layernorm(cfg, "ln_2")(x), self.deterministic)
        return x, new_cache


class GPT2Model(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, inputs: DecoderInputs, cache, deterministic):
        cfg = self.cfg
        wte = layers.Embed(cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name="wte")
        wpe = layers.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name="wpe"
        )
        x = wte(input_ids) + wpe(inputs.positions)
        x, new_cache = apply_layers(self, GPT2Block, "h", x, inputs, cache, deterministic)
        return _layernorm(cfg, "ln_f")(x), wte, new_cache


class GPT2LMHeadModel(nn.Module):
    """Same call signature as `LlamaForCausalLM`."""

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
        x, wte, new_cache = GPT2Model(cfg, name="transformer")(
            input_ids, inputs, cache, deterministic
        )
        logits = wte.attend(x).astype(jnp.float32)
        if cache is None:
            return logits
        return logits, finish_cache(cache, new_cache, inputs, input_ids.shape[1])
