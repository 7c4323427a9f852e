"""Which kernels a method adapts: regexes on `/`-joined parameter paths, or presets.

Paths look like `model/layers_3/self_attn/q_proj/kernel` (unscanned) or
`model/layers/self_attn/q_proj/kernel` (scanned). A `targets` spec is one of

- a preset: `qv` (the LoRA paper), `attention`, `mlp`, `all-linear` (every
  projection except the embedding and the output head), whose module names
  each model family declares in its spec (`FamilySpec.targets`), and the
  optional `ia3` / `ia3-feedforward` (IA3's defaults) of families that declare them;
- a list of module names, e.g. `["q_proj", "v_proj"]` or `["attn/c_attn"]`,
  matched as the path components just before `/kernel` (what HF PEFT's
  `target_modules` list means);
- any other string: a regex, searched (`re.search`) in each candidate path.

Only kernels are candidates (paths ending in `/kernel` with at least two
dimensions), so `"q_proj"` never selects a bias. A params tree does not carry
its config, so a preset is resolved through the registered family whose layer
stack and projections the tree has (`registry.families_of`).

GPT-2 fuses q, k and v into one `c_attn` projection, so its `qv` and its
`attention` presets both adapt `c_attn` (what HF PEFT does for GPT-2). A
rank-r adapter on `c_attn` has `d*r + r*3d = 2 * (d*r + r*d)` parameters,
exactly the count of the LoRA paper's separate q and v adapters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ftjax.models import registry
from ftjax.peft.base import TargetError, flatten_paths, is_leaf

PRESET_NAMES = registry.TARGET_PRESETS + registry.OPTIONAL_TARGET_PRESETS


def family(params, field: str = "method.targets") -> registry.FamilySpec:
    """The registered model family a params tree belongs to (its presets)."""
    found = registry.families_of(kernel_paths(params))
    if not found:
        top = ", ".join(sorted(params)) if isinstance(params, dict) else type(params).__name__
        raise TargetError(
            f"{field}: the params (top-level keys: {top}) match no registered model family "
            f"({', '.join(registry.model_types())}), so a preset cannot be resolved; "
            "name the module names instead, e.g. ['q_proj', 'v_proj']"
        )
    if len({tuple(sorted(s.targets.items())) for s in found}) > 1:
        raise TargetError(
            f"{field}: the params fit several model families with different presets "
            f"({', '.join(s.name for s in found)}); name the module names instead"
        )
    return found[0]


def module_names(params, targets, field: str = "method.targets") -> tuple[str, ...] | None:
    """The module names a preset or list stands for (None for a regex)."""
    if isinstance(targets, str):
        if targets not in PRESET_NAMES:
            return None
        spec = family(params, field)
        if targets not in spec.targets:
            raise TargetError(
                f"{field}: model family {spec.name!r} defines no {targets!r} preset; "
                "name the module names instead, e.g. ['k_proj', 'v_proj']"
            )
        return tuple(spec.targets[targets])
    return tuple(targets)


def pattern(params, targets, field: str = "method.targets") -> str:
    """The regex a `targets` spec stands for."""
    names = module_names(params, targets, field)
    if names is None:
        return targets
    if not names:
        raise TargetError(f"{field}: the list of module names is empty")
    return r"(^|/)(" + "|".join(re.escape(n) for n in names) + r")/kernel$"


def kernel_paths(params) -> list[str]:
    """Paths of every kernel (plain or already quantized) in the tree."""
    return [
        p
        for p, leaf in flatten_paths(params)
        if p.endswith("/kernel") and len(getattr(leaf, "shape", ())) >= 2
    ]


def _describe(paths: Sequence[str], n: int = 8) -> str:
    """A few paths, with layer numbers folded (`layers_*`) so each kind shows once."""
    kinds = list(dict.fromkeys(re.sub(r"_\d+/", "_*/", p) for p in paths))
    shown = ", ".join(kinds[:n]) + (", ..." if len(kinds) > n else "")
    return f"{shown} ({len(paths)} in all)"


def compile_regex(regex: str, field: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise TargetError(f"{field}: invalid regex {regex!r} ({e})") from None


def _module_name(path: str) -> str:
    """`model/layers_0/self_attn/q_proj/kernel` -> `q_proj`."""
    return path.split("/")[-2]


def _check_entries(names, kernels: Sequence[str], field: str) -> None:
    """Every entry of a module-name list matches at least one kernel: a typo in
    one entry must not silently adapt only the others."""
    available = sorted({_module_name(p) for p in kernels})
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip("/"):
            raise TargetError(
                f"{field}[{i}]: {name!r} is not a module name; expected a string such as "
                f"{available[0] if available else 'q_proj'!r}"
            )
        regex = re.compile(r"(^|/)" + re.escape(name) + r"/kernel$")
        if not any(regex.search(p) for p in kernels):
            raise TargetError(
                f"{field}[{i}]: module name {name!r} matches no kernel; available module "
                f"names: {', '.join(available)}"
            )


def select(params, targets, *, field: str = "method.targets", plain_only: bool = True) -> list[str]:
    """Paths of the kernels that `targets` selects; raises TargetError when none.

    `plain_only` restricts candidates to plain-array kernels (not yet adapted).

    >>> select(params, "qv")[:2]
    ['model/layers_0/self_attn/q_proj/kernel', 'model/layers_0/self_attn/v_proj/kernel']
    """
    candidates = [
        p
        for p, leaf in flatten_paths(params)
        if p.endswith("/kernel")
        and len(getattr(leaf, "shape", ())) >= 2
        and not (plain_only and is_leaf(leaf))
    ]
    if not isinstance(targets, str):
        _check_entries(targets, kernel_paths(params), field)
    regex = compile_regex(pattern(params, targets, field), field)
    chosen = [p for p in candidates if regex.search(p)]
    if not chosen:
        raise TargetError(
            f"{field}: {targets!r} matches no kernel; available: {_describe(candidates)}"
        )
    return chosen


def match_paths(paths: Sequence[str], regex: str, *, field: str) -> list[str]:
    """The paths (any parameter) a regex selects; raises TargetError when none."""
    compiled = compile_regex(regex, field)
    chosen = [p for p in paths if compiled.search(p)]
    if not chosen:
        raise TargetError(f"{field}: {regex!r} matches no parameter; available: {_describe(paths)}")
    return chosen
