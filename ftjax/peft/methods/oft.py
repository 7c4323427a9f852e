"""OFT (Qiu et al., 2023) as a method: every targeted kernel becomes an
`OFTWeight` leaf (`ftjax.peft.oft`), `blockdiag(R_1 … R_n) @ w` with each
`R_i` the Cayley transform of a trainable skew-symmetric block; only the
packed upper triangles train, `n · b(b−1)/2` parameters per kernel
(`b(b−1)/2` with `block_share`).

Defaults are HF PEFT's `OFTConfig` (block size 32, `r = 0`, the
Cayley–Neumann series with 5 terms, targets q and v), so adapters move
between the two unchanged. As in PEFT exactly one of `block_size` and
`rank` (PEFT's `r`, the number of blocks) is nonzero, and a value that does
not divide a layer's input size is replaced by the nearest divisor
(`ftjax.peft.oft.nearest_divisor`), layer by layer.
"""

from __future__ import annotations

from ftjax.peft import targets as targets_lib
from ftjax.peft import tree
from ftjax.peft.base import PeftError
from ftjax.peft.methods.ia3 import _is_spec
from ftjax.peft.oft import init_oft, with_coft_projection
from ftjax.peft.registry import MethodSpec, Option, parse_bool, register

OPTIONS = {
    "block_size": Option(32, int, "OFT block size (PEFT's oft_block_size); 0 to set rank"),
    "rank": Option(0, int, "PEFT's r: blocks per layer; 0 to set block_size"),
    "block_share": Option(False, parse_bool, "one rotation block shared by all blocks of a layer"),
    "cayley_neumann": Option(
        True, parse_bool, "PEFT's truncated series instead of the exact inverse"
    ),
    "neumann_terms": Option(5, int, "terms of the Cayley-Neumann series"),
    "coft": Option(False, parse_bool, "constrained OFT: each block's skew norm at most eps"),
    "eps": Option(6e-5, float, "COFT's bound (scaled by 1/sqrt(blocks))"),
    "targets": Option("qv", str, "preset, regex or module names (ftjax.peft.targets)"),
    "dtype": Option("float32", str, "dtype of the skew parameters"),
}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check(opts):
    for name in ("block_size", "rank"):
        if not _is_count(opts[name]):
            raise PeftError(f"method.{name}: must be a non-negative integer, got {opts[name]!r}")
    if (opts["block_size"] != 0) == (opts["rank"] != 0):
        raise PeftError(
            f"method.rank: exactly one of rank ({opts['rank']}) and block_size "
            f"({opts['block_size']}) must be nonzero (rank x block_size = the input size)"
        )
    for name in ("block_share", "cayley_neumann", "coft"):
        if not isinstance(opts[name], bool):
            raise PeftError(f"method.{name}: must be a bool, got {opts[name]!r}")
    if not _is_count(opts["neumann_terms"]) or opts["neumann_terms"] < 1:
        raise PeftError(
            f"method.neumann_terms: must be a positive integer, got {opts['neumann_terms']!r}"
        )
    eps = opts["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise PeftError(f"method.eps: must be a positive number, got {eps!r}")
    if not _is_spec(opts["targets"]):
        raise PeftError(
            f"method.targets: expected a preset, a regex or module names, got {opts['targets']!r}"
        )


def _build(opts):
    def apply(params, rng):
        del rng  # q = 0: the init is deterministic
        paths = targets_lib.select(params, opts["targets"])
        flat = dict(tree.flatten_paths(params))
        new = {
            p: init_oft(
                flat[p],
                block_size=opts["block_size"],
                rank=opts["rank"],
                block_share=opts["block_share"],
                cayley_neumann=opts["cayley_neumann"],
                neumann_terms=opts["neumann_terms"],
                coft=opts["coft"],
                eps=float(opts["eps"]),
                dtype=opts["dtype"],
            )
            for p in paths
        }
        return tree.replace_leaves(params, new)

    return apply, (lambda paths: set())


def _optimizer(opts, tx, schedule, total_steps, optim):
    """COFT keeps the stored parameters projected, as PEFT's in-place projection does."""
    del schedule, total_steps, optim
    return with_coft_projection(tx) if opts["coft"] else tx


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT OFT adapter files (`ftjax.peft.oft_format.save_adapter`)."""
    del initial  # the base is never rewritten
    from ftjax.peft.oft_format import save_adapter

    return save_adapter(model_cfg, params, out_dir, block_size=opts["block_size"],
                        rank=opts["rank"])  # fmt: skip


def _describe(opts):
    size = f"b={opts['block_size']}" if opts["block_size"] else f"r={opts['rank']}"
    return [size, str(opts["targets"])] + (["coft"] if opts["coft"] else [])


SPEC = register(
    MethodSpec(
        name="oft",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=_describe,
        lr_scale=10.0,
        export=export_adapter,
        optimizer=_optimizer,
        doc="block-diagonal orthogonal rotation (Cayley) of each kernel's input side",
    )
)
