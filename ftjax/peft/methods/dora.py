"""DoRA (Liu et al., 2024) as a method: LoRA's options, a `DoraWeight` leaf
(`ftjax.peft.dora`) per target: a trainable magnitude per output feature
times the normalized adapted direction."""

from __future__ import annotations

from ftjax.peft.dora import from_lora
from ftjax.peft.methods.lora import (
    LORA_OPTIONS,
    LORA_STUDY,
    adapter_apply,
    check_lora_options,
    describe_lora,
    export_adapter,
)
from ftjax.peft.registry import MethodSpec, register


def _build(opts):
    return adapter_apply(opts, wrap=from_lora), (lambda paths: set())


SPEC = register(
    MethodSpec(
        name="dora",
        options=LORA_OPTIONS,
        build=_build,
        check=check_lora_options,
        describe=describe_lora,
        study=LORA_STUDY,
        lr_scale=10.0,
        export=export_adapter,
        doc="weight-decomposed LoRA: magnitude x normalized (W + s a@b)",
    )
)
