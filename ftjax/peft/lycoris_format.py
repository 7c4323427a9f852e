"""HF PEFT's LoHa and LoKr adapter files (its LyCORIS tuners), written and read
for `LohaWeight` and `LokrWeight` leaves of linear layers.

Keys carry the prefix `base_model.model.` and no adapter name; the metadata
is `{"format": "pt"}`. For a JAX kernel `(in, out)` the tensors are the torch
transposes of the leaf's children:

    LoHa  <module>.hada_w1_a (out, r) = b1ᵀ   .hada_w1_b (r, in) = a1ᵀ   (and w2: b2ᵀ, a2ᵀ)
    LoKr  <module>.lokr_w1 (out_l, in_m) = w1ᵀ, or .lokr_w1_a (out_l, r) = b1ᵀ, .lokr_w1_b = a1ᵀ
          <module>.lokr_w2 (out_k, in_n) = w2ᵀ, or .lokr_w2_a (out_k, r) = b2ᵀ, .lokr_w2_b = a2ᵀ

with `alpha / r` the scale. PEFT decides the LoKr shapes itself from `r`,
`decompose_both` and `decompose_factor` (`ftjax.peft.lokr.kron_shapes`), so
writer and reader check every module's tensors against them.

PEFT's LyCORIS tuners adapt `torch.nn.Linear` (and convolutions) only:
GPT-2's `Conv1D` layers cannot carry them (`get_peft_model` raises a
`TypeError`), so such adapters are refused on export. Reading goes through an
allow-list per config class (`CONFIG_FIELDS`); conv options, dropout and
per-module patterns are accepted only at their off value.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ftjax.models.config import ModelConfig
from ftjax.models.hf import stack_layers
from ftjax.models.registry import get_family
from ftjax.peft import peft_format as lora_format
from ftjax.peft.base import AdapterFormatError, flatten_paths, is_leaf
from ftjax.peft.loha import LohaWeight
from ftjax.peft.lokr import LokrWeight, kron_shapes
from ftjax.peft.methods import replace_leaves
from ftjax.peft.targets import kernel_paths

PREFIX = lora_format.PREFIX
LEAF_TYPES = (LohaWeight, LokrWeight)
# peft_type -> leaf type, the torch tensor names and the leaf children they hold (transposed).
KINDS = {
    "LOHA": (LohaWeight, {"hada_w1_a": "b1", "hada_w1_b": "a1", "hada_w2_a": "b2", "hada_w2_b": "a2"}),
    "LOKR": (LokrWeight, {"lokr_w1": "w1", "lokr_w1_a": "b1", "lokr_w1_b": "a1",
                          "lokr_w2": "w2", "lokr_w2_a": "b2", "lokr_w2_b": "a2"}),
}  # fmt: skip


def _kind_of(leaf) -> str:
    return "LOHA" if isinstance(leaf, LohaWeight) else "LOKR"


def _expected(kind: str, config: dict, kernel_shape) -> dict[str, tuple[int, int]]:
    """The torch tensor shapes PEFT builds for a linear module under `config`."""
    fan_in, fan_out = kernel_shape[-2:]
    r = int(config["r"])
    if kind == "LOHA":
        return {"hada_w1_a": (fan_out, r), "hada_w1_b": (r, fan_in),
                "hada_w2_a": (fan_out, r), "hada_w2_b": (r, fan_in)}  # fmt: skip
    (in_m, out_l), (in_n, out_k), low1, low2 = kron_shapes(
        fan_in, fan_out, r, decompose_both=bool(config.get("decompose_both", False)),
        factor=int(config.get("decompose_factor", -1)),
    )  # fmt: skip
    out = {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)} if low1 else {"lokr_w1": (out_l, in_m)}
    out.update(
        {"lokr_w2_a": (out_k, r), "lokr_w2_b": (r, in_n)} if low2 else {"lokr_w2": (out_k, in_n)}
    )
    return out


def adapter_state(cfg: ModelConfig, params, *, base_model_name_or_path=None):
    """`(adapter_config, tensors)` for the LoHa or LoKr leaves of `params`."""
    params = lora_format._unstacked(cfg, params)
    leaves = [(p, x) for p, x in flatten_paths(params) if isinstance(x, LEAF_TYPES)]
    if not leaves:
        raise AdapterFormatError("params: no LoHa or LoKr leaves to export")
    kinds = {_kind_of(x) for _, x in leaves}
    paths = {p for p, _ in leaves}
    other = next((p for p, x in flatten_paths(params) if is_leaf(x) and p not in paths), None)
    if len(kinds) > 1 or other is not None:
        raise AdapterFormatError(
            f"params: {other or 'the tree'} mixes weight-leaf kinds; a PEFT LoHa or LoKr "
            "file holds one kind of adapter over plain weights"
        )
    kind = kinds.pop()
    family = get_family(cfg.model_type)
    if family.fan_in_fan_out:
        raise AdapterFormatError(
            f"params: HF PEFT's {kind.title()} adapts torch.nn.Linear layers only, and "
            f"{cfg.model_type}'s projections are transformers Conv1D layers (PEFT's "
            "get_peft_model raises TypeError); export merged weights instead"
        )
    if kind == "LOHA":
        settings = {(x.rank, x.scale) for _, x in leaves}
    else:
        settings = {(x.rank, x.scale, x.decompose_both, x.factor) for _, x in leaves}
    if len(settings) > 1:
        raise AdapterFormatError(
            f"params: {kind} leaves differ in rank, scale or factorization ({sorted(settings)[:3]}); "
            "PEFT's rank_pattern/alpha_pattern are not written"
        )
    rank, scale, *rest = settings.pop()
    _, names = KINDS[kind]
    tensors = {}
    for path, leaf in leaves:
        module = lora_format._module(cfg, path)
        for torch_name, child in names.items():
            value = getattr(leaf, child)
            if value is not None:
                tensors[f"{PREFIX}{module}.{torch_name}"] = np.ascontiguousarray(
                    np.asarray(value).T
                )
    adapted = [lora_format._module(cfg, p) for p, _ in leaves]
    linear = [lora_format._module(cfg, p) for p in kernel_paths(params)]
    config = {
        "peft_type": kind,
        "task_type": lora_format.task_type(cfg),
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "alpha": scale * rank,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "target_modules": lora_format._minimal_targets(
            adapted, [m for m in linear if m not in adapted]
        ),
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    if kind == "LOKR":
        config.update(decompose_both=rest[0], decompose_factor=rest[1], rank_dropout_scale=False)
    return config, tensors


def _validate(config, tensors, kernels, source, *, complete: bool):
    """`{module: {torch name: tensor}}`: every tensor is one PEFT builds for a
    targeted linear module, with its shape; with `complete`, every targeted
    module has all of them (else PEFT would initialize them itself)."""
    kind = config["peft_type"]
    _, names = KINDS[kind]
    if config.get("target_modules") is None:
        raise AdapterFormatError(
            f"{source}: adapter_config.json lacks 'target_modules' (null means PEFT's "
            "per-architecture default, which ftjax does not guess)"
        )
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        name = key.rsplit(".", 1)[-1]
        if not key.startswith(PREFIX) or name not in names:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not a {kind} tensor of a linear layer (expected "
                f"{PREFIX}<module>.<{' | '.join(names)}>)"
            )
        modules.setdefault(key[len(PREFIX) : -len(name) - 1], {})[name] = value
    targeted = lambda m: lora_format.peft_targets_match(  # noqa: E731
        m, config["target_modules"], config.get("exclude_modules")
    )
    for module, parts in sorted(modules.items()):
        if module not in kernels:
            raise AdapterFormatError(f"{source}: module {module!r} is not a linear layer")
        if not targeted(module):
            raise AdapterFormatError(
                f"{source}: module {module!r} has {kind} tensors but target_modules="
                f"{config['target_modules']!r} does not select it (PEFT would silently drop them)"
            )
        want = _expected(kind, config, kernels[module])
        got = {n: tuple(v.shape) for n, v in parts.items()}
        if got != want:
            raise AdapterFormatError(
                f"{source}: module {module!r} has tensors {got}, but under this config PEFT "
                f"builds {want}"
            )
    missing = sorted(m for m in kernels if targeted(m) and m not in modules)
    if missing:
        raise AdapterFormatError(
            f"{source}: target_modules selects {missing[0]!r}, which has no {kind} tensors "
            "(PEFT would initialize them itself)"
        )
    return modules


def save_adapter(cfg: ModelConfig, params, out_dir: str, **options) -> dict:
    """Writes the LoHa or LoKr leaves of `params` as PEFT files; returns the config.

    Example::

        save_adapter(model.cfg, trained_params, "run/adapter")
    """
    params = lora_format._unstacked(cfg, params)
    config, tensors = adapter_state(cfg, params, **options)
    _validate(config, tensors, lora_format.kernel_shapes(cfg, params), out_dir, complete=True)
    lora_format.write_files(out_dir, config, tensors)
    return config


_BOOKKEEPING = lora_format.BOOKKEEPING_FIELDS
_ZERO = (lambda v: v in (0, 0.0, None), "0 (not implemented)")
_SHARED = {
    "r": (lambda v: lora_format._is_int(v) and v > 0, "a positive int"),
    "alpha": (lambda v: lora_format._is_int(v) or isinstance(v, float), "a number"),
    "target_modules": (lora_format._names, "a regex, module names or 'all-linear'"),
    "exclude_modules": (lambda v: v is None or lora_format._names(v), "null or module names"),
    # Tensors are read from the file; the init only matters for missing ones, refused.
    "init_weights": (lambda v: isinstance(v, bool) or v == "lycoris", "a bool or 'lycoris'"),
    "rank_dropout": _ZERO,
    "module_dropout": _ZERO,
    "use_effective_conv2d": (lambda v: v in (False, None), "false (linear layers only)"),
    "layers_to_transform": (lora_format._off, "null"),
    "layers_pattern": (lora_format._off, "null"),
    "rank_pattern": (lora_format._off, "null or empty"),
    "alpha_pattern": (lora_format._off, "null or empty"),
    "modules_to_save": (lora_format._off, "null or empty"),
    **{field: (lambda v: True, "anything") for field in _BOOKKEEPING},
}
# Every field of PEFT's LoHaConfig and LoKrConfig (peft 0.21), by peft_type.
CONFIG_FIELDS = {
    "LOHA": {"peft_type": (lambda v: v == "LOHA", "'LOHA'"), **_SHARED},
    "LOKR": {
        "peft_type": (lambda v: v == "LOKR", "'LOKR'"),
        **_SHARED,
        "decompose_both": (lambda v: isinstance(v, bool), "a bool"),
        "decompose_factor": (
            lambda v: lora_format._is_int(v) and (v == -1 or v > 0),
            "-1 or a positive int",
        ),
        # Only scales rank dropout, which is refused unless 0.
        "rank_dropout_scale": (lambda v: isinstance(v, bool), "a bool"),
    },
}
CONFIG_CLASSES = {"LOHA": "LoHaConfig", "LOKR": "LoKrConfig"}


def load_adapter(cfg: ModelConfig, params, in_dir: str):
    """`params` (plain base params of `cfg`) with the LoHa or LoKr adapter of
    `in_dir` inserted (factors in the kernel's dtype); scanned params get
    stacked leaves. `peft.load_adapter` comes here for LOHA and LOKR files.

    Example::

        params = load_adapter(model.cfg, base_params, "hf_lokr_adapter/")
    """
    config, tensors = lora_format.read_adapter(in_dir, cfg)
    kind = config.get("peft_type")
    lora_format.check_config(config, in_dir, CONFIG_FIELDS[kind], kind=CONFIG_CLASSES[kind])
    flat = lora_format._unstacked(cfg, params)
    modules = _validate(
        config, tensors, lora_format.kernel_shapes(cfg, flat), in_dir, complete=False
    )
    r, alpha = int(config["r"]), float(config["alpha"])
    scale = alpha / r
    leaf_type, names = KINDS[kind]
    by_module = {lora_format._module(cfg, p): p for p in kernel_paths(flat)}
    kernels = dict(flatten_paths(flat))
    new = {}
    for module, parts in modules.items():
        path = by_module[module]
        w = kernels[path]
        kids = {names[n]: jnp.asarray(np.asarray(v).T, w.dtype) for n, v in parts.items()}
        if kind == "LOHA":
            new[path] = LohaWeight(w, kids["a1"], kids["b1"], kids["a2"], kids["b2"], scale)
        else:
            get = kids.get
            new[path] = LokrWeight(
                w, get("w1"), get("a1"), get("b1"), get("w2"), get("a2"), get("b2"), scale, r,
                bool(config.get("decompose_both", False)), int(config.get("decompose_factor", -1)),
            )  # fmt: skip
    out = replace_leaves(flat, new)
    return stack_layers(cfg, out) if cfg.scan_layers else out
