"""DoRA against float64 numpy and closed forms: the forward and merge formula,
the factored column norm, identity at init, PEFT's dropout form, and the
column norm held constant in the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import peft
from ftjax.models import ModelConfig, build_model, layers

RNG = np.random.default_rng(0)
W, A, B = RNG.normal(size=(12, 9)), RNG.normal(size=(12, 3)), RNG.normal(size=(3, 9))
M, X, S = RNG.uniform(0.5, 2.0, size=9), RNG.normal(size=(5, 12)), 0.6


def f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def numpy_dora(w, a, b, m, s):
    v = w + s * a @ b
    return m * v / np.linalg.norm(v, axis=0)


@pytest.mark.parametrize("compute", ["factored", "merged"])
def test_forward_and_merge_match_float64_numpy(compute):
    leaf = peft.DoraWeight(*f32(W, A, B, M), S, 0.0, compute)
    want = numpy_dora(W, A, B, M, S)
    np.testing.assert_allclose(np.asarray(leaf.materialize()), want, rtol=1e-5, atol=1e-5)
    got = layers.linear(jnp.asarray(X, jnp.float32), leaf)
    np.testing.assert_allclose(np.asarray(got), X @ want, rtol=1e-5, atol=1e-5)
    merged = peft.merge({"k": leaf})["k"]
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(X, jnp.float32) @ merged), np.asarray(got), rtol=1e-5, atol=1e-5
    )


def test_factored_column_norm():
    want = np.linalg.norm(W + S * A @ B, axis=0)
    for factored in (True, False):
        got = peft.column_norm(*f32(W, A, B), S, factored=factored)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    stacked = peft.column_norm(*f32(np.stack([W, 2 * W]), np.stack([A, A]), np.stack([B, B])), S)
    np.testing.assert_allclose(
        np.asarray(stacked[1]), np.linalg.norm(2 * W + S * A @ B, axis=0), rtol=1e-5
    )


def test_norm_is_a_constant_in_the_backward_pass():
    # L = sum_t,j g_j (x V)_tj with g = m / ||V||; holding ||V|| constant gives
    # dL/da = s * outer(sum_t x_t, b @ g) and dL/dm_j = sum_t (x V)_tj / ||V||_j.
    v = W + S * A @ B
    norm = np.linalg.norm(v, axis=0)
    g = M / norm
    x = jnp.asarray(X, jnp.float32)
    leaf = peft.DoraWeight(*f32(W, A, B, M), S)

    def loss(a, m):
        return jnp.sum(layers.linear(x, leaf.replace(a=a, m=m)))

    da, dm = jax.grad(loss, argnums=(0, 1))(leaf.a, leaf.m)
    np.testing.assert_allclose(np.asarray(da), S * np.outer(X.sum(0), B @ g), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dm), (X @ v).sum(0) / norm, rtol=1e-4, atol=1e-4)


def test_dropout_follows_peft():
    rate, key = 0.4, jax.random.key(3)
    leaf = peft.DoraWeight(*f32(W, A, B, M), S, rate)
    x = jnp.asarray(X, jnp.float32)
    got = np.asarray(leaf.apply_linear(x, dtype=jnp.float32, rng=key), np.float64)
    keep = np.asarray(jax.random.bernoulli(key, 1 - rate, x.shape))
    xd = np.where(keep, X / (1 - rate), 0.0)
    g = M / np.linalg.norm(W + S * A @ B, axis=0)
    # PEFT: base(x) + (g - 1) * (xd @ W) + g * s * (xd @ a) @ b
    want = X @ W + (g - 1) * (xd @ W) + g * (S * (xd @ A) @ B)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dora_model_equals_base_at_init_and_merges():
    cfg = ModelConfig(
        vocab_size=53,
        hidden_size=32,
        intermediate_size=40,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
    )
    model = build_model(cfg)
    ids = np.arange(12).reshape(2, 6)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    rng = np.random.default_rng(0)
    # Drawn with numpy (no initializer compiles), scaled so that logits are O(1).
    draw = lambda x: rng.normal(size=x.shape) / np.sqrt(x.shape[0]) if len(x.shape) == 2 else 1.0
    params = jax.tree.map(
        lambda x: jnp.asarray(np.broadcast_to(draw(x), x.shape), jnp.float32), shapes
    )
    apply = jax.jit(lambda p: model.apply({"params": p}, ids))
    base = apply(params)
    method = peft.build_method({"name": "dora", "rank": 4, "targets": "all-linear"})
    adapted = jax.jit(method.apply)(params, jax.random.key(1))
    np.testing.assert_allclose(np.asarray(apply(adapted)), np.asarray(base), atol=1e-5)
    leaf = adapted["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    w = np.asarray(params["model"]["layers_0"]["mlp"]["down_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(leaf.m), np.linalg.norm(w, axis=0), rtol=1e-5)
    # Trained-looking adapters: the merged plain model computes the same function.
    trained = jax.tree.map(
        lambda x: x.replace(b=x.b + 0.2, m=x.m * 1.3) if isinstance(x, peft.DoraWeight) else x,
        adapted,
        is_leaf=peft.is_leaf,
    )
    out = apply(trained)
    assert float(jnp.abs(out - base).max()) > 1e-2
    merged = jax.jit(peft.merge)(trained)
    np.testing.assert_allclose(np.asarray(apply(merged)), np.asarray(out), atol=1e-4)
    assert method.count(adapted)[0] == sum(
        4 * (i + o) + o
        for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 40), (32, 40), (40, 32)]
    )
