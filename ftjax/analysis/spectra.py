"""What fine-tuning did to one weight matrix, seen through singular value
decompositions.

- The spectrum of the update ΔW = W_tuned - W_base and the rank needed to hold
  90% of its energy (sum of squared singular values), as in Biderman et al.,
  "LoRA Learns Less and Forgets Less" (2024): full fine-tuning makes
  high-rank updates, LoRA low-rank ones.
- Intruder dimensions, as in Shuttleworth et al., "LoRA vs Full Fine-tuning:
  An Illusion of Equivalence" (2024): top singular vectors of W_tuned that
  are far (max |cosine| < ε) from every singular vector of W_base.
- ‖ΔW‖_F / ‖W_base‖_F.

Matrices are ftjax kernels of shape (in, out); the PyTorch weight is their
transpose. SVDs run in float32 through JAX, so on an accelerator when there is
one; results are plain Python numbers and lists, ready for JSON.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _as_matrix(w) -> jax.Array:
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {w.shape}")
    return w


def singular_values(w) -> np.ndarray:
    """Singular values of a matrix, largest first."""
    return np.asarray(jnp.linalg.svd(_as_matrix(w), compute_uv=False), np.float64)


def singular_vectors(w, side: str = "output") -> np.ndarray:
    """Unit singular vectors as rows, ordered by singular value.

    For a kernel K = U S Vh of shape (in, out), `side="output"` gives the rows
    of Vh (vectors in the output space: the left singular vectors of the
    PyTorch weight K.T, the ones the intruder-dimension paper compares);
    `side="input"` gives the columns of U.
    """
    u, _, vh = jnp.linalg.svd(_as_matrix(w), full_matrices=False)
    if side == "output":
        return np.asarray(vh)
    if side == "input":
        return np.asarray(u.T)
    raise ValueError(f"side must be 'output' or 'input', got {side!r}")


def energy_rank(values, energy: float = 0.9) -> int:
    """The smallest r whose top-r singular values hold `energy` of the total
    squared singular values (0 for a zero matrix).

    >>> energy_rank([3.0, 1.0, 1.0], energy=0.9)   # 9/11 < 0.9 <= 10/11
    2
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = np.sort(np.square(np.asarray(values, np.float64)))[::-1]
    total = sq.sum()
    if total == 0:
        return 0
    share = np.cumsum(sq) / total
    # The tolerance absorbs float32 SVD noise: a flat spectrum of 10 values
    # must reach 0.9 at 9, not at 10 because 9/10 rounded down.
    return int(min(np.searchsorted(share, energy - 1e-6) + 1, len(sq)))


def update_spectrum(w_base, w_tuned, *, energy: float = 0.9, max_values: int | None = 32) -> dict:
    """Spectrum of ΔW = w_tuned - w_base, its `energy` rank and its relative norm.

    >>> rng = np.random.default_rng(0)
    >>> w, u, v = rng.normal(size=(16, 8)), rng.normal(size=16), rng.normal(size=8)
    >>> update_spectrum(w, w + 0.1 * np.outer(u, v))["energy_rank"]   # a rank-1 update
    1
    >>> update_spectrum(w, w + 0.1 * rng.normal(size=(16, 8)))["energy_rank"]
    6
    """
    base, tuned = _as_matrix(w_base), _as_matrix(w_tuned)
    if base.shape != tuned.shape:
        raise ValueError(f"base shape {base.shape} != tuned shape {tuned.shape}")
    s = singular_values(tuned - base)
    rank = energy_rank(s, energy)
    delta_norm = float(np.sqrt(np.sum(np.square(s))))
    base_norm = float(jnp.linalg.norm(base))
    return {
        "energy_rank": rank,
        "rank_fraction": rank / len(s),
        "max_rank": len(s),
        "delta_norm": delta_norm,
        "base_norm": base_norm,
        "relative_norm": delta_norm / base_norm if base_norm > 0 else float("inf"),
        "singular_values": [float(x) for x in s[:max_values]],
    }


def relative_update_norm(w_base, w_tuned) -> float:
    """‖w_tuned - w_base‖_F / ‖w_base‖_F.

    >>> round(relative_update_norm(np.eye(2), 1.1 * np.eye(2)), 6)
    0.1
    """
    base, tuned = _as_matrix(w_base), _as_matrix(w_tuned)
    return float(jnp.linalg.norm(tuned - base) / jnp.linalg.norm(base))


def intruder_dimensions(
    w_base, w_tuned, *, k: int = 10, eps: float = 0.5, side: str = "output"
) -> dict:
    """Which of the top-k singular vectors of `w_tuned` are intruders: their
    highest |cosine similarity| with any singular vector of `w_base` is below
    `eps`. Singular vectors have no sign, hence the absolute value.

    >>> w = np.random.default_rng(0).normal(size=(4, 16))   # output side: 4 dims of 16
    >>> v = np.linalg.svd(w)[2][-1]                           # a direction outside them
    >>> r = intruder_dimensions(w, w + 10 * np.outer(np.ones(4), v))
    >>> r["count"], r["indices"]
    (1, [0])
    """
    base, tuned = _as_matrix(w_base), _as_matrix(w_tuned)
    if base.shape != tuned.shape:
        raise ValueError(f"base shape {base.shape} != tuned shape {tuned.shape}")
    top = jnp.asarray(singular_vectors(tuned, side)[:k])
    reference = jnp.asarray(singular_vectors(base, side))
    cos = jnp.abs(jnp.matmul(top, reference.T, precision=_HIGHEST))
    best = np.asarray(jnp.max(cos, axis=1), np.float64)
    indices = [int(i) for i in np.flatnonzero(best < eps)]
    return {"count": len(indices), "indices": indices, "max_cosine": [float(c) for c in best]}


def update_stats(
    w_base,
    w_tuned,
    *,
    k: int = 10,
    eps: float = 0.5,
    energy: float = 0.9,
    side: str = "output",
    max_values: int | None = 32,
) -> dict:
    """`update_spectrum` and `intruder_dimensions` of one matrix in one dict."""
    out = update_spectrum(w_base, w_tuned, energy=energy, max_values=max_values)
    intruders = intruder_dimensions(w_base, w_tuned, k=k, eps=eps, side=side)
    out.update(
        intruders=intruders["count"],
        intruder_indices=intruders["indices"],
        intruder_max_cosine=intruders["max_cosine"],
    )
    return out
