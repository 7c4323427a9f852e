"""Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`.

For a JAX kernel `(in, out)` adapted as `y += s * x @ a @ b`, PEFT stores
`base_model.model.<module>.lora_A.weight = a.T` `(r, in)`,
`...lora_B.weight = b.T` `(out, r)` and, for DoRA,
`...lora_magnitude_vector = m` `(out,)`, where `<module>` is the module's
name in the `transformers` model (`model.layers.0.self_attn.q_proj`) and no
adapter name appears. The file carries the metadata `{"format": "pt"}`.

PEFT loads leniently: it silently drops tensors of modules that
`target_modules` does not match (or `exclude_modules` does) and ignores
magnitudes when `use_dora` is false. `write_adapter` therefore checks both
itself and refuses. On import, every field of `adapter_config.json` must be
one ftjax implements, or bookkeeping, or at the value that leaves LoRA's
computation unchanged (`LORA_CONFIG_FIELDS`); any other field, including ones
a later PEFT adds, is refused by name rather than ignored. Per-module ranks,
trained biases, modules to save and layer subsets are PEFT's `rank_pattern`,
`alpha_pattern`, `bias`, `modules_to_save` and `layers_to_transform`
(`ftjax.peft.lora_fields`, `ftjax.peft.lora_fields_format`).

    >>> import jax, numpy as np
    >>> from ftjax.peft import build_method
    >>> method = build_method({"name": "lora", "rank": 4, "alpha": 8, "targets": "qv"})
    >>> adapted = method.apply(params, jax.random.key(0))
    >>> config = export_adapter(model.cfg, adapted, "out/adapter", method=method)  # to PyTorch
    >>> config["r"], config["lora_alpha"], config["target_modules"]
    (4, 8.0, ['q_proj', 'v_proj'])
    >>> sorted(os.listdir("out/adapter"))
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> loaded = load_adapter(model.cfg, params, "out/adapter")                   # and back
    >>> q = lambda p: p["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    >>> np.array_equal(q(loaded).a, q(adapted).a), q(loaded).scale
    (True, 2.0)

(`model`, `params`: a tiny random Llama and its params, set up by
tests/test_doctests.py.)

PiSSA (and OLoRA) adapters only make sense on top of their residual base.
`save_adapter` refuses them; `export_adapter` (given the base params) rewrites
them as a rank-2r LoRA over the original weights first (see `pissa_to_lora`).
`load_adapter` recomputes the residual of a file saved with
`init_lora_weights` "pissa" or "olora", as PEFT's loader does.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models import safetensors_io
from ftjax.models.config import ModelConfig
from ftjax.models.hf import hf_name, stack_layers, unstack_layers
from ftjax.models.registry import get_family
from ftjax.peft import lora_fields, lora_fields_format, task_head
from ftjax.peft.adapter_config import (  # noqa: F401  (re-exported)
    _BOOKKEEPING,
    _INIT_REFUSALS,
    _OFF,
    BASE_PRESERVING_INITS,
    BOOKKEEPING_FIELDS,
    CONFIG_FIELDS,
    CONFIG_NAME,
    LORA_CONFIG_FIELDS,
    LORA_FIELDS,
    RECOMPUTED_INITS,
    _base_preserving,
    _is_int,
    _layers,
    _mapping,
    _names,
    _off,
    check_config,
)
from ftjax.peft.base import AdapterFormatError, PeftError, flatten_paths, is_leaf, path_str
from ftjax.peft.dora import DoraWeight
from ftjax.peft.lora import (
    MERGED_MODES,
    LoraWeight,
    is_base_rewriting,
    lora_scale,
    pissa_to_lora_leaf,
    rewriting_factors,
)
from ftjax.peft.methods import replace_leaves
from ftjax.peft.targets import kernel_paths

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_magnitude_vector": "m"}


def kernel_shapes(cfg: ModelConfig, params) -> dict[str, tuple[int, ...]]:
    """HF module name -> kernel shape `(in, out)` of every linear layer of
    `params` (what each format's importer checks a file's tensors against)."""
    flat = dict(flatten_paths(params))
    return {_module(cfg, p): tuple(flat[p].shape) for p in kernel_paths(params)}


# HF PEFT's `task_type` by the model's head: it picks the PeftModel class
# `PeftModel.from_pretrained` builds (and which head modules PEFT saves).
TASK_TYPES = {"sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}


def task_type(cfg: ModelConfig) -> str:
    """`task_type` of an adapter of a model with `cfg`'s head."""
    if cfg.task:
        return TASK_TYPES[cfg.task]
    return get_family(cfg.model_type).peft_task_type


