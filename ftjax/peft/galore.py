"""GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection") as an optax transformation.

Every weight trains at full rank; what is low-rank is Adam's state. For each
targeted gradient `G` (`m x n`; leading axes, such as the layer axis of a
scanned stack, are batched: one projection per matrix), with `r' = min(r, m, n)`:

    every T steps, step 0 included:
        P = top-r' left singular vectors of G   (m x r')  if m <= n
            top-r' right singular vectors of G  (n x r')  otherwise
    R = P^T G (r' x n)   |   G P (m x r'), kept as its transpose (r' x m)
    N = Adam(R)          the moments live in R's shape
    update = scale * P N   |   scale * (P N)^T       back to m x n

`scale` is the paper's alpha. `galore_adamw` then adds AdamW's decoupled
weight decay on the full weight and the learning rate, in optax.adamw's order,
so leaves that are not targeted (biases, norms, embeddings, other kernels)
get exactly `optax.adamw`.

Memory per matrix (r' x max(m, n) per moment, P min(m, n) x r'):
`2 r' max(m, n) + r' min(m, n)` numbers, against Adam's `2 m n`.

Choices the paper's description leaves open:

- On a refresh the moments are kept as they are, as the paper's reference
  implementation does: they were accumulated in the old basis, but
  consecutive projections of a slowly changing gradient span similar
  subspaces (the paper's argument for large T), and there is no exact
  transport to the new basis (the first moment could be rotated by
  `P_new^T P_old`, the second, a mean of squares, cannot). Zeroing them instead
  would throw away the momentum every T steps. Reproducing the paper's
  numbers needs the kept moments.
- Singular vectors are defined up to sign, and the sign LAPACK returns differs
  between backends. Because the kept moments are expressed in the old basis,
  a flipped column would negate a moment row, so each column of P is made to
  have its largest-magnitude entry positive: the same gradient gives the
  same P on every backend and layout.
- The SVD runs in float32 whatever the gradient's dtype (float64 on CPU,
  see `left_singular_vectors`); P is stored in the gradient's dtype (the
  reference implementation does both).
- Adam is optax's (`m / (sqrt(v) + eps)` with bias-corrected moments); the
  reference implementation folds the bias correction into the step size,
  which differs only in where `eps` enters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A tree of bools like the params (True: projected), or a function making one.
Mask = Any | Callable[[Any], Any]


class ScaleByGaloreState(NamedTuple):
    count: jax.Array  # updates taken (int32); projections refresh when count % T == 0
    proj: Any  # P for each targeted leaf, None for the others
    inner: Any  # the Adam state, moments in the projected shapes


def projected_rank(shape, rank: int) -> int:
    """The rank GaLore uses for a matrix of this shape: r, or the matrix's
    smaller side where that is smaller (the projection is then a rotation)."""
    return min(int(rank), int(shape[-2]), int(shape[-1]))


def _left(shape) -> bool:
    """True when P spans the rows (left singular vectors): m <= n."""
    return shape[-2] <= shape[-1]


def _wide(x):
    """The matrix oriented so its shorter side comes first (`a x b`, a <= b)."""
    return x if _left(x.shape) else jnp.swapaxes(x, -1, -2)


def _host_left_vectors(x):
    return np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)[0].astype(np.float32)


def left_singular_vectors(x):
    """U of each `a x b` matrix in `x` (a <= b), float32.

    On CPU through numpy in a host callback: jaxlib's LAPACK SVD waits for
    helper tasks on the intra-op thread pool, and in a step compiled for
    several CPU devices (the simulated devices of the parallel tests) every
    pool thread is running one device's program and waits in it: a deadlock.
    Elsewhere (GPU: cuSOLVER, TPU) the backend's SVD."""

    def on_cpu(m):
        out = jax.ShapeDtypeStruct(m.shape[:-1] + (m.shape[-2],), jnp.float32)
        return jax.pure_callback(_host_left_vectors, out, m, vmap_method="sequential")

    def elsewhere(m):
        return jnp.linalg.svd(m, full_matrices=False)[0]

    return jax.lax.platform_dependent(x.astype(jnp.float32), cpu=on_cpu, default=elsewhere)


def projection(g, rank: int):
    """P (`... x a x r'`): the top singular vectors of `g` on its shorter side,
    each column's largest-magnitude entry made positive."""
    r = projected_rank(g.shape, rank)
    p = left_singular_vectors(_wide(g))[..., :r]
    peak = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=-2)[..., None, :], axis=-2)
    return (p * jnp.where(peak < 0, -1.0, 1.0)).astype(g.dtype)


