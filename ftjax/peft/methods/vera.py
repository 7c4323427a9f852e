"""VeRA (Kopiczko et al., 2024) as a method: one pair of frozen random
projections for all targets, and per targeted kernel a `VeraWeight` leaf
(`ftjax.peft.vera`) whose two vectors are all that trains: `r + out`
parameters per layer (the paper's RoBERTa-base, r = 1024 on query and
value: 12 · 2 · (1024 + 768) = 43,008).

The projections are drawn once, for the largest input and output sizes
among the targets, and each leaf takes its leading slices, as HF PEFT does.
"""

from __future__ import annotations

from ftjax.peft import targets as targets_lib
from ftjax.peft import tree
from ftjax.peft.base import PeftError
from ftjax.peft.methods.ia3 import _is_spec
from ftjax.peft.registry import MethodSpec, Option, register
from ftjax.peft.vera import init_vera, vera_projections

OPTIONS = {
    "rank": Option(256, int, "rank r of the shared random projections (PEFT's default 256)"),
    "d_initial": Option(0.1, float, "initial value of every lambda_d (lambda_b starts at 0)"),
    "targets": Option("qv", str, "preset, regex or module names (ftjax.peft.targets)"),
    "dtype": Option(None, str, "dtype of projections and vectors (default: the kernel's)"),
}


def _check(opts):
    rank = opts["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PeftError(f"method.rank: must be a positive integer, got {rank!r}")
    if isinstance(opts["d_initial"], bool) or not isinstance(opts["d_initial"], (int, float)):
        raise PeftError(f"method.d_initial: must be a number, got {opts['d_initial']!r}")
    if not _is_spec(opts["targets"]):
        raise PeftError(
            f"method.targets: expected a preset, a regex or module names, got {opts['targets']!r}"
        )


def _build(opts):
    def apply(params, rng):
        paths = targets_lib.select(params, opts["targets"])
        flat = dict(tree.flatten_paths(params))
        fan_in = max(flat[p].shape[-2] for p in paths)
        fan_out = max(flat[p].shape[-1] for p in paths)
        a, b = vera_projections(rng, opts["rank"], fan_in, fan_out)
        new = {
            p: init_vera(flat[p], a, b, d_initial=float(opts["d_initial"]), dtype=opts["dtype"])
            for p in paths
        }
        return tree.replace_leaves(params, new)

    return apply, (lambda paths: set())


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT VeRA adapter files (`ftjax.peft.vera_format.save_adapter`)."""
    del initial  # the base is never rewritten
    from ftjax.peft.vera_format import save_adapter

    return save_adapter(model_cfg, params, out_dir, d_initial=float(opts["d_initial"]))


SPEC = register(
    MethodSpec(
        name="vera",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=lambda opts: [f"r={opts['rank']}", str(opts["targets"])],
        # Vectors need larger steps than LoRA factors: the paper trains VeRA at
        # about 10x the learning rates it gives LoRA (LoRA here: 10x full tuning).
        lr_scale=100.0,
        export=export_adapter,
        doc="frozen shared random projections scaled by trainable vectors (lambda_d, lambda_b)",
    )
)
