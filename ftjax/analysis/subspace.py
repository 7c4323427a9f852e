"""Subspace similarity between two adapters (Hu et al., LoRA, 2021, Eq. 4):

    φ(A1, A2, i, j) = ‖U_1^{i T} U_2^{j}‖_F² / min(i, j)  ∈ [0, 1]

where U^{i} are the top-i singular directions of each adapter matrix. φ is 1
when one subspace contains the other and ≈ max(i, j) / d for random subspaces
of a d-dimensional space.

The paper compares the right singular vectors of A (shape r × d_in, in the
input space). ftjax's LoRA leaf stores `a` as (in, r), its transpose, so the
same vectors are the columns' singular directions: every function here takes
matrices of shape (d, r) and compares their column spaces. For the `b`
factors (r, out), the output-space directions, pass `b.T`.

In the examples, `params` are a tiny random two-layer Llama's (set up by
tests/test_doctests.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models import layers
from ftjax.models.registry import locate_layer

_HIGHEST = jax.lax.Precision.HIGHEST


def _column_basis(x) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a (d, r) matrix, got shape {x.shape}")
    u, _, _ = jnp.linalg.svd(x, full_matrices=False)
    return u


def similarity_grid(x1, x2) -> np.ndarray:
    """φ(i, j) for every 1 <= i <= r1, 1 <= j <= r2: entry [i-1, j-1].

    The squared overlaps of the singular directions are summed over the
    leading i×j block with two cumulative sums, so the whole grid (the LoRA
    paper's Figure 3) costs one SVD per matrix.
    """
    u1, u2 = _column_basis(x1), _column_basis(x2)
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"subspaces of different spaces: {u1.shape[0]} vs {u2.shape[0]} rows")
    overlap = np.square(np.asarray(jnp.matmul(u1.T, u2, precision=_HIGHEST), np.float64))
    block = np.cumsum(np.cumsum(overlap, axis=0), axis=1)
    i = np.arange(1, block.shape[0] + 1)[:, None]
    j = np.arange(1, block.shape[1] + 1)[None, :]
    return block / np.minimum(i, j)


def subspace_similarity(x1, x2, i: int | None = None, j: int | None = None) -> float:
    """φ between the top-i directions of x1's columns and the top-j of x2's
    (default: all of each).

    >>> a = np.random.default_rng(0).normal(size=(64, 8))
    >>> round(subspace_similarity(a, 3 * a), 6)   # the same column space
    1.0
    """
    grid = similarity_grid(x1, x2)
    i = grid.shape[0] if i is None else i
    j = grid.shape[1] if j is None else j
    if not (1 <= i <= grid.shape[0] and 1 <= j <= grid.shape[1]):
        raise ValueError(f"need 1 <= i <= {grid.shape[0]} and 1 <= j <= {grid.shape[1]}")
    return float(grid[i - 1, j - 1])


def adapter_factors(params, factor: str = "a") -> dict[str, np.ndarray]:
    """The (d, r) factor of every LoRA-style leaf (one with `a` and `b`
    attributes), by '/'-joined path; stacked (scanned) layers become one entry
    per layer, named as unscanned params are (`layers_3`)."""
    if factor not in ("a", "b"):
        raise ValueError(f"factor must be 'a' or 'b', got {factor!r}")
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=layers.is_weight_leaf)[0]
    out = {}
    for keypath, leaf in leaves:
        if not (hasattr(leaf, "a") and hasattr(leaf, "b")):
            continue
        parts = [str(getattr(k, "key", getattr(k, "name", k))) for k in keypath]
        mat = np.asarray(getattr(leaf, factor), np.float32)
        mat = mat if factor == "a" else np.swapaxes(mat, -1, -2)
        where = locate_layer(parts)
        stack = where[0] if where and where[1] is None else None
        if mat.ndim == 3 and stack is not None:
            for layer in range(mat.shape[0]):
                named = parts[:stack] + [f"{parts[stack]}_{layer}"] + parts[stack + 1 :]
                out["/".join(named)] = mat[layer]
        elif mat.ndim == 2:
            out["/".join(parts)] = mat
        else:
            raise ValueError(f"{'/'.join(parts)}: cannot read a {mat.shape} adapter factor")
    return out


def adapter_subspace_similarity(
    params1, params2, i: int | None = None, j: int | None = None, factor: str = "a"
) -> dict:
    """φ(i, j) per adapted matrix between two adapted params trees (e.g. two
    seeds, or rank 8 against rank 64), plus the mean.

    >>> from ftjax.peft import build_method
    >>> method = build_method({"name": "lora", "rank": 4, "targets": "qv"})
    >>> seed0 = method.apply(params, jax.random.key(0))
    >>> r = adapter_subspace_similarity(seed0, seed0)
    >>> list(r["per_matrix"])[:2], round(r["mean"], 5)
    (['model/layers_0/self_attn/q_proj/kernel', 'model/layers_0/self_attn/v_proj/kernel'], 1.0)
    >>> r = adapter_subspace_similarity(seed0, method.apply(params, jax.random.key(1)))
    >>> r["mean"] < 0.5   # two random rank-4 subspaces of R^32
    True
    """
    f1, f2 = adapter_factors(params1, factor), adapter_factors(params2, factor)
    if not f1:
        raise ValueError("the first params tree has no adapter leaves (with `a` and `b`)")
    if set(f1) != set(f2):
        only = sorted(set(f1) ^ set(f2))[:3]
        raise ValueError(f"the two params trees adapt different matrices, e.g. {only}")
    per = {name: subspace_similarity(f1[name], f2[name], i, j) for name in sorted(f1)}
    return {"per_matrix": per, "mean": float(np.mean(list(per.values())))}