def project(g, p):
    """R = P^T G, in the wide orientation (`... x r' x b`)."""
    return jnp.einsum("...ar,...ab->...rb", p, _wide(g).astype(p.dtype)).astype(g.dtype)


def project_back(n, p, shape):
    """P N, oriented back to the weight's `shape`."""
    full = jnp.einsum("...ar,...rb->...ab", p, n.astype(p.dtype)).astype(n.dtype)
    return full if _left(shape) else jnp.swapaxes(full, -1, -2)


def _resolve(mask: Mask, tree):
    return mask(tree) if callable(mask) else mask


def scale_by_galore(
    rank: int,
    update_proj_gap: int,
    scale: float = 1.0,
    *,
    mask: Mask,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam's normalized update, computed in GaLore's rank-`rank` projection
    for the leaves `mask` marks (2-D or more: the last two axes are the
    matrix) and on the full gradient for the others.

    >>> tx = scale_by_galore(1, 10, mask={"w": True, "b": False})
    >>> state = tx.init({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    >>> state.proj["w"].shape, state.inner.mu["w"].shape, state.proj["b"]
    ((2, 1), (1, 3), None)
    """
    if int(update_proj_gap) < 1 or int(rank) < 1:
        raise ValueError(f"rank={rank} and update_proj_gap={update_proj_gap} must be >= 1")
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def flat_targets(tree):
        leaves, treedef = jax.tree.flatten(tree)
        targeted = treedef.flatten_up_to(_resolve(mask, tree))
        for x, t in zip(leaves, targeted):
            if t and jnp.ndim(x) < 2:
                raise ValueError(f"GaLore's mask marks a non-matrix of shape {jnp.shape(x)}")
        return leaves, treedef, [bool(t) for t in targeted]

    def init(params):
        leaves, treedef, targeted = flat_targets(params)
        proj, low = [], []
        for x, t in zip(leaves, targeted):
            if not t:
                proj.append(None)
                low.append(x)
                continue
            a, b = sorted(x.shape[-2:])
            r = projected_rank(x.shape, rank)
            proj.append(jnp.zeros((*x.shape[:-2], a, r), x.dtype))
            low.append(jnp.zeros((*x.shape[:-2], r, b), x.dtype))  # what Adam's moments copy
        inner = adam.init(treedef.unflatten(low))
        return ScaleByGaloreState(jnp.zeros([], jnp.int32), treedef.unflatten(proj), inner)

    def update(updates, state, params=None):
        del params
        leaves, treedef, targeted = flat_targets(updates)
        old = treedef.flatten_up_to(state.proj)

        def fresh():
            return [
                projection(g, rank).astype(p.dtype) if t else None
                for g, p, t in zip(leaves, old, targeted)
            ]

        # One branch for all leaves: the SVDs run only on refresh steps.
        refresh = state.count % update_proj_gap == 0
        proj = jax.lax.cond(refresh, fresh, lambda: old) if any(targeted) else old
        low = [project(g, p) if t else g for g, p, t in zip(leaves, proj, targeted)]
        normed, inner = adam.update(treedef.unflatten(low), state.inner)
        normed = treedef.flatten_up_to(normed)
        out = [
            scale * project_back(n, p, g.shape) if t else n
            for n, p, g, t in zip(normed, proj, leaves, targeted)
        ]
        count = optax.safe_increment(state.count)
        return treedef.unflatten(out), ScaleByGaloreState(count, treedef.unflatten(proj), inner)

    return optax.GradientTransformation(init, update)


def matrices_only(params):
    """Weight decay on arrays of two or more dimensions, as
    `ftjax.train.optim.decay_mask` decides for plain (unadapted) arrays."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int,
    scale: float = 1.0,
    *,
    mask: Mask,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: Mask = matrices_only,
    clip_norm: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW with GaLore's projected moments on the leaves `mask` marks:
    global-norm clipping of the full gradients (`clip_norm` > 0), then
    `scale_by_galore`, decoupled weight decay on the full weights and the
    learning rate, in `optax.adamw`'s order."""
    tx = optax.chain(
        scale_by_galore(rank, update_proj_gap, scale, mask=mask, b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    if clip_norm and clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx
