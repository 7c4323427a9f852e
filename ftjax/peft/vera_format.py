"""HF PEFT's VeRA adapter files, written and read for `VeraWeight` leaves.

PEFT stores, with no adapter name in the keys and the metadata
`{"format": "pt"}` (as for LoRA, `ftjax.peft.peft_format`):

    base_model.model.<module>.vera_lambda_b   (out,)
    base_model.model.<module>.vera_lambda_d   (r,)
    base_model.vera_A                         (r, in_max)   = a.T of the widest input
    base_model.vera_B                         (out_max, r)  = b.T of the widest output

the shared projections only with `save_projection: true` (PEFT's default);
without them PEFT regenerates the projections from `projection_prng_key`
with torch's generator, which ftjax does not reproduce, so such files are
refused. PEFT sizes `vera_A`/`vera_B` by the largest input and output among
the modules `target_modules` selects and slices them per layer; the writer
checks that every leaf's `a`, `b` are those slices of one shared pair.

Reading goes through an allow-list (`CONFIG_FIELDS`) of every `VeraConfig`
field; unknown fields and unimplemented values (`vera_dropout`, `bias`, ...)
are refused with their name.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ftjax.models.config import ModelConfig
from ftjax.models.hf import stack_layers
from ftjax.models.registry import get_family
from ftjax.peft import peft_format as lora_format
from ftjax.peft.base import AdapterFormatError, flatten_paths, is_leaf
from ftjax.peft.methods import replace_leaves
from ftjax.peft.targets import kernel_paths
from ftjax.peft.vera import VeraWeight

PREFIX = lora_format.PREFIX
SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"
SUFFIXES = {".vera_lambda_b": "lambda_b", ".vera_lambda_d": "lambda_d"}
LEAF_TYPES = (VeraWeight,)


def adapter_state(
    cfg: ModelConfig, params, *, d_initial: float = 0.1, base_model_name_or_path=None
) -> tuple[dict, dict[str, np.ndarray]]:
    """`(adapter_config, tensors)` for the VeRA leaves of `params`."""
    params = lora_format._unstacked(cfg, params)
    leaves = [(p, x) for p, x in flatten_paths(params) if isinstance(x, VeraWeight)]
    if not leaves:
        raise AdapterFormatError("params: no VeRA leaves to export")
    paths = {p for p, _ in leaves}
    other = next((p for p, x in flatten_paths(params) if is_leaf(x) and p not in paths), None)
    if other is not None:
        raise AdapterFormatError(
            f"params: {other} is another kind of weight leaf than VeRA; HF PEFT's VeRA files "
            "hold VeRA vectors over plain weights only"
        )
    ranks = sorted({x.rank for _, x in leaves})
    if len(ranks) > 1:
        raise AdapterFormatError(f"params: VeRA leaves differ in rank {ranks}; PEFT has one r")
    widest_in = max(leaves, key=lambda px: px[1].a.shape[-2])[1]
    widest_out = max(leaves, key=lambda px: px[1].b.shape[-1])[1]
    a_shared, b_shared = np.asarray(widest_in.a, np.float32), np.asarray(widest_out.b, np.float32)
    tensors: dict[str, np.ndarray] = {}
    for path, leaf in leaves:
        a, b = np.asarray(leaf.a, np.float32), np.asarray(leaf.b, np.float32)
        if not (
            np.array_equal(a, a_shared[: a.shape[0]])
            and np.array_equal(b, b_shared[:, : b.shape[1]])
        ):
            raise AdapterFormatError(
                f"params: {path}'s projections are not slices of one shared pair "
                "(PEFT stores a single vera_A and vera_B for all layers)"
            )
        module = lora_format._module(cfg, path)
        tensors[f"{PREFIX}{module}.vera_lambda_b"] = np.asarray(leaf.lambda_b)
        tensors[f"{PREFIX}{module}.vera_lambda_d"] = np.asarray(leaf.lambda_d)
    tensors[SHARED_A] = np.ascontiguousarray(a_shared.T)
    tensors[SHARED_B] = np.ascontiguousarray(b_shared.T)
    adapted = [lora_format._module(cfg, p) for p, _ in leaves]
    linear = [lora_format._module(cfg, p) for p in kernel_paths(params)]
    config = {
        "peft_type": "VERA",
        "task_type": lora_format.task_type(cfg),
        "base_model_name_or_path": base_model_name_or_path,
        "r": ranks[0],
        "target_modules": lora_format._minimal_targets(
            adapted, [m for m in linear if m not in adapted]
        ),
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": 0.0,
        "d_initial": float(d_initial),
        "fan_in_fan_out": get_family(cfg.model_type).fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    return config, tensors


def _validate(config, tensors, kernels, source, *, complete: bool):
    """`{module: {lambda_b, lambda_d}}, (A, B)`: every tensor a VeRA vector of a
    targeted linear module or a shared projection, with the shapes PEFT
    builds (projections sized by the largest targeted input and output)."""
    if config.get("target_modules") is None:
        raise AdapterFormatError(
            f"{source}: adapter_config.json lacks 'target_modules' (null means PEFT's "
            "per-architecture default, which ftjax does not guess)"
        )
    if SHARED_A not in tensors or SHARED_B not in tensors:
        raise AdapterFormatError(
            f"{source}: no {SHARED_A}/{SHARED_B} in the file (save_projection=false: PEFT "
            "regenerates them with torch's generator, which ftjax does not reproduce)"
        )
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        if key in (SHARED_A, SHARED_B):
            continue
        suffix = next((s for s in SUFFIXES if key.startswith(PREFIX) and key.endswith(s)), None)
        if suffix is None:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is not a VeRA tensor of a linear layer (expected "
                f"{PREFIX}<module>.vera_lambda_b / .vera_lambda_d, {SHARED_A}, {SHARED_B})"
            )
        modules.setdefault(key[len(PREFIX) : -len(suffix)], {})[SUFFIXES[suffix]] = value
    targeted = sorted(
        m
        for m in kernels
        if lora_format.peft_targets_match(
            m, config["target_modules"], config.get("exclude_modules")
        )
    )
    if not targeted:
        raise AdapterFormatError(f"{source}: target_modules selects no linear layer")
    r = int(config["r"])
    in_max = max(kernels[m][-2] for m in targeted)
    out_max = max(kernels[m][-1] for m in targeted)
    a, b = tensors[SHARED_A], tensors[SHARED_B]
    if tuple(a.shape) != (r, in_max) or tuple(b.shape) != (out_max, r):
        raise AdapterFormatError(
            f"{source}: vera_A {tuple(a.shape)} and vera_B {tuple(b.shape)} are not the "
            f"({r}, {in_max}) and ({out_max}, {r}) PEFT builds for r={r} and these targets"
        )
    for module, parts in sorted(modules.items()):
        if module not in kernels:
            raise AdapterFormatError(f"{source}: module {module!r} is not a linear layer")
        if module not in targeted:
            raise AdapterFormatError(
                f"{source}: module {module!r} has VeRA vectors but target_modules="
                f"{config['target_modules']!r} does not select it (PEFT would silently drop them)"
            )
        want = {"lambda_b": (kernels[module][-1],), "lambda_d": (r,)}
        for name, shape in want.items():
            got = tuple(parts[name].shape) if name in parts else None
            if got != shape:
                raise AdapterFormatError(
                    f"{source}: module {module!r} has vera_{name} of shape {got}; PEFT expects {shape}"
                )
    missing = [m for m in targeted if m not in modules]
    if complete and missing:
        raise AdapterFormatError(
            f"{source}: target_modules selects {missing[0]!r}, which has no VeRA vectors"
        )
    if missing and config.get("init_weights", True) is not True:
        raise AdapterFormatError(
            f"{source}: module {missing[0]!r} is targeted but has no VeRA vectors, and "
            "init_weights is false (PEFT would give it random ones)"
        )
    return modules, missing, a, b


def save_adapter(cfg: ModelConfig, params, out_dir: str, **options) -> dict:
    """Writes the VeRA leaves of `params` as PEFT VeRA files; returns the config.

    Example::

        save_adapter(model.cfg, trained_params, "run/adapter")
    """
    params = lora_format._unstacked(cfg, params)
    config, tensors = adapter_state(cfg, params, **options)
    _validate(config, tensors, lora_format.kernel_shapes(cfg, params), out_dir, complete=True)
    lora_format.write_files(out_dir, config, tensors)
    return config


_BOOKKEEPING = [*lora_format.BOOKKEEPING_FIELDS, "projection_prng_key"]

# Every field of PEFT's VeraConfig (peft 0.21) and what the importer accepts for it.
CONFIG_FIELDS = {
    "peft_type": (lambda v: v == "VERA", "'VERA'"),
    "r": (lambda v: lora_format._is_int(v) and v > 0, "a positive int"),
    "target_modules": (lora_format._names, "a regex, module names or 'all-linear'"),
    "exclude_modules": (lambda v: v is None or lora_format._names(v), "null or module names"),
    "save_projection": (lambda v: v is True, "true (the projections stored in the file)"),
    "vera_dropout": (lambda v: v in (0, 0.0, None), "0 (VeRA dropout is not implemented)"),
    # Only the init of vectors missing from the file; they are read from it.
    "d_initial": (lambda v: isinstance(v, (int, float)), "a number"),
    "init_weights": (lambda v: isinstance(v, bool), "a bool"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "a bool"),
    "bias": (lambda v: v in (None, "none"), "'none'"),
    "modules_to_save": (lora_format._off, "null or empty"),
    "layers_to_transform": (lora_format._off, "null"),
    "layers_pattern": (lora_format._off, "null"),
    **{field: (lambda v: True, "anything") for field in _BOOKKEEPING},
}


def load_adapter(cfg: ModelConfig, params, in_dir: str):
    """`params` (plain base params of `cfg`) with the VeRA adapter of `in_dir`
    inserted: a `VeraWeight` per adapted kernel, its projections the leading
    slices of the file's `vera_A`, `vera_B` (in the kernel's dtype); scanned
    params get stacked leaves. `peft.load_adapter` comes here for VeRA files.

    Example::

        params = load_adapter(model.cfg, base_params, "hf_vera_adapter/")
    """
    config, tensors = lora_format.read_adapter(in_dir, cfg)
    lora_format.check_config(config, in_dir, CONFIG_FIELDS, kind="VeraConfig")
    flat = lora_format._unstacked(cfg, params)
    modules, missing, a_t, b_t = _validate(config, tensors, lora_format.kernel_shapes(cfg, flat), in_dir,
                                           complete=False)  # fmt: skip
    a_shared, b_shared = np.asarray(a_t).T, np.asarray(b_t).T
    by_module = {lora_format._module(cfg, p): p for p in kernel_paths(flat)}
    kernels = dict(flatten_paths(flat))
    new = {}
    for module in sorted(modules) + missing:
        path = by_module[module]
        w = kernels[path]
        fan_in, fan_out = w.shape[-2:]
        parts = modules.get(module)
        if parts is None:  # PEFT's init for a targeted module without vectors
            d = np.full(int(config["r"]), float(config.get("d_initial", 0.1)))
            lb = np.zeros(fan_out)
        else:
            d, lb = np.asarray(parts["lambda_d"]), np.asarray(parts["lambda_b"])
        new[path] = VeraWeight(
            w,
            jnp.asarray(a_shared[:fan_in], w.dtype),
            jnp.asarray(b_shared[:, :fan_out], w.dtype),
            jnp.asarray(d, w.dtype),
            jnp.asarray(lb, w.dtype),
        )
    out = replace_leaves(flat, new)
    return stack_layers(cfg, out) if cfg.scan_layers else out
