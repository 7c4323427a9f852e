"""The attention kernels by backend (`ftjax.models.attention`): splash (run in
Pallas interpret mode on the CPU) against a float64 reference and against
`jax.nn.dot_product_attention`'s gradients, under a simulated 8-device mesh,
inside a whole model; the cuDNN constraints and the choice of kernel per
platform; and, where libtpu is installed, the splash step compiled for a TPU
topology with no TPU attached."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import attention_f64, libtpu_env

from ftjax.models import ModelConfig, attention, build_model, layers
from ftjax.models.attention import MaskParts

B, T, H = 2, 256, 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(name, n=4, kv=4, b=B, t=T, seed=0):
    """q, k, v and the mask's parts of one test case."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, t, x, H)).astype(np.float32) for x in (n, kv, kv))
    valid = segments = window = None
    if name in ("padding", "packed", "gqa"):
        valid = np.ones((b, t), bool)
        valid[0, t - 37 :] = False  # right padding
        valid[-1, :19] = False  # left padding: its first rows see no key at all
    if name in ("packed", "gqa"):
        # Packed examples as the batcher lays them out: ids 1, 2, ... and 0 on padding.
        segments = np.where(np.arange(t) < t // 3, 1, np.where(np.arange(t) < 200, 2, 3))
        segments = np.where(valid, segments[None], 0).astype(np.int32)
    if name == "window":
        window = 100  # crosses the 128-row tiles: some tiles are skipped, some partial
    return q, k, v, MaskParts(valid, segments, window)


def _dense_mask(parts, b, t):
    index = np.broadcast_to(np.arange(t), (b, t))
    seg = parts.segment_ids
    return np.asarray(
        layers.attention_mask(index, index, parts.kv_valid, seg, seg, parts.sliding_window)
    )


def _check_against_dense(q, k, v, parts, splash, *, atol, grad_atol):
    """splash(q, k, v) against float64 attention, and its gradients against
    those of jax.nn.dot_product_attention, on rows that see at least one key."""
    mask = _dense_mask(parts, q.shape[0], q.shape[1])
    scale = H**-0.5
    rows = mask.any(-1)[:, 0]  # (B, T)
    got = np.asarray(jax.jit(splash)(q, k, v), np.float32)
    assert np.isfinite(got).all()  # rows that see nothing are finite too
    want = attention_f64(q, k, v, mask, scale)
    np.testing.assert_allclose(got[rows], want[rows], atol=atol, rtol=0)

    def loss(fn):
        return lambda q, k, v: jnp.sum(
            jnp.sin(fn(q, k, v).astype(jnp.float32)) * rows[..., None, None]
        )

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    dense = lambda q, k, v: jax.nn.dot_product_attention(
        f32(q), f32(k), f32(v), mask=mask, scale=scale
    )
    got_g = jax.jit(jax.grad(loss(splash), (0, 1, 2)))(q, k, v)
    want_g = jax.grad(loss(dense), (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got_g, want_g):
        assert np.abs(np.asarray(w)).max() > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w), atol=grad_atol, rtol=0, err_msg=name
        )


@pytest.mark.parametrize(
    "name,n,kv",
    [
        pytest.param("causal", 4, 4, marks=pytest.mark.slow),
        pytest.param("padding", 4, 4, marks=pytest.mark.slow),
        ("packed", 4, 4),
        ("window", 4, 4),
        pytest.param("gqa", 4, 2, marks=pytest.mark.slow),  # grouped-query, packed, padded
        pytest.param("gqa", 4, 1, marks=pytest.mark.slow),  # multi-query
    ],
)
def test_splash_matches_float64_attention(name, n, kv):
    q, k, v, parts = _case(name, n, kv)
    # 128-row tiles: 2 x 2 tiles per head, so tiles are skipped and combined.
    splash = lambda q, k, v: attention.splash_attention(
        q, k, v, parts, H**-0.5, interpret=True, block_size=128
    )
    _check_against_dense(q, k, v, parts, splash, atol=2e-5, grad_atol=5e-5)


