"""The registry of fine-tuning methods, each built from a config.

A method is data plus two pure functions: `apply(params, rng) -> params`
(replace the targeted kernels by weight leaves) and `select(paths) -> paths`
(which plain arrays train). Everything else (`split`, `count`, adapter
extraction) is generic and lives in `ftjax.peft.tree`.

    >>> method = build_method({"name": "lora", "rank": 8, "alpha": 16, "targets": "qv"})
    >>> params = method.apply(params, jax.random.key(0))
    >>> trainable, frozen = method.split(params)

Methods and their options (defaults in `DEFAULTS`):

- `full`: everything trains.
- `lora`: rank, alpha, rslora (scale alpha/sqrt(r) instead of alpha/r), dropout,
  init (`kaiming` | `gaussian` | `pissa`), targets (see `ftjax.peft.targets`),
  compute (`auto` | `factored` | `merged` | `hybrid`, see `ftjax.peft.lora`), dtype (adapter dtype; default the kernel's).
- `dora`: the same options; a DoRA leaf per target.
- `qlora`: the same, plus quantize (targets whose base becomes NF4, default
  `all-linear`) and double_quant. Targets default to `all-linear` as in QLoRA.
- `bitfit`: the biases train (and the norm scales, in a model without biases).
- `freeze`: only the parameters matching the regex `trainable` train, and/or
  those of the last `last_layers` decoder layers (unscanned params only).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from ftjax.peft import targets as targets_lib
from ftjax.peft import tree
from ftjax.peft.base import PeftError, UnknownMethodError, is_leaf, path_str
from ftjax.peft.dora import from_lora
from ftjax.peft.lora import INITS, check_compute, init_lora, lora_scale
from ftjax.peft.quant import quantize_nf4

_LORA = dict(
    rank=8,
    alpha=16.0,
    rslora=False,
    dropout=0.0,
    init="kaiming",
    targets="qv",
    compute="auto",
    dtype=None,
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": dict(_LORA),
    "dora": dict(_LORA),
    "qlora": {**_LORA, "targets": "all-linear", "quantize": "all-linear", "double_quant": True},
    "bitfit": {},
    "freeze": dict(trainable=None, last_layers=None),
}


class Method(NamedTuple):
    """A built method: its resolved config and its two pure functions."""

    name: str
    config: Mapping[str, Any]
    apply: Callable[[Any, jax.Array], Any]
    select: tree.Selector

    def split(self, params):
        """`(trainable, frozen)` for this method (see `ftjax.peft.tree.split`)."""
        return tree.split_with(params, self.select)

    def count(self, params) -> tuple[int, int]:
        """`(trainable, total)` parameter counts under this method."""
        return tree.count_with(params, self.select)

    def adapter_params(self, params) -> dict:
        """The trainable arrays as a plain nested dict (small checkpoints)."""
        return tree.adapter_params_with(params, self.select)


def known_methods() -> tuple[str, ...]:
    return tuple(sorted(DEFAULTS))


def resolve_config(config) -> dict[str, Any]:
    """The method config as a dict with defaults filled in, validated field by field."""
    if isinstance(config, str):
        config = {"name": config}
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    config = dict(config)
    name = config.pop("name", None)
    if name not in DEFAULTS:
        raise UnknownMethodError(
            f"method.name: unknown method {name!r}; known: {', '.join(known_methods())}"
        )
    defaults = DEFAULTS[name]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise PeftError(
            f"method.{unknown[0]}: not an option of method {name!r}; options: "
            f"{', '.join(sorted(defaults)) or '(none)'}"
        )
    opts = {**defaults, **config}
    if "rank" in opts:
        _check_lora_options(opts)
    if name == "freeze" and not opts["trainable"] and not opts["last_layers"]:
        raise PeftError(
            "method.trainable: method 'freeze' needs a regex `trainable` or `last_layers`"
        )
    return {"name": name, **opts}


def _check_lora_options(opts):
    rank = opts["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PeftError(f"method.rank: must be a positive integer, got {rank!r}")
    if not 0.0 <= float(opts["dropout"]) < 1.0:
        raise PeftError(f"method.dropout: must be in [0, 1), got {opts['dropout']!r}")
    if opts["init"] not in INITS:
        raise PeftError(f"method.init: {opts['init']!r} is not one of {', '.join(INITS)}")
    check_compute(opts["compute"], float(opts["dropout"]))
    spec = opts["targets"]
    if not isinstance(spec, str) and not (
        isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec)
    ):
        raise PeftError(f"method.targets: expected a preset, a regex or module names, got {spec!r}")


def build_method(config) -> Method:
    """Builds a method from a dict, an `ml_collections.ConfigDict` or a name.

    >>> build_method({"name": "lora", "rank": 4, "alpha": 8}).config["rank"]
    4
    >>> build_method("lroa")   # UnknownMethodError: method.name: unknown method 'lroa'; known: ...
    """
    opts = resolve_config(config)
    name = opts["name"]
    if name == "full":
        return Method(name, opts, _identity, lambda paths: set(paths))
    if name in ("lora", "dora", "qlora"):
        return Method(name, opts, _adapter_apply(name, opts), lambda paths: set())
    if name == "bitfit":
        return Method(name, opts, _identity, _bitfit_select)
    return Method(name, opts, _identity, _freeze_select(opts))


def _identity(params, rng):
    del rng
    return params


def replace_leaves(params, new: Mapping[str, Any]):
    """`params` with the leaves at the given `/`-joined paths replaced."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
    return treedef.unflatten([new.get(path_str(kp), x) for kp, x in flat])


