"""Parity of the flax models with transformers' PyTorch models, and the
checkpoint loader's handling of good and bad input."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_fixtures import TINY_CONFIGS, VOCAB, attention_f64, build_tiny, torch_logits

from ftjax.models import (
    CheckpointError,
    ModelConfig,
    build_model,
    from_pretrained,
    init_kv_cache,
    layers,
    safetensors_io,
    save_pretrained,
)

FAMILIES = sorted(TINY_CONFIGS)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {f: tiny_checkpoint(f) for f in FAMILIES}


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :4] = 0  # left padding: the padded keys must be ignored
    return ids, mask


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family, scan, blocks):
    ids, mask = _inputs()
    torch_model = build_tiny(family)
    # "block": causal block attention, which long sequences take, on 12 tokens.
    kernel = "block" if blocks else "auto"
    model, params = from_pretrained(checkpoints[family], scan_layers=scan, attention=kernel)
    got = np.asarray(model.apply({"params": params}, ids))
    np.testing.assert_allclose(got, torch_logits(torch_model, ids), atol=1e-4, rtol=0)
    got = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    want = torch_logits(torch_model, ids, mask)
    valid = mask.astype(bool)  # padded query rows are undefined in both
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    # The padding mask must change something, or the check above proves nothing.
    assert np.abs(got[1, 4:] - np.asarray(model.apply({"params": params}, ids))[1, 4:]).max() > 1e-3


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gpt2"])
def test_save_pretrained_round_trip_through_transformers(checkpoints, family, tmp_path):
    ids, _ = _inputs()
    model, params = from_pretrained(checkpoints[family], scan_layers=True)
    save_pretrained(model, params, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(
        torch_logits(reloaded, ids), np.asarray(model.apply({"params": params}, ids)), atol=1e-4
    )


def test_sharded_index_checkpoint(checkpoints, tmp_path):
    tensors = safetensors_io.load(os.path.join(checkpoints["llama2"], "model.safetensors"))
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in halves.items():
        safetensors_io.save({k: tensors[k] for k in keys}, str(tmp_path / shard))
    index = {"weight_map": {k: s for s, keys in halves.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(os.path.join(checkpoints["llama2"], "config.json"), tmp_path)
    ids, _ = _inputs()
    m1, p1 = from_pretrained(checkpoints["llama2"])
    m2, p2 = from_pretrained(str(tmp_path))
    chex.assert_trees_all_equal(p1, p2)


def test_bfloat16_weights_load_and_run(checkpoints, tmp_path):
    model = build_tiny("qwen3").to(dtype=__import__("torch").bfloat16)
    model.save_pretrained(str(tmp_path))
    ftmodel, params = from_pretrained(str(tmp_path), dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    ids, _ = _inputs()
    logits = ftmodel.apply({"params": params}, ids)
    chex.assert_tree_all_finite(logits)
    ref = torch_logits(model, ids)
    assert np.abs(np.asarray(logits) - ref).max() < 0.1  # bf16 rounding, same function


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_give_same_gradients(model_type, scan):
    """Every policy computes the gradient of the same function; what differs
    is only what the backward pass recomputes (the planner measures that)."""
    cfg = ModelConfig(model_type=model_type, scan_layers=scan)
    ids = jnp.asarray(_inputs()[0] % cfg.vocab_size)
    params = build_model(cfg).init(jax.random.key(0), ids)["params"]

    def loss(p, c):
        return build_model(c).apply({"params": p}, ids).mean()

    g1 = jax.grad(loss)(params, cfg)
    for policy in ("full", "dots", "attention", "offload", "full_offload", True):
        g2 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=policy))
        chex.assert_trees_all_close(g1, g2, atol=1e-6)


def test_remat_policies_change_what_is_saved():
    """The policies are not all the same program: the saved residuals of one
    layer differ (jax's own accounting of what the backward pass keeps)."""
    cfg = ModelConfig(model_type="llama", num_layers=1)
    ids = jnp.asarray(_inputs()[0] % cfg.vocab_size)
    params = build_model(cfg).init(jax.random.key(0), ids)["params"]

    def saved(policy):
        c = cfg.replace(remat=policy)
        f = lambda p: build_model(c).apply({"params": p}, ids).mean()
        _, vjp = jax.vjp(f, params)
        return sum(x.size for x in jax.tree.leaves(vjp) if hasattr(x, "size"))

    sizes = {p: saved(p) for p in ("none", "full", "attention", "dots")}
    assert sizes["full"] < sizes["attention"] < sizes["dots"] < sizes["none"]


@pytest.mark.parametrize("family", [pytest.param("mistral", marks=pytest.mark.slow), "gpt2"])
def test_kv_cache_decoding_equals_full_forward(checkpoints, family):
    model, params = from_pretrained(checkpoints[family], scan_layers=family == "gpt2")
    ids, mask = _inputs()
    full = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    cache = init_kv_cache(model.cfg, 2, 16)
    logits, cache = model.apply(
        {"params": params}, ids[:, :8], attention_mask=mask[:, :8], cache=cache
    )
    steps = [np.asarray(logits)]
    for t in range(8, 12):
        logits, cache = model.apply(
            {"params": params}, ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache
        )
        steps.append(np.asarray(logits))
    got = np.concatenate(steps, axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_config(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"], tmp_path / "c")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        from_pretrained(d)


def test_missing_weights(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"], tmp_path / "c")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        from_pretrained(d)


def test_pickle_only_checkpoint_is_refused(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"], tmp_path / "c")
    os.remove(os.path.join(d, "model.safetensors"))
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*convert to safetensors"):
        from_pretrained(d)


def test_unsupported_model_type_lists_supported(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"], tmp_path / "c")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "mamba"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'mamba'; supported: ") as e:
        from_pretrained(d)
    assert {"llama", "mistral", "qwen2", "qwen3", "gpt2"} <= set(
        str(e.value).split("supported: ")[1].split(", ")
    )


def test_wrong_shape_names_the_tensor(checkpoints, tmp_path):
    d = _copy(checkpoints["llama2"], tmp_path / "c")
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]
    safetensors_io.save(tensors, path)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        from_pretrained(d)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["gpt2"], tmp_path / "c")
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
    del tensors["transformer.h.1.ln_2.bias"]
    safetensors_io.save(tensors, path)
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.h\.1\.ln_2\.bias'"):
        from_pretrained(d)


def test_hub_id_offline_fails_with_one_line():
    with pytest.raises(CheckpointError) as err:
        from_pretrained("some-org/some-model-that-is-not-here")
    assert "hub download failed" in str(err.value) and "\n" not in str(err.value)


def test_nonexistent_local_path():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        from_pretrained("./does/not/exist")


@pytest.mark.slow
@pytest.mark.parametrize("t", [256, 200])  # 4 equal blocks; uneven blocks
def test_causal_block_attention_equals_float64_attention(t):
    """The blocked path that training takes for long sequences, with grouped
    heads, packed segments and right padding, against a float64 reference;
    its gradients against those of `jax.nn.dot_product_attention`."""
    rng = np.random.default_rng(0)
    b, n, kv, h = 2, 4, 2, 16
    q, k, v = (rng.normal(size=(b, t, x, h)).astype(np.float32) for x in (n, kv, kv))
    index = np.broadcast_to(np.arange(t), (b, t))
    valid = np.ones((b, t), bool)
    valid[1, t - 37 :] = False  # right padding
    segments = (np.arange(t) >= t // 3).astype(np.int32)[None].repeat(b, 0) + 1
    mask = np.asarray(layers.attention_mask(index, index, valid, segments, segments))
    got = layers.dot_product_attention(q, k, v, mask, h**-0.5, causal=True)
    assert t >= 2 * layers.CAUSAL_BLOCK_MIN  # the blocked path, not the fallback
    want = attention_f64(q, k, v, mask, h**-0.5)
    rows = mask.any(-1)[:, 0]  # (B, T): query rows that see at least one key
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=2e-5, rtol=0)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * rows[..., None, None])

    blocked = lambda q, k, v: layers.causal_block_attention(q, k, v, mask, h**-0.5)
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=h**-0.5)
    for g_blocked, g_dense in zip(
        jax.grad(loss(blocked), (0, 1, 2))(q, k, v), jax.grad(loss(dense), (0, 1, 2))(q, k, v)
    ):
        np.testing.assert_allclose(g_blocked, g_dense, atol=2e-5, rtol=0)
