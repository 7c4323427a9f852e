"""PiSSA adapters leave ftjax only as plain LoRA over the original base.

A PiSSA leaf's frozen kernel is the residual `W - s a0 b0`, so its `a`, `b`
alone mean nothing to a consumer holding `W`: `save_adapter` refuses such
leaves, and `export_adapter` rewrites them as the rank-2r LoRA
`[a, a0] @ [b; -b0]` over `W` (PEFT's own conversion), which
`peft.PeftModel.from_pretrained` applies to the unmodified HF base with
ftjax's logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
from hf_fixtures import VOCAB, torch_base, torch_logits

from ftjax import peft
from ftjax.models import from_pretrained

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama2")


def trained_like(params, seed=0):
    """As if trained a little: both a and b moved away from PiSSA's init."""
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, peft.LoraWeight):
            return x
        da = rng.normal(size=x.a.shape) * 0.3 * float(jnp.abs(x.a).max())
        db = rng.normal(size=x.b.shape) * 0.3 * float(jnp.abs(x.b).max())
        return x.replace(a=x.a + jnp.asarray(da, x.a.dtype), b=x.b + jnp.asarray(db, x.b.dtype))

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


def q_proj(params):
    layers = params["model"]
    layer = layers["layers"] if "layers" in layers else layers["layers_0"]
    return layer["self_attn"]["q_proj"]["kernel"]


@pytest.mark.parametrize(
    "config, scan",
    [
        ({"name": "lora", "rank": 4, "alpha": 8, "init": "pissa", "targets": "all-linear"}, False),
        ({"name": "lora", "rank": 2, "alpha": 4, "rslora": True, "init": "pissa"}, True),
    ],
)
def test_pissa_export_loads_in_peft_with_ftjax_logits(checkpoint, tmp_path, config, scan):
    model, base = from_pretrained(checkpoint, scan_layers=scan)
    logits = jax.jit(lambda p: model.apply({"params": p}, IDS))
    method = peft.build_method(config)
    initial = jax.jit(method.apply)(base, jax.random.key(0))
    trained = trained_like(initial)
    assert q_proj(trained).init == "pissa" and q_proj(trained).rewrites_base
    # The marker survives split/combine and merge leaves a plain array.
    assert q_proj(peft.combine(*method.split(trained))).init == "pissa"
    ours = np.asarray(logits(trained))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL  # training mattered

    for kwargs in ({}, {"method": config}):
        with pytest.raises(peft.AdapterFormatError, match="is a PiSSA adapter.*export_adapter"):
            peft.save_adapter(model.cfg, trained, str(tmp_path / "raw"), **kwargs)
    with pytest.raises(peft.AdapterFormatError, match="initial= is missing"):
        peft.export_adapter(model.cfg, trained, str(tmp_path / "raw"), method=config)

    out = str(tmp_path / "adapter")
    written = peft.export_adapter(model.cfg, trained, out, method=config, initial=base)
    rank, alpha = config["rank"], config["alpha"]
    assert written["r"] == 2 * rank and written["init_lora_weights"] is True
    want_alpha = alpha * math.sqrt(2) if config.get("rslora") else 2 * alpha
    assert math.isclose(written["lora_alpha"], want_alpha, rel_tol=1e-6)
    assert written["use_rslora"] == bool(config.get("rslora"))

    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(checkpoint), out)
    np.testing.assert_allclose(torch_logits(peft_model, IDS), ours, atol=TOL)
    np.testing.assert_allclose(torch_logits(peft_model.merge_and_unload(), IDS), ours, atol=TOL)

    # The same files from the step-0 adapted params instead of the base.
    again = str(tmp_path / "again")
    peft.export_adapter(model.cfg, trained, again, method=config, initial=initial)
    (_, first), (_, second) = peft.read_adapter(out), peft.read_adapter(again)
    assert set(first) == set(second)
    for key in first:
        np.testing.assert_allclose(second[key], first[key], atol=1e-5)
    # Back in ftjax, over the plain base.
    reloaded = peft.load_adapter(model.cfg, base, out)
    np.testing.assert_allclose(np.asarray(logits(reloaded)), ours, atol=TOL)


