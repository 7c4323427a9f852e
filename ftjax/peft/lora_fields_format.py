"""HF PEFT files for the LoraConfig fields of `ftjax.peft.lora_fields`:
per-module ranks and alphas, trained biases and modules to save.

Export (`pattern_config`, `extra_state`): `r` / `lora_alpha` are the most
common rank / alpha, and `rank_pattern` / `alpha_pattern` name the modules
that differ by the shortest dotted suffix that gives every adapted module its
own value under PEFT's first-match rule. Biases are saved as PEFT's
`get_peft_model_state_dict` does: `<module>.base_layer.bias` for an adapted
module, `<module>.bias` for another (bias "all"); a module to save as its
parameters' HF names (`lm_head.weight`), with no adapter name. A model that
ties the head to the embedding can save the embedding only the way PEFT ties
it back (`ensure_weight_tying`: `modules_to_save` names the embedding, the
file also holds `lm_head.weight`), and only for an embedding PEFT recognizes
by name (`embed_tokens`; GPT-2's `wte` is refused: PEFT would train it apart
from the head).

Import (`load_extras`): the inverse, refusing a tensor that the config does
not explain, and an untied head or embedding for a model whose ftjax params
hold one matrix for both.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

import numpy as np

from ftjax.models.config import ModelConfig
from ftjax.models.hf import hf_name
from ftjax.models.registry import get_family
from ftjax.peft import lora_fields
from ftjax.peft.base import AdapterFormatError, flatten_paths, is_leaf

PREFIX = "base_model.model."
BASE_BIAS = ".base_layer.bias"


def _value(x: float) -> float:
    # alpha = scale * r is exact only up to rounding; 12 digits say what was meant.
    return float(f"{x:.12g}")


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def _keys(values: Mapping[str, float], default) -> dict:
    """pattern key -> value for the modules whose value is not `default`."""
    out = {}
    for module, value in sorted(values.items()):
        if value == default:
            continue
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(v == value for m, v in values.items() if lora_fields.suffix_match(m, [suffix])):
                out[suffix.replace(".", "\\.")] = _number(value)
                break
    return out


def pattern_config(
    modules: Mapping[str, tuple[int, float]], lora_alpha: float | None = None
) -> dict:
    """`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern` for modules' (rank, alpha).

    >>> pattern_config({"a.q": (4, 8.0), "a.v": (4, 8.0), "a.o": (2, 8.0)})
    {'r': 4, 'lora_alpha': 8.0, 'rank_pattern': {'o': 2}, 'alpha_pattern': {}}
    """
    ranks = {m: r for m, (r, _) in modules.items()}
    alphas = {m: _value(a) for m, (_, a) in modules.items()}
    # The most common value; ties go to the larger, so the choice is stable.
    r = max(Counter(ranks.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    if lora_alpha is None:
        lora_alpha = max(Counter(alphas.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    lora_alpha = _value(lora_alpha)
    return {
        "r": int(r),
        "lora_alpha": float(lora_alpha),
        "rank_pattern": _keys(ranks, r),
        "alpha_pattern": _keys(alphas, lora_alpha),
    }


# ----------------------------------------------------------------------------- export


def layer_subset(adapted: list[str], linear: list[str], minimal_targets) -> dict | None:
    """`target_modules`, `layers_to_transform`, `layers_pattern` when the
    adapted modules are some module kinds in a proper subset of the layers
    (what `layers_to_transform` says); None otherwise. `minimal_targets(
    wanted, others)` gives the suffixes that select `wanted` only."""
    where = {}
    for m in linear:
        match = re.fullmatch(r"(.*?\.([^.]*))\.(\d+)\.(.*)", m)
        if match is not None:  # (the head, outside the layers, is never adapted here)
            where[m] = (match.group(2), int(match.group(3)), match.group(4))
    if not all(m in where for m in adapted):
        return None
    layers = {where[m][1] for m in adapted}
    kinds = {where[m][2] for m in adapted}
    stacks = {s for s, _, _ in where.values()}
    if len(stacks) != 1 or layers == {i for _, i, _ in where.values()}:
        return None
    if set(adapted) != {m for m, (_, i, k) in where.items() if i in layers and k in kinds}:
        return None
    wanted = [m for m, (_, _, k) in where.items() if k in kinds]
    others = [m for m in linear if m not in wanted]
    config = {
        "target_modules": minimal_targets(wanted, others),
        "layers_to_transform": sorted(layers),
        "layers_pattern": stacks.pop(),
    }
    if not all(lora_fields.peft_adapts(m, config) == (m in adapted) for m in linear):
        return None
    return config


def _module(cfg: ModelConfig, path: str) -> str:
    return hf_name(cfg.replace(scan_layers=False), tuple(path.split("/")))[0].rsplit(".", 1)[0]


def _name(cfg: ModelConfig, path: str) -> str:
    return hf_name(cfg.replace(scan_layers=False), tuple(path.split("/")))[0]


def _hf(cfg: ModelConfig, path: str, x) -> tuple[str, np.ndarray]:
    name, transpose = hf_name(cfg.replace(scan_layers=False), tuple(path.split("/")))
    arr = np.asarray(x)
    return name, np.ascontiguousarray(arr.T if transpose else arr)


def _all_module_names(names) -> set[str]:
    """Every module PEFT's `named_modules` lists: each dotted prefix of each name."""
    out = set()
    for name in names:
        parts = name.split(".")[:-1]
        out.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return out


