"""OFT (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning"), in the form HF PEFT implements since 0.18: block sizes as in
BOFT (Liu et al., 2024), the input-side rotation and Cayley–Neumann series
of OFTv2 (Qiu et al., 2025, "Orthogonal Finetuning Made Scalable").

`OFTWeight(w, q, block_size, ...)` stands for the kernel

    blockdiag(R_1, …, R_n) @ w                 (JAX layout: w (in, out))

a rotation of the kernel's *input* side: the layer computes
`(x @ blockdiag(R)) @ w + bias` (PEFT rotates `x` before the frozen layer;
the bias is not rotated). Each `R_i` is `block_size × block_size`, with
`n · block_size = in`; `q` `(n, block_size·(block_size−1)/2)` holds the
strict upper triangle of each block's skew-symmetric `S_i` (row-major, as
`torch.triu_indices`), and `R_i` is its Cayley transform

    exact (cayley_neumann=False):  R = (I − S)(I + S)⁻¹
    PEFT's series (default):       R = I + 2S + 2S² + … + 2S^(k−2) + S^(k−1)

with `k = neumann_terms` (the series has PEFT's own truncation: the last
kept power has coefficient 1; `k ≤ 1` gives `I`, `k = 2` gives `I + 2S`,
`k = 3` and `k = 4` both give `I + 2S + 2S² + S³`). Note the series expands
`(I + S)(I − S)⁻¹`, the transpose of the exact form; both are PEFT's. With
`block_share` a single block `q` `(1, ·)` serves all `n` blocks. The
constrained variant (COFT, `coft=True`) scales each block's `S` back to
Frobenius norm at most `eps / sqrt(blocks stored)` before use
(`project_coft`); the rotation's gradient is taken at the projected value,
as PEFT's in-place projection does. `q = 0` gives `R = I`: the model starts
unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.models import layers
from ftjax.peft.base import WeightLeaf, is_leaf, register_leaf


def packed_size(block_size: int) -> int:
    """Entries of a block's strict upper triangle: `b(b−1)/2`."""
    return block_size * (block_size - 1) // 2


def block_size_of(packed: int) -> int:
    """The block size whose strict upper triangle has `packed` entries."""
    b = (1 + math.isqrt(1 + 8 * packed)) // 2
    if packed_size(b) != packed:
        raise ValueError(f"{packed} is not b(b-1)/2 for any block size b")
    return b


def nearest_divisor(dimension: int, value: int) -> int:
    """HF PEFT's adjustment of a block size (or block count) that does not
    divide a layer's input size: the divisor of `dimension` nearest to
    `value`, the smaller one on a tie; `dimension` itself when `value` is
    at least as large.

    >>> nearest_divisor(48, 32), nearest_divisor(48, 40), nearest_divisor(32, 64)
    (24, 48, 32)
    """
    if value >= dimension:
        return dimension
    if dimension % value == 0:
        return value
    higher = next(d for d in range(value, dimension + 1) if dimension % d == 0)
    lower = next(d for d in range(value, 0, -1) if dimension % d == 0)
    return lower if value - lower <= higher - value else higher


def block_layout(fan_in: int, *, rank: int = 0, block_size: int = 0) -> tuple[int, int]:
    """`(blocks, block_size)` PEFT gives a layer with input size `fan_in`
    from exactly one of `rank` (its `r`: the number of blocks) and
    `block_size` (its `oft_block_size`), adjusted by `nearest_divisor`.

    >>> block_layout(48, block_size=32), block_layout(48, rank=5)
    ((2, 24), (4, 12))
    """
    if (rank != 0) == (block_size != 0):
        raise ValueError(f"exactly one of rank={rank} and block_size={block_size} must be nonzero")
    if block_size:
        b = nearest_divisor(fan_in, block_size)
        return fan_in // b, b
    n = nearest_divisor(fan_in, rank)
    return n, fan_in // n


def neumann_coefficients(terms: int) -> tuple[float, ...]:
    """Coefficients of `S⁰, S¹, …` in PEFT's truncated Cayley–Neumann series
    for `terms` (see the module docstring).

    >>> neumann_coefficients(5), neumann_coefficients(3), neumann_coefficients(1)
    ((1.0, 2.0, 2.0, 2.0, 1.0), (1.0, 2.0, 2.0, 1.0), (1.0,))
    """
    if terms <= 1:
        return (1.0,)
    if terms == 2:
        return (1.0, 2.0)
    top = max(3, terms - 1)
    return (1.0,) + (2.0,) * (top - 1) + (1.0,)


def skew(q, block_size: int):
    """`(..., n, b(b−1)/2)` packed upper triangles -> `(..., n, b, b)` skew-symmetric."""
    rows, cols = np.triu_indices(block_size, 1)
    upper = jnp.zeros(q.shape[:-1] + (block_size, block_size), q.dtype).at[..., rows, cols].set(q)
    return upper - jnp.swapaxes(upper, -1, -2)


def cayley(q, block_size: int, *, cayley_neumann: bool = True, neumann_terms: int = 5):
    """The blocks `R` `(..., n, b, b)` of packed skew parameters `q`, exact or
    by PEFT's series (module docstring)."""
    s = skew(q, block_size)
    eye = jnp.broadcast_to(jnp.eye(block_size, dtype=s.dtype), s.shape)
    if not cayley_neumann:
        # (I − S) and (I + S) commute, so (I − S)(I + S)⁻¹ = (I + S)⁻¹(I − S).
        return jnp.linalg.solve(eye + s, eye - s)
    coefficients = neumann_coefficients(neumann_terms)
    r, power = eye, eye
    for c in coefficients[1:]:
        power = power @ s
        r = r + c * power
    return r


