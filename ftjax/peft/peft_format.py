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
computation unchanged (`CONFIG_FIELDS`); any other field, including ones a
later PEFT adds, is refused by name rather than ignored.

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

PiSSA adapters only make sense on top of their residual base. `save_adapter`
refuses them; `export_adapter` (given the base params) rewrites them as a
rank-2r LoRA over the original weights first (see `pissa_to_lora`).
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
from ftjax.peft.base import AdapterFormatError, PeftError, flatten_paths, is_leaf, path_str
from ftjax.peft.dora import DoraWeight
from ftjax.peft.lora import MERGED_MODES, LoraWeight, lora_scale, pissa_to_lora_leaf
from ftjax.peft.methods import replace_leaves
from ftjax.peft.targets import kernel_paths

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_magnitude_vector": "m"}


def kernel_shapes(cfg: ModelConfig, params) -> dict[str, tuple[int, ...]]:
    """HF module name -> kernel shape `(in, out)` of every linear layer of
    `params` (what each format's importer checks a file's tensors against)."""
    flat = dict(flatten_paths(params))
    return {_module(cfg, p): tuple(flat[p].shape) for p in kernel_paths(params)}


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
) -> tuple[dict, dict[str, np.ndarray]]:
    """`(adapter_config, tensors)` for the LoRA/DoRA leaves of `params`.

    `lora_alpha` defaults to the value that reproduces the leaves' scale
    (`scale * r`, or `scale * sqrt(r)` with `use_rslora`); an explicit one must
    agree with it. `target_modules` defaults to the adapted module names.
    """
    params = _unstacked(cfg, params)
    leaves = [(p, x) for p, x in flatten_paths(params) if isinstance(x, LoraWeight)]
    if not leaves:
        raise AdapterFormatError("params: no LoRA/DoRA adapter to export")
    for path, leaf in leaves:
        if leaf.rewrites_base:
            raise AdapterFormatError(_pissa_refusal(f"params: {path}"))
    kinds = {(x.rank, x.scale, isinstance(x, DoraWeight), x.dropout) for _, x in leaves}
    if len(kinds) > 1:
        raise AdapterFormatError(
            "params: adapters differ in rank, scale, DoRA or dropout "
            f"({sorted(kinds)[:3]}); PEFT's rank_pattern/alpha_pattern are not written"
        )
    rank, scale, use_dora, rate = kinds.pop()
    if lora_alpha is None:
        lora_alpha = scale * (math.sqrt(rank) if use_rslora else rank)
    elif not math.isclose(lora_scale(lora_alpha, rank, use_rslora), scale, rel_tol=1e-6):
        raise AdapterFormatError(
            f"lora_alpha: {lora_alpha} with r={rank}, use_rslora={use_rslora} gives scale "
            f"{lora_scale(lora_alpha, rank, use_rslora)}, but the adapters use {scale}"
        )
    tensors: dict[str, np.ndarray] = {}
    adapted = []
    for path, leaf in leaves:
        module = _module(cfg, path)
        adapted.append(module)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.asarray(leaf.a).T
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.asarray(leaf.b).T
        if use_dora:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = np.asarray(leaf.m)
    if target_modules is None:
        others = [m for m in (_module(cfg, p) for p in kernel_paths(params)) if m not in adapted]
        target_modules = _minimal_targets(adapted, others)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": float(lora_alpha),
        "lora_dropout": float(rate),
        "target_modules": target_modules,
        "use_rslora": bool(use_rslora),
        "use_dora": bool(use_dora),
        "init_lora_weights": True,
        "bias": "none",
        # GPT-2's Conv1D stores (in, out); PEFT must know to transpose its delta.
        "fan_in_fan_out": get_family(cfg.model_type).fan_in_fan_out,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    return config, tensors


