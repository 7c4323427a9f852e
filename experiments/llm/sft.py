"""Supervised fine-tuning of any Hugging Face causal LM on a Hugging Face
dataset (or a local file), with full fine-tuning, LoRA or QLoRA.

On a GPU or TPU host (the model and dataset are downloaded on first use):

    # the defaults: LoRA (r=16, every linear layer) of Qwen2.5-0.5B on GSM8K
    python scripts/train.py --config=experiments/llm/sft.py --workdir=runs/sft-qwen

    # chat data (rendered with the tokenizer's chat template, assistant turns trained)
    python scripts/train.py --workdir=runs/sft-chat \
        --config=experiments/llm/sft.py:model=Qwen/Qwen2.5-0.5B-Instruct,dataset=HuggingFaceH4/no_robots,dataset_config=,format=chat,method=lora

    # QLoRA (NF4 base, LoRA r=16 on every linear layer) of a 7B model
    python scripts/train.py --workdir=runs/sft-llama-qlora \
        --config=experiments/llm/sft.py:model=meta-llama/Llama-2-7b-hf,method=qlora

    # several accelerators: shard parameters and optimizer state (FSDP)
    ... --config.parallel.mode=fsdp

The run writes metrics.jsonl, summary.json (train/eval loss, trainable
parameters, tokens/s, peak memory) and, for LoRA/QLoRA, the HF PEFT adapter in
<workdir>/adapter (`peft.PeftModel.from_pretrained(base, adapter)` loads it);
full fine-tuning writes merged weights in HF layout to <workdir>/hf. The
expected result is a falling train loss and an eval loss below the base
model's; how far depends on the model and data, so no number is promised here.

Arg keys (all optional; defaults in DEFAULTS):
  model        HF checkpoint: hub id or local directory (with tokenizer files)
  tokenizer    default: `model`
  dataset      hub dataset id, or a local json/jsonl/csv/parquet/txt file (or glob)
  dataset_config, split, eval_split   hub dataset config name and splits
  eval_data    a local eval file (default: eval_split, else 5% carved from train)
  format       text | prompt_completion | chat
  prompt, completion, text, messages   the dataset's column names for the format
  method       full | lora | qlora (and their options: rank, alpha, targets, dropout, ...)
  steps, batch, seq_len, lr, warmup, dtype (compute dtype: bfloat16 | float32)

Offline (the tests), point `model` at a local checkpoint directory and
`dataset` at a local file: the code path is the same as with hub names, and a
hub name offline fails with one line (`error: ...`, exit status 2).
"""

import os

from ftjax.data import default_data_config, source_config
from ftjax.data.sources import BUILDERS
from ftjax.errors import ConfigError
from ftjax.experiment import parse_arg, split_method_options, with_method
from ftjax.train import default_config

DEFAULTS = dict(
    model="Qwen/Qwen2.5-0.5B",
    dataset="openai/gsm8k",
    dataset_config="main",
    split="train",
    eval_split="test",
    eval_data="",
    format="prompt_completion",
    method="lora",
    steps="1000",
    batch="32",
    seq_len="1024",
    lr="",  # default: the method's (full 1e-5, LoRA/QLoRA 1e-4)
    warmup="",  # default: 3% of steps
    dtype="bfloat16",
)
# GSM8K's column names; other datasets name theirs with prompt=..., completion=...
DEFAULT_FIELDS = {"prompt": "question", "completion": "answer"}
METHODS = ("full", "lora", "qlora")
FIELD_KEYS = ("prompt", "completion", "text", "messages")
# Base learning rate of full fine-tuning for pre-trained LLMs; `with_method`
# scales it by 10 for LoRA/QLoRA (1e-4), the usual ranges at these sizes.
BASE_LR = 1e-5


def is_local(name: str) -> bool:
    """A local file (or glob) rather than a hub id: it exists, or it ends in a
    file suffix the loader reads (a missing local file then fails as such)."""
    return os.path.exists(name) or any(c in name for c in "*?[") or name.endswith(tuple(BUILDERS))


def data_source(dataset: str, *, dataset_config="", split="train", eval_split="", eval_data="",
                format="prompt_completion", weight=1.0, max_examples=0, **fields):  # fmt: skip
    """`source_config` for a hub id or a local path, whichever `dataset` is."""
    if is_local(dataset):
        return source_config(dataset, eval_path=eval_data, format=format, weight=weight,
                             max_examples=max_examples, **fields)  # fmt: skip
    return source_config(hub=dataset, hub_config=dataset_config, split=split,
                         eval_split=eval_split, format=format, weight=weight,
                         max_examples=max_examples, **fields)  # fmt: skip


def take(args: dict, defaults: dict) -> dict:
    """The known keys of `args` (popped) over `defaults`."""
    return {k: args.pop(k, v) for k, v in defaults.items()}


def base_config(o: dict):
    """Model, tokenizer, optimizer and schedule shared by the LLM configs."""
    if o["dtype"] not in ("bfloat16", "float32", "float16"):
        raise ConfigError(f"config arg dtype={o['dtype']!r}; expected bfloat16, float32 or float16")
    cfg = default_config()
    # Layers scanned (one compiled layer; with QLoRA/LoRA one layer's dequantized or
    # adapted kernels live at a time: docs/benchmarks.md measured 1.2-1.4x faster
    # steps and 14-16% lower peak memory at a weights-dominated size) and rematerialized.
    cfg.model.update(checkpoint=o["model"], dtype=o["dtype"], param_dtype="float32", remat="full",
                     scan_layers=True)  # fmt: skip
    cfg.data = default_data_config()
    cfg.data.update(tokenizer=o.get("tokenizer") or o["model"], seq_len=int(o["seq_len"]),
                    batch_size=int(o["batch"]), max_eval_examples=500)  # fmt: skip
    steps = int(o["steps"])
    cfg.optim.update(name="adamw", lr=BASE_LR, schedule="cosine", weight_decay=0.0,
                     end_lr_fraction=0.1, clip_norm=1.0)  # fmt: skip
    cfg.optim.warmup_steps = int(o["warmup"]) if o["warmup"] else max(1, int(0.03 * steps))
    cfg.train.update(steps=steps, log_every=min(10, steps), checkpoint_every=min(500, steps),
                     keep=2, eval_every=0, export_adapter=True)  # fmt: skip
    return cfg


def apply_method(cfg, method: str, options: dict, lr: str):
    if method not in METHODS:
        raise ConfigError(f"config arg method={method!r}; expected one of {', '.join(METHODS)}")
    with_method(cfg, method, options)  # LoRA/QLoRA: all-linear, r=16, alpha=32, lr x10
    if lr:
        cfg.optim.lr = float(lr)
    # Full fine-tuning has no adapter to hand over: export merged HF weights.
    cfg.train.export_hf = method == "full"
    return cfg


def get_config(arg=None):
    args = parse_arg(arg)
    o = take(args, {**DEFAULTS, "tokenizer": ""})
    fields = {k: args.pop(k) for k in FIELD_KEYS if k in args}
    if o["dataset"] == DEFAULTS["dataset"]:
        fields = {**DEFAULT_FIELDS, **fields}
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)} for the SFT config")
    cfg = base_config(o)
    cfg.data.sources.sft = data_source(
        o["dataset"], dataset_config=o["dataset_config"], split=o["split"],
        eval_split=o["eval_split"], eval_data=o["eval_data"], format=o["format"], **fields,
    )  # fmt: skip
    return apply_method(cfg, o["method"], method_options, o["lr"])