@pytest.mark.slow
def test_splash_bfloat16():
    q, k, v, parts = _case("packed", 4, 2)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    splash = lambda q, k, v: attention.splash_attention(q, k, v, parts, H**-0.5, interpret=True)
    assert attention.splash_block_size(T) == 256  # the default tile: one per head
    out = splash(q, k, v)
    assert out.dtype == jnp.bfloat16
    _check_against_dense(q, k, v, parts, splash, atol=3e-2, grad_atol=1e-1)


def test_dispatch_runs_splash_in_interpret_mode_on_cpu():
    """kernel="splash" on the CPU goes through splash (interpret mode); a KV
    cache call (not causal) and a length no tile divides fall back to the
    kernels "auto" would run there."""
    q, k, v, parts = _case("packed", 4, 2)
    mask = _dense_mask(parts, B, T)
    got = attention.dot_product_attention(q, k, v, mask, H**-0.5, True, "splash", parts=parts)
    jaxpr = str(jax.make_jaxpr(
        lambda q: attention.dot_product_attention(q, k, v, mask, H**-0.5, True, "splash", parts=parts)
    )(q))  # fmt: skip
    assert "pallas_call" in jaxpr
    rows = mask.any(-1)[:, 0]
    np.testing.assert_allclose(
        np.asarray(got)[rows], attention_f64(q, k, v, mask, H**-0.5)[rows], atol=2e-5
    )
    short = _case("causal", 4, 4, t=200)
    short_mask = _dense_mask(short[3], B, 200)
    out = attention.dot_product_attention(
        *short[:3], short_mask, H**-0.5, True, "splash", parts=short[3]
    )
    want = attention.causal_block_attention(*short[:3], short_mask, H**-0.5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.slow
def test_splash_under_a_mesh_is_sharded_and_equal():
    """Under `jax.set_mesh`, splash runs in shard_map: batch over "data", heads
    over "model"; values and gradients equal the single-device kernel."""
    assert jax.device_count() == 8  # conftest.py
    auto, explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
    cases = [  # (kv heads, mesh shape, axis type, expected (batch, heads, kv heads) axes)
        (2, (4, 2), auto, ("data", "model", "model")),  # as parallel.py's Mesh
        (2, (4, 2), explicit, ("data", "model", "model")),
        (1, (4, 2), auto, ("data", "model", None)),  # MQA: k/v replicated
        (2, (8,), auto, (None, None, None)),  # a batch of 4 does not split 8 ways
    ]
    for kv, shape, kind, axes in cases:
        q, k, v, parts = _case("gqa", 4, kv, b=4)
        splash = lambda q, k, v, parts=parts: attention.splash_attention(
            q, k, v, parts, H**-0.5, interpret=True, block_size=128
        )
        loss = lambda q, k, v, splash=splash: jnp.sum(jnp.sin(splash(q, k, v)))
        want = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
        names = ("data", "model")[: len(shape)]
        mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))
        assert attention._shard_axes(mesh, 4, 4, kv) == axes
        with jax.set_mesh(mesh):
            assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
            got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- choice