def test_conversion_checks_the_residual(checkpoint):
    model, base = from_pretrained(checkpoint)
    method = peft.build_method({"name": "lora", "rank": 4, "alpha": 8, "init": "pissa"})
    trained = trained_like(method.apply(base, jax.random.key(0)))
    converted = peft.pissa_to_lora(trained, base)
    leaf = q_proj(converted)
    assert leaf.init is None and leaf.rank == 8
    np.testing.assert_array_equal(np.asarray(leaf.w), np.asarray(q_proj(base)))
    other = jax.tree.map(lambda x: x * 1.5, base)
    with pytest.raises(peft.AdapterFormatError, match="frozen residual differs"):
        peft.pissa_to_lora(trained, other)
    with pytest.raises(peft.AdapterFormatError, match="initial: not a params tree"):
        peft.pissa_to_lora(trained, {"model": {}})
    other_rank = peft.build_method({"name": "lora", "rank": 2, "alpha": 8, "init": "pissa"})
    with pytest.raises(peft.AdapterFormatError, match="is not this PiSSA leaf's"):
        peft.pissa_to_lora(trained, other_rank.apply(base, jax.random.key(0)))


def test_qpissa_exports_relative_to_the_original_base(checkpoint, tmp_path):
    # QLoRA over a PiSSA residual: the rank-2r LoRA over W is what PEFT's own
    # conversion gives; it differs from the trained model by the quantization
    # error of the residual, and equals ftjax's converted params exactly.
    model, base = from_pretrained(checkpoint)
    logits = jax.jit(lambda p: model.apply({"params": p}, IDS))
    config = {"name": "qlora", "rank": 4, "alpha": 8, "init": "pissa", "targets": "qv"}
    config["quantize"] = "qv"  # the other kernels stay as in the HF base
    method = peft.build_method(config)
    initial = method.apply(base, jax.random.key(0))
    trained = trained_like(initial)
    assert isinstance(q_proj(trained).w, peft.NF4Weight) and q_proj(trained).init == "pissa"
    # From the step-0 tree the rewrite is exact for ftjax's leaf.
    exact = peft.pissa_to_lora(trained, initial)
    np.testing.assert_allclose(np.asarray(logits(exact)), np.asarray(logits(trained)), atol=1e-5)
    out = str(tmp_path / "adapter")
    peft.export_adapter(model.cfg, trained, out, method=config, initial=base)
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(checkpoint), out)
    want = np.asarray(logits(peft.pissa_to_lora(trained, base)))
    np.testing.assert_allclose(torch_logits(peft_model, IDS), want, atol=TOL)


def test_dora_pissa_is_refused_unconverted(checkpoint, tmp_path):
    model, base = from_pretrained(checkpoint)
    config = {"name": "dora", "rank": 2, "alpha": 4, "init": "pissa", "targets": "qv"}
    trained = trained_like(peft.build_method(config).apply(base, jax.random.key(0)))
    with pytest.raises(peft.AdapterFormatError, match="PiSSA adapter"):
        peft.save_adapter(model.cfg, trained, str(tmp_path), method=config)


@pytest.mark.skipif(
    "init" not in peft.DoraWeight.static, reason="DoraWeight does not carry the init marker yet"
)
def test_dora_pissa_export_loads_in_peft(checkpoint, tmp_path):
    model, base = from_pretrained(checkpoint)
    logits = jax.jit(lambda p: model.apply({"params": p}, IDS))
    config = {"name": "dora", "rank": 2, "alpha": 4, "init": "pissa", "targets": "qv"}
    trained = trained_like(peft.build_method(config).apply(base, jax.random.key(0)))
    assert q_proj(trained).init == "pissa"
    with pytest.raises(peft.AdapterFormatError, match="PiSSA adapter"):
        peft.save_adapter(model.cfg, trained, str(tmp_path))
    written = peft.export_adapter(model.cfg, trained, str(tmp_path), method=config, initial=base)
    assert written["use_dora"] and written["r"] == 4
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(checkpoint), str(tmp_path))
    np.testing.assert_allclose(torch_logits(peft_model, IDS), np.asarray(logits(trained)), atol=TOL)
