"""HF PEFT interop against PyTorch `peft` itself: adapters written by ftjax
load with `PeftModel.from_pretrained` and give the same logits (before and
after `merge_and_unload`), adapters made by `peft` import into ftjax with the
same logits, and the writer refuses the two mismatches PEFT would accept
silently. PiSSA exports: test_peft_interop_pissa.py; the config allow-list:
test_peft_interop_config.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import VOCAB, torch_base, torch_logits

from ftjax import peft
from ftjax.models import ModelConfig, build_model, from_pretrained
from ftjax.peft import peft_format

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {f: tiny_checkpoint(f) for f in ("llama2", "qwen2")}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """(model, base params, jitted logits function) per family, loaded once."""
    out = {}
    for family, path in checkpoints.items():
        model, params = from_pretrained(path)
        out[family] = (model, params, jax.jit(lambda p, m=model: m.apply({"params": p}, IDS)))
    return out


def perturb(params, seed=0):
    """Trained-looking adapters: b (and DoRA's m) away from their identity init."""
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, peft.LoraWeight):
            return x
        x = x.replace(b=jnp.asarray(rng.normal(size=x.b.shape), x.b.dtype))
        if isinstance(x, peft.DoraWeight):
            x = x.replace(m=x.m * jnp.asarray(rng.uniform(0.5, 1.5, x.m.shape), x.m.dtype))
        return x

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


@pytest.mark.parametrize(
    "family, config",
    [
        ("llama2", {"name": "lora", "rank": 4, "alpha": 8, "targets": "attention"}),
        ("qwen2", {"name": "lora", "rank": 4, "alpha": 8, "rslora": True, "targets": "all-linear"}),
        (
            "qwen2",
            {"name": "dora", "rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
        ),
    ],
)
def test_ftjax_adapter_loads_in_peft(checkpoints, loaded, tmp_path, family, config):
    model, base, logits = loaded[family]
    method = peft.build_method(config)
    params = perturb(jax.jit(method.apply)(base, jax.random.key(0)))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL  # the adapter matters
    written = peft.save_adapter(model.cfg, params, str(tmp_path), method=config)
    assert written["use_dora"] == (config["name"] == "dora")
    assert written["use_rslora"] == config.get("rslora", False)

    peft_model = torch_peft.PeftModel.from_pretrained(
        torch_base(checkpoints[family]), str(tmp_path)
    )
    np.testing.assert_allclose(torch_logits(peft_model, IDS), ours, atol=TOL)
    merged = peft_model.merge_and_unload()
    np.testing.assert_allclose(torch_logits(merged, IDS), ours, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits(jax.jit(peft.merge)(params))), ours, atol=TOL)
    # And back into ftjax from the same files.
    reloaded = peft.load_adapter(model.cfg, base, str(tmp_path))
    np.testing.assert_allclose(np.asarray(logits(reloaded)), ours, atol=1e-6)


@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("llama2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        ("qwen2", dict(r=2, lora_alpha=4, use_rslora=True, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj"])),
    ],
)  # fmt: skip
def test_peft_adapter_imports_into_ftjax(checkpoints, loaded, tmp_path, family, kwargs):
    torch.manual_seed(0)
    # init_lora_weights=False leaves B random (not zero), like a trained adapter.
    config = torch_peft.LoraConfig(init_lora_weights=False, **kwargs)
    peft_model = torch_peft.get_peft_model(torch_base(checkpoints[family]), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    want = torch_logits(peft_model, IDS)

    model, base, logits = loaded[family]
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    assert isinstance(
        params["model"]["layers_1"]["mlp"][kwargs["target_modules"][-1]]["kernel"],
        peft.DoraWeight if kwargs.get("use_dora") else peft.LoraWeight,
    )
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL
    np.testing.assert_allclose(ours, want, atol=TOL)
    # Scanned params get stacked adapters with the same function.
    scanned_model, scanned_base = from_pretrained(checkpoints[family], scan_layers=True)
    scanned = peft.load_adapter(scanned_model.cfg, scanned_base, str(tmp_path))
    out = jax.jit(lambda p: scanned_model.apply({"params": p}, IDS))(scanned)
    np.testing.assert_allclose(np.asarray(out), want, atol=TOL)
    # Written back from the stacked tree, the tensors are the ones PEFT wrote.
    _, tensors = peft.read_adapter(str(tmp_path))
    _, rewritten = peft_format.adapter_state(scanned_model.cfg, scanned)
    assert set(rewritten) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(rewritten[key], np.asarray(value))


def test_writer_refuses_what_peft_would_silently_accept(tmp_path):
    cfg = ModelConfig(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
    )
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), IDS[:, :2])["params"]
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    lora = peft.build_method({"name": "lora", "rank": 2, "targets": "qv"}).apply(
        params, jax.random.key(0)
    )
    config, tensors = peft_format.adapter_state(cfg, lora)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert set(tensors) == {
        f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight"
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (
        16,
        2,
    )
    with pytest.raises(
        peft.AdapterFormatError,
        match="'model.layers.0.self_attn.v_proj' has tensors but target_modules=\\['q_proj'\\]",
    ):
        peft.write_adapter(str(tmp_path), {**config, "target_modules": ["q_proj"]}, tensors)
    dora = peft.build_method({"name": "dora", "rank": 2, "targets": "qv"}).apply(
        params, jax.random.key(0)
    )
    config, tensors = peft_format.adapter_state(cfg, dora)
    with pytest.raises(
        peft.AdapterFormatError, match="lora_magnitude_vector but use_dora is false"
    ):
        peft.write_adapter(str(tmp_path), {**config, "use_dora": False}, tensors)
    assert not os.path.exists(tmp_path / "adapter_config.json")  # nothing half-written
    # A matching config writes; the importer refuses adapters relative to a rewritten base.
    peft.write_adapter(str(tmp_path), config, tensors)
    with open(tmp_path / "adapter_config.json") as f:
        written = json.load(f)
    assert written["use_dora"] and written["init_lora_weights"] is True
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump({**written, "init_lora_weights": "corda"}, f)
    with pytest.raises(peft.AdapterFormatError, match="init_lora_weights='corda'"):
        peft.load_adapter(cfg, params, str(tmp_path))
