"""AdaLoRA (Zhang et al., 2023) as a method: every targeted kernel becomes an
`AdaLoraWeight` leaf (`ftjax.peft.adalora`), `a`, `e`, `b` train, at
`init_r · (in + out + 1)` parameters per kernel (PEFT's count: the
`ranknum` buffer is not a parameter).

Two hooks make it AdaLoRA rather than an SVD-shaped LoRA: the loss gets
PEFT's orthogonality regularizer (`MethodSpec.penalty`), and the run's
optimizer is wrapped by the rank allocator (`MethodSpec.optimizer`,
`ftjax.peft.adalora_allocator`), which prunes triplets from `init_r` per
kernel on average down to `target_r`. `total_step` defaults to the run's
`train.steps`. Options and defaults are PEFT's `AdaLoraConfig`'s (`alpha`
is `lora_alpha`, 8; `deltaT` is `delta_t`); the default targets are each
family's `qv` preset, PEFT's AdaLoRA default for these families (GPT-2:
the fused `c_attn`).
"""

from __future__ import annotations

import jax

from ftjax.peft import targets as targets_lib
from ftjax.peft import tree
from ftjax.peft.adalora import init_adalora, orthogonality_penalty
from ftjax.peft.adalora_allocator import RankSchedule, allocate_ranks
from ftjax.peft.base import PeftError
from ftjax.peft.methods.ia3 import _is_spec
from ftjax.peft.registry import MethodSpec, Option, register


def _optional_int(text: str):
    return None if text.strip().lower() in ("none", "null", "") else int(text)


OPTIONS = {
    "init_r": Option(12, int, "initial rank of every adapted kernel"),
    "target_r": Option(8, int, "average rank per kernel after allocation"),
    "tinit": Option(0, int, "steps before any pruning (budget stays init_r)"),
    "tfinal": Option(0, int, "last steps, at the final ranks (no pruning)"),
    "delta_t": Option(1, int, "steps between two allocations (PEFT's deltaT)"),
    "beta1": Option(0.85, float, "EMA factor of the sensitivity |w * grad|"),
    "beta2": Option(0.85, float, "EMA factor of its uncertainty"),
    "orth_reg_weight": Option(0.5, float, "weight of the orthogonality regularizer"),
    "total_step": Option(None, _optional_int, "length of the schedule (default: train.steps)"),
    "alpha": Option(8.0, float, "scale numerator: alpha / init_r (PEFT's lora_alpha)"),
    "dropout": Option(0.0, float, "dropout on the adapter's input (PEFT's lora_dropout)"),
    "targets": Option("qv", str, "preset, regex or module names (ftjax.peft.targets)"),
    "dtype": Option(None, str, "adapter dtype (default: the kernel's)"),
}


def _int(opts, name, low):
    value = opts[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PeftError(f"method.{name}: must be an integer >= {low}, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(opts):
    _int(opts, "init_r", 1)
    _int(opts, "target_r", 0)
    _int(opts, "tinit", 0)
    _int(opts, "tfinal", 0)
    _int(opts, "delta_t", 1)
    if opts["target_r"] >= opts["init_r"]:
        # The budget would never fall below the initial one: nothing to allocate
        # (PEFT fails on it at its first allocation).
        raise PeftError(
            f"method.target_r: must be below init_r={opts['init_r']}, got {opts['target_r']}"
        )
    for name in ("beta1", "beta2"):
        if not _number(opts[name]) or not 0 < opts[name] < 1:
            raise PeftError(f"method.{name}: must be in (0, 1) as PEFT asserts, got {opts[name]!r}")
    if not _number(opts["orth_reg_weight"]) or opts["orth_reg_weight"] < 0:
        raise PeftError(
            f"method.orth_reg_weight: must be a number >= 0, got {opts['orth_reg_weight']!r}"
        )
    if not _number(opts["alpha"]) or opts["alpha"] <= 0:
        # PEFT scales by the rank instead for alpha <= 0, which its rank_pattern
        # resizing then changes per module; not reproduced.
        raise PeftError(f"method.alpha: must be a number > 0, got {opts['alpha']!r}")
    if not _number(opts["dropout"]) or not 0 <= opts["dropout"] < 1:
        raise PeftError(f"method.dropout: must be in [0, 1), got {opts['dropout']!r}")
    if opts["total_step"] is not None:
        _int(opts, "total_step", 1)
        schedule(opts, opts["total_step"])
    if not _is_spec(opts["targets"]):
        raise PeftError(
            f"method.targets: expected a preset, a regex or module names, got {opts['targets']!r}"
        )


def schedule(opts, total_steps: int) -> RankSchedule:
    """The allocator's schedule; `total_step` from the options or the run."""
    total = opts["total_step"] if opts["total_step"] is not None else int(total_steps)
    return RankSchedule(
        target_r=int(opts["target_r"]),
        total_step=int(total),
        tinit=int(opts["tinit"]),
        tfinal=int(opts["tfinal"]),
        delta_t=int(opts["delta_t"]),
        beta1=float(opts["beta1"]),
        beta2=float(opts["beta2"]),
    )


def _build(opts):
    def apply(params, rng):
        paths = targets_lib.select(params, opts["targets"])
        flat = dict(tree.flatten_paths(params))
        new = {
            path: init_adalora(
                jax.random.fold_in(rng, i),
                flat[path],
                int(opts["init_r"]),
                alpha=float(opts["alpha"]),
                dropout=float(opts["dropout"]),
                dtype=opts["dtype"],
            )
            for i, path in enumerate(paths)
        }
        return tree.replace_leaves(params, new)

    return apply, (lambda paths: set())


def _optimizer(opts, tx, lr_schedule, total_steps, optim):
    del lr_schedule, optim
    return allocate_ranks(tx, schedule(opts, total_steps))


def _penalty(opts):
    weight = float(opts["orth_reg_weight"])
    if weight == 0:
        return None
    return lambda trainable: orthogonality_penalty(trainable, weight)


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT AdaLoRA adapter files (`ftjax.peft.adalora_format.save_adapter`)."""
    del initial  # the base is never rewritten
    from ftjax.peft.adalora_format import save_adapter

    return save_adapter(model_cfg, params, out_dir, options=opts)


SPEC = register(
    MethodSpec(
        name="adalora",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=lambda opts: [f"r={opts['init_r']}->{opts['target_r']}", str(opts["targets"])],
        # The paper adapts every weight matrix, at LoRA-like learning rates.
        study={"targets": "all-linear"},
        lr_scale=10.0,
        export=export_adapter,
        doc="SVD-form low-rank updates whose ranks an importance-driven allocator prunes",
        optimizer=_optimizer,
        penalty=_penalty,
    )
)
