"""Pure-functional flax models that load Hugging Face checkpoints."""

from ftjax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from ftjax.models.decoder import init_kv_cache
from ftjax.models.hf import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    save_pretrained,
    stack_layers,
    unstack_layers,
)
from ftjax.models.registry import build_model, layers_prefix

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "ModelConfig",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "init_kv_cache",
    "layers_prefix",
    "save_pretrained",
    "stack_layers",
    "unstack_layers",
]
