"""Hugging Face checkpoints <-> ftjax: config.json <-> ModelConfig and
safetensors <-> params, with no torch needed, driven by the family specs
(`ftjax.models.registry.FamilySpec`).

The mapping is a rename: flax path `model/layers_3/self_attn/q_proj/kernel` is
HF key `model.layers.3.self_attn.q_proj.weight`, transposed where the family's
HF weights are torch `Linear` (out, in) (GPT-2's Conv1D weights are already
(in, out)); `scale` and `embedding` are `weight`.
Pickle checkpoints (`pytorch_model.bin`) are refused: unpickling runs code.
"""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ModelError
from ftjax.models import layers, safetensors_io
from ftjax.models.config import ModelConfig
from ftjax.models.decoder import KV_PREFIX, VIRTUAL_TOKENS
from ftjax.models.registry import (
    build_model,
    container_of,
    get_family,
    layers_prefix,
    model_types,
    with_container,
)

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class CheckpointError(ModelError):
    """A checkpoint that cannot be loaded; the message is one line naming the file."""


# ----------------------------------------------------------------------------- configs


class _HFConfig(dict):
    """A config.json dict whose missing required field (`hf["n_embd"]`) is a
    CheckpointError naming the file, so that family code indexes plainly."""

    def __init__(self, hf: dict, source: str):
        super().__init__(hf)
        self.source = source

    def __missing__(self, key):
        raise CheckpointError(
            f"{self.source}: missing field {key!r} for {dict.get(self, 'model_type')}"
        )


def config_from_hf(hf: dict, source: str = "config.json", **options) -> ModelConfig:
    """ModelConfig from a config.json dict; `options` set dtype, scan_layers, ..."""
    model_type = hf.get("model_type")
    if model_type not in model_types():
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r}; supported: "
            f"{', '.join(model_types())}"
        )
    fields = get_family(model_type).config_from_hf(_HFConfig(hf, source))
    return ModelConfig(model_type=model_type, **{**fields, **options})


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json dict that `transformers.AutoConfig` reads back to `cfg`."""
    return get_family(cfg.model_type).config_to_hf(cfg)


# ----------------------------------------------------------------------------- names


def hf_name(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF tensor name, whether the tensor is transposed) for an unscanned flax path.

    >>> hf_name(ModelConfig(), ("model", "layers_3", "self_attn", "q_proj", "kernel"))
    ('model.layers.3.self_attn.q_proj.weight', True)
    """
    spec = get_family(cfg.model_type)
    layer = spec.layers[1]
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(rf"{re.escape(layer)}_(\d+)", p)
        parts.extend([layer, m.group(1)] if m else [spec.renames.get(p, p)])
    leaf = path[-1]
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts), leaf == "kernel" and spec.transpose_kernels


def abstract_params(cfg: ModelConfig):
    """Shapes and dtypes of the params, without allocating them."""
    model = build_model(cfg)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def stack_layers(cfg: ModelConfig, params: dict) -> dict:
    """Unscanned params -> scanned: layer i's leaves become row i of one stack."""
    container, layer = layers_prefix(cfg)
    inner = dict(container_of(params, container))
    per_layer = [inner.pop(f"{layer}_{i}") for i in range(cfg.num_layers)]
    inner[layer] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return with_container(params, container, inner)


def unstack_layers(cfg: ModelConfig, params: dict) -> dict:
    container, layer = layers_prefix(cfg)
    if layer not in container_of(params, container):
        return params
    inner = dict(container_of(params, container))
    stacked = inner.pop(layer)
    for i in range(cfg.num_layers):
        inner[f"{layer}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return with_container(params, container, inner)


# ----------------------------------------------------------------------------- tensors


def _fresh_head(cfg: ModelConfig, paths: list, seed: int) -> dict:
    """Random-init values of the head params at `paths` (a classifier the
    checkpoint lacks), drawn as `model.init` draws them from `seed`."""
    model = build_model(cfg)
    init = jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32)))
    fresh = dict(_flatten(init()["params"]))
    return {p: fresh[p] for p in paths}


