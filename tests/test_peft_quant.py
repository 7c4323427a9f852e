"""NF4: the level table (DESIGN.md and the normal-quantile construction),
bitsandbytes' dynamic 8-bit map, nearest-level quantization in bitsandbytes'
block order (along the input axis) and its error bound against float64 numpy,
double quantization of the block constants, per-layer quantization of stacked
kernels, and QLoRA in the model (also under scan_layers). The comparison with
bitsandbytes itself is in test_peft_interop_bitsandbytes.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ftjax import peft
from ftjax.models import ModelConfig, build_model, stack_layers
from ftjax.peft import quant

DESIGN_TABLE = [-1, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0,
                0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1]  # fmt: skip


def random_params(cfg, ids, seed=0):
    """Model params drawn with numpy (cheaper than compiling flax's initializers)."""
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), ids)["params"]
    rng = np.random.default_rng(seed)
    draw = lambda x: rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if len(x.shape) > 1 else 1)
    return jax.tree.map(lambda x: jnp.asarray(draw(x), jnp.float32), shapes)


def test_levels_match_design_table_and_normal_quantiles():
    np.testing.assert_allclose(peft.NF4_LEVELS, DESIGN_TABLE, atol=5e-8)
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) from
    # offset 0.9677083 to 1/2, plus an exact zero, scaled to [-1, 1].
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(peft.NF4_LEVELS, levels / levels.max(), atol=1e-7)


def test_dynamic_map_construction():
    dyn = quant.DYNAMIC_MAP.astype(np.float64)
    assert dyn.shape == (256,) and np.all(np.diff(dyn) > 0)
    assert dyn[127] == 0 and dyn[255] == 1 and np.array_equal(dyn[:127], -dyn[128:255][::-1])
    # Decade e holds the 2**e midpoints of linspace(0.1, 1, 2**e + 1), times 10**(e - 6).
    start = 128
    for e in range(7):
        edges = np.linspace(0.1, 1, 2**e + 1)
        want = (edges[1:] + edges[:-1]) / 2 * 10.0 ** (e - 6)
        np.testing.assert_allclose(dyn[start : start + 2**e], want, rtol=2e-7)
        start += 2**e


def reference_blocks(w):
    """The bitsandbytes order: the transposed kernel, row-major, in blocks of 64."""
    flat = np.asarray(w, np.float64).T.ravel()
    return np.pad(flat, (0, -flat.size % 64)).reshape(-1, 64)


@pytest.mark.parametrize("shape", [(96, 80), (33, 50)])  # the second pads its last block
def test_nearest_level_and_error_bound(shape):
    w = np.random.default_rng(0).standard_t(df=5, size=shape)  # heavy tails, outliers
    q = peft.quantize_nf4(jnp.asarray(w, jnp.float32), double_quant=False)
    got = np.asarray(peft.dequantize_nf4(q), np.float64)
    assert got.shape == shape and q.absmax.dtype == jnp.float32
    flat = reference_blocks(w)
    absmax = np.abs(flat).max(axis=1, keepdims=True)
    levels = peft.NF4_LEVELS.astype(np.float64)
    nearest = levels[np.argmin(np.abs((flat / absmax)[..., None] - levels), axis=-1)]
    want = (nearest * absmax).ravel()[: w.size].reshape(shape[::-1]).T
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The error stays within half the spacing of the two levels around each value.
    v = flat / absmax
    hi = np.searchsorted(levels, v).clip(1, 15)
    spacing = ((levels[hi] - levels[hi - 1]) * absmax).ravel()[: w.size]
    err = np.abs(flat.ravel()[: w.size] - got.T.ravel())
    assert np.all(err <= spacing / 2 + 1e-6)


def test_blocks_run_along_the_input_axis():
    # Column j of the kernel (output j) is one block of 64 inputs: scaling it
    # scales that block's absmax only.
    w = np.random.default_rng(4).normal(size=(64, 8)) * np.arange(1, 9)
    q = peft.quantize_nf4(jnp.asarray(w, jnp.float32), double_quant=False)
    np.testing.assert_allclose(np.asarray(q.absmax), np.abs(w).max(axis=0), rtol=1e-6)


def test_double_quantization_of_block_constants():
    n_blocks = 600  # 3 groups of 256, the last partial
    scales = np.random.default_rng(2).uniform(0.5, 3.0, n_blocks)
    w_t = np.random.default_rng(1).normal(size=(n_blocks, 64)) * scales[:, None]
    w = w_t.reshape(n_blocks * 64 // 40, 40, order="C")  # the (out, in) weight ...
    kernel = w.T  # ... and its (in, out) kernel
    q = peft.quantize_nf4(jnp.asarray(kernel, jnp.float32))
    assert q.absmax.dtype == jnp.uint8 and q.absmax_scale.shape == (3,)
    true_absmax = np.abs(w_t).max(axis=1)
    mean = true_absmax.mean()
    np.testing.assert_allclose(float(q.absmax_offset), mean, rtol=1e-6)
    centered = true_absmax - mean
    group_max = np.array([np.abs(centered[i : i + 256]).max() for i in range(0, n_blocks, 256)])
    np.testing.assert_allclose(np.asarray(q.absmax_scale), group_max, rtol=1e-6)
    # Each constant takes the nearest entry of the dynamic map.
    dyn = quant.DYNAMIC_MAP.astype(np.float64)
    normed = centered / np.repeat(group_max, 256)[:n_blocks]
    np.testing.assert_array_equal(
        np.asarray(q.absmax), np.argmin(np.abs(normed[:, None] - dyn), axis=1)
    )
    got_absmax = np.asarray(q.block_absmax(), np.float64)
    want = dyn[np.asarray(q.absmax)] * np.repeat(group_max, 256)[:n_blocks] + mean
    np.testing.assert_allclose(got_absmax, want, rtol=1e-6)
    half_gap = np.max(np.diff(dyn)) / 2 * np.repeat(group_max, 256)[:n_blocks]
    dq_err = np.abs(got_absmax - true_absmax)
    assert np.all(dq_err <= half_gap * (1 + 1e-5) + 1e-6)
    # The element error then adds at most that constant's error.
    got = np.asarray(peft.dequantize_nf4(q), np.float64).T.reshape(-1, 64)
    max_half_gap = np.max(np.diff(peft.NF4_LEVELS)) / 2
    bound = true_absmax[:, None] * max_half_gap + dq_err[:, None] + 1e-6
    assert np.all(np.abs(w_t - got) <= bound)
    n = w.size
    assert quant.nbytes(q) == n // 2 + n_blocks + 4 * 3 + 4  # ~4.13 bits per parameter


def test_stacked_kernels_quantize_per_layer():
    w = jnp.asarray(np.random.default_rng(3).normal(size=(3, 40, 24)) * [[[1.0]], [[5.0]], [[0.1]]])
    quantize, dequantize = jax.jit(peft.quantize_nf4), jax.jit(peft.dequantize_nf4)
    stacked = quantize(w)
    assert stacked.codes.shape == (3, 40 * 24 // 2) and stacked.absmax_offset.shape == (3,)
    for i in range(3):
        alone = quantize(w[i])
        sliced = jax.tree.map(lambda x, i=i: x[i], stacked)
        np.testing.assert_array_equal(np.asarray(sliced.codes), np.asarray(alone.codes))
        np.testing.assert_allclose(
            np.asarray(dequantize(sliced)), np.asarray(dequantize(alone)), rtol=1e-6
        )


@pytest.mark.slow
def test_qlora_model_and_scan():
    cfg = ModelConfig(
        vocab_size=53, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2
    )
    ids = np.arange(12).reshape(2, 6)
    params = random_params(cfg, ids)
    method = peft.build_method({"name": "qlora", "rank": 4, "targets": "qv"})
    adapted = jax.jit(method.apply)(params, jax.random.key(1))
    layer = adapted["model"]["layers_0"]
    assert isinstance(layer["self_attn"]["q_proj"]["kernel"].w, peft.NF4Weight)
    assert isinstance(layer["mlp"]["up_proj"]["kernel"], peft.NF4Weight)  # quantized, no adapter
    assert isinstance(adapted["lm_head"]["kernel"], jax.Array)  # the head stays dense
    model = build_model(cfg)
    apply = jax.jit(lambda p: model.apply({"params": p}, ids))
    # At init the model is its dequantized base (to float32 rounding: XLA may
    # fuse the dequantization into the matmul and sum in another order).
    np.testing.assert_allclose(
        np.asarray(apply(adapted)), np.asarray(apply(jax.jit(peft.merge)(adapted))), atol=1e-5
    )
    trainable, frozen = method.split(adapted)
    n_adapter = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert peft.nbytes(trainable) == 4 * n_adapter
    n_train, n_total = method.count(adapted)
    assert (n_train, n_total) == (n_adapter, peft.count(params)[1] + n_adapter)
    # Scanned: stacked NF4 codes and adapters, which nn.scan slices per layer.
    scfg = cfg.replace(scan_layers=True)
    trained = jax.tree.map(
        lambda x: x.replace(b=x.b + 0.5) if isinstance(x, peft.LoraWeight) else x,
        adapted,
        is_leaf=peft.is_leaf,
    )
    stacked = stack_layers(cfg, trained)
    assert stacked["model"]["layers"]["mlp"]["up_proj"]["kernel"].codes.shape[0] == 2
    scanned = jax.jit(lambda p: build_model(scfg).apply({"params": p}, ids))(stacked)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(apply(trained)), atol=1e-5)
    assert float(jnp.abs(scanned - apply(adapted)).max()) > 1e-3  # the adapters act