def _save_names(wanted: set[str], modules: set[str]) -> list[str]:
    """Shortest dotted suffixes whose plain `endswith` (PEFT's rule) selects
    exactly `wanted` among `modules`."""
    out = set()
    for module in sorted(wanted):
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(m in wanted for m in modules if m.endswith(suffix)):
                out.add(suffix)
                break
    return sorted(out)


def extra_state(cfg: ModelConfig, params, opts: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
    """(config fields, tensors) of the biases and modules to save that `opts`
    (a LoRA-family method's options) train, from unstacked `params`."""
    bias = opts.get("bias", "none") or "none"
    save = lora_fields.as_list(opts.get("modules_to_save"))
    flat = flatten_paths(params)
    plain = {p: x for p, x in flat if not is_leaf(x)}
    adapted = {p[: -len("kernel")] for p, x in flat if is_leaf(x) and p.endswith("/kernel")}
    tensors: dict[str, np.ndarray] = {}
    config: dict = {"bias": bias, "modules_to_save": None}
    trained = lora_fields.trained_plain(list(plain), {"bias": bias, "modules_to_save": save})
    saved = (
        set(lora_fields.trained_plain(list(plain), {"modules_to_save": save})) if save else set()
    )
    for path in sorted(trained - saved):  # the biases
        module = path[: -len("bias")]
        name, arr = _hf(cfg, path, plain[path])
        if module in adapted:
            name = name.removesuffix(".bias") + BASE_BIAS
        tensors[PREFIX + name] = arr
    if not saved:
        return config, tensors
    family = get_family(cfg.model_type)
    embedding = "/".join(family.tied_embedding) if family.tied_embedding else None
    for path in sorted(saved):
        if bias == "all" and path.endswith("/bias"):
            raise AdapterFormatError(
                f"params: {path} is in modules_to_save and bias is 'all'; PEFT would save that "
                "bias twice under wrapper names, so ftjax writes neither combination"
            )
        name, arr = _hf(cfg, path, plain[path])
        tensors[PREFIX + name] = arr
    names = {_name(cfg, p) for p, _ in flat} | {f"{family.output_head}.weight"}
    wanted = {_module(cfg, p) for p in saved}
    config["modules_to_save"] = _save_names(wanted, _all_module_names(names))
    if cfg.tie_word_embeddings and embedding in saved:
        module = _module(cfg, embedding)
        if module.rsplit(".", 1)[-1] not in lora_fields.PEFT_EMBEDDING_NAMES:
            raise AdapterFormatError(
                f"modules_to_save: the {cfg.model_type} embedding {module!r} is tied to the head; "
                "PEFT ties a trained embedding back to the head only for modules named "
                f"{' or '.join(lora_fields.PEFT_EMBEDDING_NAMES)}, so it would train the "
                "embedding apart from the head"
            )
        config["ensure_weight_tying"] = True
        tensors[f"{PREFIX}{family.output_head}.weight"] = tensors[PREFIX + module + ".weight"]
    return config, tensors


# ----------------------------------------------------------------------------- import


def load_extras(
    cfg: ModelConfig, params, config: Mapping, extras: Mapping[str, np.ndarray], adapted, source
) -> dict:
    """{params path: array} for the non-LoRA tensors of a PEFT file (`extras`:
    key -> tensor), over unstacked plain `params`; `adapted`: the modules
    that have LoRA tensors."""
    flat_cfg = cfg.replace(scan_layers=False)
    by_name = {}
    for path, x in flatten_paths(params):
        if not is_leaf(x):
            name, transpose = hf_name(flat_cfg, tuple(path.split("/")))
            by_name[name] = (path, transpose, tuple(x.shape))
    bias = config.get("bias") or "none"
    save = config.get("modules_to_save") or []
    family = get_family(cfg.model_type)
    head = f"{family.output_head}.weight"
    out = {}
    for key, value in sorted(extras.items()):
        name = key[len(PREFIX) :]
        module = name.rsplit(".", 1)[0]
        if cfg.tie_word_embeddings and name == head and head not in by_name:
            _check_tied_head(config, extras, key, value, family, flat_cfg, source)
            continue
        if name.endswith(BASE_BIAS):
            module = name[: -len(BASE_BIAS)]
            if bias == "none" or module not in adapted:
                raise AdapterFormatError(
                    f"{source}: tensor {key!r} is the bias of a LoRA module, but bias={bias!r}"
                    + ("" if module in adapted else f" and {module!r} has no LoRA tensors")
                )
            name = module + ".bias"
        elif lora_fields.saved_by_peft(module, save):
            pass  # a module to save: checked against the model's names below
        elif not (bias == "all" and name.endswith(".bias")):
            raise AdapterFormatError(
                f"{source}: tensor {key!r} is neither a LoRA tensor, a bias that bias={bias!r} "
                f"saves, nor a module of modules_to_save={save!r}"
            )
        if name not in by_name:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} names no parameter of this {cfg.model_type} model"
            )
        path, transpose, shape = by_name[name]
        arr = np.asarray(value)
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != shape:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model's "
                f"{name} {shape[::-1] if transpose else shape}"
            )
        if cfg.tie_word_embeddings and "/".join(family.tied_embedding or ()) == path:
            _check_tied_embedding(config, extras, family, key, source)
        out[path] = arr
    return out


def _check_tied_head(config, extras, key, value, family, flat_cfg, source):
    """A saved head of a tied model is only the copy PEFT's weight tying writes."""
    embedding = hf_name(flat_cfg, family.tied_embedding)[0]
    twin = extras.get(PREFIX + embedding)
    if (
        not config.get("ensure_weight_tying")
        or twin is None
        or not np.array_equal(np.asarray(twin), np.asarray(value))
    ):
        raise AdapterFormatError(
            f"{source}: tensor {key!r} trains the head of a model that ties it to the embedding, "
            "apart from the embedding (ensure_weight_tying is false); ftjax's tied model has one "
            "matrix for both"
        )


def _check_tied_embedding(config, extras, family, key, source):
    if not config.get("ensure_weight_tying"):
        raise AdapterFormatError(
            f"{source}: tensor {key!r} trains the embedding of a model that ties it to the head, "
            "apart from the head (ensure_weight_tying is false); ftjax's tied model has one "
            "matrix for both"
        )
