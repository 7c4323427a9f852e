"""DoRA (Liu et al., 2024) as a method: LoRA's options, a `DoraWeight` leaf
(`ftjax.peft.dora`) per target: a trainable magnitude per output feature
times the normalized adapted direction."""

from __future__ import annotations

from ftjax.peft.dora import from_lora
from ftjax.peft.methods.lora import adapter_apply, lora_family_spec, select_trained
from ftjax.peft.registry import register


def _build(opts):
    return adapter_apply(opts, wrap=from_lora), select_trained(opts)


SPEC = register(
    lora_family_spec(
        "dora", _build, doc="weight-decomposed LoRA: magnitude x normalized (W + s a@b)"
    )
)
