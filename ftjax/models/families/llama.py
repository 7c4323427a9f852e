"""The Llama decoder family in one config-driven module: Llama 2, Llama 3/3.1
(with `llama3` rope scaling), Mistral (sliding window), Qwen2 (q/k/v biases),
Qwen3 (q/k RMSNorm). Parameter names follow the Hugging Face module names, so
the spec's name mapping is a rename; HF `Linear` weights are (out, in).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from ftjax.models import layers
from ftjax.models.config import ModelConfig, freeze_rope_scaling
from ftjax.models.decoder import (
    ATTENTION_OUT,
    LAYER_INPUT,
    MLP_HIDDEN,
    DecoderInputs,
    OutputHead,
    apply_layers,
    attend,
    causal_lm_outputs,
    decoder_inputs,
    head_logits,
    prepend_virtual,
    read_virtual,
)
from ftjax.models.registry import FamilySpec, register_family


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
        out = attend(cfg, q, k, v, inputs)
        out = checkpoint_name(out.reshape(b, t, cfg.num_heads * hd), ATTENTION_OUT)
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
        hidden = checkpoint_name(act(gate) * up, MLP_HIDDEN)  # for the remat policies
        return _linear(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(hidden, deterministic)


class LlamaDecoderLayer(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True  # an attribute, not an argument, so nn.scan/remat see a constant

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs, layer_cache):
        cfg, deterministic = self.cfg, self.deterministic
        x = checkpoint_name(x, LAYER_INPUT)  # for the "full_offload" policy
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
        x = prepend_virtual(inputs, x)  # prompt tuning's tokens, if any
        x, new_cache = apply_layers(
            self, LlamaDecoderLayer, "layers", x, inputs, cache, deterministic
        )
        return layers.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x), new_cache


class LlamaForCausalLM(nn.Module):
    """`model.apply({"params": p}, input_ids, attention_mask=None, positions=None)`
    returns float32 logits (batch, seq, vocab). With `cache=` (see
    `layers.init_kv_cache`) it returns `(logits, new_cache)` for incremental decoding.
    `segment_ids` (packed sequences) keep attention inside each segment.
    `return_hidden=True` (no cache) returns the final hidden states (batch, seq,
    hidden) instead, for `decoder.head_logits` to apply the head in chunks."""

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
        return_hidden: bool = False,
    ):
        cfg = self.cfg
        inputs = decoder_inputs(
            cfg,
            input_ids,
            attention_mask,
            positions,
            segment_ids,
            cache,
            rotary=True,
            virtual=read_virtual(self),
        )
        model = LlamaModel(cfg, name="model")
        x, new_cache = model(input_ids, inputs, cache, deterministic)
        if cfg.tie_word_embeddings:
            embedding = model.variables["params"]["embed_tokens"]["embedding"]
            head = lambda h: head_logits(cfg, OutputHead(embedding, tied=True), h)
        else:
            head = lambda h: _linear(cfg, cfg.vocab_size, False, "lm_head")(h, deterministic)
        return causal_lm_outputs(x, head, inputs, cache, new_cache, return_hidden)


# ----------------------------------------------------------------------------- HF config

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def rope_from_hf(hf: Mapping) -> tuple[float, tuple | None]:
    """(rope_theta, hashable rope_scaling) from either transformers layout
    (`rope_parameters`, or the older `rope_theta` + `rope_scaling`)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = {}
    return float(theta), freeze_rope_scaling(rope)


def rope_to_hf(cfg: ModelConfig) -> dict:
    """The rope fields of config.json, in both transformers layouts."""
    rope = {"rope_type": "default", **(cfg.rope_scaling_dict or {}), "rope_theta": cfg.rope_theta}
    return dict(
        rope_theta=cfg.rope_theta,
        rope_parameters=rope,
        rope_scaling=None if rope["rope_type"] == "default" else rope,
    )


def config_from_hf(hf: Mapping) -> dict:
    model_type = hf["model_type"]
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    theta, scaling = rope_from_hf(hf)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama's
        # `attention_bias` puts a bias on all four.
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_proj_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=window,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    out = dict(
        model_type=cfg.model_type,
        architectures=[_ARCHITECTURES[cfg.model_type]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        hidden_act=cfg.hidden_act,
        tie_word_embeddings=cfg.tie_word_embeddings,
        sliding_window=cfg.sliding_window,
        **rope_to_hf(cfg),
    )
    if cfg.model_type in ("llama", "mistral"):
        out.update(attention_bias=cfg.o_proj_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = cfg.sliding_window is not None
    if cfg.model_type == "qwen3":
        out["attention_bias"] = cfg.attention_bias
    return out


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

SPEC = register_family(
    FamilySpec(
        name="llama",
        model_types=tuple(_ARCHITECTURES),
        module=LlamaForCausalLM,
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        layers=("model", "layers"),
        targets={
            "qv": ("q_proj", "v_proj"),
            "attention": _ATTENTION,
            "mlp": _MLP,
            "all-linear": _ATTENTION + _MLP,
            "ia3": ("k_proj", "v_proj", "down_proj"),
            "ia3-feedforward": ("down_proj",),
        },
        column_parallel=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
        row_parallel=("o_proj", "down_proj"),
        ignored_keys=r"rotary_emb\.inv_freq$",
        head_kernel=("lm_head", "kernel"),
        tied_embedding=("model", "embed_tokens", "embedding"),
        kv_width=lambda layer: layer["self_attn"]["k_proj"]["kernel"].shape[-1],
    )
)
