"""The allow-list of HF PEFT's `LoraConfig` (peft 0.21): every field, and
the values ftjax's importer implements (`check_config` refuses the rest by
name); the bookkeeping fields every format's allow-list shares. Split out
of `ftjax.peft.peft_format`, which re-exports these names."""

from __future__ import annotations

import json

from ftjax.peft.base import AdapterFormatError

CONFIG_NAME = "adapter_config.json"


# init_lora_weights values under which PEFT leaves the base weights alone, so
# the saved A, B are relative to the checkpoint the user holds. (pissa*, olora,
# corda, loftq and lora_ga rewrite the base; unknown ones are refused too.)
BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")

# Every field of PEFT's LoraConfig (peft 0.21) and what the importer accepts
# for it. Bookkeeping, runtime and init-time-only settings take anything
# (whether an init rewrote the base is `init_lora_weights`' business):
# The fields every PEFT adapter config carries for bookkeeping (each format's
# allow-list accepts them as they are).
BOOKKEEPING_FIELDS = (
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode",
)  # fmt: skip
_BOOKKEEPING = [
    *BOOKKEEPING_FIELDS,
    *"""runtime_config megatron_core qalora_group_size
    ensure_weight_tying loftq_config eva_config corda_config lora_ga_config""".split(),
]
# Features ftjax does not implement, accepted only at their off value, and why:
_OFF = {
    "megatron_config": "Megatron-LM parallel linear layers are PyTorch-side",
    "trainable_token_indices": "trainable rows of the embedding (TrainableTokens) are not implemented",
    "velora_config": "the VeLoRA variant is not implemented",
    "alora_invocation_tokens": "activated LoRA (adapter on only after invocation tokens) is not "
    "implemented",
    "monteclora_config": "the MonteCLoRA variant is not implemented",
    "layer_replication": "replicated decoder layers change the model's depth",
    "target_parameters": "LoRA on bare nn.Parameters (MoE experts) is not implemented",
    "use_bdlora": "block-diagonal LoRA is not implemented",
    "arrow_config": "Arrow routing among adapters is not implemented",
    "kasa_config": "the KaSA variant (SVD-truncated base) is not implemented",
    "lora_bias": "a trainable bias on lora_B is not implemented",
    "use_qalora": "QALoRA's pooled input is not implemented",
}
# LoraConfig fields that LoRA's importer implements (`ftjax.peft.lora_fields`)
# beyond plain LoRA. Formats that reuse CONFIG_FIELDS for LoraConfig's fields
# (AdaLoRA) get them at their off value only; LoRA reads `LORA_CONFIG_FIELDS`.
LORA_FIELDS = (
    "rank_pattern", "alpha_pattern", "bias", "modules_to_save", "layers_to_transform",
    "layers_pattern",
)  # fmt: skip


def _off(v) -> bool:
    """null, false, empty, or bias's "none"."""
    return (
        v is None or v is False or (isinstance(v, (dict, list, str)) and v in ({}, [], "", "none"))
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _names(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v))


def _base_preserving(v) -> bool:
    return any(v is k if isinstance(k, bool) else v == k for k in BASE_PRESERVING_INITS)


# field -> (accepts(value), what is expected); a field not listed is refused.
CONFIG_FIELDS = {
    "peft_type": (lambda v: v in (None, "LORA"), "'LORA'"),
    "r": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "lora_alpha": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "target_modules": (
        _names,
        "a regex, module names or 'all-linear'; null means PEFT's per-architecture default",
    ),
    "exclude_modules": (lambda v: v is None or _names(v), "null, a regex or module names"),
    "lora_dropout": (lambda v: v is None or _is_int(v) or isinstance(v, float), "a number"),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
    "use_dora": (lambda v: isinstance(v, bool), "a bool"),
    "init_lora_weights": (_base_preserving, "an init that leaves the base unchanged"),
    # PEFT sets it per layer type itself (Conv1D or Linear); the tensors' layout is the same.
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "a bool"),
    **{field: (lambda v: True, "anything") for field in _BOOKKEEPING},
    **{field: (_off, f"null, false or empty: {why}") for field, why in _OFF.items()},
    **{field: (_off, "null, false, empty or 'none'") for field in LORA_FIELDS},
}


