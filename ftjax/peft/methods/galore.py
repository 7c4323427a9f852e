"""GaLore (Zhao et al., 2024) as a method: every parameter trains, as in
`full`, and the run's AdamW is replaced through the optimizer hook by
`ftjax.peft.galore.galore_adamw` with the run's lr schedule, b1, b2, eps,
weight decay and clipping: Adam's moments of each targeted kernel (every
linear layer by default; one projection per layer of a scanned stack) live in
a rank-r projection of its gradient, refreshed every `update_proj_gap` steps.

The state of an `m x n` kernel, `r' = min(r, m, n)`: `2 r' max(m, n)`
moment entries plus the `r' min(m, n)` projection, against AdamW's `2 m n`.

There are no adapter files: GaLore changes every weight, so a run exports the
merged HF weights (`train.export_hf`, `scripts/export.py`) as `full` does.
"""

from __future__ import annotations

import jax

from ftjax.errors import ConfigError
from ftjax.peft import targets as targets_lib
from ftjax.peft.base import PeftError, path_str
from ftjax.peft.galore import galore_adamw
from ftjax.peft.methods.ia3 import _is_spec
from ftjax.peft.registry import MethodSpec, Option, register

# Defaults: the paper's pre-training settings (r = 128, T = 200, alpha = 0.25).
OPTIONS = {
    "rank": Option(128, int, "rank r of the gradient projection (min(r, m, n) per matrix)"),
    "update_proj_gap": Option(200, int, "steps T between projection refreshes (SVD)"),
    "scale": Option(0.25, float, "the paper's alpha: multiplies the projected-back update"),
    "targets": Option("all-linear", str, "kernels with projected moments (ftjax.peft.targets)"),
}


def _positive_int(opts, key):
    value = opts[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PeftError(f"method.{key}: must be a positive integer, got {value!r}")


def _check(opts):
    _positive_int(opts, "rank")
    _positive_int(opts, "update_proj_gap")
    scale = opts["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise PeftError(f"method.scale: must be a positive number, got {scale!r}")
    if not _is_spec(opts["targets"]):
        raise PeftError(
            f"method.targets: expected a preset, a regex or module names, got {opts['targets']!r}"
        )


def _build(opts):
    del opts
    return (lambda params, rng: params), (lambda paths: set(paths))


def target_mask(targets):
    """`tree -> tree of bools`: the kernels `targets` selects (a TargetError
    names `method.targets` when it selects none)."""

    def mask(tree):
        chosen = set(targets_lib.select(tree, targets))
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return treedef.unflatten([path_str(kp) in chosen for kp, _ in flat])

    return mask


def galore_optimizer(opts, tx, schedule, total_steps, optim):
    """The run's AdamW, described by its `optim` config, rebuilt as GaLore's
    (the `MethodSpec.optimizer` hook); the built `tx` itself is replaced."""
    del tx, total_steps
    if optim is None:
        raise TypeError("GaLore's optimizer hook needs the run's optim config (Method.optimizer)")
    if optim.name != "adamw":
        raise ConfigError(
            f"optim.name={optim.name!r}: method galore runs Adam on projected gradients; "
            "expected optim.name='adamw'"
        )
    return galore_adamw(
        schedule,
        opts["rank"],
        opts["update_proj_gap"],
        float(opts["scale"]),
        mask=target_mask(opts["targets"]),
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        clip_norm=optim.clip_norm,
    )


SPEC = register(
    MethodSpec(
        name="galore",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=lambda opts: [
            f"r={opts['rank']}",
            f"T={opts['update_proj_gap']}",
            f"scale={opts['scale']:g}",
            str(opts["targets"]),
        ],
        optimizer=galore_optimizer,
        no_export=(
            "GaLore changes every weight (HF PEFT has no GaLore format): "
            "export the merged HF weights instead, as for full fine-tuning"
        ),
        doc="every parameter trains; Adam's moments of targeted kernels in a rank-r gradient projection",
    )
)
