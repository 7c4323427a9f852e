"""Attention kernels, chosen by the platform the program is compiled for.

`dot_product_attention(q, k, v, mask, scale, causal, kernel, parts=...)` is the
one entry point the model families call (through `decoder.attend`). `kernel` is
`ModelConfig.attention`:

    "xla"     jax.nn.dot_product_attention over the dense mask: the whole
              (batch, heads, T, S) score matrix, on every platform.
    "block"   `causal_block_attention`: queries cut into blocks that skip the
              masked upper triangle (the fastest path on CPU).
    "splash"  Pallas splash attention (TPU flash attention): scores never leave
              on-chip memory, fully masked blocks are skipped. Off TPU it runs
              in Pallas interpret mode (slow; for tests).
    "cudnn"   cuDNN flash attention through jax.nn.dot_product_attention
              (GPU; bf16/fp16 only).
    "auto"    tpu -> splash, gpu -> cudnn, cpu -> block for long causal
              sequences, xla otherwise.

Splash and cuDNN need the mask as its parts (`MaskParts`: key padding, packed
segment ids, sliding window) rather than as a dense array, and apply only to
training-style calls (causal, no KV cache). Where a kernel cannot express a
call, `choose_kernel` says why and another kernel runs; the result is the same
function either way.

The platform is read at trace time: `jax.default_backend()`, unless a
`target_platform(...)` context says otherwise. The planner compiles for a TPU
topology on a CPU host, so it traces under `target_platform("tpu")`. A jitted
function does not retrace when only the platform changes: trace it under the
context it will run in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
log = logging.getLogger(__name__)

KERNELS = ("auto", "block", "xla", "splash", "cudnn")

# Query blocks of causal attention: at least this many rows each, and at most
# this many blocks (each block is its own pair of dots in the program).
CAUSAL_BLOCK_MIN, CAUSAL_BLOCKS_MAX = 64, 8

# Splash tiles: multiples of the TPU lane width that divide the sequence,
# largest first (512 rows x 512 keys of float32 scores fit VMEM comfortably).
SPLASH_BLOCKS = (512, 256, 128)

# The kv segment id of a padded key: matches no query's segment id.
_PADDING_SEGMENT = np.iinfo(np.int32).min


class MaskParts(NamedTuple):
    """What a causal self-attention mask is made of, for kernels that build it
    themselves; the dense mask given alongside must be exactly
    `layers.attention_mask(index, index, kv_valid, segment_ids, segment_ids,
    sliding_window)`.

    kv_valid      (B, S) bool, False for padded keys, or None.
    segment_ids   (B, T) int, packed-example ids shared by queries and keys
                  (no attention across ids), or None.
    sliding_window  keys more than this many positions back are hidden, or None.
    """

    kv_valid: Array | None = None
    segment_ids: Array | None = None
    sliding_window: int | None = None


# ----------------------------------------------------------------------------- platform

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ftjax_attention_platform", default=None
)


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Traces inside the block pick kernels for `platform` ("cpu", "gpu",
    "tpu"; None: the default backend):

        with attention.target_platform(mesh.devices.flat[0].platform):
            lowered = jax.jit(step).lower(...)
    """
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def current_platform() -> str:
    """The platform attention is traced for (see `target_platform`)."""
    platform = _PLATFORM.get() or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


# ----------------------------------------------------------------------------- choice


def splash_block_size(t: int) -> int | None:
    """The splash tile for a length-`t` sequence (None: no tile divides it)."""
    return next((b for b in SPLASH_BLOCKS if t % b == 0), None)


def splash_unsupported(q_shape, k_shape, causal: bool, parts: MaskParts | None) -> str | None:
    """Why splash cannot compute this call, or None if it can."""
    t, s = q_shape[1], k_shape[1]
    if not causal or t != s:
        return "not a causal self-attention call (KV cache or cross attention)"
    if parts is None:
        return "the mask was given only as a dense array (no MaskParts)"
    if splash_block_size(t) is None:
        return f"sequence length {t} is not a multiple of {SPLASH_BLOCKS[-1]} (the splash tile)"
    return None


