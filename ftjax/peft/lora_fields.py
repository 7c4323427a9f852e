"""The LoraConfig fields beyond one rank for every target, as PEFT means them.

PEFT names modules as `transformers` does (`model.layers.3.self_attn.q_proj`);
ftjax's paths are `model/layers_3/self_attn/q_proj/kernel`, or, scanned,
`model/layers/self_attn/q_proj/kernel` standing for every layer at once
(`module_names`). Matching follows PEFT 0.21 (`peft.tuners.tuners_utils`,
`peft.utils.other`):

- `rank_pattern` / `alpha_pattern`: the first key `k` (in the mapping's order)
  for which `re.match(rf"(.*\\.)?({k})$", module)` holds gives the module its
  rank / alpha; others keep `r` / `lora_alpha` (`pattern_value`).
- `layers_to_transform` (an int or a list) with `layers_pattern`: only modules
  in those layers are adapted, the layer index being the first number after
  `<layers_pattern>.` (or after any name when no pattern is given); PEFT
  applies this only when `target_modules` is a list and the module is not
  named in it in full (`peft_adapts`).
- `modules_to_save`: a module whose name ends with one of the strings (a plain
  `endswith`, no dot needed) trains in full and is saved whole; LoRA never
  targets a module inside one (`saved_by_peft`).
- `bias`: "lora_only" trains the biases of the adapted modules, "all" every
  bias of the model. PEFT saves them as `<module>.base_layer.bias` (adapted
  modules) or `<module>.bias`.

The ftjax method options of the same names select modules by *dotted suffix*
(`q_proj` or `self_attn.q_proj` match `model.layers.0.self_attn.q_proj`,
`proj` does not), and export writes names that select the same modules under
PEFT's rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from ftjax.models import registry
from ftjax.peft.base import PeftError, TargetError

BIAS_MODES = ("none", "lora_only", "all")
# PEFT ties a trained copy of the embedding to the head only for modules so
# named (peft.utils.constants.EMBEDDING_LAYER_NAMES).
PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


# ----------------------------------------------------------------------------- names


def module_names(path: str, n_layers: int | None = None) -> list[str]:
    """HF module names of the module holding the parameter at `path` (one per
    layer for a scanned path: `n_layers` of them).

    >>> module_names("model/layers_3/self_attn/q_proj/kernel")
    ['model.layers.3.self_attn.q_proj']
    >>> module_names("transformer/h/attn/c_attn/kernel", 2)
    ['transformer.h.0.attn.c_attn', 'transformer.h.1.attn.c_attn']
    """
    parts = path.split("/")[:-1]
    where = registry.locate_layer(parts)
    if where is None:
        return [".".join(parts)]
    pos, index = where
    if index is not None:
        name = parts[pos][: -len(f"_{index}")]
        return [".".join([*parts[:pos], name, str(index), *parts[pos + 1 :]])]
    if n_layers is None:
        raise PeftError(f"{path}: a scanned path needs the number of layers")
    return [
        ".".join([*parts[:pos], parts[pos], str(i), *parts[pos + 1 :]]) for i in range(n_layers)
    ]


def layer_of(path: str) -> tuple[bool, int | None]:
    """(whether `path` is in the decoder stack, its layer index or None when scanned)."""
    where = registry.locate_layer(path.split("/"))
    return (False, None) if where is None else (True, where[1])


def suffix_match(module: str, names: Sequence[str]) -> bool:
    """ftjax's rule: a name is the module's full name or a dotted suffix of it."""
    return any(module == n or module.endswith("." + n) for n in names)


# ----------------------------------------------------------------------------- PEFT's rules


def pattern_value(pattern: Mapping[str, float] | None, module: str, default):
    """PEFT's `get_pattern_key`: the value of the first matching key, else `default`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_layer_index(module: str, layers_pattern=None) -> int | None:
    """The layer index PEFT reads from a module name (None when there is none)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for p in patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def saved_by_peft(module: str, modules_to_save) -> bool:
    """Whether PEFT wraps `module` as a module to save (a plain `endswith`)."""
    return any(module.endswith(m) for m in modules_to_save or ())


def inside_saved(module: str, modules_to_save) -> bool:
    """Whether PEFT keeps LoRA off `module` because it is (in) a module to save."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in modules_to_save or ())


def peft_adapts(module: str, config: Mapping) -> bool:
    """Whether PEFT puts a LoRA layer on `module` under `config` (target_modules,
    exclude_modules, modules_to_save, layers_to_transform/layers_pattern)."""
    from ftjax.peft.peft_format import peft_targets_match

    targets = config.get("target_modules")
    if not peft_targets_match(module, targets, config.get("exclude_modules")):
        return False
    if inside_saved(module, config.get("modules_to_save")):
        return False
    layers = config.get("layers_to_transform")
    if isinstance(targets, str) or module in targets or layers is None or layers == []:
        return True
    index = peft_layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


# ----------------------------------------------------------------------------- method options


