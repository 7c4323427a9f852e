"""LoRA: a frozen kernel plus a trainable low-rank update, as one weight leaf.

`LoraWeight(w, a, b, scale)` stands for the kernel `w + scale * a @ b`, with `w`
of shape `(..., in, out)`, `a` `(..., in, r)` and `b` `(..., r, out)` (the
leading axes are the stacked-layer axis under `scan_layers`). Applied to `x` it
computes

    x @ w + scale * (dropout(x) @ a) @ b

without ever forming `a @ b` (`compute="factored"`), or
`x @ (w + scale * a @ b)` (`compute="merged"`, for ablating the two), or the
merged forward with factored gradients (`compute="hybrid"`, see
`merged_forward`). The default, `compute="auto"`, is `hybrid` where it is the
same function to float32 rounding and faster (float32 compute, no active
dropout, enough tokens per call: 1.4x per LoRA step on the CPU benchmark), and
`factored` otherwise: in bfloat16 a merged kernel would round away updates
smaller than the kernel's last bit, dropout needs the separate low-rank input,
and on few tokens the merged kernel costs more than it saves
(`LoraWeight.compute_mode`). `w` may be a plain array or another weight leaf such as
`NF4Weight` (that is QLoRA).

Scales: LoRA uses `alpha / r`, rsLoRA `alpha / sqrt(r)` (`lora_scale`).
Inits (`init_lora`): `kaiming` (a ~ U(-1/sqrt(in), 1/sqrt(in)), what PEFT's
kaiming_uniform(a=sqrt(5)) gives), `gaussian` (a ~ N(0, 1/r^2)), both with
`b = 0` so the adapted model equals the base model exactly at step 0; and
`pissa`, which takes `a`, `b` from the top-r singular directions of `w`
scaled by `sqrt(S / scale)` and leaves the residual `w - scale * a @ b` frozen;
`pissa_niter_<k>`, the same from a randomized SVD (k subspace iterations on a
fixed Gaussian sketch, so that it is a deterministic function of `w`); and
`olora`, which takes them from the QR decomposition of the torch-layout
kernel `w.T = Q R` (`b = Q_r.T`, `a = R_r.T`), as PEFT's OLoRA does.
A leaf made by one of these records it in its static field `init`: its `w`
is not the model's kernel, so an adapter file holding only `a`, `b` would be
applied to the wrong base; `pissa_to_lora_leaf` rewrites it as a plain LoRA
over the original kernel (`init=None`).
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models import layers
from ftjax.peft.base import PeftError, RankError, WeightLeaf, register_leaf

COMPUTE_MODES = ("auto", "factored", "merged", "hybrid")
# Modes whose forward uses the merged kernel: no separate low-rank input, so no dropout.
MERGED_MODES = ("merged", "hybrid")
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<k>", "olora")
# Inits that rewrite the frozen kernel: a leaf made by one is not "base + a @ b".
BASE_REWRITING_INITS = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
# PEFT inits ftjax does not implement, and why (`check_init`).
REFUSED_INITS = {
    "loftq": "data-dependent: alternates NF4 quantization and SVD of the base (LoftQ)",
    "corda": "data-dependent: needs activation covariances from calibration data (CorDA)",
    "eva": "data-dependent: SVD of activations on calibration data (EVA)",
    "lora_ga": "data-dependent: needs gradients on calibration data (LoRA-GA)",
    "orthogonal": "not implemented (PEFT's orthogonal init)",
    "mica": "not implemented (MiCA freezes B at the minor singular vectors)",
}


def is_base_rewriting(init) -> bool:
    """True for the inits whose leaf's `w` is a residual, not the model's kernel."""
    return isinstance(init, str) and (
        init in BASE_REWRITING_INITS or _PISSA_NITER.fullmatch(init) is not None
    )


def check_init(init, field: str = "method.init") -> None:
    """Raises PeftError naming `field` for an init ftjax cannot make."""
    if init in ("kaiming", "gaussian") or is_base_rewriting(init):
        return
    reason = REFUSED_INITS.get(init) if isinstance(init, str) else None
    if reason:
        raise PeftError(f"{field}: {init!r} is refused: {reason}")
    raise PeftError(f"{field}: {init!r} is not one of {', '.join(INITS)}")


def dropout(x, rate: float, rng):
    """Inverted dropout; the identity when `rng` is None (evaluation) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def check_compute(compute: str, rate: float):
    if compute not in COMPUTE_MODES:
        raise PeftError(f"method.compute: {compute!r} is not one of {', '.join(COMPUTE_MODES)}")
    if compute in MERGED_MODES and rate:
        # Dropout acts on the input of the low-rank path only, which a merged
        # kernel no longer has.
        raise PeftError(f"method.compute: {compute!r} cannot apply LoRA dropout; set dropout=0")