def cudnn_unsupported(
    dtype,
    head_dim: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    parts: MaskParts | None,
    compute_capability: tuple[int, int] | None = None,
) -> str | None:
    """Why cuDNN flash attention (jax.nn.dot_product_attention with
    implementation="cudnn") cannot compute this call, or None if it can.

    cuDNN takes the mask as a type (causal), a left window and per-row valid
    *lengths*; a padding mask or packed segment ids are arbitrary patterns it
    could take only as a dense bias, whose gradient jax always computes: no
    better than "xla". `compute_capability` (major, minor) of the GPU; None
    assumes pre-Hopper limits."""
    if not causal or q_len != kv_len:
        return "not a causal self-attention call (KV cache or cross attention)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: cuDNN flash attention takes bfloat16 or float16"
    max_head = 256 if compute_capability is not None and compute_capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head:
        return f"head_dim {head_dim}: cuDNN needs a multiple of 8 up to {max_head}"
    if parts is None:
        return "the mask was given only as a dense array (no MaskParts)"
    if parts.segment_ids is not None:
        return "packed segment ids (cuDNN takes no segment mask)"
    if parts.kv_valid is not None:
        return "a key padding mask (cuDNN takes padding only as valid lengths)"
    return None


def _default_kernel(q_shape, k_shape, causal: bool) -> str:
    """The CPU rule (and the fallback of splash): causal blocks for long
    training-length sequences, the dense kernel otherwise."""
    t, s = q_shape[1], k_shape[1]
    blockable = causal and t == s and t >= 2
    return "block" if blockable and t >= 2 * CAUSAL_BLOCK_MIN else "xla"


