"""LoRA leaves and the lora method on a tiny Llama, against closed forms and
float64 numpy: identity at init, PiSSA's reconstruction and its marker and
conversion to plain LoRA, factored == merged,
merge == adapted forward, scan == no scan, and gradients/optimizer state that
exist only for the adapter."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import peft
from ftjax.models import ModelConfig, build_model, layers, stack_layers
from ftjax.peft import lora

CFG = ModelConfig(
    model_type="llama",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
)
IDS = np.random.default_rng(0).integers(0, 61, (2, 7))


def tiny_params(cfg=CFG, seed=0):
    """Random weights scaled so logits are O(1) (a 1e-5 tolerance then means something)."""
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), IDS)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    fresh = [
        rng.normal(size=x.shape) / np.sqrt(x.shape[-2])
        if len(x.shape) >= 2
        else 1.0 + 0.1 * rng.normal(size=x.shape)
        for x in leaves
    ]
    return treedef.unflatten([jnp.asarray(x, jnp.float32) for x in fresh])


def randomize_b(params, seed=3, std=0.3):
    """Nonzero `b` everywhere, so the adapter changes the function."""

    rng = np.random.default_rng(seed)

    def f(x):
        if isinstance(x, peft.LoraWeight):
            return x.replace(b=jnp.asarray(std * rng.normal(size=x.b.shape), x.b.dtype))
        return x

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


@pytest.fixture(scope="module")
def base():
    model = build_model(CFG)
    apply = jax.jit(lambda p: model.apply({"params": p}, IDS))
    params = tiny_params()
    return model, apply, params, apply(params)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_b_init_is_exactly_the_base_model(base, init):
    _, apply, params, logits = base
    method = peft.build_method({"name": "lora", "rank": 4, "init": init, "targets": "all-linear"})
    adapted = method.apply(params, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(apply(adapted)), np.asarray(logits))
    leaf = adapted["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert float(jnp.abs(leaf.a).max()) > 0  # a is random, b carries the zero
    if init == "kaiming":  # U(-1/sqrt(in), 1/sqrt(in)), PEFT's kaiming_uniform(a=sqrt(5))
        assert float(jnp.abs(leaf.a).max()) <= 1 / np.sqrt(32)
        assert float(jnp.abs(leaf.a).max()) > 0.8 / np.sqrt(32)
    else:  # N(0, (1/r)^2)
        assert abs(float(jnp.std(leaf.a)) - 1 / 4) < 0.06


def test_scales():
    lora = peft.build_method({"name": "lora", "rank": 4, "alpha": 16})
    rs = peft.build_method({"name": "lora", "rank": 4, "alpha": 16, "rslora": True})
    params = tiny_params()
    leaf = lora.apply(params, jax.random.key(0))["model"]["layers_1"]["self_attn"]["v_proj"]
    rs_leaf = rs.apply(params, jax.random.key(0))["model"]["layers_1"]["self_attn"]["v_proj"]
    assert leaf["kernel"].scale == 16 / 4
    assert rs_leaf["kernel"].scale == 16 / np.sqrt(4)


def test_apply_linear_matches_float64_numpy():
    rng = np.random.default_rng(1)
    w, a, b = rng.normal(size=(12, 10)), rng.normal(size=(12, 3)), rng.normal(size=(3, 10))
    x = rng.normal(size=(5, 12))
    want = x @ w + 0.7 * (x @ a) @ b
    for compute in ("factored", "merged", "hybrid"):
        leaf = peft.LoraWeight(*(jnp.asarray(t, jnp.float32) for t in (w, a, b)), 0.7, 0.0, compute)
        got = layers.linear(jnp.asarray(x, jnp.float32), leaf)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(leaf.materialize()), w + 0.7 * a @ b, rtol=1e-5, atol=1e-5
        )


def test_pissa_reconstructs_the_base(base):
    _, apply, params, logits = base
    method = peft.build_method(
        {"name": "lora", "rank": 4, "alpha": 8, "init": "pissa", "targets": "all-linear"}
    )
    adapted = method.apply(params, jax.random.key(1))
    np.testing.assert_allclose(np.asarray(apply(adapted)), np.asarray(logits), atol=1e-5, rtol=1e-5)
    # Against float64 numpy's SVD: s*a@b is the best rank-r part of W, a^T a = S_r / s.
    w = np.asarray(params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"], np.float64)
    leaf = adapted["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    top = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(np.asarray(leaf.delta(), np.float64), top, atol=1e-5)
    np.testing.assert_allclose(np.asarray(leaf.w, np.float64), w - top, atol=1e-5)
    a = np.asarray(leaf.a, np.float64)
    np.testing.assert_allclose(a.T @ a, np.diag(s[:4] / leaf.scale), atol=1e-5)


def test_pissa_marker_and_conversion_to_plain_lora(base):
    _, apply, params, _ = base
    config = {"name": "lora", "rank": 4, "alpha": 8, "init": "pissa", "targets": "qv"}
    method = peft.build_method(config)
    initial = method.apply(params, jax.random.key(1))
    trained = randomize_b(initial)
    leaf = trained["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert leaf.init == "pissa" and leaf.rewrites_base
    kaiming = peft.build_method({**config, "init": "kaiming"}).apply(params, jax.random.key(1))
    assert kaiming["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].init is None
    # The marker is static: it survives split/combine, jit, stacking and scan slicing.
    t, f = method.split(trained)
    for tree in (t, f, peft.combine(t, f), jax.jit(lambda p: p)(trained)):
        assert tree["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].init == "pissa"
    stacked = stack_layers(CFG, trained)["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert stacked.init == "pissa"
    with pytest.raises(peft.PeftError, match="LoraWeight.init"):
        peft.LoraWeight(leaf.w, leaf.a, leaf.b, init="loftq")  # olora, pissa_niter_<k> are valid
    # [a, a0] @ [b; -b0] over W, from the initial leaf or from W itself.
    w = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    start = initial["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    for source in (start, w):
        plain = lora.pissa_to_lora_leaf(leaf, source)
        assert plain.init is None and plain.rank == 8 and plain.scale == leaf.scale
        np.testing.assert_allclose(np.asarray(plain.w), np.asarray(w), atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(plain.materialize(), np.float64),
            np.asarray(leaf.materialize(), np.float64),
            atol=1e-5,
        )
    with pytest.raises(peft.PeftError, match="not a PiSSA leaf"):
        lora.pissa_to_lora_leaf(plain, w)
    converted = peft.pissa_to_lora(trained, params)
    np.testing.assert_allclose(np.asarray(apply(converted)), np.asarray(apply(trained)), atol=1e-5)


def test_factored_equals_merged_and_merge_equals_adapted(base):
    model, apply, params, logits = base
    outs = {}
    for compute in ("factored", "merged", "hybrid"):
        method = peft.build_method(
            {"name": "lora", "rank": 4, "targets": "all-linear", "compute": compute}
        )
        outs[compute] = randomize_b(method.apply(params, jax.random.key(1)))
    factored = apply(outs["factored"])
    assert float(jnp.abs(factored - logits).max()) > 1e-2  # the adapter matters
    np.testing.assert_allclose(np.asarray(apply(outs["merged"])), np.asarray(factored), atol=1e-5)
    np.testing.assert_allclose(np.asarray(apply(outs["hybrid"])), np.asarray(factored), atol=1e-5)
    merged = peft.merge(outs["factored"])
    assert not any(peft.is_leaf(x) for x in jax.tree.leaves(merged, is_leaf=peft.is_leaf))
    np.testing.assert_allclose(np.asarray(apply(merged)), np.asarray(factored), atol=1e-5)


def test_dropout_only_in_training_mode(base):
    model, apply, params, logits = base
    method = peft.build_method({"name": "lora", "rank": 4, "dropout": 0.5})
    run = jax.jit(
        lambda p, key, det: model.apply(
            {"params": p}, IDS, deterministic=det, rngs={"dropout": key}
        ),
        static_argnums=2,
    )
    zero_b = method.apply(params, jax.random.key(1))
    adapted = randomize_b(zero_b)
    evaluated = run(adapted, jax.random.key(0), True)
    np.testing.assert_allclose(np.asarray(evaluated), np.asarray(apply(adapted)), atol=1e-5)
    trained = run(adapted, jax.random.key(0), False)
    assert float(jnp.abs(trained - evaluated).max()) > 1e-3
    # With b = 0 the low-rank path is zero, so dropout (on its input only) changes nothing.
    np.testing.assert_allclose(
        np.asarray(run(zero_b, jax.random.key(0), False)), np.asarray(logits), atol=1e-5
    )


def test_scan_layers_equals_unscanned(base):
    _, apply, params, _ = base
    method = peft.build_method({"name": "lora", "rank": 4, "targets": "attention"})
    adapted = randomize_b(method.apply(params, jax.random.key(1)))
    scfg = CFG.replace(scan_layers=True)
    smodel = build_model(scfg)
    stacked = stack_layers(CFG, adapted)
    leaf = stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    chex.assert_shape([leaf.w, leaf.a, leaf.b], [(2, 32, 32), (2, 32, 4), (2, 4, 32)])
    np.testing.assert_allclose(
        np.asarray(smodel.apply({"params": stacked}, IDS)), np.asarray(apply(adapted)), atol=1e-5
    )
    # Applying the method to stacked params gives one independent adapter per layer.
    direct = method.apply(stack_layers(CFG, params), jax.random.key(1))
    leaf = direct["model"]["layers"]["self_attn"]["v_proj"]["kernel"]
    chex.assert_shape([leaf.a, leaf.b], [(2, 32, 4), (2, 4, 16)])
    assert not np.allclose(np.asarray(leaf.a[0]), np.asarray(leaf.a[1]))
    chex.assert_trees_all_equal(
        leaf.w, stack_layers(CFG, params)["model"]["layers"]["self_attn"]["v_proj"]["kernel"]
    )


def test_gradients_and_optimizer_state_only_for_adapters(base):
    model, _, params, _ = base
    method = peft.build_method({"name": "lora", "rank": 4, "targets": "qv"})
    adapted = randomize_b(method.apply(params, jax.random.key(1)))
    trainable, frozen = method.split(adapted)
    chex.assert_trees_all_equal(peft.combine(trainable, frozen), adapted)

    def loss(t):
        return jnp.mean(model.apply({"params": peft.combine(t, frozen)}, IDS) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    assert len(paths) == 8 and all(p.endswith((".a", ".b")) for p in paths)
    # q: 32*4 + 4*32, v: 32*4 + 4*16 per layer, float32.
    n_adapter = 2 * (32 * 4 + 4 * 32 + 32 * 4 + 4 * 16)
    assert peft.nbytes(grads) == peft.nbytes(trainable) == 4 * n_adapter
    assert method.count(adapted) == (n_adapter, peft.count(params)[1] + n_adapter)
    # The same gradients as differentiating the whole tree and reading off a, b.
    full = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, IDS) ** 2)))(adapted)
    want = full["model"]["layers_1"]["self_attn"]["v_proj"]["kernel"]
    got = grads["model"]["layers_1"]["self_attn"]["v_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(got.b), np.asarray(want.b), rtol=1e-5, atol=1e-7)

    tx = optax.adamw(1e-3)
    opt_state = tx.init(trainable)
    # adamw keeps mu and nu (one copy each of the trainable arrays) and an int32 count.
    assert peft.nbytes(opt_state) == 2 * 4 * n_adapter + 4
    updates, _ = tx.update(grads, opt_state, trainable)
    stepped = peft.combine(optax.apply_updates(trainable, updates), frozen)
    leaf = stepped["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    old = adapted["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert leaf.w is old.w  # the frozen base is untouched (the same buffer)
    assert not np.allclose(np.asarray(leaf.a), np.asarray(old.a))


@pytest.mark.parametrize("quantized", [False, True])
def test_hybrid_gradients_match_float64_closed_form(quantized):
    """compute="hybrid" (merged forward, custom backward): the gradients of
    sum(y * r) for y = x @ (w + s a@b) are, in closed form, dx = r (w + s a b)^T,
    da = s x^T r b^T, db = s (x a)^T r. Checked in float64 numpy, with a plain
    and an NF4 base (whose dequantized kernel is the reference's w)."""
    rng = np.random.default_rng(2)
    w, a, b = rng.normal(size=(64, 24)), rng.normal(size=(64, 4)), rng.normal(size=(4, 24))
    x, r = rng.normal(size=(3, 5, 64)), rng.normal(size=(3, 5, 24))
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    base = peft.quantize_nf4(f32(w)) if quantized else f32(w)
    if quantized:
        w = np.asarray(layers.materialize(base, jnp.float32), np.float64)

    def loss(x, a, b, compute):
        leaf = peft.LoraWeight(base, a, b, 0.5, 0.0, compute)
        return jnp.sum(layers.linear(x, leaf) * f32(r))

    got = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(f32(x), f32(a), f32(b), "hybrid")
    xf, rf = x.reshape(-1, 64), r.reshape(-1, 24)
    want = (
        (rf @ (w + 0.5 * a @ b).T).reshape(x.shape),
        0.5 * xf.T @ (rf @ b.T),
        0.5 * (xf @ a).T @ rf,
    )
    for g, ref in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
    # The same gradients as autodiff through the factored form.
    factored = jax.grad(loss, (0, 1, 2))(f32(x), f32(a), f32(b), "factored")
    for g, h in zip(got, factored):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_hybrid_training_step_equals_factored(base):
    """A LoRA model's loss and adapter gradients under compute="hybrid" equal
    the factored form's, with scanned layers (stacked adapters)."""
    import dataclasses

    model = build_model(dataclasses.replace(CFG, scan_layers=True))
    params = stack_layers(CFG, tiny_params())
    grads = {}
    for compute in ("factored", "hybrid"):
        method = peft.build_method(
            {"name": "lora", "rank": 4, "targets": "all-linear", "compute": compute}
        )
        trainable, frozen = method.split(randomize_b(method.apply(params, jax.random.key(1))))
        loss = lambda t, f: jnp.mean(model.apply({"params": peft.combine(t, f)}, IDS) ** 2)
        grads[compute] = jax.value_and_grad(loss)(trainable, frozen)
    (l1, g1), (l2, g2) = grads["factored"], grads["hybrid"]
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1))
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4 * scale)


