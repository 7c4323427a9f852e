"""Pure-functional flax models that load Hugging Face checkpoints.

Each model family is one module under `families/` that registers a
`FamilySpec`; everything here is driven by those specs."""

from ftjax.models import families  # noqa: F401  (registers the built-in families)
from ftjax.models.config import ModelConfig
from ftjax.models.decoder import OutputHead, head_logits, init_kv_cache, output_head
from ftjax.models.hf import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    from_pretrained,
    hf_name,
    save_pretrained,
    stack_layers,
    unstack_layers,
)
from ftjax.models.registry import (
    TARGET_PRESETS,
    FamilySpec,
    all_families,
    build_model,
    get_family,
    layers_prefix,
    model_types,
    register_family,
)

__all__ = [
    "TARGET_PRESETS",
    "CheckpointError",
    "FamilySpec",
    "ModelConfig",
    "OutputHead",
    "all_families",
    "build_model",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "get_family",
    "head_logits",
    "hf_name",
    "init_kv_cache",
    "layers_prefix",
    "model_types",
    "output_head",
    "register_family",
    "save_pretrained",
    "stack_layers",
    "unstack_layers",
]