def choose_kernel(
    kernel: str,
    platform: str,
    q_shape,
    k_shape,
    dtype,
    causal: bool,
    parts: MaskParts | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> tuple[str, str | None]:
    """`(kernel that runs, why the requested one does not)`: one of "xla",
    "block", "splash", "cudnn", and None when nothing fell back."""
    t, s = q_shape[1], k_shape[1]
    if kernel == "xla":
        return "xla", None
    if kernel == "block":
        blockable = causal and t == s and t >= 2
        return ("block", None) if blockable else ("xla", "not a causal self-attention call")
    if kernel == "auto":
        if platform == "tpu":
            kernel = "splash"
        elif platform == "gpu":
            kernel = "cudnn"
        else:
            return _default_kernel(q_shape, k_shape, causal), None
    if kernel == "splash":
        reason = splash_unsupported(q_shape, k_shape, causal, parts)
        return (
            ("splash", None)
            if reason is None
            else (_default_kernel(q_shape, k_shape, causal), reason)
        )
    if kernel == "cudnn":
        if platform != "gpu":
            return "xla", f"platform {platform!r} (cuDNN runs on GPUs)"
        reason = cudnn_unsupported(dtype, q_shape[-1], t, s, causal, parts, compute_capability)
        return ("cudnn", None) if reason is None else ("xla", reason)
    raise ValueError(f"attention kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


@functools.cache
def _log_fallback(requested: str, chosen: str, reason: str):
    log.warning("attention=%r: using %r instead: %s", requested, chosen, reason)


def _gpu_compute_capability() -> tuple[int, int] | None:
    try:
        cc = jax.devices("gpu")[0].compute_capability
    except (RuntimeError, AttributeError, IndexError):  # no GPU here (compiling ahead)
        return None
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return major, minor


# ----------------------------------------------------------------------------- dispatch


def dot_product_attention(
    q, k, v, mask, scale=None, causal=False, kernel="auto", *, parts=None, residual_name=None
):
    """q (B, T, N, H), k/v (B, S, K, H) with N a multiple of K (grouped-query);
    `mask` (B, 1, T, S) bool.

    `causal=True` promises that `mask` hides every key after its query (no KV
    cache: queries and keys are the same positions). `parts` (`MaskParts`)
    describes the same mask to kernels that build their own (splash, cuDNN).
    `kernel` is `ModelConfig.attention` (module docstring); a training-style
    call the requested kernel cannot express logs why, once, and runs another.
    `residual_name`: a `checkpoint_name` for the splash kernel's residuals
    (output and log-sum-exp), so a remat policy that saves it does not rerun
    the kernel."""
    platform = current_platform()
    cc = _gpu_compute_capability() if platform == "gpu" and kernel in ("auto", "cudnn") else None
    chosen, reason = choose_kernel(
        kernel, platform, q.shape, k.shape, q.dtype, causal, parts, compute_capability=cc
    )
    if reason is not None and causal and kernel != "auto":
        _log_fallback(kernel, chosen, reason)
    if chosen == "block":
        return causal_block_attention(q, k, v, mask, scale)
    if chosen == "splash":
        return splash_attention(
            q, k, v, parts, scale, interpret=platform != "tpu", residual_name=residual_name
        )
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, scale, parts.sliding_window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


# ----------------------------------------------------------------------------- block (CPU)


def causal_block_attention(q, k, v, mask, scale=None):
    """Attention with the queries cut into blocks, each attending only to the
    key prefix up to its last row: with 4 blocks, 10/16 of the score matrix is
    computed instead of all of it, and each block's scores stay small. On a
    CPU this halves the attention time of a training step (XLA:CPU has no fused
    attention kernel; docs/benchmarks.md). Exact for any mask inside the causal
    triangle, up to float rounding; a row whose every key is masked (padding
    only) averages its visible prefix rather than every key, which no unmasked
    position ever reads.

    Layout: scores and softmax in float32, heads leading (B, K, G, T, S), so
    that both dots are plain batched matmuls."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    groups = n // kv_heads
    scale = h**-0.5 if scale is None else scale
    blocks = max(2, min(CAUSAL_BLOCKS_MAX, t // CAUSAL_BLOCK_MIN))
    edges = [round(i * t / blocks) for i in range(blocks + 1)]
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv_heads, groups, h)
    qh = qh.transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    outs = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        scores = jnp.einsum("bkgth,bksh->bkgts", qh[:, :, :, lo:hi], kh[:, :, :hi],
                            preferred_element_type=jnp.float32)  # fmt: skip
        visible = mask[:, :, None, lo:hi, :hi]  # (B, 1, 1, rows, keys)
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", probs, vh[:, :, :hi]))
    out = jnp.concatenate(outs, axis=3)  # (B, K, G, T, H)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_attention(q, k, v, scale=None, sliding_window=None):
    """Causal cuDNN flash attention (`cudnn_unsupported` says when it applies)."""
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, local_window_size=window, implementation="cudnn"
    )


# ----------------------------------------------------------------------------- splash (TPU)


def _splash_segments(parts: MaskParts, b: int, t: int):
    """(q, kv) segment ids (B, T) int32 expressing packing and key padding, or
    None when the mask is causal (and windowed) only. A padded key gets an id
    no query has; a query keeps its own id, so padded queries on the right
    still see their prefix exactly as in the dense mask."""
    if parts.segment_ids is None and parts.kv_valid is None:
        return None
    if parts.segment_ids is None:
        q_seg = jnp.zeros((b, t), jnp.int32)
    else:
        q_seg = jnp.broadcast_to(jnp.asarray(parts.segment_ids, jnp.int32), (b, t))
    kv_seg = q_seg
    if parts.kv_valid is not None:
        valid = jnp.broadcast_to(jnp.asarray(parts.kv_valid, bool), (b, t))
        kv_seg = jnp.where(valid, q_seg, _PADDING_SEGMENT)
    return q_seg, kv_seg


def _shard_axes(mesh, b: int, n: int, kv_heads: int):
    """(batch, query heads, kv heads) axes of the ambient mesh the kernel is
    split over: "data" when it divides the batch; "model" when it divides the
    query heads and the kv heads, or the query heads of a single kv head (MQA:
    k/v replicated); None for a replicated dimension."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch = "data" if "data" in sizes and b % sizes["data"] == 0 else None
    m = sizes.get("model")
    if m is None or n % m:
        return batch, None, None
    if kv_heads % m == 0:
        return batch, "model", "model"
    return (batch, "model", None) if kv_heads == 1 else (batch, None, None)


def splash_attention(
    q, k, v, parts: MaskParts, scale=None, *, interpret=False, block_size=None, residual_name=None
):
    """Causal attention through the Pallas splash kernel; same layout and
    result as `jax.nn.dot_product_attention` over the mask `parts` describes.

    Query rows whose every key is masked (padding) average the keys of the
    blocks they visit instead, which no unmasked position reads. Grouped
    query heads use the multi-query kernel over each kv head's group (k/v are
    not repeated). Under an ambient mesh (`jax.set_mesh`), the kernel, which
    GSPMD cannot partition, runs under `shard_map`: batch over "data", heads
    over "model" when they divide, everything else replicated."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    block = block_size or splash_block_size(t)
    scale = h**-0.5 if scale is None else scale
    q = q * jnp.asarray(scale, q.dtype)
    segments = _splash_segments(parts, b, t)
    local = functools.partial(
        _splash_local,
        window=parts.sliding_window,
        block=block,
        interpret=interpret,
        residual_name=residual_name,
    )
    args = (q, k, v) + (() if segments is None else segments)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Manual in mesh.axis_types:
        return local(*args)  # one device, or already inside a shard_map
    batch_axis, heads_axis, kv_axis = _shard_axes(mesh, b, n, kv_heads)
    P = jax.sharding.PartitionSpec
    qo, kv = P(batch_axis, None, heads_axis, None), P(batch_axis, None, kv_axis, None)
    seg = P(batch_axis, None)
    specs = (qo, kv, kv) + (() if segments is None else (seg, seg))
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types)
        if kind == jax.sharding.AxisType.Explicit
    }
    if explicit:  # typed shardings must match the specs exactly: lay the inputs out so
        keep = lambda spec: P(*(a if a in explicit else None for a in spec))
        args = tuple(jax.reshard(a, keep(spec)) for a, spec in zip(args, specs))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qo, check_vma=False)(*args)


def _splash_local(q, k, v, q_seg=None, kv_seg=None, *, window, block, interpret, residual_name):
    """Splash on one device's shard: q (B, T, N, H) already scaled."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    groups = n // kv_heads
    if window is None or window >= t:
        head_mask = sm.CausalMask((t, t))
    else:  # keys q - window < k <= q
        head_mask = sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    heads = n if groups == 1 else groups
    blocks = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    make = sk.make_splash_mha if groups == 1 else sk.make_splash_mqa
    kernel = make(
        sm.MultiHeadMask([head_mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=residual_name,
        interpret=interpret,
    )

    def one_row(q, k, v, segment_ids):  # q (N, T, H), k/v (K, S, H)
        if groups == 1:
            return kernel(q, k, v, segment_ids=segment_ids)
        q = q.reshape(kv_heads, groups, t, h)
        per_group = lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids)
        return jax.vmap(per_group)(q, k, v).reshape(n, t, h)

    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # (B, T, N, H) <-> (B, N, T, H)
    if q_seg is None:
        out = jax.vmap(lambda q, k, v: one_row(q, k, v, None))(
            heads_first(q), heads_first(k), heads_first(v)
        )
    else:
        out = jax.vmap(lambda q, k, v, qs, ks: one_row(q, k, v, sk.SegmentIds(qs, ks)))(
            heads_first(q), heads_first(k), heads_first(v), q_seg, kv_seg
        )
    return heads_first(out)
