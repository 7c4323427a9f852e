"""From a ModelConfig to the flax module of its family."""

from __future__ import annotations

import flax.linen as nn

from ftjax.models.config import LLAMA_FAMILY, ModelConfig
from ftjax.models.gpt2 import GPT2LMHeadModel
from ftjax.models.llama import LlamaForCausalLM


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.model_type in LLAMA_FAMILY:
        return LlamaForCausalLM(cfg)
    if cfg.model_type == "gpt2":
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"no flax model for model_type {cfg.model_type!r}")


def layers_prefix(cfg: ModelConfig) -> tuple[str, str]:
    """(container path, layer name) of the decoder stack in the params tree:
    params[container][f"{layer}_{i}"] unscanned, params[container][layer] scanned."""
    if cfg.model_type == "gpt2":
        return "transformer", "h"
    return "model", "layers"
