"""QLoRA (Dettmers et al., 2023) as a method: LoRA over an NF4-quantized base
(`ftjax.peft.quant`), on every linear layer by default. `quantize` selects
which kernels' bases become NF4 (default all linear layers);
`double_quant` also quantizes the blocks' absmax constants."""

from __future__ import annotations

from ftjax.peft.methods.lora import (
    LORA_OPTIONS,
    adapter_apply,
    lora_family_spec,
    select_trained,
)
from ftjax.peft.registry import Option, parse_bool, register

OPTIONS = {
    **LORA_OPTIONS,
    "targets": Option("all-linear", str, LORA_OPTIONS["targets"].doc),
    "quantize": Option("all-linear", str, "targets whose base becomes NF4"),
    "double_quant": Option(True, parse_bool, "8-bit absmax constants (blocks of 256)"),
}


def _build(opts):
    apply = adapter_apply(opts, quantized_spec=opts["quantize"], double_quant=opts["double_quant"])
    return apply, select_trained(opts)


SPEC = register(lora_family_spec("qlora", _build, OPTIONS, doc="LoRA over an NF4-quantized base"))