def _module(cfg: ModelConfig, path: str) -> str:
    name, _ = hf_name(cfg.replace(scan_layers=False), tuple(path.split("/")))
    return name.removesuffix(".weight")


def _unstacked(cfg: ModelConfig, params):
    return unstack_layers(cfg, params) if cfg.scan_layers else params


ALL_LINEAR = "all-linear"
# The output head every supported family has; PEFT's "all-linear" leaves it out.
OUTPUT_HEAD = "lm_head"


def _names_match(module: str, names) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches a name or a dotted suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == t or module.endswith("." + t) for t in names)


def peft_targets_match(module: str, target_modules, exclude_modules=None) -> bool:
    """Whether PEFT adapts a module under `target_modules` (a regex, a list of
    names or dotted suffixes, or "all-linear": every linear layer but the
    output head) and `exclude_modules` (same rules, no shorthand)."""
    if exclude_modules and _names_match(module, exclude_modules):
        return False
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        return module != OUTPUT_HEAD and not module.endswith("." + OUTPUT_HEAD)
    return _names_match(module, target_modules)


def _minimal_targets(adapted: list[str], others: list[str]) -> list[str]:
    """Shortest dotted suffixes that match every adapted module and no other
    linear module (GPT-2's `c_proj` is both `attn.c_proj` and `mlp.c_proj`)."""
    out = set()
    for module in adapted:
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(peft_targets_match(o, [suffix]) for o in others):
                out.add(suffix)
                break
    return sorted(out)


