"""The task head of a classification model trains with every method, and
travels with every adapter as PEFT's `modules_to_save`.

A classifier on a pre-trained encoder starts random: freezing it would make
any PEFT method a probe of random features. HF PEFT's `SEQ_CLS` and
`TOKEN_CLS` tasks therefore always train it (they add `classifier` and
`score` to `modules_to_save`) and save it beside the adapter. ftjax does the
same for every method: `Method.select` adds the head's parameters to what
the method trains (so they count as trainable and get optimizer state), and
the adapter files of every format carry them.

The head is the family's `FamilySpec.task_head` (`classifier` for BERT and
RoBERTa) in a params tree of that family; a decoder's output head is not a
task head and is never added.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ftjax.models import registry
from ftjax.models.config import ModelConfig
from ftjax.models.hf import hf_name
from ftjax.peft.base import AdapterFormatError

PREFIX = "base_model.model."
# The head names PEFT's classification tasks add to `modules_to_save` themselves.
PEFT_HEAD_NAMES = ("classifier", "score")


def head_of(paths: Sequence[str]) -> str | None:
    """The task-head module of the family whose layer stack `paths` hold, if
    that family has one and the tree holds it."""
    for spec in registry.all_families():
        head = spec.task_head
        if not head or not any(p.startswith(spec.layers[0] + "/") for p in paths):
            continue
        if any(p.startswith(head + "/") for p in paths):
            return head
    return None


def head_paths(paths: Sequence[str]) -> list[str]:
    """The task head's parameter paths among `paths` (plain-array paths)."""
    head = head_of(paths)
    return [] if head is None else [p for p in paths if p.startswith(head + "/")]


def with_head(select):
    """A method's selector that also trains the task head."""
    return lambda paths: set(select(paths)) | set(head_paths(list(paths)))


def _head_tensors(cfg: ModelConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    flat_cfg = cfg.replace(scan_layers=False)
    out = {}
    for path in head_paths(list(flat)):
        name, transpose = hf_name(flat_cfg, tuple(path.split("/")))
        arr = np.asarray(flat[path], np.float32)
        out[PREFIX + name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def add_to_adapter(cfg: ModelConfig, flat: dict, config: dict, tensors: dict) -> bool:
    """Adds the head of `flat` (path -> array of the params) to an adapter's
    config and tensors; False when the model has no task head."""
    head = get_head(cfg)
    if head is None:
        return False
    tensors.update(_head_tensors(cfg, flat))
    saved = list(config.get("modules_to_save") or [])
    config["modules_to_save"] = saved + [head] * (head not in saved)
    return True


def get_head(cfg: ModelConfig) -> str | None:
    """The task-head module name of `cfg` (None for a model without a task)."""
    return registry.get_family(cfg.model_type).task_head or None if cfg.task else None


def split_from_adapter(cfg: ModelConfig, config: dict, tensors: dict, source: str):
    """`(config, tensors, head tensors)`: the head taken out of an adapter of a
    model with a task, so that each format's reader sees only its own fields.
    An adapter for a task model without the head is refused: PEFT would keep
    the base's (random) classifier."""
    head = get_head(cfg)
    if head is None:
        return config, tensors, {}
    saved = list(config.get("modules_to_save") or [])
    if head not in saved:
        raise AdapterFormatError(
            f"{source}: modules_to_save={saved or None!r} lacks the classification head "
            f"{head!r}; a {cfg.task} adapter must carry its trained head"
        )
    # PEFT's SEQ_CLS/TOKEN_CLS list both of its head names; the absent one is no module.
    rest = [
        m
        for m in saved
        if m != head
        and not (m in PEFT_HEAD_NAMES and not any(k.startswith(f"{PREFIX}{m}.") for k in tensors))
    ]
    config = {**config, "modules_to_save": rest or None}
    mine = {k: v for k, v in tensors.items() if k.startswith(f"{PREFIX}{head}.")}
    return config, {k: v for k, v in tensors.items() if k not in mine}, mine


def load_head(cfg: ModelConfig, flat: dict, head_tensors: dict, source: str) -> dict:
    """`flat` (path -> array) with the head's arrays read from `head_tensors`."""
    flat_cfg = cfg.replace(scan_layers=False)
    out = dict(flat)
    used = set()
    for path in head_paths(list(flat)):
        name, transpose = hf_name(flat_cfg, tuple(path.split("/")))
        key = PREFIX + name
        if key not in head_tensors:
            raise AdapterFormatError(f"{source}: missing tensor {key!r} of the classification head")
        arr = np.asarray(head_tensors[key])
        arr = arr.T if transpose else arr
        if arr.shape != tuple(flat[path].shape):
            raise AdapterFormatError(
                f"{source}: tensor {key!r} has shape {tuple(head_tensors[key].shape)}; the "
                f"model's head expects {tuple(flat[path].shape[::-1] if transpose else flat[path].shape)}"
            )
        out[path] = arr.astype(np.asarray(flat[path]).dtype)
        used.add(key)
    extra = sorted(set(head_tensors) - used)
    if extra:
        raise AdapterFormatError(f"{source}: tensor {extra[0]!r} is not a parameter of the head")
    return out