def params_from_tensors(cfg: ModelConfig, tensors: dict, source: str, head_seed: int = 0) -> dict:
    """Builds the params tree from HF-named tensors, checking every shape.
    Tensors of the family's `new_head` that the checkpoint lacks (a classifier
    on a bare or differently headed encoder) are initialized from `head_seed`."""
    family = get_family(cfg.model_type)
    flat_cfg = cfg.replace(scan_layers=False)
    expected = dict(_flatten(abstract_params(flat_cfg)))
    prefix = family.bare_prefix
    if prefix and not any(k.startswith(prefix) for k in tensors):
        tensors = {f"{prefix}{k}": v for k, v in tensors.items()}
    used = set()
    flat = {}
    dtype = jnp.dtype(cfg.param_dtype)
    fresh = [
        path
        for path in expected
        if hf_name(flat_cfg, path)[0] not in tensors
        and family.new_head
        and re.search(family.new_head, hf_name(flat_cfg, path)[0])
    ]
    if fresh:
        names = [hf_name(flat_cfg, p)[0] for p in fresh]
        log.warning("%s: no %s in the checkpoint; initialized fresh (seed %d)",
                    source, ", ".join(names), head_seed)  # fmt: skip
        flat.update(
            {p: v.astype(dtype) for p, v in _fresh_head(flat_cfg, fresh, head_seed).items()}
        )
    for path, spec in expected.items():
        if path in flat:
            continue
        name, transpose = hf_name(flat_cfg, path)
        if name not in tensors:
            raise CheckpointError(
                f"{source}: missing tensor {name!r} (expected shape {spec.shape})"
            )
        arr = tensors[name]
        shape = tuple(arr.shape[::-1]) if transpose else tuple(arr.shape)
        if shape != tuple(spec.shape):
            want = spec.shape[::-1] if transpose else spec.shape
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, but config.json "
                f"implies {tuple(want)}"
            )
        arr = np.asarray(arr)
        flat[path] = jnp.asarray(arr.T if transpose else arr, dtype)
        used.add(name)
    tied_copy = f"{family.output_head}.weight" if cfg.tie_word_embeddings else None
    extra = [
        k
        for k in tensors
        if k not in used
        and not (family.ignored_keys and re.search(family.ignored_keys, k))
        and k != tied_copy
    ]
    if extra:
        log.warning("%s: ignoring %d unexpected tensors, e.g. %s", source, len(extra), extra[:3])
    params = _unflatten(flat)
    return stack_layers(cfg, params) if cfg.scan_layers else params


