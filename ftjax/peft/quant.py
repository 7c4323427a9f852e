"""NF4 (4-bit NormalFloat) kernels, the frozen base of QLoRA.

A kernel of shape `(..., in, out)` is flattened per layer (the leading axes
are kept, so every layer of a stacked `scan_layers` kernel is quantized on its
own and `nn.scan` can slice the codes), cut into blocks of 64 values, and each
value is stored as the index of the nearest of the 16 NF4 levels after
dividing by its block's absolute maximum. Two 4-bit codes share a byte.

Double quantization stores the per-block absmax constants themselves in 8 bits:
per layer their mean is subtracted, and each group of 256 constants is scaled
to int8 by its own float32 maximum. (bitsandbytes uses an 8-bit dynamic float
map for that step; symmetric int8 around the mean is simpler and its error is
bounded by half a step, `max|absmax - mean| / 254`, which tests check.)
Storage is 4 + 8/64 + 32/(64*256) ≈ 4.127 bits per parameter.

`NF4Weight` is frozen (it has no trainable children); `LoraWeight(NF4Weight…)`
is QLoRA. It applies itself by dequantizing to the compute dtype.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ftjax.peft.base import WeightLeaf, register_leaf

# The NF4 levels of QLoRA (Dettmers et al. 2023): normal quantiles normalized to
# [-1, 1], with an exact zero. Stored to the precision the paper's code prints.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# A value goes to level i when it lies between the midpoints around level i.
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

BLOCK_SIZE = 64
GROUP_SIZE = 256  # absmax constants per double-quantization group


@register_leaf
class NF4Weight(WeightLeaf):
    """A frozen 4-bit kernel. Build it with `quantize_nf4`.

    Children (each with the kernel's leading axes first):
      codes          uint8 `(..., n_blocks * 32)`  two level indices per byte
      absmax         int8 `(..., n_blocks)` (float32 without double quantization)
      absmax_scale   float32 `(..., n_groups)`     int8 step of each group of 256
      absmax_offset  float32 `(...)`               the subtracted mean
    Static: `kernel_shape` (in, out) and `dtype` (of `materialize()`).
    """

    children = ("codes", "absmax", "absmax_scale", "absmax_offset")
    trainable_children = ()
    static = ("kernel_shape", "dtype_name")

    @property
    def shape(self):
        return tuple(self.codes.shape[:-1]) + tuple(self.kernel_shape)

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    def param_counts(self) -> tuple[int, int]:
        # The logical size of the kernel, not the bytes that store it.
        return 0, math.prod(self.shape)

    def block_absmax(self):
        """The dequantized per-block absmax constants, float32 `(..., n_blocks)`."""
        n_blocks = self.absmax.shape[-1]
        step = jnp.repeat(jnp.asarray(self.absmax_scale, jnp.float32), GROUP_SIZE, axis=-1)
        return (
            jnp.asarray(self.absmax, jnp.float32) * step[..., :n_blocks]
            + jnp.asarray(self.absmax_offset, jnp.float32)[..., None]
        )

    def materialize(self, dtype=None):
        return dequantize_nf4(self, dtype or self.dtype)

    def apply_linear(self, x, *, dtype, rng):
        del rng
        return jnp.matmul(x, self.materialize(dtype))


def quantize_nf4(w, *, double_quant: bool = True) -> NF4Weight:
    """Quantizes a kernel `(..., in, out)` to NF4, one layer (leading index) at a time.

    >>> q = quantize_nf4(jax.random.normal(jax.random.key(0), (64, 32)))
    >>> q.codes.shape, q.absmax.shape, dequantize_nf4(q).shape
    ((1024,), (32,), (64, 32))
    """
    shape = tuple(w.shape)
    lead, kernel_shape = shape[:-2], shape[-2:]
    n = math.prod(kernel_shape)
    n_blocks = -(-n // BLOCK_SIZE)
    flat = jnp.asarray(w, jnp.float32).reshape(lead + (n,))
    # Zero padding fills the last block; zeros quantize exactly (level 7).
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, n_blocks * BLOCK_SIZE - n)])
    blocks = flat.reshape(lead + (n_blocks, BLOCK_SIZE))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    idx = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed).astype(jnp.uint8)
    pairs = idx.reshape(lead + (n_blocks * BLOCK_SIZE // 2, 2))
    codes = (pairs[..., 0] << 4) | pairs[..., 1]

    n_groups = -(-n_blocks // GROUP_SIZE)
    if double_quant:
        offset = jnp.mean(absmax, axis=-1)
        centered = absmax - offset[..., None]
        padded = jnp.pad(centered, [(0, 0)] * len(lead) + [(0, n_groups * GROUP_SIZE - n_blocks)])
        groups = padded.reshape(lead + (n_groups, GROUP_SIZE))
        step = jnp.max(jnp.abs(groups), axis=-1) / 127.0
        step = jnp.where(step > 0, step, 1.0)
        q = jnp.clip(jnp.round(groups / step[..., None]), -127, 127).astype(jnp.int8)
        stored = q.reshape(lead + (n_groups * GROUP_SIZE,))[..., :n_blocks]
    else:
        offset = jnp.zeros(lead, jnp.float32)
        step = jnp.ones(lead + (n_groups,), jnp.float32)
        stored = absmax
    leaf = NF4Weight._unflatten(
        (kernel_shape, jnp.dtype(w.dtype).name), [codes, stored, step, offset]
    )
    return leaf


def dequantize_nf4(q: NF4Weight, dtype=jnp.float32):
    """The dense kernel `(..., in, out)` that `q` encodes, in `dtype`."""
    lead = tuple(q.codes.shape[:-1])
    hi = (q.codes >> 4).astype(jnp.int32)
    lo = (q.codes & 0xF).astype(jnp.int32)
    idx = jnp.stack([hi, lo], axis=-1).reshape(lead + (-1, BLOCK_SIZE))
    values = jnp.take(jnp.asarray(NF4_LEVELS), idx) * q.block_absmax()[..., None]
    n = math.prod(q.kernel_shape)
    values = values.reshape(lead + (-1,))[..., :n]
    return values.reshape(lead + tuple(q.kernel_shape)).astype(dtype)


def nbytes(q: NF4Weight) -> int:
    """Bytes the quantized kernel occupies (codes and constants)."""
    return sum(
        math.prod(c.shape) * jnp.dtype(c.dtype).itemsize
        for c in (q.codes, q.absmax, q.absmax_scale, q.absmax_offset)
    )
