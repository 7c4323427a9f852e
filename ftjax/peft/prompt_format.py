"""HF PEFT's PROMPT_TUNING and PREFIX_TUNING adapter files.

Both store one tensor, `prompt_embeddings`, with no key prefix:

    PROMPT_TUNING   (n, hidden)                         the virtual-token embeddings
    PREFIX_TUNING   (n, num_layers * 2 * kv_width)      per token, every layer's key
                                                        then value, heads then head dims

which are exactly ftjax's `params[VIRTUAL_TOKENS]` and `params[KV_PREFIX]`
materialized (`ftjax.models.decoder`). PEFT sizes a prefix by the key/value
heads (`token_dim = kv_heads x head_dim`, `num_attention_heads = kv_heads`
for grouped-query models), and so does the writer. A prefix trained through
the MLP of `prefix_projection` is written as its output with
`prefix_projection: false`: what PEFT loads in inference mode either way, and
what it can also load to train on.

Reading goes through allow-lists of every field of PEFT's PromptTuningConfig
and PrefixTuningConfig (with PromptLearningConfig's); the fields that size
the tensor must agree with the model, unknown fields are refused by name.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ftjax.models import layers
from ftjax.models.config import ModelConfig
from ftjax.models.decoder import KV_PREFIX, VIRTUAL_TOKENS
from ftjax.peft import peft_format as lora_format
from ftjax.peft.base import AdapterFormatError
from ftjax.peft.prompt import PrefixMlpWeight, PromptWeight

TENSOR = "prompt_embeddings"
LEAF_TYPES = (PromptWeight, PrefixMlpWeight)
PEFT_TYPES = {VIRTUAL_TOKENS: "PROMPT_TUNING", KV_PREFIX: "PREFIX_TUNING"}
_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def _sizes(cfg: ModelConfig, key: str) -> dict:
    """The PromptLearningConfig sizes PEFT derives for `cfg` and this kind."""
    if key == VIRTUAL_TOKENS:
        return {"token_dim": cfg.hidden_size, "num_attention_heads": cfg.num_heads}
    return {
        "token_dim": cfg.num_kv_heads * cfg.head_size,
        "num_attention_heads": cfg.num_kv_heads,
    }


def _width(cfg: ModelConfig, key: str) -> int:
    token_dim = _sizes(cfg, key)["token_dim"]
    return token_dim if key == VIRTUAL_TOKENS else cfg.num_layers * 2 * token_dim


def adapter_state(cfg: ModelConfig, params, *, init=None, base_model_name_or_path=None):
    """`(adapter_config, tensors)` for the virtual tokens of `params`; `init`:
    the method's options, recorded as PEFT's init fields (bookkeeping)."""
    present = [k for k in PEFT_TYPES if isinstance(params, dict) and k in params]
    if len(present) != 1:
        raise AdapterFormatError(
            f"params: expected one of {', '.join(map(repr, PEFT_TYPES))} at the top level "
            f"(prompt or prefix tuning), found {present or 'neither'}"
        )
    key = present[0]
    table = np.asarray(layers.materialize(params[key], jnp.float32))
    if table.ndim != 2 or table.shape[1] != _width(cfg, key):
        raise AdapterFormatError(
            f"params[{key!r}]: shape {table.shape}; this {cfg.model_type} model takes "
            f"(num_virtual_tokens, {_width(cfg, key)})"
        )
    opts = dict(init or {})
    config = {
        "peft_type": PEFT_TYPES[key],
        "task_type": lora_format.task_type(cfg),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": int(table.shape[0]),
        "num_transformer_submodules": 1,
        "num_layers": cfg.num_layers,
        "modules_to_save": None,
        **_sizes(cfg, key),
    }
    if key == VIRTUAL_TOKENS:
        text = opts.get("init") == "text"
        config.update(
            prompt_tuning_init=_INITS.get(opts.get("init"), "RANDOM"),
            prompt_tuning_init_text=opts.get("init_text") if text else None,
            tokenizer_name_or_path=opts.get("tokenizer") if text else None,
            tokenizer_kwargs=None,
        )
    else:
        config.update(
            encoder_hidden_size=config["token_dim"],
            prefix_projection=False,  # the MLP's output is what is written
            init_weights="zero" if opts.get("init") == "zero" else None,
        )
    return config, {TENSOR: np.ascontiguousarray(table)}


def save_adapter(cfg: ModelConfig, params, out_dir: str, **options) -> dict:
    """Writes the virtual tokens of `params` as PEFT prompt/prefix tuning files;
    returns the config.

    Example::

        save_adapter(model.cfg, trained_params, "run/adapter")
    """
    config, tensors = adapter_state(cfg, params, **options)
    lora_format.write_files(out_dir, config, tensors)
    return config


def _positive_int(v) -> bool:
    return lora_format._is_int(v) and v > 0


def _null_or_int(v) -> bool:
    return v is None or _positive_int(v)


_COMMON = {
    "num_virtual_tokens": (_positive_int, "a positive int"),
    # Sizes PEFT fills in from the model's config; checked against the model below.
    "token_dim": (_null_or_int, "null or a positive int"),
    "num_attention_heads": (_null_or_int, "null or a positive int"),
    "num_layers": (_null_or_int, "null or a positive int"),
    "num_transformer_submodules": (lambda v: v in (None, 1), "1 (decoder-only models)"),
    "modules_to_save": (lora_format._off, "null or empty"),
    **{field: (lambda v: True, "anything") for field in lora_format.BOOKKEEPING_FIELDS},
}

# Every field of PEFT's PromptTuningConfig (peft 0.21) and what the importer
# accepts. The init fields only say how training started; the file holds the result.
PROMPT_FIELDS = {
    **_COMMON,
    "peft_type": (lambda v: v == "PROMPT_TUNING", "'PROMPT_TUNING'"),
    "prompt_tuning_init": (lambda v: v in _INITS.values(), "RANDOM, SAMPLE_VOCAB or TEXT"),
    "prompt_tuning_init_text": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "tokenizer_name_or_path": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "tokenizer_kwargs": (lambda v: v is None or isinstance(v, dict), "null or an object"),
}

# Every field of PEFT's PrefixTuningConfig (peft 0.21). With prefix_projection
# PEFT saves the MLP's output, the prefix itself, as it does without.
PREFIX_FIELDS = {
    **_COMMON,
    "peft_type": (lambda v: v == "PREFIX_TUNING", "'PREFIX_TUNING'"),
    "init_weights": (lambda v: v in (None, "zero"), "null or 'zero'"),
    "encoder_hidden_size": (_null_or_int, "null or a positive int"),
    "prefix_projection": (lambda v: isinstance(v, bool), "a bool"),
}


def _check_sizes(cfg: ModelConfig, config: dict, key: str, table, source: str) -> None:
    """The tensor and the size fields must be what PEFT builds on this model."""
    sizes = {**_sizes(cfg, key), "num_layers": cfg.num_layers}
    if key == VIRTUAL_TOKENS:
        sizes.pop("num_attention_heads")  # prompt tuning does not use it
        sizes.pop("num_layers")
    for field, want in sizes.items():
        got = config.get(field)
        if got is not None and got != want:
            raise AdapterFormatError(
                f"{source}: {field}={got!r}, but this {cfg.model_type} model gives {want} "
                f"(PEFT sizes the prompt from the model it is loaded on)"
            )
    want = (config["num_virtual_tokens"], _width(cfg, key))
    if tuple(table.shape) != want:
        raise AdapterFormatError(
            f"{source}: {TENSOR} has shape {tuple(table.shape)}; PEFT expects {want} "
            f"(num_virtual_tokens, {'hidden' if key == VIRTUAL_TOKENS else 'layers x 2 x kv width'})"
        )


def load_adapter(cfg: ModelConfig, params, in_dir: str):
    """`params` (base params of `cfg`, scanned or not) with the prompt or
    prefix of `in_dir` added as a trainable `PromptWeight` (float32).
    `peft.load_adapter` comes here for PROMPT_TUNING and PREFIX_TUNING files.

    Example::

        params = load_adapter(model.cfg, base_params, "hf_prompt_adapter/")
    """
    config, tensors = lora_format.read_adapter(in_dir, cfg)
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    key = VIRTUAL_TOKENS if peft_type == "PROMPT_TUNING" else KV_PREFIX
    fields, kind = (
        (PROMPT_FIELDS, "PromptTuningConfig")
        if key == VIRTUAL_TOKENS
        else (PREFIX_FIELDS, "PrefixTuningConfig")
    )
    lora_format.check_config(config, in_dir, fields, kind=kind)
    if "num_virtual_tokens" not in config:
        raise AdapterFormatError(f"{in_dir}: adapter_config.json lacks 'num_virtual_tokens'")
    if set(tensors) != {TENSOR}:
        other = sorted(set(tensors) - {TENSOR}) or ["(none)"]
        raise AdapterFormatError(
            f"{in_dir}: expected the single tensor {TENSOR!r}, found {other[0]!r}"
        )
    table = np.asarray(tensors[TENSOR], np.float32)
    _check_sizes(cfg, config, key, table, in_dir)
    return {**params, key: PromptWeight(jnp.asarray(table))}
