"""The built-in model families; importing this package registers them.

One module per family declares its flax module, HF config and tensor-name
mapping, layer container, target presets and tensor-parallel rules in one
`FamilySpec` (see `ftjax.models.registry`)."""

from ftjax.models.families import bert, gpt2, llama

__all__ = ["bert", "gpt2", "llama"]
