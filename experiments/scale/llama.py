"""Llama-3.1 fine-tuning at real scale, the cases the planner measures
(README, "Running on Cloud TPU"). Each case is the SFT config
(`experiments/llm/sft.py`) with the published model dimensions, sequence
length 4,096, AdamW and bfloat16 compute:

    8b-lora     Llama-3.1-8B, LoRA r=16 on every linear layer, global batch 32
    8b-full     Llama-3.1-8B, full fine-tuning, float32 master weights, batch 32
    70b-qlora   Llama-3.1-70B, QLoRA (NF4 base) r=16 on every linear layer, batch 8

all FSDP (`parallel.mode=fsdp`), layers scanned, rematerialized per layer
(`model.remat=full`; 70b-qlora keeps each layer's input in host memory,
`model.remat=full_offload`, which is what fits it on a v5e-8). Plan, then run:

    python scripts/plan.py --config=experiments/scale/llama.py:8b-lora --target=v5e-8
    python scripts/train.py --config=experiments/scale/llama.py:8b-lora --workdir=runs/8b-lora \
        --config.model.checkpoint=meta-llama/Llama-3.1-8B

`models/<name>/config.json` holds the published dimensions only (no
weights), which is all the planner reads; a training run points
`model.checkpoint` (and the tokenizer) at the real checkpoint, whose
config.json is the same. Further `key=value` args go to the SFT config
(e.g. `8b-lora,rank=64,batch=16`).
"""

import importlib.util
import os

from ftjax.errors import ConfigError
from ftjax.experiment import parse_arg

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {
    "8b-lora": dict(model="llama-3.1-8b", method="lora", batch="32", param_dtype="bfloat16"),
    "8b-full": dict(model="llama-3.1-8b", method="full", batch="32", param_dtype="float32"),
    "70b-qlora": dict(
        model="llama-3.1-70b",
        method="qlora",
        batch="8",
        param_dtype="bfloat16",
        remat="full_offload",
    ),
}


def _sft():
    # Experiment files are loaded by path, not as a package.
    path = os.path.join(HERE, "..", "llm", "sft.py")
    spec = importlib.util.spec_from_file_location("ftjax_llm_sft", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    text = arg or "8b-lora"
    case, _, rest = text.partition(",")
    if case not in CASES:
        raise ConfigError(f"config arg {case!r}: expected one of {', '.join(CASES)}")
    c = CASES[case]
    model_dir = os.path.join(HERE, "models", c["model"])
    args = dict(model=model_dir, method=c["method"], batch=c["batch"], seq_len="4096",
                dtype="bfloat16")  # fmt: skip
    args.update(parse_arg(rest))
    cfg = _sft().get_config(",".join(f"{k}={v}" for k, v in args.items()))
    # Frozen bases are stored in the compute dtype; full tuning keeps float32
    # master weights (and so float32 optimizer state).
    cfg.model.param_dtype = c["param_dtype"]
    cfg.model.remat = c.get("remat", cfg.model.remat)
    cfg.parallel.mode = "fsdp"
    return cfg