def _mapping(value_ok):
    return lambda v: (
        v is None
        or (isinstance(v, dict) and all(isinstance(k, str) and value_ok(x) for k, x in v.items()))
    )


def _layers(v) -> bool:
    return v is None or (_is_int(v) and v >= 0) or (
        isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)
    )  # fmt: skip


# Base-rewriting inits whose base ftjax recomputes from the checkpoint exactly
# as PEFT's loader does (`ftjax.peft.lora.rewriting_factors`).
RECOMPUTED_INITS = ("pissa", "olora")
# LoRA's own allow-list: CONFIG_FIELDS with LORA_FIELDS implemented. Every
# LoraConfig field is then implemented here, bookkeeping (_BOOKKEEPING) or
# refused unless off with its reason (_OFF); tests/test_peft_lora_fields.py
# checks that the three cover peft.LoraConfig.
LORA_CONFIG_FIELDS = {
    **CONFIG_FIELDS,
    "rank_pattern": (_mapping(lambda x: _is_int(x) and x > 0), "null or {module regex: rank > 0}"),
    "alpha_pattern": (
        _mapping(lambda x: _is_int(x) or isinstance(x, float)),
        "null or {module regex: alpha}",
    ),  # fmt: skip
    "bias": (lambda v: v in ("none", "lora_only", "all"), "'none', 'lora_only' or 'all'"),
    "modules_to_save": (
        lambda v: v is None or (isinstance(v, list) and _names(v)),
        "null or a list of module names",
    ),  # fmt: skip
    "layers_to_transform": (_layers, "null, a layer index or a list of them"),
    "layers_pattern": (lambda v: v is None or _names(v), "null or layer-stack names"),
    "init_lora_weights": (
        lambda v: _base_preserving(v) or v in RECOMPUTED_INITS,
        "an init that leaves the base unchanged, or pissa / olora (recomputed)",
    ),
    "ensure_weight_tying": (lambda v: isinstance(v, bool), "a bool"),
}
# Why the other string inits are refused on import.
_INIT_REFUSALS = {
    "corda": "CorDA's residual base comes from calibration data",
    "loftq": "LoftQ's base is a quantized residual fitted to the adapter",
    "lora_ga": "LoRA-GA's residual base comes from gradients on calibration data",
    "pissa_niter": "the randomized SVD's sketch (torch's RNG) cannot be reproduced, so neither can "
    "the residual base",
}


def check_config(config: dict, source: str, fields=None, kind: str = "LoraConfig") -> None:
    """Refuses an adapter config with a field ftjax does not implement at the
    given value, or does not know (`fields`: `CONFIG_FIELDS`, the allow-list
    of PEFT's `kind`)."""
    fields = CONFIG_FIELDS if fields is None else fields
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{source}: {CONFIG_NAME} is not a JSON object")
    for field, value in config.items():
        if field not in fields:
            raise AdapterFormatError(
                f"{source}: {CONFIG_NAME} field {field!r} is unknown to ftjax's importer "
                f"(PEFT {kind} fields as of peft 0.21); refusing rather than ignoring it"
            )
        ok, expected = fields[field]
        if ok(value):
            continue
        if field == "init_lora_weights" and isinstance(value, str):
            # Weights saved under such an init are relative to a rewritten base
            # (PiSSA's residual, ...), not the checkpoint the user holds.
            accepted = ", ".join(json.dumps(k) for k in BASE_PRESERVING_INITS)
            why = _INIT_REFUSALS.get("pissa_niter" if "_niter_" in value else value)
            if why is None and value in RECOMPUTED_INITS:
                why = "only LoRA's own importer recomputes its residual base"
            raise AdapterFormatError(
                f"{source}: init_lora_weights={value!r} is not one of the inits that leave the "
                f"base weights unchanged ({accepted}), so A and B may be relative to a rewritten "
                f"base{f' ({why})' if why else ''}; convert the adapter to plain LoRA first (PEFT: "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...))"
            )
        raise AdapterFormatError(
            f"{source}: {field}={value!r} is not supported by ftjax's importer (expected {expected})"
        )