def _adapter_apply(name: str, opts):
    rank = opts["rank"]
    scale = lora_scale(opts["alpha"], rank, opts["rslora"])

    def apply(params, rng):
        paths = targets_lib.select(params, opts["targets"])
        quantized = set()
        if name == "qlora":
            quantized = set(targets_lib.select(params, opts["quantize"], field="method.quantize"))
        flat = dict(tree.flatten_paths(params))
        new = {}
        for i, path in enumerate(paths):
            leaf = init_lora(
                jax.random.fold_in(rng, i),
                flat[path],
                rank,
                scale=scale,
                init=opts["init"],
                dropout=float(opts["dropout"]),
                compute=opts["compute"],
                dtype=opts["dtype"],
                path=path,
            )
            if path in quantized:
                # Quantize after init, so that PiSSA's residual (not W) is what
                # gets quantized, as in the PiSSA paper's QPiSSA.
                leaf = leaf.replace(w=quantize_nf4(leaf.w, double_quant=opts["double_quant"]))
            new[path] = from_lora(leaf) if name == "dora" else leaf
        for path in quantized - set(paths):
            new[path] = quantize_nf4(flat[path], double_quant=opts["double_quant"])
        return replace_leaves(params, new)

    return apply


def _bitfit_select(paths: Sequence[str]) -> set[str]:
    biases = {p for p in paths if p.endswith("/bias")}
    if biases:
        return biases
    return {p for p in paths if p.endswith("/scale")}


_LAYER_INDEX = re.compile(r"(^|/)(layers|h)_(\d+)/")
_STACKED = re.compile(r"(^|/)(layers|h)/")


def _freeze_select(opts):
    def select(paths: Sequence[str]) -> set[str]:
        chosen: set[str] = set()
        if opts["trainable"]:
            chosen |= set(
                targets_lib.match_paths(paths, opts["trainable"], field="method.trainable")
            )
        k = opts["last_layers"]
        if k:
            found = [int(m.group(3)) for p in paths if (m := _LAYER_INDEX.search(p))]
            if not found:
                hint = (
                    " (the layers are stacked: load with scan_layers=False to freeze per layer)"
                    if any(_STACKED.search(p) for p in paths)
                    else ""
                )
                raise PeftError(f"method.last_layers: no numbered decoder layers found{hint}")
            n = max(found) + 1
            if not 0 < k <= n:
                raise PeftError(f"method.last_layers: {k} is not in [1, {n}] (the model has {n})")
            keep = set(range(n - k, n))
            chosen |= {
                p for p in paths if (m := _LAYER_INDEX.search(p)) and int(m.group(3)) in keep
            }
        return chosen

    return select
