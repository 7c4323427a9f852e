"""NF4 (4-bit NormalFloat) kernels, the frozen base of QLoRA, in bitsandbytes' layout.

A Flax kernel `(..., in, out)` is quantized per layer (leading indices are
kept, so every layer of a stacked `scan_layers` kernel is quantized on its own
and `nn.scan` can slice the codes) exactly as bitsandbytes quantizes the
PyTorch weight `(out, in)` of the same layer: the transposed kernel is
flattened row-major and cut into blocks of 64 consecutive values (so a block
runs along the *input* axis). Each value is multiplied by the reciprocal of its
block's absolute maximum and stored as the index of the nearest of the 16 NF4
levels (a value exactly between two levels takes the lower). Two codes share a
byte, the first value in the high nibble. A short last block (when
`in * out` is not a multiple of 64) is divided by its absmax instead, as in
bitsandbytes' reference kernel. The codes are then byte for byte those of
`bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")`
(padded with zero codes to whole blocks).

Double quantization (`compress_statistics=True` in bitsandbytes) stores the
per-block absmax constants in 8 bits: per layer their mean is subtracted, each
group of 256 is scaled by its own absolute maximum (float32) and each value is
stored as the index of the nearest entry of bitsandbytes' signed 8-bit dynamic
map (`DYNAMIC_MAP`). Dequantized, a block's absmax is
`DYNAMIC_MAP[code] * group_absmax + mean`, rounded after the product and after
the sum as bitsandbytes does. Storage is 4 + 8/64 + 32/(64*256) ≈ 4.127 bits
per parameter. (bitsandbytes' 0.50 CPU kernel looks the 8-bit code up in a
65536-entry table and so picks the farther entry for about 1% of the constants;
its reference and CUDA kernels, and this module, take the nearest.)

`NF4Weight` is frozen (it has no trainable children); `LoraWeight(NF4Weight…)`
is QLoRA. It applies itself by dequantizing to the compute dtype.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ftjax.peft.base import WeightLeaf, register_leaf

# The NF4 levels of QLoRA (Dettmers et al. 2023): normal quantiles normalized to
# [-1, 1], with an exact zero. As float32, bitsandbytes' `get_4bit_type("nf4")`.
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

# The positive half of bitsandbytes' signed dynamic 8-bit map
# (`create_dynamic_map()`, Dettmers 2016): for e = 0..6, the midpoints of
# 2**e + 1 points evenly spaced on [0.1, 1], times 10**(e - 6), as the float32
# values torch's linspace rounds them to. The map is 0, 1, these 127 values
# and their negatives, sorted.
# fmt: off
_DYNAMIC_POSITIVE = np.array([
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05,
    1.5625001e-04, 2.6875004e-04, 3.8125002e-04, 4.9375003e-04, 6.062501e-04, 7.1875006e-04,
    8.3125e-04, 9.437501e-04, 0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497,
    0.00409375, 0.0046562497, 0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875,
    0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625, 0.036718752,
    0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375,
    0.07890625, 0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126,
    0.09859375, 0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376,
    0.19140625, 0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127,
    0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876,
    0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625,
    0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313, 0.5710938, 0.58515626,
    0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563,
    0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124, 0.79609376, 0.8101562,
    0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125, 0.9085938,
    0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874
], np.float32)
# fmt: on
DYNAMIC_MAP = np.sort(
    np.concatenate([-_DYNAMIC_POSITIVE, [0.0, 1.0], _DYNAMIC_POSITIVE]).astype(np.float32)
)


def _midpoints(levels: np.ndarray) -> np.ndarray:
    """A value goes to level i when it lies in (mid[i-1], mid[i]] (ties go down)."""
    return ((levels[1:] + levels[:-1]) / np.float32(2)).astype(np.float32)


_NF4_MIDPOINTS = _midpoints(NF4_LEVELS)
_DYNAMIC_MIDPOINTS = _midpoints(DYNAMIC_MAP)

BLOCK_SIZE = 64
GROUP_SIZE = 256  # absmax constants per double-quantization group
_TINY = float(np.finfo(np.float32).tiny)


@register_leaf
class NF4Weight(WeightLeaf):
    """A frozen 4-bit kernel. Build it with `quantize_nf4`.

    Children (each with the kernel's leading axes first):
      codes          uint8 `(..., n_blocks * 32)`  two level indices per byte, in the
                     row-major order of the transposed kernel `(out, in)`
      absmax         uint8 `(..., n_blocks)`  indices into `DYNAMIC_MAP`
                     (float32 block absmax without double quantization)
      absmax_scale   float32 `(..., n_groups)`  absmax of each group of 256
      absmax_offset  float32 `(...)`            the subtracted mean
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

    @property
    def double_quant(self) -> bool:
        return not jnp.issubdtype(self.absmax.dtype, jnp.floating)

    def param_counts(self) -> tuple[int, int]:
        # The logical size of the kernel, not the bytes that store it.
        return 0, math.prod(self.shape)

    def block_absmax(self):
        """The dequantized per-block absmax constants, float32 `(..., n_blocks)`."""
        if not self.double_quant:
            return jnp.asarray(self.absmax, jnp.float32)
        n_blocks = self.absmax.shape[-1]
        scale = jnp.repeat(jnp.asarray(self.absmax_scale, jnp.float32), GROUP_SIZE, axis=-1)
        product = jnp.take(jnp.asarray(DYNAMIC_MAP), self.absmax.astype(jnp.int32))
        product = _rounded(product * scale[..., :n_blocks])
        return product + jnp.asarray(self.absmax_offset, jnp.float32)[..., None]

    def materialize(self, dtype=None):
        return dequantize_nf4(self, dtype or self.dtype)

    def apply_linear(self, x, *, dtype, rng):
        del rng
        return jnp.matmul(x, self.materialize(dtype))


def _rounded(x):
    """`x`, kept from being fused with a following addition into one rounding
    (XLA contracts `a * b + c` to a fused multiply-add; bitsandbytes rounds twice).
    The select is opaque to that contraction; it is the identity on non-NaN input."""
    return jnp.where(x == x, x, jnp.zeros((), x.dtype))


def _blocks(flat, size: int):
    """`(..., n)` -> `(..., n_blocks, size)` zero-padded, and a mask of the padded
    last block (`(n_blocks,)`, True where the block is short)."""
    n = flat.shape[-1]
    n_blocks = -(-n // size)
    pad = n_blocks * size - n
    flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
    short = np.zeros(n_blocks, bool)
    short[-1] = pad > 0
    return flat.reshape(flat.shape[:-1] + (n_blocks, size)), short


def _quantize_blockwise(flat, levels_midpoints: np.ndarray, size: int):
    """bitsandbytes' blockwise scheme: (indices `(..., n_blocks, size)` int32,
    absmax `(..., n_blocks)` float32). Values are scaled by the reciprocal of
    their block's absmax (divided by it in a short last block) and clipped to
    [-1, 1]; each takes the nearest level, ties to the lower one."""
    blocks, short = _blocks(flat, size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax >= _TINY, absmax, 1.0)[..., None]
    scaled = jnp.where(jnp.asarray(short)[:, None], blocks / safe, blocks * (1.0 / safe))
    scaled = jnp.where((absmax >= _TINY)[..., None], jnp.clip(scaled, -1.0, 1.0), 0.0)
    idx = jnp.searchsorted(jnp.asarray(levels_midpoints), scaled, side="left")
    return idx.astype(jnp.int32), absmax


def quantize_nf4(w, *, double_quant: bool = True) -> NF4Weight:
    """Quantizes a kernel `(..., in, out)` to NF4, one layer (leading index) at a
    time, with the codes and constants bitsandbytes computes for `w.T`.

    >>> import jax
    >>> q = quantize_nf4(jax.random.normal(jax.random.key(0), (64, 32)))
    >>> q.codes.shape, q.absmax.shape, dequantize_nf4(q).shape
    ((1024,), (32,), (64, 32))
    """
    shape = tuple(w.shape)
    lead, kernel_shape = shape[:-2], shape[-2:]
    n = math.prod(kernel_shape)
    # bitsandbytes' order: the PyTorch weight (out, in), row-major.
    flat = jnp.swapaxes(jnp.asarray(w, jnp.float32), -1, -2).reshape(lead + (n,))
    idx, absmax = _quantize_blockwise(flat, _NF4_MIDPOINTS, BLOCK_SIZE)
    pairs = idx.astype(jnp.uint8).reshape(lead + (-1, 2))
    codes = (pairs[..., 0] << 4) | pairs[..., 1]

    n_blocks = absmax.shape[-1]
    n_groups = -(-n_blocks // GROUP_SIZE)
    if double_quant:
        offset = jnp.mean(absmax, axis=-1)
        q, step = _quantize_blockwise(absmax - offset[..., None], _DYNAMIC_MIDPOINTS, GROUP_SIZE)
        stored = q.astype(jnp.uint8).reshape(lead + (n_groups * GROUP_SIZE,))[..., :n_blocks]
    else:
        offset = jnp.zeros(lead, jnp.float32)
        step = jnp.ones(lead + (n_groups,), jnp.float32)
        stored = absmax
    return NF4Weight._unflatten(
        (kernel_shape, jnp.dtype(w.dtype).name), [codes, stored, step, offset]
    )


def nf4_levels(codes):
    """The float32 NF4 level of each 4-bit code (uint8 in [0, 16)). A chain of
    selects rather than a table lookup: it fuses with the unpacking and the
    scaling into one loop that writes the dequantized kernel once, where a
    gather left an int32 index array and a float32 copy of every kernel (on
    TPU, 6.5 of a 70B QLoRA step's 11.6 GiB of temporaries per chip)."""
    out = jnp.zeros(codes.shape, jnp.float32)
    for k, level in enumerate(NF4_LEVELS):
        if level != 0:
            out = jnp.where(codes == k, np.float32(level), out)
    return out


def dequantize_nf4(q: NF4Weight, dtype=jnp.float32):
    """The dense kernel `(..., in, out)` that `q` encodes, in `dtype`."""
    lead = tuple(q.codes.shape[:-1])
    fan_in, fan_out = q.kernel_shape
    codes = jnp.asarray(q.codes, jnp.uint8)
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(lead + (-1, BLOCK_SIZE))
    values = nf4_levels(idx) * q.block_absmax()[..., None]
    values = values.reshape(lead + (-1,))[..., : fan_in * fan_out]
    return jnp.swapaxes(values.reshape(lead + (fan_out, fan_in)).astype(dtype), -1, -2)


def nbytes(q: NF4Weight) -> int:
    """Bytes the quantized kernel occupies (codes and constants)."""
    return sum(
        math.prod(c.shape) * jnp.dtype(c.dtype).itemsize
        for c in (q.codes, q.absmax, q.absmax_scale, q.absmax_offset)
    )