def adapter_state(
    cfg: ModelConfig,
    params,
    *,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    target_modules=None,
    base_model_name_or_path: str | None = None,
    trained=None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """`(adapter_config, tensors)` for the LoRA/DoRA leaves of `params`.

    `lora_alpha` defaults to the most common value that reproduces the
    leaves' scales (`scale * r`, or `scale * sqrt(r)` with `use_rslora`); an
    explicit one must be some leaf's. Leaves of other ranks or alphas are
    written as `rank_pattern` / `alpha_pattern`. `target_modules` defaults to
    the adapted module names. `trained`: the method's options, for the biases
    and modules to save it trains (`bias`, `modules_to_save`).
    """
    params = _unstacked(cfg, params)
    leaves = [(p, x) for p, x in flatten_paths(params) if isinstance(x, LoraWeight)]
    if not leaves:
        raise AdapterFormatError("params: no LoRA/DoRA adapter to export")
    for path, leaf in leaves:
        if leaf.rewrites_base:
            raise AdapterFormatError(_pissa_refusal(f"params: {path}"))
    kinds = {(isinstance(x, DoraWeight), x.dropout) for _, x in leaves}
    if len(kinds) > 1:
        raise AdapterFormatError(
            f"params: adapters differ in DoRA or dropout ({sorted(kinds)[:3]}); a PEFT LoraConfig "
            "has one use_dora and one lora_dropout"
        )
    use_dora, rate = kinds.pop()
    if lora_alpha is not None and not any(
        math.isclose(lora_scale(lora_alpha, x.rank, use_rslora), x.scale, rel_tol=1e-6)
        for _, x in leaves
    ):
        rank, scale = leaves[0][1].rank, leaves[0][1].scale
        raise AdapterFormatError(
            f"lora_alpha: {lora_alpha} with r={rank}, use_rslora={use_rslora} gives scale "
            f"{lora_scale(lora_alpha, rank, use_rslora)}, but the adapters use {scale}"
        )
    root = math.sqrt if use_rslora else float
    sizes = {_module(cfg, p): (x.rank, x.scale * root(x.rank)) for p, x in leaves}
    tensors: dict[str, np.ndarray] = {}
    adapted = []
    for path, leaf in leaves:
        module = _module(cfg, path)
        adapted.append(module)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.asarray(leaf.a).T
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.asarray(leaf.b).T
        if use_dora:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = np.asarray(leaf.m)
    layers = {"layers_to_transform": None, "layers_pattern": None}
    if target_modules is None:
        linear = [_module(cfg, p) for p in kernel_paths(params)]
        subset = lora_fields_format.layer_subset(adapted, linear, _minimal_targets)
        if subset is not None:  # some layers only: PEFT's layers_to_transform
            layers = subset
            target_modules = layers.pop("target_modules")
        else:
            target_modules = _minimal_targets(adapted, [m for m in linear if m not in adapted])
    extra_config, extra_tensors = {"bias": "none", "modules_to_save": None}, {}
    if trained is not None:
        extra_config, extra_tensors = lora_fields_format.extra_state(cfg, params, trained)
    config = {
        "peft_type": "LORA",
        "task_type": task_type(cfg),
        "base_model_name_or_path": base_model_name_or_path,
        **lora_fields_format.pattern_config(sizes, lora_alpha),
        "lora_dropout": float(rate),
        "target_modules": target_modules,
        "use_rslora": bool(use_rslora),
        "use_dora": bool(use_dora),
        "init_lora_weights": True,
        # GPT-2's Conv1D stores (in, out); PEFT must know to transpose its delta.
        "fan_in_fan_out": get_family(cfg.model_type).fan_in_fan_out,
        "inference_mode": True,
        **layers,
        **extra_config,
    }
    return config, {**tensors, **extra_tensors}


def _group(tensors: dict, source: str, extras: dict | None = None):
    """{module: {"a"|"b"|"m": tensor}} from PEFT keys. Other keys go to
    `extras` (biases, modules to save: `_validate` checks them) when given,
    and are refused otherwise."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if key.startswith(PREFIX) and suffix is None and extras is not None:
            extras[key] = value
            continue
        if not key.startswith(PREFIX) or suffix is None:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not a LoRA/DoRA tensor of a linear layer "
                f"(expected {PREFIX}<module>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector)"
            )
        module = key[len(PREFIX) : -len(suffix)]
        modules.setdefault(module, {})[_SUFFIXES[suffix]] = value
    return modules


def _selection(config: dict) -> str:
    """How the config selects modules, for an error line."""
    out = f"target_modules={config['target_modules']!r}"
    for field in ("exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
        if config.get(field) not in (None, [], ""):
            out += f", {field}={config[field]!r}"
    return out


def _validate(config: dict, modules: dict, source: str, extras: dict | None = None):
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise AdapterFormatError(f"{source}: adapter_config.json lacks {field!r}")
    use_dora = bool(config.get("use_dora", False))
    for module, parts in sorted(modules.items()):
        if not lora_fields.peft_adapts(module, config):
            raise AdapterFormatError(
                f"{source}: module {module!r} has tensors but {_selection(config)} does not "
                "select it (PEFT would silently drop them)"
            )
        if "m" in parts and not use_dora:
            raise AdapterFormatError(
                f"{source}: module {module!r} has a lora_magnitude_vector but use_dora is false "
                "(PEFT would silently ignore the DoRA magnitudes)"
            )
        if use_dora and "m" not in parts:
            raise AdapterFormatError(
                f"{source}: use_dora is true but module {module!r} has no lora_magnitude_vector"
            )
        if "a" not in parts or "b" not in parts:
            raise AdapterFormatError(f"{source}: module {module!r} lacks lora_A or lora_B")
        rank = lora_fields.pattern_value(config.get("rank_pattern"), module, config["r"])
        if parts["a"].shape[0] != rank or parts["b"].shape[-1] != rank:
            raise AdapterFormatError(
                f"{source}: module {module!r} has lora_A {tuple(parts['a'].shape)} and lora_B "
                f"{tuple(parts['b'].shape)}, but its rank is {rank} (r={config['r']}, "
                f"rank_pattern={config.get('rank_pattern') or {}!r})"
            )
    bias, save = config.get("bias") or "none", config.get("modules_to_save") or []
    for key in sorted(extras or {}):
        name = key[len(PREFIX) :]
        if name.endswith(".base_layer.bias"):
            ok = bias != "none" and name[: -len(".base_layer.bias")] in modules
        else:
            module = name.rsplit(".", 1)[0]
            ok = (
                lora_fields.saved_by_peft(module, save)
                or (bias == "all" and name.endswith(".bias"))
                or (config.get("ensure_weight_tying") and bool(save))
            )  # PEFT's tied head copy
        if not ok:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is neither a LoRA tensor, a bias that bias={bias!r} "
                f"saves, nor in modules_to_save={save or None!r} (PEFT would not load it as meant)"
            )


def write_adapter(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Writes the two files after checking that PEFT will read them as meant."""
    extras: dict = {}
    _validate(config, _group(tensors, out_dir, extras), out_dir, extras)
    write_files(out_dir, config, tensors)


def write_files(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """The two files as given (`write_adapter` checks LoRA's first)."""
    os.makedirs(out_dir, exist_ok=True)
    safetensors_io.save(tensors, os.path.join(out_dir, WEIGHTS_NAME), {"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _pissa_refusal(where: str) -> str:
    return (
        f"{where} is a PiSSA adapter (or OLoRA: an init that rewrites the base): its frozen "
        "kernel is the residual W - s*a0@b0, so PEFT "
        "would apply a and b to the wrong base; export it with peft.export_adapter(cfg, params, "
        "dir, method=..., initial=base_params), or convert it first with peft.pissa_to_lora"
    )


def _method_options(method) -> dict:
    opts = getattr(method, "config", method)
    return opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)


# PEFT types with a layout of their own: peft_type -> the ftjax.peft module that
# writes (for its `LEAF_TYPES`) and reads them.
OTHER_FORMATS = {
    "ADALORA": "adalora_format",
    "IA3": "ia3_format",
    "VERA": "vera_format",
    "LOHA": "lycoris_format",
    "LOKR": "lycoris_format",
    "OFT": "oft_format",
    "PROMPT_TUNING": "prompt_format",
    "PREFIX_TUNING": "prompt_format",
}


def _other_format(*, leaves=(), peft_type=None):
    """The format module for `peft_type`, or for the first of `leaves` one of
    them writes; None for LoRA (this module)."""
    import importlib

    if peft_type is not None:
        name = OTHER_FORMATS.get(peft_type)
        return importlib.import_module(f"ftjax.peft.{name}") if name else None
    for name in dict.fromkeys(OTHER_FORMATS.values()):
        module = importlib.import_module(f"ftjax.peft.{name}")
        if any(isinstance(x, module.LEAF_TYPES) for x in leaves):
            return module
    return None


def save_adapter(cfg: ModelConfig, params, out_dir: str, *, method=None, **options) -> dict:
    """Exports the adapters of `params` for `peft.PeftModel.from_pretrained`.

    `method` (a method config or `Method`) supplies `lora_alpha` and
    `use_rslora` as configured; `options` go to `adapter_state` (lora_alpha,
    use_rslora, target_modules, base_model_name_or_path, trained: the method's
    options, whose `bias` and `modules_to_save` are saved too). Returns the config.
    PiSSA leaves are refused (see `export_adapter`). IA3, VeRA, LoHa and LoKr
    leaves are written in PEFT's layout for them (`OTHER_FORMATS`).

    Example::

        save_adapter(model.cfg, state_params, "run/adapter", method=config.method)
    """
    config = _save_adapter(cfg, params, out_dir, method=method, **options)
    if task_head.get_head(cfg) is not None:
        # Every format's files get the trained head (PEFT's modules_to_save).
        config, tensors = read_adapter(out_dir)
        flat = {p: x for p, x in flatten_paths(_unstacked(cfg, params)) if not is_leaf(x)}
        task_head.add_to_adapter(cfg, flat, config, tensors)
        write_files(out_dir, config, tensors)
    return config


def _save_adapter(cfg: ModelConfig, params, out_dir: str, *, method=None, **options) -> dict:
    other = _other_format(leaves=[x for _, x in flatten_paths(params)])
    if other is not None:
        return other.save_adapter(cfg, params, out_dir, **options)
    if method is not None:
        opts = _method_options(method)
        if (
            is_base_rewriting(opts.get("init"))
            and not opts.get("rank_pattern")
            and any(
                isinstance(x, LoraWeight) and x.rank == opts.get("rank")
                for _, x in flatten_paths(params)
            )
        ):
            # Also catches leaves that lost their marker (a rank-r leaf of a
            # PiSSA run is unconverted; converted ones have rank 2r).
            raise AdapterFormatError(
                _pissa_refusal(f"params (method init {opts['init']!r}, rank {opts['rank']})")
            )
        if "alpha" in opts:
            options.setdefault("lora_alpha", float(opts["alpha"]))
            options.setdefault("use_rslora", bool(opts.get("rslora", False)))
        if "bias" in opts or "modules_to_save" in opts:
            options.setdefault("trained", opts)
    config, tensors = adapter_state(cfg, params, **options)
    write_adapter(out_dir, config, tensors)
    return config


def export_adapter(
    cfg: ModelConfig, params, out_dir: str, *, method=None, initial=None, **options
) -> dict:
    """`save_adapter`, first rewriting PiSSA leaves as plain LoRA over the base.

    `initial` is the plain base params the run started from (or the adapted
    params at step 0, `method.apply(base, rng)`), in the layout of `params`;
    it is needed only when there are PiSSA leaves, which become rank-2r
    LoRA with the same scale (`lora_alpha` doubles, or grows by sqrt(2) with
    rsLoRA, as in PEFT's own conversion). Returns the written config.

    Example (see the module docstring for one that runs)::

        export_adapter(model.cfg, trained_params, "run/adapter", method=method,
                       initial=base_params)
    """
    pissa = any(isinstance(x, LoraWeight) and x.rewrites_base for _, x in flatten_paths(params))
    if pissa:
        if initial is None:
            raise AdapterFormatError(_pissa_refusal("params") + " (initial= is missing)")
        params = pissa_to_lora(params, initial)
        if method is not None:
            # The converted rank is 2r: alpha follows from the unchanged scale.
            opts = _method_options(method)
            options.setdefault("use_rslora", bool(opts.get("rslora", False)))
            if "bias" in opts or "modules_to_save" in opts:
                options.setdefault("trained", opts)
            method = None
    return save_adapter(cfg, params, out_dir, method=method, **options)


def read_adapter(in_dir: str, cfg: ModelConfig | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """`(adapter_config, tensors)` as stored; with `cfg`, without the task head
    (`ftjax.peft.task_head`, which `load_adapter` installs for every format)."""
    if cfg is not None:
        config, tensors = read_adapter(in_dir)
        config, tensors, _ = task_head.split_from_adapter(cfg, config, tensors, in_dir)
        return config, tensors
    config_path = os.path.join(in_dir, CONFIG_NAME)
    weights_path = os.path.join(in_dir, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterFormatError(f"{path}: missing (not a PEFT adapter directory)")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise AdapterFormatError(f"{config_path}: invalid JSON ({e})") from None
    return config, safetensors_io.load(weights_path)


# The LoraConfig allow-list lives in ftjax.peft.adapter_config (re-exported).


def load_adapter(cfg: ModelConfig, params, in_dir: str, *, compute: str = "auto"):
    """`params` (plain base params of `cfg`) with the adapter of `in_dir` inserted.

    Each adapted kernel becomes a `LoraWeight` (or `DoraWeight`) with the scale
    the config implies; scanned params get stacked adapters. IA3, VeRA, LoHa
    and LoKr adapters (by `peft_type`) give their own leaves (`OTHER_FORMATS`).

    Example::

        params = load_adapter(model.cfg, base_params, "hf_adapter/")
        logits = model.apply({"params": params}, input_ids)
    """
    adapted = _load_adapter(cfg, params, in_dir, compute=compute)
    if task_head.get_head(cfg) is None:
        return adapted
    config, tensors = read_adapter(in_dir)
    _, _, head = task_head.split_from_adapter(cfg, config, tensors, in_dir)
    flat = dict(flatten_paths(_unstacked(cfg, adapted)))
    loaded = task_head.load_head(cfg, flat, head, os.path.join(in_dir, WEIGHTS_NAME))
    new = {p: jnp.asarray(v) for p, v in loaded.items() if p in head_paths_of(flat)}
    out = replace_leaves(_unstacked(cfg, adapted), new)
    return stack_layers(cfg, out) if cfg.scan_layers else out


def head_paths_of(flat: dict) -> list[str]:
    return task_head.head_paths([p for p, x in flat.items() if not is_leaf(x)])


def _load_adapter(cfg: ModelConfig, params, in_dir: str, *, compute: str = "auto"):
    config, tensors = read_adapter(in_dir, cfg)
    other = _other_format(peft_type=config.get("peft_type") if isinstance(config, dict) else None)
    if other is not None:
        return other.load_adapter(cfg, params, in_dir)
    check_config(config, in_dir, LORA_CONFIG_FIELDS)
    extras: dict = {}
    modules = _group(tensors, in_dir, extras)
    _validate(config, modules, in_dir, extras)
    init = _recomputed_init(cfg, config, in_dir)
    rslora = bool(config.get("use_rslora", False))
    rate = float(config.get("lora_dropout", 0.0) or 0.0) if compute not in MERGED_MODES else 0.0
    flat = _unstacked(cfg, params)
    by_module = {_module(cfg, p): p for p in kernel_paths(flat)}
    kernels = dict(flatten_paths(flat))
    new = {}
    for module, parts in sorted(modules.items()):
        if module not in by_module:
            raise AdapterFormatError(
                f"{in_dir}: module {module!r} is not a linear layer of this {cfg.model_type} model"
            )
        path = by_module[module]
        w = kernels[path]
        dtype = w.dtype
        a, b = np.asarray(parts["a"]).T, np.asarray(parts["b"]).T
        if (a.shape[0], b.shape[1]) != tuple(w.shape[-2:]):
            raise AdapterFormatError(
                f"{in_dir}: module {module!r} adapter is {a.shape[0]}->{b.shape[1]}, "
                f"but the kernel is {tuple(w.shape)}"
            )
        a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        rank = a.shape[-1]
        alpha = lora_fields.pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        scale = lora_scale(alpha, rank, rslora)
        if init is not None:
            # PEFT's loader runs the init on the base before loading A and B.
            w = rewriting_factors(init, w, rank, scale)[0]
        if "m" in parts:
            m = jnp.asarray(np.asarray(parts["m"]), dtype)
            new[path] = DoraWeight(w, a, b, m, scale, rate, compute, init)
        else:
            new[path] = LoraWeight(w, a, b, scale, rate, compute, init)
    trained = lora_fields_format.load_extras(cfg, flat, config, extras, set(modules), in_dir)
    new.update({p: jnp.asarray(x, kernels[p].dtype) for p, x in trained.items()})
    out = replace_leaves(flat, new)
    if not cfg.scan_layers:
        return out
    _check_stackable(cfg, new, in_dir)
    return stack_layers(cfg, out)


def _recomputed_init(cfg: ModelConfig, config: dict, source: str):
    """The base-rewriting init whose residual the importer recomputes, or None."""
    init = config.get("init_lora_weights", True)
    if init not in RECOMPUTED_INITS:
        return None
    if init == "olora" and get_family(cfg.model_type).fan_in_fan_out:
        raise AdapterFormatError(
            f"{source}: init_lora_weights='olora' on {cfg.model_type}'s Conv1D layers: PEFT's "
            "OLoRA factors the (in, out) weight untransposed, which its own layers cannot apply"
        )
    return init


def _check_stackable(cfg: ModelConfig, new: dict, source: str):
    """Scanned params stack one leaf per layer: each adapted module needs an
    adapter of one rank and scale in every layer."""
    kinds: dict[str, list] = {}
    for path, x in new.items():
        where = lora_fields.layer_of(path)
        if where[0] and is_leaf(x):
            kind = re.sub(r"_\d+/", "/", path, count=1)
            kinds.setdefault(kind, []).append(
                (type(x).__name__, getattr(x, "rank", None), getattr(x, "scale", None))
            )
    for kind, found in sorted(kinds.items()):
        if len(found) != cfg.num_layers or len(set(found)) > 1:
            raise AdapterFormatError(
                f"{source}: {kind} is adapted in {len(found)} of {cfg.num_layers} layers or with "
                "different ranks or scales (layers_to_transform / rank_pattern), which a scanned "
                "model's stacked kernel cannot hold; load it with scan_layers=False"
            )


def pissa_to_lora(params, initial):
    """Rewrites trained PiSSA adapters as plain LoRA over the original weights.

    `initial` is, in the layout of `params`, either the plain base params the
    run started from or the tree PiSSA's `apply` returned before training
    (`method.apply(base_params, rng)`; PiSSA's init is deterministic). Each
    PiSSA leaf becomes rank 2r: `a' = [a, a0]`, `b' = [b; -b0]`, `w' = W`
    (`pissa_to_lora_leaf`); other leaves are kept. Runs outside `jit`.

    Example::

        lora_params = pissa_to_lora(trained_params, base_params)
        save_adapter(model.cfg, lora_params, "out")
    """

    def convert(keypath, leaf, start):
        if isinstance(leaf, LoraWeight) and leaf.rewrites_base:
            try:
                return pissa_to_lora_leaf(leaf, start, path_str(keypath))
            except PeftError as e:
                raise AdapterFormatError(f"initial: {e}") from None
        return leaf

    try:
        return jax.tree_util.tree_map_with_path(convert, params, initial, is_leaf=is_leaf)
    except ValueError as e:
        if isinstance(e, PeftError):
            raise
        raise AdapterFormatError(
            f"initial: not a params tree of the same model and layout as params ({e})"
        ) from None
