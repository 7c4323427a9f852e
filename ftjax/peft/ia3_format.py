"""HF PEFT's IA3 adapter files, written and read for `IA3Weight` leaves.

For a JAX kernel `(in, out)` with vector `l`, PEFT stores
`base_model.model.<module>.ia3_l` with shape `(out, 1)`, or `(1, in)` for a
feedforward module, with no adapter name in the key and the safetensors
metadata `{"format": "pt"}` (as for LoRA, `ftjax.peft.peft_format`).
`adapter_config.json` has `peft_type: "IA3"`, `target_modules`,
`feedforward_modules`, `fan_in_fan_out` (GPT-2's Conv1D) and
`init_ia3_weights`.

PEFT reads `feedforward_modules` with its own rule: a string is a full-match
regex, and a list entry marks every module whose name *ends with* it, as a
plain string (`"c_proj"` marks `attn.c_proj` too). It also requires the
feedforward entries to be entries of `target_modules`. The writer picks
entries that mark exactly the feedforward leaves under that rule and checks
every tensor's shape against what PEFT will build; a module PEFT would not
adapt, or adapt the other way round, is refused rather than written.

Reading goes through an allow-list (`CONFIG_FIELDS`): every field of PEFT's
`IA3Config` is implemented, bookkeeping, or accepted only at its off value;
unknown fields are refused with their name.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from ftjax.models.config import ModelConfig
from ftjax.models.hf import stack_layers
from ftjax.models.registry import get_family
from ftjax.peft import peft_format as lora_format
from ftjax.peft.base import AdapterFormatError, flatten_paths, is_leaf
from ftjax.peft.ia3 import IA3Weight
from ftjax.peft.methods import replace_leaves
from ftjax.peft.targets import kernel_paths

SUFFIX = ".ia3_l"
LEAF_TYPES = (IA3Weight,)
PREFIX = lora_format.PREFIX


def is_feedforward(module: str, feedforward_modules) -> bool:
    """PEFT's rule (`IA3Model._check_target_module_feedforward`)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module) is not None
    return any(module.endswith(t) for t in feedforward_modules)


def _suffixes(modules, others, matches) -> list[str]:
    """The shortest dotted suffix of each module that `matches` none of `others`."""
    out = set()
    for module in modules:
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(matches(o, suffix) for o in others):
                out.add(suffix)
                break
    return sorted(out)


def _expected_shape(module, config, kernel_shape) -> tuple[int, int]:
    fan_in, fan_out = kernel_shape[-2:]
    return (1, fan_in) if is_feedforward(module, config["feedforward_modules"]) else (fan_out, 1)


def _targeted(module: str, config: dict) -> bool:
    return lora_format.peft_targets_match(
        module, config["target_modules"], config.get("exclude_modules")
    )


def _validate(config: dict, tensors: dict, kernels: dict, source: str, *, complete: bool):
    """Every tensor is an `ia3_l` of a linear module that the config targets,
    with the shape PEFT builds for it; with `complete`, every targeted module
    has a tensor (so that PEFT does not initialize one itself)."""
    for field in ("target_modules", "feedforward_modules"):
        if config.get(field) is None:
            raise AdapterFormatError(
                f"{source}: adapter_config.json lacks {field!r} (null means PEFT's "
                "per-architecture default, which ftjax does not guess)"
            )
    modules = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX) or not key.endswith(SUFFIX):
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not an IA3 vector of a linear layer "
                f"(expected {PREFIX}<module>{SUFFIX})"
            )
        modules[key[len(PREFIX) : -len(SUFFIX)]] = value
    for module, value in sorted(modules.items()):
        if module not in kernels:
            raise AdapterFormatError(f"{source}: module {module!r} is not a linear layer")
        if not _targeted(module, config):
            raise AdapterFormatError(
                f"{source}: module {module!r} has an ia3_l but target_modules="
                f"{config['target_modules']!r} does not select it (PEFT would silently drop it)"
            )
        want = _expected_shape(module, config, kernels[module])
        if tuple(value.shape) != want:
            kind = "feedforward" if want[0] == 1 else "not feedforward"
            raise AdapterFormatError(
                f"{source}: module {module!r} has an ia3_l of shape {tuple(value.shape)}, but "
                f"under feedforward_modules={config['feedforward_modules']!r} it is {kind} "
                f"and PEFT expects {want}"
            )
    missing = sorted(m for m in kernels if _targeted(m, config) and m not in modules)
    if complete and missing:
        raise AdapterFormatError(
            f"{source}: target_modules={config['target_modules']!r} selects {missing[0]!r}, "
            "which has no ia3_l (PEFT would initialize it itself)"
        )
    return modules, missing


