"""GPT-2: learned positions, pre-LayerNorm blocks with biases, tanh-GELU MLP,
fused q/k/v projection (`c_attn`), output head tied to the token embedding.

HF stores GPT-2's projections as Conv1D weights of shape (in, out), which is
already the flax kernel layout (HF PEFT's `fan_in_fan_out`)."""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ftjax.errors import ModelError
from ftjax.models import layers
from ftjax.models.config import ModelConfig
from ftjax.models.decoder import (
    ATTENTION_OUT,
    LAYER_INPUT,
    MLP_HIDDEN,
    DecoderInputs,
    apply_layers,
    attend,
    causal_lm_outputs,
    decoder_inputs,
    prepend_virtual,
    read_virtual,
)
from ftjax.models.registry import FamilySpec, register_family


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
        out = attend(cfg, q, k, v, inputs)
        out = checkpoint_name(out.reshape(b, t, d), ATTENTION_OUT)  # for the remat policies
        return _linear(cfg, d, "c_proj")(out, deterministic), new_cache


class GPT2MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        h = _linear(cfg, cfg.intermediate_size, "c_fc")(x, deterministic)
        h = checkpoint_name(layers.activation(cfg.hidden_act)(h), MLP_HIDDEN)
        return _linear(cfg, cfg.hidden_size, "c_proj")(h, deterministic)


class GPT2Block(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs, layer_cache):
        cfg = self.cfg
        x = checkpoint_name(x, LAYER_INPUT)  # for the "full_offload" policy
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
        # Prompt tuning's tokens, if any, get learned positions like the input's.
        x = prepend_virtual(inputs, wte(input_ids)) + wpe(inputs.positions)
        x, new_cache = apply_layers(self, GPT2Block, "h", x, inputs, cache, deterministic)
        return _layernorm(cfg, "ln_f")(x), wte, new_cache


class GPT2LMHeadModel(nn.Module):
    """Same call signature as `LlamaForCausalLM` (`return_hidden` included)."""

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
        virtual = read_virtual(self)  # prompt or prefix tuning's tokens, if any
        inputs = decoder_inputs(
            cfg, input_ids, attention_mask, positions, segment_ids, cache, virtual=virtual
        )
        x, wte, new_cache = GPT2Model(cfg, name="transformer")(
            input_ids, inputs, cache, deterministic
        )
        return causal_lm_outputs(x, wte.attend, inputs, cache, new_cache, return_hidden)


# ----------------------------------------------------------------------------- HF config


def config_from_hf(hf: Mapping) -> dict:
    d = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=d,
        intermediate_size=hf.get("n_inner") or 4 * d,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        num_kv_heads=hf["n_head"],
        max_position_embeddings=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_act=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=True,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=cfg.vocab_size,
        n_embd=cfg.hidden_size,
        n_inner=cfg.intermediate_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_positions=cfg.max_position_embeddings,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function=cfg.hidden_act,
        tie_word_embeddings=True,
    )


def check(cfg: ModelConfig) -> None:
    if cfg.num_kv_heads != cfg.num_heads:
        raise ModelError(
            f"model_type='gpt2' has no grouped-query attention: num_kv_heads={cfg.num_kv_heads} "
            f"must equal num_heads={cfg.num_heads}"
        )


SPEC = register_family(
    FamilySpec(
        name="gpt2",
        model_types=("gpt2",),
        module=GPT2LMHeadModel,
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        layers=("transformer", "h"),
        # q, k and v are one fused `c_attn` projection, so `qv` and `attention`
        # both adapt it (as HF PEFT does for GPT-2); `c_proj` is in both blocks.
        targets={
            "qv": ("attn/c_attn",),
            "attention": ("attn/c_attn", "attn/c_proj"),
            "mlp": ("mlp/c_fc", "mlp/c_proj"),
            "all-linear": ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"),
            # HF PEFT's IA3 default for GPT-2: the fused q/k/v and the MLP's output.
            "ia3": ("attn/c_attn", "mlp/c_proj"),
            "ia3-feedforward": ("mlp/c_proj",),
        },
        column_parallel=("attn/c_attn", "mlp/c_fc"),
        row_parallel=("attn/c_proj", "mlp/c_proj"),
        transpose_kernels=False,
        # Checkpoints of the bare GPT2Model (the hub's `gpt2`) lack `transformer.`.
        bare_prefix="transformer.",
        ignored_keys=r"attn\.(bias|masked_bias)$",
        check=check,
        tied_embedding=("transformer", "wte", "embedding"),  # the head is always tied
        kv_width=lambda layer: layer["attn"]["c_attn"]["kernel"].shape[-1] // 3,  # q, k, v fused
    )
)