def project_coft(q, eps: float):
    """COFT's constraint as PEFT applies it: each block's skew matrix (of
    Frobenius norm `sqrt(2)·|q_i|`) scaled back to norm at most
    `eps / sqrt(n)`, `n` the blocks stored (1 with `block_share`)."""
    limit = eps / math.sqrt(q.shape[-2])
    norm = math.sqrt(2.0) * jnp.linalg.norm(q.astype(jnp.float32), axis=-1, keepdims=True)
    factor = jnp.where(norm <= limit, 1.0, limit / jnp.where(norm > 0, norm, 1.0))
    return (q * factor).astype(q.dtype)


@register_leaf
class OFTWeight(WeightLeaf):
    """`blockdiag(R(q)) @ w` (see the module docstring).

    >>> leaf = init_oft(jnp.eye(4), block_size=2)
    >>> leaf.q.shape
    (2, 1)
    >>> leaf = leaf.replace(q=jnp.asarray([[0.5], [0.0]]))
    >>> leaf.materialize()[:2, :2]  # PEFT's series, k = 5: I + 2S + 2S² + 2S³ + S⁴
    Array([[ 0.5625,  0.75  ],
           [-0.75  ,  0.5625]], dtype=float32)
    >>> layers.linear(jnp.asarray([[1.0, 0.0, 1.0, 1.0]]), leaf)
    Array([[0.5625, 0.75  , 1.    , 1.    ]], dtype=float32)
    """

    children = ("w", "q")
    trainable_children = ("q",)
    static = ("block_size", "cayley_neumann", "neumann_terms", "coft", "eps")

    def __init__(self, w, q, block_size, cayley_neumann=True, neumann_terms=5, coft=False,
                 eps=6e-5):  # fmt: skip
        self._set(w=w, q=q, block_size=int(block_size), cayley_neumann=bool(cayley_neumann),
                  neumann_terms=int(neumann_terms), coft=bool(coft), eps=float(eps))  # fmt: skip

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def blocks(self) -> int:
        """Blocks along the input side (`in / block_size`), shared or not."""
        return self.shape[-2] // self.block_size

    @property
    def block_share(self) -> bool:
        """One stored block serving several."""
        return self.q.shape[-2] == 1 and self.blocks > 1

    def rotation_blocks(self, dtype=jnp.float32):
        """`R` `(..., stored blocks, b, b)`, computed in float32 (`b × b` only)."""
        q = jnp.asarray(self.q, jnp.float32)
        if self.coft:
            # Value of the projection, gradient of the identity: PEFT overwrites
            # its weight with the projected one (no_grad) and differentiates there.
            q = q + jax.lax.stop_gradient(project_coft(q, self.eps) - q)
        r = cayley(q, self.block_size, cayley_neumann=self.cayley_neumann,
                   neumann_terms=self.neumann_terms)  # fmt: skip
        return r.astype(dtype)

    def apply_linear(self, x, *, dtype, rng):
        r = self.rotation_blocks(dtype)
        h = x.reshape(x.shape[:-1] + (self.blocks, self.block_size))
        if r.shape[-3] == 1:
            h = jnp.einsum("...nk,kc->...nc", h, r[0])
        else:
            h = jnp.einsum("...nk,nkc->...nc", h, r)
        return layers.linear(h.reshape(x.shape), self.w, dtype=dtype, rng=rng)

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        w = layers.materialize(self.w, jnp.float32)
        lead, fan_out = w.shape[:-2], w.shape[-1]
        r = self.rotation_blocks(jnp.float32)
        r = jnp.broadcast_to(r, lead + (self.blocks, self.block_size, self.block_size))
        wb = w.reshape(lead + (self.blocks, self.block_size, fan_out))
        return jnp.einsum("...nkc,...nco->...nko", r, wb).reshape(w.shape).astype(dtype)


def init_oft(w, *, block_size: int = 0, rank: int = 0, block_share=False, cayley_neumann=True,
             neumann_terms=5, coft=False, eps=6e-5, dtype=jnp.float32) -> OFTWeight:  # fmt: skip
    """A fresh `OFTWeight` around `w` (`(..., in, out)`): `q = 0` (`R = I`),
    blocks laid out from `block_size` or `rank` as PEFT does (`block_layout`).

    >>> init_oft(jnp.zeros((3, 48, 8)), block_size=32).q.shape  # 2 blocks of 24
    (3, 2, 276)
    """
    shape = tuple(w.shape)
    lead, fan_in = shape[:-2], shape[-2]
    blocks, b = block_layout(fan_in, rank=rank, block_size=block_size)
    stored = 1 if block_share else blocks
    q = jnp.zeros(lead + (stored, packed_size(b)), jnp.dtype(dtype or jnp.float32))
    return OFTWeight(w, q, b, cayley_neumann, neumann_terms, coft, eps)


def with_coft_projection(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` followed by COFT's projection of every constrained `OFTWeight`'s
    `q`: the stored parameter becomes `project(project(q) + update)`, the
    value PEFT's next forward uses (PEFT projects its weight in place at each
    forward, then the optimizer steps from the projected value)."""

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        if params is None:
            raise ValueError("with_coft_projection needs the params in tx.update")

        def project(u, p):
            if not (isinstance(p, OFTWeight) and p.coft and p.q is not None):
                return u
            start = project_coft(p.q, p.eps)
            return u.replace(q=project_coft(start + u.q, p.eps) - p.q)

        return jax.tree.map(project, updates, params, is_leaf=is_leaf), state

    return optax.GradientTransformation(tx.init, update)
