"""Parameter-efficient fine-tuning as parameter-pytree transforms."""

from ftjax.peft.adalora import AdaLoraWeight, init_adalora
from ftjax.peft.base import (
    AdapterFormatError,
    PeftError,
    RankError,
    TargetError,
    UnknownMethodError,
    WeightLeaf,
    is_leaf,
)
from ftjax.peft.dora import DoraWeight, column_norm, from_lora, init_dora
from ftjax.peft.galore import galore_adamw, scale_by_galore
from ftjax.peft.ia3 import IA3Weight, init_ia3
from ftjax.peft.loha import LohaWeight, init_loha
from ftjax.peft.lokr import LokrWeight, init_lokr
from ftjax.peft.lora import LoraWeight, init_lora, lora_scale, pissa_factors
from ftjax.peft.methods import DEFAULTS, Method, build_method, known_methods
from ftjax.peft.oft import OFTWeight, init_oft
from ftjax.peft.peft_format import (
    export_adapter,
    load_adapter,
    pissa_to_lora,
    read_adapter,
    save_adapter,
    write_adapter,
)
from ftjax.peft.prompt import PrefixMlpWeight, PromptWeight
from ftjax.peft.quant import NF4_LEVELS, NF4Weight, dequantize_nf4, quantize_nf4
from ftjax.peft.targets import PRESET_NAMES
from ftjax.peft.tree import (
    adapter_params,
    combine,
    count,
    has_adapters,
    merge,
    nbytes,
    split,
    with_adapter_params,
)
from ftjax.peft.vera import VeraWeight, init_vera

__all__ = [
    "AdaLoraWeight",
    "DEFAULTS",
    "NF4_LEVELS",
    "PRESET_NAMES",
    "AdapterFormatError",
    "DoraWeight",
    "IA3Weight",
    "LohaWeight",
    "LokrWeight",
    "LoraWeight",
    "Method",
    "NF4Weight",
    "OFTWeight",
    "PeftError",
    "PrefixMlpWeight",
    "PromptWeight",
    "RankError",
    "TargetError",
    "UnknownMethodError",
    "VeraWeight",
    "WeightLeaf",
    "adapter_params",
    "column_norm",
    "combine",
    "count",
    "dequantize_nf4",
    "export_adapter",
    "from_lora",
    "galore_adamw",
    "has_adapters",
    "build_method",
    "init_adalora",
    "init_dora",
    "init_ia3",
    "init_loha",
    "init_lokr",
    "init_lora",
    "init_oft",
    "init_vera",
    "is_leaf",
    "known_methods",
    "load_adapter",
    "lora_scale",
    "merge",
    "nbytes",
    "pissa_factors",
    "pissa_to_lora",
    "quantize_nf4",
    "read_adapter",
    "save_adapter",
    "scale_by_galore",
    "split",
    "with_adapter_params",
    "write_adapter",
]