def test_auto_resolves_per_platform():
    choose = attention.choose_kernel
    q, k = (B, T, 4, H), (B, T, 2, H)
    bf16, f32 = jnp.bfloat16, jnp.float32
    parts = MaskParts()
    packed = MaskParts(kv_valid=np.ones((B, T), bool), segment_ids=np.ones((B, T), np.int32))
    # CPU: today's rule (causal blocks for long training sequences).
    assert choose("auto", "cpu", q, k, f32, True, packed) == ("block", None)
    assert choose("auto", "cpu", (B, 100, 4, H), (B, 100, 2, H), f32, True, packed)[0] == "xla"
    assert choose("auto", "cpu", (B, 1, 4, H), k, f32, False) == ("xla", None)  # decoding
    # TPU: splash; its fallback is the CPU rule.
    assert choose("auto", "tpu", q, k, bf16, True, packed) == ("splash", None)
    kernel, reason = choose("auto", "tpu", (B, 200, 4, H), (B, 200, 2, H), bf16, True, parts)
    assert kernel == "block" and "not a multiple of 128" in reason
    assert choose("auto", "tpu", q, k, bf16, True, None)[0] == "block"  # no MaskParts
    assert choose("auto", "tpu", (B, 1, 4, H), k, bf16, False)[0] == "xla"
    # GPU: cuDNN where it can express the call, else xla.
    assert choose("auto", "gpu", q, k, bf16, True, parts) == ("cudnn", None)
    assert choose("auto", "gpu", q, k, f32, True, parts)[0] == "xla"
    assert choose("auto", "gpu", q, k, bf16, True, packed)[0] == "xla"
    # Explicit kernels.
    assert choose("xla", "tpu", q, k, bf16, True, parts) == ("xla", None)
    assert choose("block", "tpu", q, k, bf16, True, parts) == ("block", None)
    assert choose("splash", "cpu", q, k, f32, True, parts) == ("splash", None)
    assert choose("cudnn", "cpu", q, k, bf16, True, parts)[0] == "xla"
    with pytest.raises(ValueError, match="expected one of auto, block, xla, splash, cudnn"):
        choose("flash", "cpu", q, k, f32, True, parts)


def test_cudnn_constraints():
    ok = MaskParts(sliding_window=64)
    check = attention.cudnn_unsupported
    assert check(jnp.bfloat16, 128, 512, 512, True, ok) is None
    assert check(jnp.float16, 64, 512, 512, True, MaskParts()) is None
    assert "dtype float32" in check(jnp.float32, 128, 512, 512, True, ok)
    assert "head_dim 256" in check(jnp.bfloat16, 256, 512, 512, True, ok)
    assert check(jnp.bfloat16, 256, 512, 512, True, ok, compute_capability=(9, 0)) is None
    assert "head_dim 60" in check(jnp.bfloat16, 60, 512, 512, True, ok)
    assert "causal" in check(jnp.bfloat16, 128, 1, 512, False, ok)
    assert "dense" in check(jnp.bfloat16, 128, 512, 512, True, None)
    assert "segment" in check(jnp.bfloat16, 128, 512, 512, True, MaskParts(segment_ids=1))
    assert "padding" in check(jnp.bfloat16, 128, 512, 512, True, MaskParts(kv_valid=1))


def test_target_platform_context():
    default = attention.current_platform()
    assert default == jax.default_backend()
    with attention.target_platform("tpu"):
        assert attention.current_platform() == "tpu"
        with attention.target_platform("cuda"):
            assert attention.current_platform() == "gpu"
        assert attention.current_platform() == "tpu"
    assert attention.current_platform() == default