def test_hybrid_refuses_dropout_and_dora():
    with pytest.raises(peft.PeftError, match="'hybrid' cannot apply LoRA dropout"):
        peft.build_method({"name": "lora", "rank": 4, "dropout": 0.1, "compute": "hybrid"})
    with pytest.raises(peft.PeftError, match="'hybrid' is LoRA's"):
        peft.build_method({"name": "dora", "rank": 4, "compute": "hybrid"}).apply(
            tiny_params(), jax.random.key(0)
        )


def test_auto_compute_resolves_by_dtype_and_dropout():
    w, a, b = jnp.ones((8, 6)), jnp.ones((8, 2)), jnp.ones((2, 6))
    plain, dropped = peft.LoraWeight(w, a, b), peft.LoraWeight(w, a, b, dropout=0.1)
    assert (
        plain.compute == "auto" and peft.build_method({"name": "lora"}).config["compute"] == "auto"
    )
    key = jax.random.key(0)
    assert plain.compute_mode(jnp.float32, key) == "hybrid"
    assert plain.compute_mode(jnp.bfloat16, None) == "factored"  # small updates would round away
    assert dropped.compute_mode(jnp.float32, key) == "factored"  # dropout needs the low-rank input
    assert dropped.compute_mode(jnp.float32, None) == "hybrid"  # evaluation: no dropout
    # 8x6 kernel: the merged kernel pays off from 8*6/(8+6) = 3.4 tokens up.
    assert plain.compute_mode(jnp.float32, None, tokens=4) == "hybrid"
    assert plain.compute_mode(jnp.float32, None, tokens=3) == "factored"
