"""HF PEFT's OFT adapter files, written and read for `OFTWeight` leaves.

PEFT stores one tensor per adapted module, with no adapter name in the key
and the metadata `{"format": "pt"}`:

    base_model.model.<module>.oft_R.weight   (blocks stored, b(b-1)/2) = the leaf's q

(one row per block, or a single row with `block_share`), and decides each
layer's block size itself from `oft_block_size` or `r` (exactly one nonzero),
adjusted to a divisor of the layer's input size (`ftjax.peft.oft.block_layout`).
The writer finds a setting under which PEFT's rule gives every leaf its
block size, and both sides check every tensor's shape against that rule.

PEFT's OFT adapts `torch.nn.Linear` (and convolutions and embeddings, which
ftjax does not target): GPT-2's `Conv1D` layers cannot carry it
(`get_peft_model` raises a `TypeError`), so such adapters are refused both
ways. Reading goes through an allow-list (`CONFIG_FIELDS`) of every
`OFTConfig` field; unknown fields and unimplemented values are refused with
their name. PEFT 0.18 changed the Cayley–Neumann series; files from earlier
versions (by `peft_version`) that use it are refused.
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
from ftjax.peft.methods import replace_leaves
from ftjax.peft.oft import OFTWeight, block_layout, nearest_divisor, packed_size
from ftjax.peft.targets import kernel_paths

PREFIX = lora_format.PREFIX
SUFFIX = ".oft_R.weight"
LEAF_TYPES = (OFTWeight,)
# The first PEFT release with the Cayley-Neumann series ftjax implements.
NEUMANN_SINCE = (0, 18, 0)


def _conv1d_refusal(where: str, model_type: str) -> str:
    return (
        f"{where}: HF PEFT's OFT adapts torch.nn.Linear layers, and {model_type}'s projections "
        "are transformers Conv1D layers (PEFT's get_peft_model raises TypeError); "
        "export merged weights instead"
    )


def _size_setting(layouts, hints=()) -> tuple[str, int]:
    """`("oft_block_size", v)` or `("r", v)` under which PEFT's rule gives
    every `(fan_in, block_size)` of `layouts`; `hints` (tried first) are
    `(field, value)` pairs such as the method's own options."""
    fan_ins = sorted({f for f, _ in layouts})
    sizes = sorted({b for _, b in layouts}, reverse=True)
    counts = sorted({f // b for f, b in layouts})
    every = range(1, max(fan_ins) + 1)
    tries = [*hints, *(("oft_block_size", v) for v in [*sizes, *every]),
             *(("r", v) for v in [*counts, *every])]  # fmt: skip
    for field, v in tries:
        if v <= 0:
            continue
        if field == "oft_block_size":
            ok = all(nearest_divisor(f, v) == b for f, b in layouts)
        else:
            ok = all(f // nearest_divisor(f, v) == b for f, b in layouts)
        if ok:
            return field, v
    raise AdapterFormatError(
        f"params: OFT block sizes {sorted(set(layouts))} (input size, block size) follow no "
        "single r or oft_block_size under PEFT's rule"
    )


def adapter_state(cfg: ModelConfig, params, *, block_size=0, rank=0, base_model_name_or_path=None):
    """`(adapter_config, tensors)` for the OFT leaves of `params`; `block_size`
    / `rank`: the setting to write if it reproduces the leaves' block sizes."""
    params = lora_format._unstacked(cfg, params)
    leaves = [(p, x) for p, x in flatten_paths(params) if isinstance(x, OFTWeight)]
    if not leaves:
        raise AdapterFormatError("params: no OFT leaves to export")
    paths = {p for p, _ in leaves}
    other = next((p for p, x in flatten_paths(params) if is_leaf(x) and p not in paths), None)
    if other is not None:
        raise AdapterFormatError(
            f"params: {other} is another kind of weight leaf than OFT; HF PEFT's OFT files "
            "hold rotations of plain weights only"
        )
    if get_family(cfg.model_type).fan_in_fan_out:
        raise AdapterFormatError(_conv1d_refusal("params", cfg.model_type))
    settings = {(x.cayley_neumann, x.neumann_terms, x.coft, x.eps) for _, x in leaves}
    shared = {x.block_share for _, x in leaves if x.blocks > 1}
    if len(settings) > 1 or len(shared) > 1:
        raise AdapterFormatError(
            f"params: OFT leaves differ in their Cayley, COFT or block_share settings "
            f"({sorted(settings)[:3]}); PEFT's config has one of each"
        )
    cayley_neumann, terms, coft, eps = settings.pop()
    hints = [("oft_block_size", block_size), ("r", rank)]
    field, value = _size_setting([(x.shape[-2], x.block_size) for _, x in leaves], hints)
    tensors = {
        f"{PREFIX}{lora_format._module(cfg, p)}{SUFFIX}": np.asarray(x.q, np.float32)
        for p, x in leaves
    }
    adapted = [lora_format._module(cfg, p) for p, _ in leaves]
    linear = [lora_format._module(cfg, p) for p in kernel_paths(params)]
    config = {
        "peft_type": "OFT",
        "task_type": lora_format.task_type(cfg),
        "base_model_name_or_path": base_model_name_or_path,
        # PEFT reads it to tell the Cayley-Neumann series ftjax implements from the older one.
        "peft_version": ".".join(map(str, NEUMANN_SINCE)),
        "r": value if field == "r" else 0,
        "oft_block_size": value if field == "oft_block_size" else 0,
        "module_dropout": 0.0,
        "target_modules": lora_format._minimal_targets(
            adapted, [m for m in linear if m not in adapted]
        ),
        "fan_in_fan_out": False,
        "bias": "none",
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "coft": coft,
        "eps": eps,
        "block_share": bool(shared and shared.pop()),
        "use_cayley_neumann": cayley_neumann,
        "num_cayley_neumann_terms": terms,
        "inference_mode": True,
    }
    return config, tensors


def _version(text) -> tuple[int, int, int]:
    """`(major, minor, patch)` of a version string; `(0, 0, 0)` when there is none."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return (int(found[1]), int(found[2]), int(found[3] or 0)) if found else (0, 0, 0)


def _validate(config, tensors, kernels, source, model_type):
    """`({module: q}, [targeted modules without tensors], {module: (blocks stored, b)})`:
    every tensor an OFT rotation of a targeted linear module, with the shape
    PEFT builds for it under `config`."""
    if config.get("target_modules") is None:
        raise AdapterFormatError(
            f"{source}: adapter_config.json lacks 'target_modules' (null means PEFT's "
            "per-architecture default, which ftjax does not guess)"
        )
    if "oft_block_size" not in config:
        raise AdapterFormatError(
            f"{source}: adapter_config.json lacks 'oft_block_size': an OFT adapter from PEFT "
            "before 0.14, whose layout current PEFT and ftjax do not read"
        )
    r, size = int(config.get("r", 0)), int(config["oft_block_size"])
    if (r != 0) == (size != 0):
        raise AdapterFormatError(
            f"{source}: r={r} and oft_block_size={size}; PEFT needs exactly one of them nonzero"
        )
    version = config.get("peft_version")
    if config.get("use_cayley_neumann", True) and _version(version) < NEUMANN_SINCE:
        raise AdapterFormatError(
            f"{source}: use_cayley_neumann is true and peft_version={version!r} is older than "
            "0.18.0, which changed the Cayley-Neumann series (ftjax implements the new one)"
        )
    modules = {}
    for key, value in tensors.items():
        if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not an OFT rotation of a linear layer "
                f"(expected {PREFIX}<module>{SUFFIX})"
            )
        modules[key[len(PREFIX) : -len(SUFFIX)]] = value
    targeted = sorted(
        m
        for m in kernels
        if lora_format.peft_targets_match(
            m, config["target_modules"], config.get("exclude_modules")
        )
    )
    if not targeted:
        raise AdapterFormatError(f"{source}: target_modules selects no linear layer")
    if get_family(model_type).fan_in_fan_out:
        raise AdapterFormatError(_conv1d_refusal(f"{source}: module {targeted[0]!r}", model_type))
    layouts = {}
    for module in targeted:
        blocks, b = block_layout(kernels[module][-2], rank=r, block_size=size)
        layouts[module] = (1 if config.get("block_share", False) else blocks, b)
    for module, q in sorted(modules.items()):
        if module not in kernels:
            raise AdapterFormatError(f"{source}: module {module!r} is not a linear layer")
        if module not in layouts:
            raise AdapterFormatError(
                f"{source}: module {module!r} has an OFT rotation but target_modules="
                f"{config['target_modules']!r} does not select it (PEFT would silently drop it)"
            )
        stored, b = layouts[module]
        if tuple(q.shape) != (stored, packed_size(b)):
            raise AdapterFormatError(
                f"{source}: module {module!r} has oft_R.weight of shape {tuple(q.shape)}; "
                f"PEFT builds {(stored, packed_size(b))} (block size {b}) under this config"
            )
    missing = [m for m in targeted if m not in modules]
    if missing and config.get("init_weights", True) is not True:
        raise AdapterFormatError(
            f"{source}: module {missing[0]!r} is targeted but has no OFT rotation, and "
            "init_weights is false (PEFT would give it a random one)"
        )
    return modules, missing, layouts


def save_adapter(cfg: ModelConfig, params, out_dir: str, **options) -> dict:
    """Writes the OFT leaves of `params` as PEFT OFT files; returns the config.

    Example::

        save_adapter(model.cfg, trained_params, "run/adapter")
    """
    params = lora_format._unstacked(cfg, params)
    config, tensors = adapter_state(cfg, params, **options)
    kernels = lora_format.kernel_shapes(cfg, params)
    _, missing, _ = _validate(config, tensors, kernels, out_dir, cfg.model_type)
    if missing:  # _minimal_targets selects exactly the adapted modules
        raise AdapterFormatError(f"{out_dir}: target_modules would also select {missing[0]!r}")
    lora_format.write_files(out_dir, config, tensors)
    return config


_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_BOOL = (lambda v: isinstance(v, bool), "a bool")

# Every field of PEFT's OFTConfig (peft 0.21) and what the importer accepts for it.
CONFIG_FIELDS = {
    "peft_type": (lambda v: v == "OFT", "'OFT'"),
    "r": (lambda v: lora_format._is_int(v) and v >= 0, "a non-negative int"),
    "oft_block_size": (lambda v: lora_format._is_int(v) and v >= 0, "a non-negative int"),
    "target_modules": (lora_format._names, "a regex, module names or 'all-linear'"),
    "exclude_modules": (lambda v: v is None or lora_format._names(v), "null or module names"),
    # PEFT 0.21 builds the dropout but its Linear forward never applies it.
    "module_dropout": _NUMBER,
    # PEFT sets it to false itself for torch.nn.Linear, the only layers read here.
    "fan_in_fan_out": _BOOL,
    "bias": (lambda v: v in (None, "none"), "'none' (trained biases are not read)"),
    # Only the init of targeted modules missing from the file (zeros: R = I).
    "init_weights": _BOOL,
    "coft": _BOOL,
    "eps": _NUMBER,
    "block_share": _BOOL,
    "use_cayley_neumann": _BOOL,
    "num_cayley_neumann_terms": (lora_format._is_int, "an int"),
    "layers_to_transform": (lora_format._off, "null"),
    "layers_pattern": (lora_format._off, "null"),
    "modules_to_save": (lora_format._off, "null or empty"),
    **{field: (lambda v: True, "anything") for field in lora_format.BOOKKEEPING_FIELDS},
}


def load_adapter(cfg: ModelConfig, params, in_dir: str):
    """`params` (plain base params of `cfg`) with the OFT adapter of `in_dir`
    inserted: an `OFTWeight` per adapted kernel (targeted modules the file
    lacks get PEFT's identity init); scanned params get stacked leaves.
    `peft.load_adapter` comes here for OFT files.

    Example::

        params = load_adapter(model.cfg, base_params, "hf_oft_adapter/")
    """
    config, tensors = lora_format.read_adapter(in_dir, cfg)
    lora_format.check_config(config, in_dir, CONFIG_FIELDS, kind="OFTConfig")
    flat = lora_format._unstacked(cfg, params)
    kernels = lora_format.kernel_shapes(cfg, flat)
    modules, missing, layouts = _validate(config, tensors, kernels, in_dir, cfg.model_type)
    by_module = {lora_format._module(cfg, p): p for p in kernel_paths(flat)}
    weights = dict(flatten_paths(flat))
    new = {}
    for module in sorted(modules) + missing:
        stored, b = layouts[module]
        q = modules[module] if module in modules else np.zeros((stored, packed_size(b)))
        new[by_module[module]] = OFTWeight(
            weights[by_module[module]],
            jnp.asarray(np.asarray(q), jnp.float32),
            b,
            bool(config.get("use_cayley_neumann", True)),
            int(config.get("num_cayley_neumann_terms", 5)),
            bool(config.get("coft", False)),
            float(config.get("eps", 6e-5)),
        )
    out = replace_leaves(flat, new)
    return stack_layers(cfg, out) if cfg.scan_layers else out