def test_cpu_auto_is_the_causal_block_kernel_bit_for_bit():
    """The CPU results of "auto" are what they were before kernels by backend:
    the block kernel for long causal calls, jax.nn.dot_product_attention else."""
    t = 2 * attention.CAUSAL_BLOCK_MIN
    q, k, v, parts = _case("packed", 4, 2, t=t)
    mask = _dense_mask(parts, B, t)
    got = attention.dot_product_attention(q, k, v, mask, H**-0.5, True, parts=parts)
    want = attention.causal_block_attention(q, k, v, mask, H**-0.5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got = attention.dot_product_attention(q[:, :1], k, v, mask[:, :, :1], H**-0.5, False)
    want = jax.nn.dot_product_attention(q[:, :1], k, v, mask=mask[:, :, :1], scale=H**-0.5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- model


@pytest.mark.slow
@pytest.mark.parametrize("window,scan", [(None, False), (48, True)])
def test_model_with_splash_equals_xla(window, scan):
    """A tiny Llama (grouped-query heads) with attention="splash" computes the
    logits and loss gradients of attention="xla", on packed, padded rows; also
    with a sliding window, scanned layers and the remat policy that keeps the
    attention output (and so splash's residuals)."""
    from hf_fixtures import random_params

    t = 128
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=t,
        sliding_window=window,
        scan_layers=scan,
        remat="attention" if scan else "none",
        attention="xla",
    )
    params = random_params(build_model(cfg), 0)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (2, t))
    segments = np.ones((2, t), np.int32)
    segments[0, 50:] = 2
    segments[0, 110:] = 0  # padding
    positions = np.where(segments[0] == 2, np.arange(t) - 50, np.arange(t))[None].repeat(2, 0)
    batch = dict(
        attention_mask=(segments > 0).astype(np.int32), segment_ids=segments, positions=positions
    )
    weights = jnp.asarray(segments > 0, jnp.float32)[..., None]

    def loss(params, kernel):
        logits = build_model(cfg.replace(attention=kernel)).apply({"params": params}, ids, **batch)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0:1] * weights), logits

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    g_xla, logits_xla = grad(params, "xla")
    g_splash, logits_splash = grad(params, "splash")
    valid = segments > 0
    np.testing.assert_allclose(
        np.asarray(logits_splash)[valid], np.asarray(logits_xla)[valid], atol=1e-5, rtol=0
    )
    for g, w in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- TPU compile

_TPU_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ftjax.models import attention, layers

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")

    def compile_step(kernel, devices, axes, b, t, n, kv, h, packed, window=None):
        grid = np.array(devices).reshape((-1, 2) if len(axes) == 2 else (-1,))
        mesh = Mesh(grid, axes)
        spec = NamedSharding(mesh, P("data"))
        q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.bfloat16)
        seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

        def loss(q, k, v, seg):
            index = jnp.broadcast_to(jnp.arange(t), (b, t))
            valid, seg = (seg > 0, seg) if packed else (None, None)
            mask = layers.attention_mask(index, index, valid, seg, seg, window)
            parts = attention.MaskParts(valid, seg, window)
            out = attention.dot_product_attention(q, k, v, mask, h**-0.5, True, kernel, parts=parts)
            return jnp.sum(out.astype(jnp.float32))

        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), in_shardings=(spec,) * 4)
        with attention.target_platform("tpu"), jax.set_mesh(mesh):
            compiled = step.lower(q, k, k, seg).compile()
        hlo = compiled.as_text()
        return dict(
            temp=compiled.memory_analysis().temp_size_in_bytes,
            mosaic=hlo.count("tpu_custom_call"),
            gathers=hlo.count("all-gather"),
        )

    one = topo.devices[:1]
    out = {
        # The headline: causal, 4 x 8 heads x 2048 x 128, one chip.
        "splash": compile_step("splash", one, ("data",), 4, 2048, 8, 8, 128, False),
        "xla": compile_step("xla", one, ("data",), 4, 2048, 8, 8, 128, False),
        # Packed + padded, grouped heads, a window, head_dim 64, sharded 2 x 2.
        "splash_mesh": compile_step(
            "splash", topo.devices, ("data", "model"), 4, 1024, 8, 4, 64, True, 256
        ),
    }
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(libtpu_env() is None, reason="needs libtpu (.ci/run installs it in .tpu-site)")
def test_splash_compiles_for_tpu_with_small_temp_memory():
    """The forward+backward splash step compiles for a v5e topology (no TPU
    attached) to Mosaic kernels, without gathering q/k/v across the mesh, and
    needs a small fraction of the dense kernel's temporary memory."""
    env = libtpu_env()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _TPU_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    print(res)
    assert res["splash"]["mosaic"] >= 3  # forward, dq and dkv kernels
    assert res["xla"]["mosaic"] == 0
    assert res["splash"]["temp"] < 16 * 2**20 < 2**28 < res["xla"]["temp"]
    assert res["splash_mesh"]["mosaic"] >= 3
    assert res["splash_mesh"]["gathers"] == 0  # each chip computes its own batch rows and heads
