"""Which kernels a method adapts: regexes on `/`-joined parameter paths, or presets.

Paths look like `model/layers_3/self_attn/q_proj/kernel` (unscanned) or
`model/layers/self_attn/q_proj/kernel` (scanned). A `targets` spec is one of

- a preset: `qv` (the LoRA paper), `attention`, `mlp`, `all-linear` (every
  projection except the embedding and the output head);
- a list of module names, e.g. `["q_proj", "v_proj"]` or `["attn/c_attn"]`,
  matched as the path components just before `/kernel` (what HF PEFT's
  `target_modules` list means);
- any other string: a regex, searched (`re.search`) in each candidate path.

Only kernels are candidates (paths ending in `/kernel` with at least two
dimensions), so `"q_proj"` never selects a bias.

GPT-2 fuses q, k and v into one `c_attn` projection, so its `qv` and its
`attention` presets both adapt `c_attn` (what HF PEFT does for GPT-2). A
rank-r adapter on `c_attn` has `d*r + r*3d = 2 * (d*r + r*d)` parameters,
exactly the count of the LoRA paper's separate q and v adapters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ftjax.peft.base import TargetError, flatten_paths, is_leaf

_LLAMA = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
_GPT2 = {
    "qv": ("attn/c_attn",),
    "attention": ("attn/c_attn", "attn/c_proj"),
    "mlp": ("mlp/c_fc", "mlp/c_proj"),
}
PRESETS = {
    "llama": {**_LLAMA, "all-linear": _LLAMA["attention"] + _LLAMA["mlp"]},
    "gpt2": {**_GPT2, "all-linear": _GPT2["attention"] + _GPT2["mlp"]},
}
PRESET_NAMES = tuple(PRESETS["llama"])


def family(params) -> str:
    """`gpt2` or `llama` (the Llama/Mistral/Qwen family), from the tree's top keys."""
    return "gpt2" if "transformer" in params else "llama"


def module_names(params, targets) -> tuple[str, ...] | None:
    """The module names a preset or list stands for (None for a regex)."""
    if isinstance(targets, str):
        return PRESETS[family(params)].get(targets)
    return tuple(targets)


def pattern(params, targets) -> str:
    """The regex a `targets` spec stands for."""
    names = module_names(params, targets)
    if names is None:
        return targets
    if not names:
        raise TargetError("method.targets: the list of module names is empty")
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
    regex = compile_regex(pattern(params, targets), field)
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