def _group(tensors: dict, source: str) -> dict[str, dict[str, np.ndarray]]:
    """{module: {"a"|"b"|"m": tensor}} from PEFT keys; refuses keys it cannot place."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not a LoRA/DoRA tensor of a linear layer "
                f"(expected {PREFIX}<module>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector)"
            )
        module = key[len(PREFIX) : -len(suffix)]
        modules.setdefault(module, {})[_SUFFIXES[suffix]] = value
    return modules


def _validate(config: dict, modules: dict, source: str):
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise AdapterFormatError(f"{source}: adapter_config.json lacks {field!r}")
    rank, use_dora = config["r"], bool(config.get("use_dora", False))
    targets, excluded = config["target_modules"], config.get("exclude_modules")
    for module, parts in sorted(modules.items()):
        if not peft_targets_match(module, targets, excluded):
            raise AdapterFormatError(
                f"{source}: module {module!r} has tensors but target_modules={targets!r}"
                + (f", exclude_modules={excluded!r}" if excluded else "")
                + " does not select it (PEFT would silently drop them)"
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
        if parts["a"].shape[0] != rank or parts["b"].shape[-1] != rank:
            raise AdapterFormatError(
                f"{source}: module {module!r} has lora_A {tuple(parts['a'].shape)} and lora_B "
                f"{tuple(parts['b'].shape)}, but r={rank} (rank_pattern is not supported)"
            )


def write_adapter(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """Writes the two files after checking that PEFT will read them as meant."""
    _validate(config, _group(tensors, out_dir), out_dir)
    write_files(out_dir, config, tensors)


def write_files(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """The two files as given (`write_adapter` checks LoRA's first)."""
    os.makedirs(out_dir, exist_ok=True)
    safetensors_io.save(tensors, os.path.join(out_dir, WEIGHTS_NAME), {"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _pissa_refusal(where: str) -> str:
    return (
        f"{where} is a PiSSA adapter: its frozen kernel is the residual W - s*a0@b0, so PEFT "
        "would apply a and b to the wrong base; export it with peft.export_adapter(cfg, params, "
        "dir, method=..., initial=base_params), or convert it first with peft.pissa_to_lora"
    )


def _method_options(method) -> dict:
    opts = getattr(method, "config", method)
    return opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)


# PEFT types with a layout of their own: peft_type -> the ftjax.peft module that
# writes (for its `LEAF_TYPES`) and reads them.
OTHER_FORMATS = {
    "IA3": "ia3_format",
    "VERA": "vera_format",
    "LOHA": "lycoris_format",
    "LOKR": "lycoris_format",
    "OFT": "oft_format",
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
    use_rslora, target_modules, base_model_name_or_path). Returns the config.
    PiSSA leaves are refused (see `export_adapter`). IA3, VeRA, LoHa and LoKr
    leaves are written in PEFT's layout for them (`OTHER_FORMATS`).

    Example::

        save_adapter(model.cfg, state_params, "run/adapter", method=config.method)
    """
    other = _other_format(leaves=[x for _, x in flatten_paths(params)])
    if other is not None:
        return other.save_adapter(cfg, params, out_dir, **options)
    if method is not None:
        opts = _method_options(method)
        if opts.get("init") == "pissa" and any(
            isinstance(x, LoraWeight) and x.rank == opts.get("rank")
            for _, x in flatten_paths(params)
        ):
            # Also catches leaves that lost their marker (a rank-r leaf of a
            # PiSSA run is unconverted; converted ones have rank 2r).
            raise AdapterFormatError(
                _pissa_refusal(f"params (method init 'pissa', rank {opts['rank']})")
            )
        if "alpha" in opts:
            options.setdefault("lora_alpha", float(opts["alpha"]))
            options.setdefault("use_rslora", bool(opts.get("rslora", False)))
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
            options.setdefault("use_rslora", bool(_method_options(method).get("rslora", False)))
            method = None
    return save_adapter(cfg, params, out_dir, method=method, **options)


def read_adapter(in_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """`(adapter_config, tensors)` as stored."""
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
# Features ftjax does not implement, accepted only at their off value:
_OFF = """rank_pattern alpha_pattern modules_to_save layers_to_transform layers_pattern
    megatron_config trainable_token_indices velora_config alora_invocation_tokens
    monteclora_config layer_replication target_parameters use_bdlora arrow_config
    kasa_config bias lora_bias use_qalora""".split()


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
    **{field: (_off, "null, false, empty or 'none'") for field in _OFF},
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
            raise AdapterFormatError(
                f"{source}: init_lora_weights={value!r} is not one of the inits that leave the "
                f"base weights unchanged ({accepted}), so A and B may be relative to a rewritten "
                "base; convert the adapter to plain LoRA first (PEFT: "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...))"
            )
        raise AdapterFormatError(
            f"{source}: {field}={value!r} is not supported by ftjax's importer (expected {expected})"
        )


def load_adapter(cfg: ModelConfig, params, in_dir: str, *, compute: str = "auto"):
    """`params` (plain base params of `cfg`) with the adapter of `in_dir` inserted.

    Each adapted kernel becomes a `LoraWeight` (or `DoraWeight`) with the scale
    the config implies; scanned params get stacked adapters. IA3, VeRA, LoHa
    and LoKr adapters (by `peft_type`) give their own leaves (`OTHER_FORMATS`).

    Example::

        params = load_adapter(model.cfg, base_params, "hf_adapter/")
        logits = model.apply({"params": params}, input_ids)
    """
    config, tensors = read_adapter(in_dir)
    other = _other_format(peft_type=config.get("peft_type") if isinstance(config, dict) else None)
    if other is not None:
        return other.load_adapter(cfg, params, in_dir)
    check_config(config, in_dir)
    modules = _group(tensors, in_dir)
    _validate(config, modules, in_dir)
    scale = lora_scale(config["lora_alpha"], config["r"], bool(config.get("use_rslora", False)))
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
        if "m" in parts:
            m = jnp.asarray(np.asarray(parts["m"]), dtype)
            new[path] = DoraWeight(w, a, b, m, scale, rate, compute)
        else:
            new[path] = LoraWeight(w, a, b, scale, rate, compute)
    out = replace_leaves(flat, new)
    return stack_layers(cfg, out) if cfg.scan_layers else out


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