def as_pattern(value, field: str) -> dict:
    """A rank/alpha pattern as a dict: given as a mapping, or as its JSON text
    (the form a config keeps: `ml_collections.ConfigDict` refuses dotted keys
    such as `model\\.layers\\.0\\.self_attn\\.q_proj`)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise PeftError(f"method.{field}: not JSON ({e}): {value!r}") from None
    if not isinstance(value, Mapping):
        raise PeftError(
            f"method.{field}: expected a mapping of module regex -> value, got {value!r}"
        )
    return dict(value)


def check_options(opts) -> None:
    """The checks of the LoRA options this module implements (one line each)."""
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = as_pattern(opts.get(field), field)
        for key, value in pattern.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if field == "rank_pattern":
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not isinstance(key, str) or not ok:
                want = "a positive int" if field == "rank_pattern" else "a number"
                raise PeftError(f"method.{field}[{key!r}]: expected {want}, got {value!r}")
            try:
                re.compile(key)
            except re.error as e:
                raise PeftError(f"method.{field}: invalid regex {key!r} ({e})") from None
    if opts.get("bias", "none") not in BIAS_MODES:
        raise PeftError(f"method.bias: {opts.get('bias')!r} is not one of {', '.join(BIAS_MODES)}")
    save = opts.get("modules_to_save")
    if save is not None and not _names(save):
        raise PeftError(f"method.modules_to_save: expected module names, got {save!r}")
    layers = opts.get("layers_to_transform")
    if layers is not None and not (_index(layers) or (
        isinstance(layers, (list, tuple)) and layers and all(_index(i) for i in layers)
    )):  # fmt: skip
        raise PeftError(
            f"method.layers_to_transform: expected a layer index or a list of them, got {layers!r}"
        )
    pattern = opts.get("layers_pattern")
    if pattern is not None and not _names(pattern):
        raise PeftError(f"method.layers_pattern: expected a layer-stack name, got {pattern!r}")


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _names(v) -> bool:
    if isinstance(v, str):
        return bool(v)
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(s, str) and s for s in v)


def as_list(names) -> list[str]:
    return [names] if isinstance(names, str) else list(names or ())


def saved_paths(flat: Mapping, opts) -> list[str]:
    """Plain-parameter paths of the modules `modules_to_save` names (all of
    their parameters train in full); TargetError when a name matches none."""
    names = as_list(opts.get("modules_to_save"))
    if not names:
        return []
    chosen = []
    matched = set()
    for path, x in flat.items():
        shape = getattr(x, "shape", ())
        hits = [n for n in names if _module_hit(path, shape, n)]
        if hits:
            chosen.append(path)
            matched.update(hits)
    for name in names:
        if name not in matched:
            hint = ""
            if name in ("lm_head",):
                hint = (
                    " (a model with tied embeddings has no separate head: its embedding, "
                    "e.g. 'embed_tokens', is also the head)"
                )
            raise TargetError(f"method.modules_to_save: {name!r} matches no module{hint}")
    return chosen


def _module_hit(path: str, shape, name: str) -> bool:
    in_stack, index = layer_of(path)
    n = shape[0] if in_stack and index is None and len(shape) else None
    names = module_names(path, n)
    hits = [suffix_match(m, [name]) for m in names]
    if any(hits) and not all(hits):
        raise PeftError(
            f"method.modules_to_save: {name!r} names some layers of the stacked {path}; "
            "load the model with scan_layers=False to train single layers in full"
        )
    return any(hits)


def plan(paths: Sequence[str], flat: Mapping, opts) -> list[tuple[str, int, float]]:
    """`(path, rank, alpha)` of each LoRA target among `paths` (kernels the
    `targets` spec selected) after `modules_to_save` (excluded),
    `layers_to_transform` and `rank_pattern` / `alpha_pattern`."""
    save = as_list(opts.get("modules_to_save"))
    layers = opts.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    stack_name = opts.get("layers_pattern")
    ranks = as_pattern(opts.get("rank_pattern"), "rank_pattern")
    alphas = as_pattern(opts.get("alpha_pattern"), "alpha_pattern")
    out = []
    for path in paths:
        in_stack, index = layer_of(path)
        if layers is not None:
            if in_stack and index is None:
                raise PeftError(
                    "method.layers_to_transform: the layers are stacked (model.scan_layers=True), so "
                    "one kernel holds every layer's adapter; load with scan_layers=False"
                )
            if not in_stack or index not in layers:
                continue
            if stack_name is not None:
                part = path.split("/")[registry.locate_layer(path.split("/"))[0]]
                if part.rsplit("_", 1)[0] not in as_list(stack_name):
                    continue
        shape = tuple(flat[path].shape)
        names = module_names(path, shape[0] if in_stack and index is None else None)
        if save and any(suffix_match(m, save) for m in names):
            continue
        values = {
            (pattern_value(ranks, m, opts["rank"]), float(pattern_value(alphas, m, opts["alpha"])))
            for m in names
        }
        if len(values) > 1:
            raise PeftError(
                f"method.rank_pattern: gives the layers of the stacked {path} different ranks or "
                "alphas; load with scan_layers=False"
            )
        rank, alpha = values.pop()
        out.append((path, rank, alpha))
    if not out:
        raise TargetError(
            "method.targets: no kernel is left to adapt after modules_to_save / layers_to_transform"
        )
    return out


def trained_plain(paths: Sequence[str], opts) -> set[str]:
    """The plain parameters a LoRA-family method trains besides its adapters,
    from the plain paths alone (what a selector gets): the biases (`bias`)
    and every parameter of the modules to save."""
    chosen: set[str] = set()
    bias = opts.get("bias", "none")
    present = set(paths)
    if bias == "all":
        chosen |= {p for p in paths if p.endswith("/bias")}
    elif bias == "lora_only":
        # An adapted module's kernel is a weight leaf, not a plain path: its
        # bias is then the module's only plain parameter (a norm keeps its scale).
        for p in paths:
            if p.endswith("/bias"):
                module = p[: -len("bias")]
                if not any(q.startswith(module) and q != p for q in present):
                    chosen.add(p)
    if opts.get("modules_to_save"):
        names = as_list(opts["modules_to_save"])
        chosen |= {p for p in paths if any(suffix_match(m, names) for m in _names_of(p))}
    return chosen


def _names_of(path: str) -> list[str]:
    in_stack, index = layer_of(path)
    if in_stack and index is None:
        # A stacked module is saved whole (saved_paths refused partial stacks);
        # one layer's name stands for all of them.
        return module_names(path, 1)
    return module_names(path)
