"""NF4: the level table (DESIGN.md and the normal-quantile construction),
nearest-level quantization and its error bound against float64 numpy, double
quantization of the block constants, per-layer quantization of stacked
kernels, and QLoRA in the model (also under scan_layers)."""

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


@pytest.mark.parametrize("shape", [(96, 80), (33, 50)])  # the second pads its last block
def test_nearest_level_and_error_bound(shape):
    w = np.random.default_rng(0).standard_t(df=5, size=shape)  # heavy tails, outliers
    q = peft.quantize_nf4(jnp.asarray(w, jnp.float32), double_quant=False)
    got = np.asarray(peft.dequantize_nf4(q), np.float64)
    flat = np.pad(w.ravel(), (0, -w.size % 64)).reshape(-1, 64)
    absmax = np.abs(flat).max(axis=1, keepdims=True)
    levels = peft.NF4_LEVELS.astype(np.float64)
    nearest = levels[np.argmin(np.abs((flat / absmax)[..., None] - levels), axis=-1)]
    want = (nearest * absmax).ravel()[: w.size].reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The error stays within half the spacing of the two levels around each value.
    v = flat / absmax
    hi = np.searchsorted(levels, v).clip(1, 15)
    spacing = (levels[hi] - levels[hi - 1]) * absmax
    err = np.abs(flat.ravel()[: w.size] - got.ravel())
    assert np.all(err <= spacing.ravel()[: w.size] / 2 + 1e-6)
    assert got.shape == shape


def test_double_quantization_of_block_constants():
    n_blocks = 600  # 3 groups of 256, the last partial
    w = np.random.default_rng(1).normal(size=(n_blocks * 64 // 40, 40)) * np.repeat(
        np.random.default_rng(2).uniform(0.5, 3.0, n_blocks), 64
    ).reshape(-1, 40)
    q = peft.quantize_nf4(jnp.asarray(w, jnp.float32))
    assert q.absmax.dtype == jnp.int8 and q.absmax_scale.shape == (3,)
    true_absmax = np.abs(w.reshape(-1, 64)).max(axis=1)
    centered = np.pad(true_absmax - true_absmax.mean(), (0, 3 * 256 - n_blocks))
    half_step = np.repeat(np.abs(centered.reshape(3, 256)).max(axis=1) / 127 / 2, 256)[:n_blocks]
    dq_err = np.abs(np.asarray(q.block_absmax(), np.float64) - true_absmax)
    assert np.all(dq_err <= half_step * (1 + 1e-5) + 1e-7)
    # The element error then adds at most that constant's error.
    got = np.asarray(peft.dequantize_nf4(q), np.float64).reshape(-1, 64)
    max_half_gap = np.max(np.diff(peft.NF4_LEVELS)) / 2
    bound = true_absmax[:, None] * max_half_gap + dq_err[:, None] + 1e-6
    assert np.all(np.abs(w.reshape(-1, 64) - got) <= bound)
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
    # At init the model is exactly its dequantized base.
    np.testing.assert_allclose(
        np.asarray(apply(adapted)), np.asarray(apply(jax.jit(peft.merge)(adapted))), atol=1e-6
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
