"""Partial fine-tuning: the parameters matching a regex, and/or those of the
last `last_layers` decoder layers, train; everything else is frozen."""

from __future__ import annotations

from collections.abc import Sequence

from ftjax.models.registry import locate_layer
from ftjax.peft import targets as targets_lib
from ftjax.peft.base import PeftError
from ftjax.peft.registry import MethodSpec, Option, register


def _check(opts):
    if not opts["trainable"] and not opts["last_layers"]:
        raise PeftError(
            "method.trainable: method 'freeze' needs a regex `trainable` or `last_layers`"
        )
    k = opts["last_layers"]
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
        raise PeftError(f"method.last_layers: must be an integer >= 0 (0: none), got {k!r}")


def _last_layers(paths: Sequence[str], k: int) -> set[str]:
    """The paths in the last k decoder layers (the layer stack each model
    family declares in its spec)."""
    where = {p: loc for p in paths if (loc := locate_layer(p.split("/")))}
    found = [index for _, index in where.values() if index is not None]
    if not found:
        hint = (
            " (the layers are stacked: load with scan_layers=False to freeze per layer)"
            if where
            else ""
        )
        raise PeftError(f"method.last_layers: no numbered decoder layers found{hint}")
    n = max(found) + 1
    if not 0 < k <= n:
        raise PeftError(f"method.last_layers: {k} is not in [1, {n}] (the model has {n})")
    keep = set(range(n - k, n))
    return {p for p, (_, index) in where.items() if index in keep}


def _build(opts):
    def select(paths: Sequence[str]) -> set[str]:
        chosen: set[str] = set()
        if opts["trainable"]:
            chosen |= set(
                targets_lib.match_paths(paths, opts["trainable"], field="method.trainable")
            )
        if opts["last_layers"]:
            chosen |= _last_layers(paths, opts["last_layers"])
        return chosen

    return (lambda params, rng: params), select


def _describe(opts):
    return [f"last {opts['last_layers']}" if opts["last_layers"] else str(opts["trainable"])]


SPEC = register(
    MethodSpec(
        name="freeze",
        options={
            "trainable": Option(None, str, "regex of the parameter paths that train"),
            "last_layers": Option(None, int, "the last k decoder layers train (0: none)"),
        },
        build=_build,
        check=_check,
        describe=_describe,
        study={"last_layers": 1},
        no_export="HF PEFT has no adapter type for partial fine-tuning: export the merged "
        "HF weights instead",
        doc="the matched parameters or the last layers train",
    )
)
