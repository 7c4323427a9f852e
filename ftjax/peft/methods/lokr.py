"""LoKr (LyCORIS) as a method: every targeted kernel becomes a `LokrWeight`
leaf (`ftjax.peft.lokr`), `w + alpha/r · kron(F1, F2)`, with HF PEFT's
factorization of the kernel's sides (`decompose_factor`) and its rule for
which factors are low-rank (`decompose_both`). Defaults are PEFT's
`LoKrConfig` (r = alpha = 8, decompose_factor = -1: near the square root)."""

from __future__ import annotations

import jax

from ftjax.peft import targets as targets_lib
from ftjax.peft import tree
from ftjax.peft.base import PeftError
from ftjax.peft.lokr import init_lokr
from ftjax.peft.methods.loha import check_rank_alpha_targets
from ftjax.peft.registry import MethodSpec, Option, parse_bool, register

OPTIONS = {
    "rank": Option(8, int, "rank r of a low-rank Kronecker factor"),
    "alpha": Option(8.0, float, "scale numerator: alpha / r"),
    "decompose_both": Option(False, parse_bool, "the small factor may be low-rank too"),
    "decompose_factor": Option(-1, int, "Kronecker split size (-1: near the square root)"),
    "targets": Option("qv", str, "preset, regex or module names (ftjax.peft.targets)"),
    "dtype": Option(None, str, "adapter dtype (default: the kernel's)"),
}


def _check(opts):
    check_rank_alpha_targets(opts)
    if not isinstance(opts["decompose_both"], bool):
        raise PeftError(f"method.decompose_both: must be a bool, got {opts['decompose_both']!r}")
    factor = opts["decompose_factor"]
    if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor > 0):
        raise PeftError(f"method.decompose_factor: must be -1 or a positive int, got {factor!r}")


def _build(opts):
    scale = float(opts["alpha"]) / opts["rank"]

    def apply(params, rng):
        paths = targets_lib.select(params, opts["targets"])
        flat = dict(tree.flatten_paths(params))
        new = {
            p: init_lokr(
                jax.random.fold_in(rng, i),
                flat[p],
                opts["rank"],
                scale=scale,
                decompose_both=opts["decompose_both"],
                factor=opts["decompose_factor"],
                dtype=opts["dtype"],
            )  # fmt: skip
            for i, p in enumerate(paths)
        }
        return tree.replace_leaves(params, new)

    return apply, (lambda paths: set())


def _describe(opts):
    parts = [f"r={opts['rank']}", str(opts["targets"])]
    if opts["decompose_both"]:
        parts.append("both")
    if opts["decompose_factor"] != -1:
        parts.append(f"factor={opts['decompose_factor']}")
    return parts


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT LoKr adapter files (`ftjax.peft.lycoris_format.save_adapter`)."""
    del initial
    from ftjax.peft.lycoris_format import save_adapter

    return save_adapter(model_cfg, params, out_dir)


SPEC = register(
    MethodSpec(
        name="lokr",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=_describe,
        lr_scale=10.0,
        export=export_adapter,
        doc="Kronecker-product updates alpha/r * kron(F1, F2), F2 (and F1) possibly low-rank",
    )
)