def tensors_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF-named numpy tensors; adapter/quantized leaves are materialized."""
    virtual = [k for k in (VIRTUAL_TOKENS, KV_PREFIX) if k in params]
    if virtual:
        raise ModelError(
            f"params[{virtual[0]!r}]: virtual tokens (prompt or prefix tuning) cannot be merged "
            "into a checkpoint's weights; export the adapter instead (peft.save_adapter)"
        )
    params = layers.materialize_params(unstack_layers(cfg, params))
    out = {}
    flat_cfg = cfg.replace(scan_layers=False)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=layers.is_weight_leaf)[0]
    for keypath, leaf in leaves:
        path = tuple(k.key for k in keypath)
        name, transpose = hf_name(flat_cfg, path)
        arr = np.asarray(layers.materialize(leaf))
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


# ----------------------------------------------------------------------------- files


def _from_hub(path_or_id: str, what: str, download):
    """`download()` for a hub id (`what` it fetches, for the error line); a
    path that is neither a directory nor a hub id is refused as such."""
    if not _HUB_ID.fullmatch(path_or_id) or path_or_id.startswith("."):
        raise CheckpointError(f"{path_or_id}: no such checkpoint directory")
    try:
        return download()
    except Exception as e:  # network, auth, missing repo: one line either way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path_or_id}: not a local directory and the Hugging Face hub download failed "
            f"(offline or unknown repo?) for {what}: {reason}"
        ) from None


def resolve_dir(path_or_id: str) -> str:
    """A local checkpoint directory, downloading a hub id when online."""
    if os.path.isdir(path_or_id):
        return path_or_id

    def download():
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        return snapshot_download(path_or_id, allow_patterns=patterns)

    return _from_hub(path_or_id, "the checkpoint", download)


def fetch_config(path_or_id: str) -> tuple[dict, str]:
    """(config.json as a dict, its path) of a local checkpoint directory or a
    hub id, downloading that one file only (the planner needs no weights)."""
    if os.path.isdir(path_or_id):
        return read_config(path_or_id), os.path.join(path_or_id, "config.json")

    def download():
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path_or_id, "config.json")

    path = _from_hub(path_or_id, "config.json", download)
    return read_config(os.path.dirname(path)), path


def read_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing config.json (not a Hugging Face checkpoint dir)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: got a JSON {type(hf).__name__}; expected an object")
    return hf


def _dtype(value, name: str) -> str:
    try:
        return str(jnp.dtype(value))
    except TypeError:
        raise ModelError(
            f"{name}={value!r} is not a dtype; expected e.g. float32, bfloat16, float16"
        ) from None


def read_tensors(ckpt_dir: str) -> tuple[dict, str]:
    single = os.path.join(ckpt_dir, WEIGHTS_NAME)
    index = os.path.join(ckpt_dir, INDEX_NAME)
    if os.path.isfile(single):
        return safetensors_io.load(single), single
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(
                f"{index}: invalid index ({e}); expected a JSON object with a weight_map"
            ) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: weight_map is not an object of tensor name -> shard file name"
            )
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(ckpt_dir, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index}: shard {shard} is missing")
            tensors.update(safetensors_io.load(shard_path))
        return tensors, index
    pickles = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(ckpt_dir, n))]
    if pickles:
        raise CheckpointError(
            f"{os.path.join(ckpt_dir, pickles[0])}: pickle checkpoints are refused (unpickling can "
            "run arbitrary code); convert to safetensors first, e.g. load it in transformers and "
            "call save_pretrained(out_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def from_pretrained(
    path_or_hub_id: str,
    dtype: str = "float32",
    param_dtype: str | None = None,
    scan_layers: bool = False,
    remat: str | bool = "none",
    attention: str = "auto",
    task: str = "",
    num_labels: int = 0,
    head_seed: int = 0,
):
    """Loads a HF checkpoint (a local directory or a hub id) as `(model, params)`:

    model, params = from_pretrained("path/to/llama", dtype="bfloat16")
    logits = model.apply({"params": params}, input_ids)

    `task` and `num_labels` (when set) replace the head the checkpoint's
    config.json names, as `AutoModelForSequenceClassification.from_pretrained`
    does on a bare encoder; a head the checkpoint lacks starts from `head_seed`.
    """
    ckpt_dir = resolve_dir(path_or_hub_id)
    hf = read_config(ckpt_dir)
    head = {k: v for k, v in (("task", task), ("num_labels", num_labels)) if v}
    cfg = config_from_hf(
        hf,
        os.path.join(ckpt_dir, "config.json"),
        dtype=_dtype(dtype, "dtype"),
        param_dtype=_dtype(param_dtype or dtype, "param_dtype"),
        scan_layers=scan_layers,
        remat=remat,
        attention=attention,
        **head,
    )
    tensors, source = read_tensors(ckpt_dir)
    params = params_from_tensors(cfg, tensors, source, head_seed=head_seed)
    return build_model(cfg), params


def save_pretrained(model, params, out_dir: str, dtype: str | None = None) -> None:
    """Writes `config.json` + `model.safetensors` that transformers loads."""
    cfg: ModelConfig = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    if dtype is not None:
        dtype = _dtype(dtype, "dtype")
    tensors = tensors_from_params(cfg, params)
    if dtype is not None:
        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    safetensors_io.save(tensors, os.path.join(out_dir, WEIGHTS_NAME), {"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
