"""docs/models.md's "Adding a model family" block, run as it stands: the
family it defines (Starcoder2, which ftjax does not ship) must match
`transformers` to 1e-4, round-trip through save_pretrained/from_pretrained,
and train through the normal config machinery with its own presets, its
adapter loading in HF PEFT with the same logits."""

import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import TINY_HF_FIELDS, doc_module, torch_logits

from ftjax import peft
from ftjax.models import ModelConfig, build_model, from_pretrained, registry, save_pretrained
from ftjax.peft.base import flatten_paths
from ftjax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "models.md")
QUICK = os.path.join(ROOT, "experiments", "quick", "train.py")

pytestmark = pytest.mark.slow  # torch parity and a training run of the doc's family


@pytest.fixture(scope="module")
def family():
    """The doc's module, executed as a module of its own; the registry is
    restored afterwards so that other tests in this process never see it."""
    saved = dict(registry._FAMILIES)
    try:
        with doc_module(DOC, "Adding a model family", "docs_models_example") as module:
            yield module
    finally:
        registry._FAMILIES.clear()
        registry._FAMILIES.update(saved)


def tiny_torch_model(seed=0):
    config = transformers.Starcoder2Config(**TINY_HF_FIELDS)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random (not zero) biases and norms, so parity exercises them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :4] = 0  # left padding
    return ids, mask


def test_doc_family_is_registered(family):
    spec = registry.get_family("starcoder2")
    assert spec is family.STARCODER2 and "starcoder2" in registry.model_types()
    with pytest.raises(ValueError, match="'starcoder2' is already registered"):
        registry.register_family(dataclasses.replace(spec, name="other"))


@pytest.mark.parametrize("scan", [False, True])
def test_doc_family_matches_transformers_and_round_trips(family, scan, tmp_path):
    ids, mask = _inputs()
    torch_model = tiny_torch_model()
    torch_model.save_pretrained(str(tmp_path / "hf"))
    model, params = from_pretrained(str(tmp_path / "hf"), scan_layers=scan)
    assert type(model) is family.Starcoder2ForCausalLM
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, ids)), torch_logits(torch_model, ids), atol=1e-4
    )
    got = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], torch_logits(torch_model, ids, mask)[valid], atol=1e-4)

    save_pretrained(model, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(reloaded).__name__ == "Starcoder2ForCausalLM"
    want = np.asarray(model.apply({"params": params}, ids))
    np.testing.assert_allclose(torch_logits(reloaded, ids), want, atol=1e-4)
    _, params2 = from_pretrained(str(tmp_path / "out"), scan_layers=scan)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_doc_family_check_refuses_mixed_biases(family):
    with pytest.raises(ValueError, match="attention_bias, o_proj_bias and mlp_bias must be equal"):
        ModelConfig(model_type="starcoder2", attention_bias=True)


def _quick_config():
    spec = importlib.util.spec_from_file_location("quick_train", QUICK)
    quick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quick)
    cfg = quick.get_config("method=lora,rank=4")
    cfg.method.targets = "all-linear"
    cfg.model.init.model_type = "starcoder2"
    cfg.train.export_hf = True
    return cfg


def test_doc_family_trains_through_the_config_machinery(family, tmp_path):
    from peft import PeftModel

    cfg = _quick_config()
    result = train(cfg, str(tmp_path / "run"), quiet=True)
    assert type(result.model) is family.Starcoder2ForCausalLM
    assert result.summary["status"] == "completed" and result.summary["steps"] == cfg.train.steps
    # The family's own `all-linear` preset: Starcoder2's c_fc/c_proj, not Llama's gate/up/down.
    adapted = sorted(p for p, x in flatten_paths(result.params) if isinstance(x, peft.LoraWeight))
    modules = ["mlp/c_fc", "mlp/c_proj"] + [f"self_attn/{m}_proj" for m in "koqv"]
    assert adapted == [f"model/layers_{i}/{m}/kernel" for i in range(2) for m in modules]
    # r * (in + out) per adapted kernel: q, o 32->32; k, v 32->16; c_fc 32->64; c_proj 64->32.
    assert result.summary["trainable_params"] == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96)
    leaf = dict(flatten_paths(result.params))[adapted[0]]
    assert np.abs(np.asarray(leaf.b)).max() > 0  # trained: b starts at zero

    ids = np.random.default_rng(1).integers(0, cfg.model.init.vocab_size, (2, 10))
    want = np.asarray(result.model.apply({"params": peft.merge(result.params)}, ids))
    # The merged export reloads in transformers ...
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "hf"))
    np.testing.assert_allclose(torch_logits(merged.eval(), ids), want, atol=1e-4)
    # ... and the adapter loads in HF PEFT over the base weights with the same logits.
    save_pretrained(result.model, result.base_params, str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    adapted_torch = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    np.testing.assert_allclose(torch_logits(adapted_torch, ids), want, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_doc_family_chunked_loss_equals_dense(family, tie):
    """The doc's `return_hidden` and head paths: the chunked loss (`train.loss_chunk`)
    gives the dense sums."""
    from ftjax.train import eval_step

    cfg = ModelConfig(model_type="starcoder2", vocab_size=50, num_layers=1,
                      tie_word_embeddings=tie)  # fmt: skip
    model = build_model(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, 3), np.int32))["params"]
    ids = np.random.default_rng(0).integers(0, 50, (2, 9)).astype(np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((2, 9))}
    sums = lambda chunk: eval_step(*peft.split(params), batch, model=model, loss_chunk=chunk)
    dense, chunked = sums(0), sums(4)
    np.testing.assert_allclose(chunked["loss_sum"], dense["loss_sum"], rtol=1e-6)
    assert float(chunked["correct_sum"]) == float(dense["correct_sum"])


def test_random_init_builds_without_a_checkpoint(family):
    cfg = ModelConfig(model_type="starcoder2", vocab_size=50, num_layers=1)
    params = build_model(cfg).init(jax.random.key(0), np.zeros((1, 3), np.int32))["params"]
    assert set(params["model"]) == {"embed_tokens", "layers_0", "norm"}
    assert set(params["model"]["layers_0"]["mlp"]) == {"c_fc", "c_proj"}
