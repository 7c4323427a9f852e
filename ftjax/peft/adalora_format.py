"""HF PEFT's AdaLoRA adapter files, written and read for `AdaLoraWeight` leaves.

PEFT stores, per adapted module, with no adapter name in the keys and the
metadata `{"format": "pt"}` (as for LoRA, `ftjax.peft.peft_format`):

    base_model.model.<module>.lora_A   (k, in)   = a[:, kept].T
    base_model.model.<module>.lora_E   (k, 1)    = e[kept]
    base_model.model.<module>.lora_B   (out, k)  = b[kept].T

and no `ranknum` (PEFT rebuilds it as `init_r`). Once ranks have been
allocated, PEFT's config carries `rank_pattern`, `{"<module>.lora_E":
[bool] * init_r}`, the triplets kept, and the tensors hold only those (`k`
of them); `PeftModel.from_pretrained` builds every module at `init_r`, then
shrinks each listed one to its pattern before loading, keeping `ranknum =
init_r` so the scale `lora_alpha / init_r` does not change. ftjax keeps
every leaf at `init_r` (stacked layers need one shape) with pruned triplets
at `e = 0`: the writer drops exactly the triplets whose `e` is 0 (they add
nothing, so the function is unchanged) and writes their pattern; the reader
puts the kept triplets back at their places and zeros at the others.

Reading goes through an allow-list (`CONFIG_FIELDS`) of every
`AdaLoraConfig` field; unknown fields and unimplemented values are refused
with their name.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ftjax.models.config import ModelConfig
from ftjax.models.hf import stack_layers
from ftjax.models.registry import get_family
from ftjax.peft import peft_format as lora_format
from ftjax.peft.adalora import AdaLoraWeight
from ftjax.peft.base import AdapterFormatError, flatten_paths, is_leaf
from ftjax.peft.methods import replace_leaves
from ftjax.peft.targets import kernel_paths

PREFIX = lora_format.PREFIX
SUFFIXES = {".lora_A": "a", ".lora_E": "e", ".lora_B": "b"}
LEAF_TYPES = (AdaLoraWeight,)
# PEFT's AdaLoraConfig defaults (a config without the field means them).
DEFAULT_INIT_R, DEFAULT_ALPHA = 12, 8
# PEFT's AdaLoraConfig defaults, written when the method's options are not given.
SCHEDULE_DEFAULTS = {"target_r": 8, "tinit": 0, "tfinal": 0, "delta_t": 1, "beta1": 0.85,
                     "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": None}  # fmt: skip


def _pattern_key(module: str) -> str:
    return f"{module}.lora_E"


def _schedule_fields(options) -> dict:
    opts = {**SCHEDULE_DEFAULTS, **{k: v for k, v in dict(options or {}).items()
                                    if k in SCHEDULE_DEFAULTS}}  # fmt: skip
    total = opts["total_step"]
    if total is None:
        # PEFT refuses a config without a schedule; the run's length is not known
        # here, so the shortest valid one stands in (it matters only to training).
        total = int(opts["tinit"]) + int(opts["tfinal"]) + 1
    return {
        "target_r": int(opts["target_r"]),
        "tinit": int(opts["tinit"]),
        "tfinal": int(opts["tfinal"]),
        "deltaT": int(opts["delta_t"]),
        "beta1": float(opts["beta1"]),
        "beta2": float(opts["beta2"]),
        "orth_reg_weight": float(opts["orth_reg_weight"]),
        "total_step": int(total),
    }


def adapter_state(
    cfg: ModelConfig, params, *, options=None, base_model_name_or_path=None
) -> tuple[dict, dict[str, np.ndarray]]:
    """`(adapter_config, tensors)` for the AdaLoRA leaves of `params`;
    `options`: the method's (schedule fields of the config)."""
    params = lora_format._unstacked(cfg, params)
    leaves = [(p, x) for p, x in flatten_paths(params) if isinstance(x, AdaLoraWeight)]
    if not leaves:
        raise AdapterFormatError("params: no AdaLoRA leaves to export")
    paths = {p for p, _ in leaves}
    other = next((p for p, x in flatten_paths(params) if is_leaf(x) and p not in paths), None)
    if other is not None:
        raise AdapterFormatError(
            f"params: {other} is another kind of weight leaf than AdaLoRA; HF PEFT's AdaLoRA "
            "files hold AdaLoRA updates over plain weights only"
        )
    kinds = {(x.rank, x.alpha, x.dropout) for _, x in leaves}
    if len(kinds) > 1:
        raise AdapterFormatError(
            f"params: AdaLoRA leaves differ in init_r, alpha or dropout ({sorted(kinds)[:3]}); "
            "PEFT has one of each"
        )
    rank, alpha, rate = kinds.pop()
    tensors: dict[str, np.ndarray] = {}
    pattern: dict[str, list[bool]] = {}
    for path, leaf in leaves:
        module = lora_format._module(cfg, path)
        e = np.asarray(leaf.e, np.float32)
        kept = e != 0
        pattern[_pattern_key(module)] = [bool(k) for k in kept]
        tensors[f"{PREFIX}{module}.lora_A"] = np.ascontiguousarray(np.asarray(leaf.a)[:, kept].T)
        tensors[f"{PREFIX}{module}.lora_E"] = np.asarray(leaf.e)[kept][:, None]
        tensors[f"{PREFIX}{module}.lora_B"] = np.ascontiguousarray(np.asarray(leaf.b)[kept].T)
    adapted = [lora_format._module(cfg, p) for p, _ in leaves]
    linear = [lora_format._module(cfg, p) for p in kernel_paths(params)]
    config = {
        "peft_type": "ADALORA",
        "task_type": lora_format.task_type(cfg),
        "base_model_name_or_path": base_model_name_or_path,
        "init_r": int(rank),
        **_schedule_fields(options),
        "lora_alpha": float(alpha),
        "lora_dropout": float(rate),
        "target_modules": lora_format._minimal_targets(
            adapted, [m for m in linear if m not in adapted]
        ),
        # Only when something is pruned: without it PEFT loads every module at init_r.
        "rank_pattern": pattern if not all(all(v) for v in pattern.values()) else None,
        "fan_in_fan_out": get_family(cfg.model_type).fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, tensors


def _validate(config, tensors, kernels, source):
    """`{module: {a, e, b}}` at full `init_r` (pruned triplets zero): every
    tensor an AdaLoRA tensor of a targeted linear module, every targeted
    module present, shapes as `init_r` and `rank_pattern` make them."""
    if config.get("target_modules") is None:
        raise AdapterFormatError(
            f"{source}: adapter_config.json lacks 'target_modules' (null means PEFT's "
            "per-architecture default, which ftjax does not guess)"
        )
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.startswith(PREFIX) and key.endswith(s)), None)
        if suffix is None:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not an AdaLoRA tensor of a linear layer "
                f"(expected {PREFIX}<module>.lora_A / .lora_E / .lora_B)"
            )
        modules.setdefault(key[len(PREFIX) : -len(suffix)], {})[SUFFIXES[suffix]] = value
    targets, excluded = config["target_modules"], config.get("exclude_modules")
    targeted = sorted(m for m in kernels if lora_format.peft_targets_match(m, targets, excluded))
    if not targeted:
        raise AdapterFormatError(f"{source}: target_modules selects no linear layer")
    init_r = int(config.get("init_r", DEFAULT_INIT_R))
    pattern = dict(config.get("rank_pattern") or {})
    unknown = sorted(set(pattern) - {_pattern_key(m) for m in modules})
    if unknown:
        raise AdapterFormatError(
            f"{source}: rank_pattern key {unknown[0]!r} is not '<module>.lora_E' of a module "
            "with AdaLoRA tensors in the file"
        )
    out = {}
    for module, parts in sorted(modules.items()):
        if module not in kernels:
            raise AdapterFormatError(f"{source}: module {module!r} is not a linear layer")
        if module not in targeted:
            raise AdapterFormatError(
                f"{source}: module {module!r} has AdaLoRA tensors but target_modules="
                f"{targets!r} does not select it (PEFT would silently drop them)"
            )
        keep = pattern.get(_pattern_key(module), [True] * init_r)
        if len(keep) != init_r or not all(isinstance(k, bool) for k in keep):
            raise AdapterFormatError(
                f"{source}: rank_pattern[{_pattern_key(module)!r}] is not {init_r} booleans "
                f"(init_r={init_r})"
            )
        k = sum(keep)
        fan_in, fan_out = kernels[module][-2:]
        want = {"a": (k, fan_in), "e": (k, 1), "b": (fan_out, k)}
        for name, shape in want.items():
            got = tuple(parts[name].shape) if name in parts else None
            if got != shape:
                raise AdapterFormatError(
                    f"{source}: module {module!r} has lora_{name.upper()} of shape {got}; PEFT "
                    f"expects {shape} (init_r={init_r}, {k} triplets kept by rank_pattern)"
                )
        kept = np.asarray(keep, bool)
        a = np.zeros((fan_in, init_r), np.float32)
        e = np.zeros(init_r, np.float32)
        b = np.zeros((init_r, fan_out), np.float32)
        a[:, kept] = np.asarray(parts["a"], np.float32).T
        e[kept] = np.asarray(parts["e"], np.float32)[:, 0]
        b[kept] = np.asarray(parts["b"], np.float32).T
        out[module] = (a, e, b)
    missing = [m for m in targeted if m not in modules]
    if missing:
        raise AdapterFormatError(
            f"{source}: target_modules selects {missing[0]!r}, which has no AdaLoRA tensors "
            "(PEFT would give it a random init)"
        )
    return out