def adapter_state(
    cfg: ModelConfig, params, *, base_model_name_or_path: str | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """`(adapter_config, tensors)` for the IA3 leaves of `params`."""
    params = lora_format._unstacked(cfg, params)
    leaves = [(p, x) for p, x in flatten_paths(params) if isinstance(x, IA3Weight)]
    if not leaves:
        raise AdapterFormatError("params: no IA3 vectors to export")
    ia3_paths = {p for p, _ in leaves}
    other = next((p for p, x in flatten_paths(params) if is_leaf(x) and p not in ia3_paths), None)
    if other is not None:
        raise AdapterFormatError(
            f"params: {other} is another kind of weight leaf than IA3; HF PEFT's IA3 files "
            "hold IA3 vectors over plain weights only"
        )
    tensors: dict[str, np.ndarray] = {}
    feedforward, plain = [], []
    for path, leaf in leaves:
        module = lora_format._module(cfg, path)
        l = np.asarray(leaf.l)  # noqa: E741
        (feedforward if leaf.feedforward else plain).append(module)
        tensors[f"{PREFIX}{module}{SUFFIX}"] = l[None, :] if leaf.feedforward else l[:, None]
    adapted = set(feedforward) | set(plain)
    linear = [lora_format._module(cfg, p) for p in kernel_paths(params)]
    # Feedforward entries must mark no other module under PEFT's plain-suffix
    # rule, and target no unadapted one; the others only target adapted ones.
    ff_targets = _suffixes(
        feedforward, [m for m in linear if m not in feedforward], lambda o, s: o.endswith(s)
    )
    plain_targets = _suffixes(
        plain,
        [m for m in linear if m not in adapted],
        lambda o, s: lora_format.peft_targets_match(o, [s]),
    )
    config = {
        "peft_type": "IA3",
        "task_type": lora_format.task_type(cfg),
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(set(ff_targets) | set(plain_targets)),
        "feedforward_modules": ff_targets,
        "exclude_modules": None,
        "fan_in_fan_out": get_family(cfg.model_type).fan_in_fan_out,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return config, tensors


def save_adapter(cfg: ModelConfig, params, out_dir: str, **options) -> dict:
    """Writes the IA3 leaves of `params` as PEFT IA3 files; returns the config.

    Example::

        save_adapter(model.cfg, trained_params, "run/adapter")
    """
    params = lora_format._unstacked(cfg, params)
    config, tensors = adapter_state(cfg, params, **options)
    _validate(config, tensors, lora_format.kernel_shapes(cfg, params), out_dir, complete=True)
    lora_format.write_files(out_dir, config, tensors)
    return config


_BOOKKEEPING = lora_format.BOOKKEEPING_FIELDS

# Every field of PEFT's IA3Config (peft 0.21) and what the importer accepts for it.
CONFIG_FIELDS = {
    "peft_type": (lambda v: v == "IA3", "'IA3'"),
    "target_modules": (lora_format._names, "a regex, module names or 'all-linear'"),
    "feedforward_modules": (
        lora_format._names,
        "a regex or module names, [] for none; null, PEFT's per-architecture default, is not guessed",
    ),
    "exclude_modules": (lambda v: v is None or lora_format._names(v), "null or module names"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "a bool"),
    # The vectors are read from the file; the init only matters for missing ones.
    "init_ia3_weights": (lambda v: isinstance(v, bool), "a bool"),
    "modules_to_save": (lora_format._off, "null or empty"),
    **{field: (lambda v: True, "anything") for field in _BOOKKEEPING},
}


def load_adapter(cfg: ModelConfig, params, in_dir: str, *, dtype="float32"):
    """`params` (plain base params of `cfg`) with the IA3 adapter of `in_dir`
    inserted: an `IA3Weight` (vector in `dtype`) per adapted kernel; scanned
    params get stacked vectors. `peft.load_adapter` comes here for IA3 files.

    Example::

        params = load_adapter(model.cfg, base_params, "hf_ia3_adapter/")
    """
    config, tensors = lora_format.read_adapter(in_dir, cfg)
    lora_format.check_config(config, in_dir, CONFIG_FIELDS, kind="IA3Config")
    flat = lora_format._unstacked(cfg, params)
    modules, missing = _validate(
        config, tensors, lora_format.kernel_shapes(cfg, flat), in_dir, complete=False
    )
    if missing and not config.get("init_ia3_weights", True):
        # PEFT would give these modules random vectors (init_ia3_weights false).
        raise AdapterFormatError(
            f"{in_dir}: module {missing[0]!r} is targeted but has no ia3_l, and "
            "init_ia3_weights is false (PEFT would give it a random vector)"
        )
    by_module = {lora_format._module(cfg, p): p for p in kernel_paths(flat)}
    kernels = dict(flatten_paths(flat))
    new = {}
    for module, value in modules.items():
        path = by_module[module]
        l = jnp.asarray(np.asarray(value).reshape(-1), jnp.dtype(dtype))  # noqa: E741
        feedforward = is_feedforward(module, config["feedforward_modules"])
        new[path] = IA3Weight(kernels[path], l, feedforward)
    out = replace_leaves(flat, new)
    return stack_layers(cfg, out) if cfg.scan_layers else out
