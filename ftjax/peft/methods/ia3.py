"""(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning") as a method: every targeted
kernel becomes an `IA3Weight` leaf (`ftjax.peft.ia3`) whose vector `l`, one
number per feature, is all that trains.

As in HF PEFT, `l` scales the *output* features of the targets and the
*input* features of the `feedforward_targets` (a subset of the targets). The
defaults are each model family's `ia3` and `ia3-feedforward` target presets:
keys, values and the MLP's down projection, the last scaled on its input
(GPT-2: the fused `c_attn`, so q as well, and the MLP's `c_proj`: HF PEFT's
GPT-2 default).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from ftjax.peft import targets as targets_lib
from ftjax.peft import tree
from ftjax.peft.base import PeftError
from ftjax.peft.ia3 import init_ia3
from ftjax.peft.registry import MethodSpec, Option, register

FEEDFORWARD_PRESET = "ia3-feedforward"

OPTIONS = {
    "targets": Option(
        "ia3", str, "preset, regex or module names (default: keys, values, MLP down)"
    ),
    "feedforward_targets": Option(
        None, str, "targets scaled on their input (default: the family's ia3-feedforward preset)"
    ),
    "dtype": Option("float32", str, "dtype of the vectors (float32 whatever the kernels')"),
}


def _is_spec(spec) -> bool:
    return isinstance(spec, str) or (
        isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec)
    )


def _check(opts):
    if not _is_spec(opts["targets"]):
        raise PeftError(
            f"method.targets: expected a preset, a regex or module names, got {opts['targets']!r}"
        )
    ff = opts["feedforward_targets"]
    if ff is not None and not _is_spec(ff):
        raise PeftError(
            "method.feedforward_targets: expected null (the family's preset), a preset, a regex "
            f"or module names ([] for none), got {ff!r}"
        )
    try:
        floating = jnp.issubdtype(jnp.dtype(opts["dtype"]), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise PeftError(f"method.dtype: {opts['dtype']!r} is not a floating-point dtype")


def feedforward_paths(params, spec, adapted: Sequence[str]) -> set[str]:
    """The adapted kernel paths whose input features IA3 scales. `None`: the
    family's `ia3-feedforward` preset among `adapted`; an empty list or
    string: none; otherwise a targets spec, which must select only adapted
    kernels (HF PEFT requires feedforward modules to be targets too)."""
    field = "method.feedforward_targets"
    if spec is None:
        chosen = targets_lib.select(params, FEEDFORWARD_PRESET, field=field)
        return set(chosen) & set(adapted)
    if len(spec) == 0:
        return set()
    chosen = set(targets_lib.select(params, spec, field=field))
    extra = sorted(chosen - set(adapted))
    if extra:
        raise PeftError(
            f"{field}: {spec!r} selects {extra[0]}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + ", which method.targets does not adapt; feedforward targets must be targets"
        )
    return chosen


def _build(opts):
    def apply(params, rng):
        del rng  # the vectors start at ones
        paths = targets_lib.select(params, opts["targets"])
        feedforward = feedforward_paths(params, opts["feedforward_targets"], paths)
        flat = dict(tree.flatten_paths(params))
        new = {
            p: init_ia3(flat[p], feedforward=p in feedforward, dtype=opts["dtype"]) for p in paths
        }
        return tree.replace_leaves(params, new)

    return apply, (lambda paths: set())


def _describe(opts):
    parts = [] if opts["targets"] == "ia3" else [str(opts["targets"])]
    if opts["feedforward_targets"] is not None:
        parts.append(f"ff={opts['feedforward_targets']}")
    return parts


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT IA3 adapter files (`ftjax.peft.ia3_format.save_adapter`)."""
    del initial  # the base is never rewritten
    from ftjax.peft.ia3_format import save_adapter

    return save_adapter(model_cfg, params, out_dir)


SPEC = register(
    MethodSpec(
        name="ia3",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=_describe,
        # T-Few trains (IA)^3 at 3e-3 (Adafactor): vectors around 1 need larger
        # steps than weights do; a study starts it where it starts BitFit.
        lr_scale=10.0,
        export=export_adapter,
        doc="learned per-feature scales of keys, values and the MLP's down-projection input",
    )
)
