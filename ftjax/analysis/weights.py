"""Weight analysis of a tuned params tree against its base: per matrix and
aggregated per module type and overall.

Both trees may hold plain arrays or any weight leaves (LoRA, DoRA, quantized):
each kernel is materialized to its effective dense matrix first. Scanned
params (`model/layers/...` with a leading layer axis) are split into one
matrix per layer and named like unscanned ones (`model/layers_3/...`), so a
scanned run compares against an unscanned base and reports the same keys.

In the examples, `params` are a tiny random two-layer Llama's (set up by
tests/test_doctests.py).
"""

from __future__ import annotations

import re

import jax
import numpy as np

from ftjax.analysis import spectra
from ftjax.models import layers
from ftjax.models.registry import all_families, locate_layer

# Projections only, by default: embeddings and the output head are vocab-sized
# and are not adapted by the usual PEFT targets ("all-linear" excludes them).
# Embeddings are `embedding` leaves, so `/kernel$` leaves them out already.
DEFAULT_INCLUDE = r"/kernel$"
# The default `exclude`: the output head of every registered model family.
DEFAULT_EXCLUDE = "<output heads>"


def _exclude_regex(exclude: str | None) -> str | None:
    if exclude != DEFAULT_EXCLUDE:
        return exclude
    heads = sorted({s.output_head.replace(".", "/") for s in all_families()})
    return r"(^|/)(" + "|".join(re.escape(h) for h in heads) + r")/"


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def weight_matrices(
    params, *, include: str = DEFAULT_INCLUDE, exclude: str | None = DEFAULT_EXCLUDE
) -> dict[str, np.ndarray]:
    """Dense float32 matrices by '/'-joined path, one per layer: the paths
    `include` matches and `exclude` does not (default: every kernel but the
    model family's output head).

    >>> sorted(weight_matrices(params))[:2]
    ['model/layers_0/mlp/down_proj/kernel', 'model/layers_0/mlp/gate_proj/kernel']
    >>> len(weight_matrices(params))   # 7 projections x 2 layers; no embedding, no head
    14
    """
    exclude = _exclude_regex(exclude)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=layers.is_weight_leaf)[0]
    out = {}
    for keypath, leaf in leaves:
        parts = [_key_name(k) for k in keypath]
        path = "/".join(parts)
        if not re.search(include, path) or (exclude and re.search(exclude, path)):
            continue
        where = locate_layer(parts)
        if where is None or where[1] is not None:
            out[path] = np.asarray(layers.materialize(leaf), np.float32)
            continue
        # Slice every child of the leaf, then materialize per layer: a weight
        # leaf's children all carry the stacked layer axis.
        num_layers = jax.tree.leaves(leaf)[0].shape[0]
        stack = where[0]
        for i in range(num_layers):
            one = jax.tree.map(lambda x, i=i: x[i], leaf)
            named = parts[:stack] + [f"{parts[stack]}_{i}"] + parts[stack + 1 :]
            out["/".join(named)] = np.asarray(layers.materialize(one), np.float32)
    return out


def module_name(path: str) -> str:
    """The module type of a matrix path, without its layer: 'self_attn/q_proj'.

    >>> module_name("model/layers_3/self_attn/q_proj/kernel")
    'self_attn/q_proj'
    """
    parts = path.split("/")
    return "/".join(parts[-3:-1])


def _aggregate(rows: list[dict]) -> dict:
    return {
        "matrices": len(rows),
        "mean_energy_rank": float(np.mean([r["energy_rank"] for r in rows])),
        "mean_rank_fraction": float(np.mean([r["rank_fraction"] for r in rows])),
        "mean_relative_norm": float(np.mean([r["relative_norm"] for r in rows])),
        "total_intruders": int(np.sum([r["intruders"] for r in rows])),
        "mean_intruders": float(np.mean([r["intruders"] for r in rows])),
    }


def analyze_update(
    base_params,
    tuned_params,
    *,
    k: int = 10,
    eps: float = 0.5,
    energy: float = 0.9,
    side: str = "output",
    include: str = DEFAULT_INCLUDE,
    exclude: str | None = DEFAULT_EXCLUDE,
    max_values: int | None = 32,
) -> dict:
    """ΔW spectra, energy ranks, intruder dimensions and relative norms of every
    matrix that changed, aggregated per module type and overall.

    Matrices whose update is exactly zero (not adapted) are counted in
    `unchanged` and left out of the statistics.

    >>> rng = np.random.default_rng(0)
    >>> def rank_one(x):   # adds a rank-1 update to a matrix
    ...     return x + 0.1 * np.outer(rng.normal(size=x.shape[0]), rng.normal(size=x.shape[1]))
    >>> tuned = jax.tree.map(lambda x: rank_one(x) if x.ndim == 2 else x, params)
    >>> report = analyze_update(params, tuned)
    >>> report["unchanged"], report["aggregate"]["all"]["matrices"]
    (0, 14)
    >>> report["aggregate"]["all"]["mean_energy_rank"]
    1.0
    """
    base = weight_matrices(base_params, include=include, exclude=exclude)
    tuned = weight_matrices(tuned_params, include=include, exclude=exclude)
    if set(base) != set(tuned):
        only = sorted(set(base) ^ set(tuned))[:3]
        raise ValueError(f"base and tuned params hold different matrices, e.g. {only}")
    if not base:
        raise ValueError(f"no matrix matches include={include!r} / exclude={exclude!r}")
    per, unchanged = {}, []
    for name in sorted(base):
        if base[name].shape != tuned[name].shape:
            raise ValueError(
                f"{name}: base shape {base[name].shape} != tuned shape {tuned[name].shape}"
            )
        if np.array_equal(base[name], tuned[name]):
            unchanged.append(name)
            continue
        per[name] = spectra.update_stats(
            base[name], tuned[name], k=k, eps=eps, energy=energy, side=side, max_values=max_values
        )
    by_module: dict[str, list] = {}
    for name, row in per.items():
        by_module.setdefault(module_name(name), []).append(row)
    aggregate = {m: _aggregate(rows) for m, rows in sorted(by_module.items())}
    if per:
        aggregate["all"] = _aggregate(list(per.values()))
    return {
        "settings": {"k": k, "eps": eps, "energy": energy, "side": side},
        "unchanged": len(unchanged),
        "per_matrix": per,
        "aggregate": aggregate,
    }