def save_adapter(cfg: ModelConfig, params, out_dir: str, **options) -> dict:
    """Writes the AdaLoRA leaves of `params` as PEFT AdaLoRA files; returns the
    config. `options=` the method's options (schedule fields of the config).

    Example::

        save_adapter(model.cfg, trained_params, "run/adapter", options=method.config)
    """
    params = lora_format._unstacked(cfg, params)
    config, tensors = adapter_state(cfg, params, **options)
    _validate(config, tensors, lora_format.kernel_shapes(cfg, params), out_dir)
    lora_format.write_files(out_dir, config, tensors)
    return config


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rank_pattern(v) -> bool:
    return v is None or (
        isinstance(v, dict)
        and all(isinstance(k, str) and isinstance(x, list) for k, x in v.items())
    )


def _int_at_least(low):
    return lambda v: lora_format._is_int(v) and v >= low


# Every field of PEFT's AdaLoraConfig (peft 0.21: LoraConfig's and its own)
# and what the importer accepts for it.
_ADALORA_FIELDS = {
    "peft_type": (lambda v: v == "ADALORA", "'ADALORA'"),
    "init_r": (_int_at_least(1), "a positive int"),
    "rank_pattern": (_rank_pattern, "null or {'<module>.lora_E': [bool, ...]}"),
    "lora_alpha": (lambda v: _is_number(v) and v > 0,
                   "a number > 0 (PEFT scales by the rank for alpha <= 0, not reproduced)"),
    "lora_dropout": (lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "use_dora": (lambda v: v is False, "false (PEFT's AdaLoRA has no DoRA)"),
    # Only the init of modules missing from the file, which are refused anyway.
    "init_lora_weights": (lambda v: isinstance(v, bool), "a bool"),
    # Ignored by PEFT's AdaLoRA layers (scale alpha / init_r, rank init_r): bookkeeping.
    "r": (lambda v: True, "anything"),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
    # The training schedule: kept by the file, used by neither loader.
    "target_r": (_int_at_least(0), "an int >= 0"),
    "tinit": (_int_at_least(0), "an int >= 0"),
    "tfinal": (_int_at_least(0), "an int >= 0"),
    "deltaT": (_int_at_least(1), "a positive int"),
    "beta1": (_is_number, "a number"),
    "beta2": (_is_number, "a number"),
    "orth_reg_weight": (_is_number, "a number"),
    "total_step": (lambda v: v is None or lora_format._is_int(v), "an int"),
    # PEFT's AdaLoRA layers ignore it; a non-empty one says something PEFT does not do.
    "alpha_pattern": (lora_format._off, "null or empty"),
}  # fmt: skip
# The rest (targets, fan_in_fan_out, bookkeeping, features accepted only off)
# are LoraConfig's fields, read as for LoRA.
CONFIG_FIELDS = {
    **{k: v for k, v in lora_format.CONFIG_FIELDS.items() if k not in _ADALORA_FIELDS},
    **_ADALORA_FIELDS,
}


def load_adapter(cfg: ModelConfig, params, in_dir: str):
    """`params` (plain base params of `cfg`) with the AdaLoRA adapter of
    `in_dir` inserted: an `AdaLoraWeight` of rank `init_r` per adapted
    kernel, triplets dropped by `rank_pattern` back at `e = 0` (in the
    kernel's dtype); scanned params get stacked leaves. `peft.load_adapter`
    comes here for AdaLoRA files.

    Example::

        params = load_adapter(model.cfg, base_params, "hf_adalora_adapter/")
    """
    config, tensors = lora_format.read_adapter(in_dir, cfg)
    lora_format.check_config(config, in_dir, CONFIG_FIELDS, kind="AdaLoraConfig")
    flat = lora_format._unstacked(cfg, params)
    modules = _validate(config, tensors, lora_format.kernel_shapes(cfg, flat), in_dir)
    by_module = {lora_format._module(cfg, p): p for p in kernel_paths(flat)}
    kernels = dict(flatten_paths(flat))
    rate = float(config.get("lora_dropout") or 0.0)
    new = {}
    for module, (a, e, b) in modules.items():
        path = by_module[module]
        w = kernels[path]
        as_w = lambda x, w=w: jnp.asarray(x, w.dtype)  # noqa: E731
        new[path] = AdaLoraWeight(
            w,
            as_w(a),
            as_w(e),
            as_w(b),
            alpha=float(config.get("lora_alpha", DEFAULT_ALPHA)),
            dropout=rate,
        )
    out = replace_leaves(flat, new)
    return stack_layers(cfg, out) if cfg.scan_layers else out
