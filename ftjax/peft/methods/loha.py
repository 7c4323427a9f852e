"""LoHa (Hyeon-Woo et al., 2022, "FedPara") as a method: every targeted kernel
becomes a `LohaWeight` leaf (`ftjax.peft.loha`), `w + alpha/r · (a1@b1)*(a2@b2)`;
only the four factors train, 2·r·(in + out) parameters per kernel. Defaults
are HF PEFT's `LoHaConfig` (r = alpha = 8)."""

from __future__ import annotations

import jax

from ftjax.peft import targets as targets_lib
from ftjax.peft import tree
from ftjax.peft.base import PeftError
from ftjax.peft.loha import init_loha
from ftjax.peft.methods.ia3 import _is_spec
from ftjax.peft.registry import MethodSpec, Option, register

OPTIONS = {
    "rank": Option(8, int, "rank r of each of the two factor pairs"),
    "alpha": Option(8.0, float, "scale numerator: alpha / r"),
    "targets": Option("qv", str, "preset, regex or module names (ftjax.peft.targets)"),
    "dtype": Option(None, str, "adapter dtype (default: the kernel's)"),
}


def check_rank_alpha_targets(opts):
    rank = opts["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PeftError(f"method.rank: must be a positive integer, got {rank!r}")
    if isinstance(opts["alpha"], bool) or not isinstance(opts["alpha"], (int, float)):
        raise PeftError(f"method.alpha: must be a number, got {opts['alpha']!r}")
    if not _is_spec(opts["targets"]):
        raise PeftError(
            f"method.targets: expected a preset, a regex or module names, got {opts['targets']!r}"
        )


def _build(opts):
    scale = float(opts["alpha"]) / opts["rank"]

    def apply(params, rng):
        paths = targets_lib.select(params, opts["targets"])
        flat = dict(tree.flatten_paths(params))
        new = {
            p: init_loha(
                jax.random.fold_in(rng, i), flat[p], opts["rank"], scale=scale, dtype=opts["dtype"]
            )  # fmt: skip
            for i, p in enumerate(paths)
        }
        return tree.replace_leaves(params, new)

    return apply, (lambda paths: set())


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT LoHa adapter files (`ftjax.peft.lycoris_format.save_adapter`)."""
    del initial
    from ftjax.peft.lycoris_format import save_adapter

    return save_adapter(model_cfg, params, out_dir)


SPEC = register(
    MethodSpec(
        name="loha",
        options=OPTIONS,
        build=_build,
        check=check_rank_alpha_targets,
        describe=lambda opts: [f"r={opts['rank']}", str(opts["targets"])],
        lr_scale=10.0,
        export=export_adapter,
        doc="low-rank Hadamard-product updates alpha/r * (a1 @ b1) * (a2 @ b2)",
    )
)