@register_leaf
class LoraWeight(WeightLeaf):
    """The kernel `w + scale * a @ b` (see the module docstring).

    >>> w = jnp.ones((4, 3)); a = jnp.ones((4, 2)); b = jnp.zeros((2, 3))
    >>> leaf = LoraWeight(w, a, b, scale=2.0)
    >>> layers.linear(jnp.ones((1, 4)), leaf)   # == ones(1, 4) @ w while b == 0
    Array([[4., 4., 4.]], dtype=float32)
    >>> layers.linear(jnp.ones((1, 4)), LoraWeight(w, a, jnp.ones((2, 3)), scale=2.0))
    Array([[20., 20., 20.]], dtype=float32)
    """

    children = ("w", "a", "b")
    trainable_children = ("a", "b")
    static = ("scale", "dropout", "compute", "init", "freeze_a")
    # The defaults for subclasses whose `static` predates the fields.
    init = None
    freeze_a = False

    def __init__(
        self,
        w,
        a,
        b,
        scale: float = 1.0,
        dropout: float = 0.0,
        compute="auto",
        init=None,
        freeze_a: bool = False,
    ):
        check_compute(compute, dropout)
        if init is not None and not is_base_rewriting(init):
            raise PeftError(
                f"LoraWeight.init: {init!r} is not None or one of "
                f"{', '.join(BASE_REWRITING_INITS)}, pissa_niter_<k>"
            )
        self._set(
            w=w, a=a, b=b, scale=float(scale), dropout=float(dropout), compute=compute, init=init,
            freeze_a=bool(freeze_a),
        )  # fmt: skip

    def trainable_names(self) -> tuple[str, ...]:
        """LoRA-FA (`freeze_a`): `a` stays at its random init, only `b` (and
        DoRA's `m`) train."""
        if self.freeze_a:
            return tuple(n for n in self.trainable_children if n != "a")
        return self.trainable_children

    @property
    def rewrites_base(self) -> bool:
        """True when `w` is not the model's kernel (a PiSSA residual, say)."""
        return is_base_rewriting(self.init)

    @property
    def shape(self):
        return tuple(self.w.shape)

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def compute_mode(self, dtype, rng, tokens: int | None = None) -> str:
        """The mode `auto` resolves to for a call on `tokens` rows of input:
        `hybrid` for float32 compute, no active dropout, and at least
        `in*out/(in+out)` tokens. Below that, the merged kernel (built twice a
        step) costs more FLOPs than the factored form's rank-r matmuls, and it
        outweighs the layer's own input and output in memory: at batch 1 x 128
        tokens it raised LoRA's peak from 0.47x to 0.60x full tuning's."""
        if self.compute != "auto":
            return self.compute
        if jnp.dtype(dtype) != jnp.float32 or (rng is not None and self.dropout > 0):
            return "factored"
        fan_in, fan_out = self.shape[-2], self.shape[-1]
        if tokens is not None and tokens * (fan_in + fan_out) < fan_in * fan_out:
            return "factored"
        return "hybrid"

    def apply_linear(self, x, *, dtype, rng):
        mode = self.compute_mode(dtype, rng, math.prod(x.shape[:-1]))
        if mode == "merged":
            return jnp.matmul(x, self.materialize(dtype))
        if mode == "hybrid":
            return merged_forward(x, self, jnp.dtype(dtype))
        y = layers.linear(x, self.w, dtype=dtype)
        h = jnp.matmul(dropout(x, self.dropout, rng), jnp.asarray(self.a, dtype))
        # Scaling the r-wide activation is the cheapest place to apply `scale`.
        return y + jnp.matmul(h * jnp.asarray(self.scale, dtype), jnp.asarray(self.b, dtype))

    def delta(self, dtype=jnp.float32):
        """`scale * a @ b`, the dense update (materialized: for merging and tests)."""
        a = jnp.asarray(self.a, dtype) * jnp.asarray(self.scale, dtype)
        return jnp.matmul(a, jnp.asarray(self.b, dtype))

    def materialize(self, dtype=None):
        dtype = dtype or self.dtype
        # Summed in float32 so that merging a bfloat16 model loses no more than
        # the final rounding.
        w = layers.materialize(self.w, jnp.float32)
        return (w + self.delta(jnp.float32)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def merged_forward(x, leaf: LoraWeight, dtype):
    """`x @ leaf.materialize(dtype)`, differentiated as the factored form.

    The forward is one dense matmul with the merged kernel `w + scale * a @ b`;
    the backward is `dx = dy @ merged.T` (one dense matmul again) and the
    adapter gradients in factored form, `db = scale * (x @ a).T @ dy` and
    `da = scale * x.T @ (dy @ b.T)`, so that there is no dense gradient of the
    kernel (`compute="merged"` has one, as large as full tuning's). The merged
    kernel is rebuilt in the backward rather than kept, so a step holds one
    at a time, and `w` (a plain array or an `NF4Weight`) is only read. On a
    CPU this replaces the slow, skinny rank-r matmuls of the factored form
    with the dense ones full tuning runs at full speed (docs/benchmarks.md).
    Its cost is `2 * in * out * r` FLOPs per merge, small beside the
    `2 * tokens * in * out` of the matmul once tokens per step >> r."""
    return jnp.matmul(x, leaf.materialize(dtype))


def _merged_forward_fwd(x, leaf, dtype):
    return merged_forward(x, leaf, dtype), (x, leaf)


def _zero_cotangent(tree):
    """The (unused) cotangent of the frozen kernel: zeros, float0 for integer
    children such as NF4 codes."""

    def zero(t):
        if jnp.issubdtype(jnp.result_type(t), jnp.inexact):
            return jnp.zeros_like(t)
        return np.zeros(jnp.shape(t), jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _merged_forward_bwd(dtype, residuals, dy):
    x, leaf = residuals
    dx = jnp.matmul(dy, leaf.materialize(dtype).T)
    a, b = jnp.asarray(leaf.a, dy.dtype), jnp.asarray(leaf.b, dy.dtype)
    scale = jnp.asarray(leaf.scale, dy.dtype)
    # Contract over every leading (batch, token) axis.
    db = jnp.einsum("...r,...o->ro", jnp.matmul(x, a), dy) * scale
    da = jnp.einsum("...i,...r->ir", x, jnp.matmul(dy, b.T)) * scale
    grads = leaf.replace(w=_zero_cotangent(leaf.w), a=da.astype(leaf.a.dtype),
                         b=db.astype(leaf.b.dtype))  # fmt: skip
    return dx, grads


merged_forward.defvjp(_merged_forward_fwd, _merged_forward_bwd)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """`alpha / r` (LoRA) or `alpha / sqrt(r)` (rsLoRA).

    >>> lora_scale(16, 8), lora_scale(16, 4, rslora=True)
    (2.0, 8.0)
    """
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def check_rank(rank: int, shape, path: str = "kernel"):
    """Raises RankError when `rank` is not in [1, min(in, out)] for a kernel shape."""
    fan_in, fan_out = shape[-2], shape[-1]
    if rank < 1:
        raise RankError(f"method.rank: must be at least 1, got {rank}")
    if rank > min(fan_in, fan_out):
        raise RankError(
            f"method.rank: {rank} exceeds min(in, out) = {min(fan_in, fan_out)} of {path} "
            f"(shape {tuple(shape)})"
        )


def init_lora(
    key,
    w,
    rank: int,
    *,
    scale: float,
    init: str = "kaiming",
    dropout: float = 0.0,
    compute: str = "auto",
    dtype=None,
    path: str = "kernel",
    freeze_a: bool = False,
) -> LoraWeight:
    """A fresh `LoraWeight` around kernel `w` (shape `(..., in, out)`).

    `dtype` is the adapter dtype (default: the kernel's). Leading axes of `w`
    (stacked layers) give each layer its own independent adapter. With
    `freeze_a` (LoRA-FA) `a` keeps its init and only `b` trains.

    >>> leaf = init_lora(jax.random.key(0), jnp.ones((16, 8)), 4, scale=2.0)
    >>> leaf.a.shape, leaf.b.shape, float(jnp.abs(leaf.b).max())
    ((16, 4), (4, 8), 0.0)
    """
    shape = tuple(w.shape)
    check_rank(rank, shape, path)
    dtype = jnp.dtype(dtype or w.dtype)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    if init == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, lead + (fan_in, rank), dtype, -bound, bound)
        b = jnp.zeros(lead + (rank, fan_out), dtype)
    elif init == "gaussian":
        a = jax.random.normal(key, lead + (fan_in, rank), dtype) / rank
        b = jnp.zeros(lead + (rank, fan_out), dtype)
    elif is_base_rewriting(init):
        if isinstance(w, WeightLeaf):
            raise PeftError(f"method.init: {init!r} needs a dense kernel at {path}")
        w, a, b = rewriting_factors(init, w, rank, scale)
        a, b = a.astype(dtype), b.astype(dtype)
    else:
        check_init(init)
        raise PeftError(f"method.init: {init!r} is not one of {', '.join(INITS)}")
    marker = init if is_base_rewriting(init) else None
    return LoraWeight(
        w, a, b, scale=scale, dropout=dropout, compute=compute, init=marker, freeze_a=freeze_a
    )


def pissa_factors(w, rank: int, scale: float):
    """(residual, a, b) with `residual + scale * a @ b == w` (PiSSA init).

    From `w = U diag(S) Vt`: `a = U_r sqrt(S_r / scale)`,
    `b = sqrt(S_r / scale) Vt_r`, residual `w - scale * a @ b`, all batched over
    leading axes. The SVD runs in float32; the residual keeps `w`'s dtype.
    """
    w32 = jnp.asarray(w, jnp.float32)
    u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    a = u[..., :, :rank] * root[..., None, :]
    b = root[..., :, None] * vt[..., :rank, :]
    residual = (w32 - scale * jnp.matmul(a, b)).astype(w.dtype)
    return residual, a, b


def pissa_niter_factors(w, rank: int, scale: float, niter: int):
    """`pissa_factors` from a randomized SVD: `niter` subspace iterations on a
    Gaussian sketch of width `rank` (Halko et al.; PEFT's `pissa_niter_<k>`
    uses torch's `svd_lowrank` the same way). The sketch's key is fixed, so
    the factors are a function of `w` alone and a conversion to plain LoRA
    can recompute them from the base."""
    m = jnp.asarray(w, jnp.float32)
    mt = jnp.swapaxes(m, -1, -2)
    sketch = jax.random.normal(jax.random.key(0), m.shape[:-2] + (m.shape[-1], rank), jnp.float32)
    q, _ = jnp.linalg.qr(jnp.matmul(m, sketch))
    for _ in range(niter):
        z, _ = jnp.linalg.qr(jnp.matmul(mt, q))
        q, _ = jnp.linalg.qr(jnp.matmul(m, z))
    u_small, s, vt = jnp.linalg.svd(jnp.matmul(jnp.swapaxes(q, -1, -2), m), full_matrices=False)
    root = jnp.sqrt(s / scale)
    a = jnp.matmul(q, u_small) * root[..., None, :]
    b = root[..., :, None] * vt
    return (m - scale * jnp.matmul(a, b)).astype(w.dtype), a, b


def olora_factors(w, rank: int, scale: float):
    """(residual, a, b) with `residual + scale * a @ b == w` (OLoRA init).

    PEFT factors the torch-layout weight `w.T = Q R` and sets `lora_B = Q_r`,
    `lora_A = R_r` (no rescaling by `scale`), so `b = Q_r.T`, `a = R_r.T`.
    The product `Q_r R_r` does not depend on QR's sign convention."""
    w32 = jnp.asarray(w, jnp.float32)
    q, r = jnp.linalg.qr(jnp.swapaxes(w32, -1, -2))
    a = jnp.swapaxes(r[..., :rank, :], -1, -2)
    b = jnp.swapaxes(q[..., :, :rank], -1, -2)
    return (w32 - scale * jnp.matmul(a, b)).astype(w.dtype), a, b


def rewriting_factors(init: str, w, rank: int, scale: float):
    """(residual, a, b) of a base-rewriting init (`is_base_rewriting`)."""
    if init == "pissa":
        return pissa_factors(w, rank, scale)
    if init == "olora":
        return olora_factors(w, rank, scale)
    match = _PISSA_NITER.fullmatch(init)
    if match is None:
        raise PeftError(f"init: {init!r} does not rewrite the base")
    return pissa_niter_factors(w, rank, scale, int(match.group(1)))


def pissa_to_lora_leaf(trained: LoraWeight, initial, path: str = "kernel") -> LoraWeight:
    """A plain-LoRA leaf over the *original* kernel equal to a trained PiSSA leaf.

    PiSSA trains `a, b` over the residual `w_res = W - s a0 b0`, so
    `w_res + s a b = W + s [a, a0] @ [b; -b0]`: a rank-2r LoRA on `W` itself,
    which is what a consumer holding only the base model can apply (PEFT's
    `path_initial_model_for_weight_conversion` does the same).

    `initial` is either the PiSSA leaf as initialized (`w_res, a0, b0`; then
    `W = w_res + s a0 b0`) or the original kernel `W` itself (then `a0, b0`
    are recomputed: PiSSA's init is a deterministic SVD). Either way the
    trained leaf's residual must be the one `initial` gives, which is checked
    (so this runs outside `jit`). Over a quantized residual (QPiSSA) the
    rewrite is exact for ftjax's leaf, whose `w` becomes the dequantized
    residual plus `s a0 b0`; over the released `W` it differs by the
    quantization error, as PEFT warns for its own conversion. OLoRA and
    `pissa_niter_<k>` leaves convert the same way (`rewriting_factors`).
    """
    if not trained.rewrites_base:
        raise PeftError(f"{path}: not a PiSSA leaf (init={trained.init!r}); nothing to convert")
    rank, scale = trained.rank, trained.scale
    if isinstance(initial, LoraWeight):
        if initial.init != trained.init or initial.rank != rank or initial.scale != scale:
            raise PeftError(
                f"{path}: the initial leaf (init={initial.init!r}, rank {initial.rank}, "
                f"scale {initial.scale}) is not this PiSSA leaf's (rank {rank}, scale {scale})"
            )
        residual, a0, b0 = initial.w, initial.a, initial.b
        original = layers.materialize(residual, jnp.float32) + initial.delta(jnp.float32)
    else:
        if tuple(initial.shape) != tuple(trained.shape):
            raise PeftError(
                f"{path}: the base kernel has shape {tuple(initial.shape)}, "
                f"the PiSSA leaf {tuple(trained.shape)}"
            )
        original = jnp.asarray(initial, jnp.float32)
        residual, a0, b0 = rewriting_factors(trained.init, original, rank, scale)
    _check_residual(trained.w, residual, path)
    dtype = trained.w.dtype
    a = jnp.concatenate([trained.a, jnp.asarray(a0, trained.a.dtype)], axis=-1)
    b = jnp.concatenate([trained.b, -jnp.asarray(b0, trained.b.dtype)], axis=-2)
    return trained.replace(w=original.astype(dtype), a=a, b=b, **_plain_init(trained))


def _plain_init(leaf) -> dict:
    # A subclass whose `static` lacks the field has no marker to clear.
    return {"init": None} if "init" in type(leaf).static else {}


def _check_residual(stored, expected, path: str):
    """Refuses an `initial` whose residual is not the trained leaf's frozen one
    (another base, rank or scale); the tolerance allows a dtype's rounding, or
    a quantized residual's quantization error."""
    got = np.asarray(layers.materialize(stored, jnp.float32))
    want = np.asarray(layers.materialize(expected, jnp.float32))
    quantized = isinstance(stored, WeightLeaf) or isinstance(expected, WeightLeaf)
    tol = 0.25 if quantized else 1e-2
    err = float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-30)
    if not err <= tol:
        raise PeftError(
            f"{path}: the PiSSA leaf's frozen residual differs from the one `initial` gives "
            f"(max relative difference {err:.3g} > {tol}); pass the base params (or the initial "
            "adapted params) the adapter was trained from"
        )
