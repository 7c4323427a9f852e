"""The LoraConfig fields beyond plain LoRA, against PyTorch `peft` itself.

rank_pattern / alpha_pattern, bias, modules_to_save, layers_to_transform and
the fixed inits (gaussian, olora, pissa, pissa_niter_<k>) as ftjax method
options: adapters trained (randomized) in ftjax and exported load with
`peft.PeftModel.from_pretrained` with ftjax's logits (<= 1e-4), and
adapters made by `peft` with the same fields (weights randomized) import
into ftjax with PEFT's logits. Trainable counts follow closed forms; every
LoraConfig field is classified; a quick training run exports an adapter
(lm_head saved, biases trained) that PEFT loads with the trained logits.
"""

import dataclasses
import functools
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
from ftjax.peft.base import flatten_paths

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """`loaded(family)`: (checkpoint dir, model, base params, jitted logits)."""

    @functools.cache
    def get(family, scan=False):
        path = tiny_checkpoint(family)
        model, base = from_pretrained(path, scan_layers=scan)
        return path, model, base, jax.jit(lambda p: model.apply({"params": p}, IDS))

    return get


def randomize(params, method, seed=0):
    """As if trained: every trainable array moved away from its init (the
    adapters' a and b, the biases and modules to save in full)."""
    rng = np.random.default_rng(seed)
    trainable, frozen = method.split(params)

    def move(x):
        noise = rng.normal(0.0, 0.2, x.shape) * max(float(jnp.abs(x).max()), 0.5)
        return x + jnp.asarray(noise, x.dtype)

    return peft.combine(jax.tree.map(move, trainable), frozen)


def peft_made(path, out, seed=0, **kwargs):
    """An adapter made by `peft` with `kwargs`, every trainable tensor
    randomized, saved to `out`; returns PEFT's logits."""
    torch.manual_seed(seed)
    model = torch_peft.get_peft_model(torch_base(path), torch_peft.LoraConfig(**kwargs))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p) * max(float(p.abs().max()), 0.5))
    model.eval()
    model.save_pretrained(str(out))
    return torch_logits(model, IDS)


def report(case, ours, theirs):
    diff = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"\n{case}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL, diff


# (id, family, ftjax method options, the same as peft.LoraConfig kwargs)
CASES = [
    ("rank_pattern", "llama2",
     {"rank": 4, "alpha": 8, "targets": "all-linear",
      "rank_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
      "alpha_pattern": {"o_proj": 3}},
     dict(r=4, lora_alpha=8, target_modules="all-linear",
          rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
          alpha_pattern={"o_proj": 3})),
    ("rank_pattern", "gpt2",
     {"rank": 4, "alpha": 8, "targets": ["c_attn", "c_fc"],
      "rank_pattern": {"c_fc": 2, r"h\.1\.attn\.c_attn": 6}, "alpha_pattern": {"c_attn": 5}},
     dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
          rank_pattern={"c_fc": 2, r"h\.1\.attn\.c_attn": 6}, alpha_pattern={"c_attn": 5})),
    ("bias", "qwen2",
     {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "bias": "lora_only"},
     dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], bias="lora_only")),
    ("bias", "gpt2",
     {"rank": 2, "alpha": 4, "targets": ["c_attn"], "bias": "all"},
     dict(r=2, lora_alpha=4, target_modules=["c_attn"], bias="all")),
    ("modules_to_save", "llama2",
     {"rank": 2, "alpha": 4, "targets": "qv", "modules_to_save": "lm_head"},
     dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("modules_to_save", "qwen2",  # tied: the embedding is also the head
     {"rank": 2, "alpha": 4, "targets": "qv", "modules_to_save": ["embed_tokens"]},
     dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
          modules_to_save=["embed_tokens"], ensure_weight_tying=True)),
    ("modules_to_save", "gpt2",
     {"rank": 2, "alpha": 4, "targets": "qv", "modules_to_save": ["ln_f", "h.1.mlp.c_proj"]},
     dict(r=2, lora_alpha=4, target_modules=["c_attn"], modules_to_save=["ln_f", "1.mlp.c_proj"])),
    ("layers_to_transform", "llama2",
     {"rank": 2, "alpha": 4, "targets": "all-linear", "layers_to_transform": [1]},
     dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"],
          layers_to_transform=[1])),
    ("layers_to_transform", "gpt2",
     {"rank": 2, "alpha": 4, "targets": "all-linear", "layers_to_transform": 0,
      "layers_pattern": "h"},
     dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
          layers_to_transform=0, layers_pattern="h")),
    ("pissa", "llama2", {"rank": 4, "alpha": 8, "init": "pissa"},
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")),
    ("pissa", "gpt2", {"rank": 4, "alpha": 8, "init": "pissa"},
     dict(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="pissa")),
    ("olora", "llama2", {"rank": 4, "alpha": 4, "init": "olora", "targets": "all-linear"},
     dict(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora")),
    ("olora", "gpt2", {"rank": 4, "alpha": 4, "init": "olora"}, None),
    ("pissa_niter", "llama2", {"rank": 4, "alpha": 8, "init": "pissa_niter_2"}, None),
    ("gaussian", "mistral", {"rank": 4, "alpha": 8, "init": "gaussian", "rank_pattern": {"q_proj": 2}},
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian",
          rank_pattern={"q_proj": 2})),
    ("rank_pattern", "qwen3",
     {"rank": 4, "alpha": 8, "targets": "mlp", "rank_pattern": {"down_proj": 2}, "bias": "all"},
     dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
          rank_pattern={"down_proj": 2}, bias="all")),
]  # fmt: skip


# Families beyond Llama and GPT-2 share Llama's code path: redundant, so slow.
EXTRA_FAMILIES = ("mistral", "qwen3")


def _ids(cases, direction):
    return [
        pytest.param(*c, id=f"{c[0]}-{c[1]}-{direction}",
                     marks=[pytest.mark.slow] if c[1] in EXTRA_FAMILIES else [])
        for c in cases
    ]  # fmt: skip


@pytest.mark.parametrize("field, family, opts, _", _ids(CASES, "ftjax_to_peft"))
def test_ftjax_adapter_loads_in_peft(loaded, tmp_path, field, family, opts, _):
    path, model, base, logits = loaded(family)
    config = {"name": "lora", **opts}
    method = peft.build_method(config)
    params = randomize(method.apply(base, jax.random.key(0)), method)
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL  # training mattered
    out = str(tmp_path / "adapter")
    written = peft.export_adapter(model.cfg, params, out, method=config, initial=base)
    assert written["init_lora_weights"] is True  # inits that rewrite the base are converted
    if "rank_pattern" in opts:
        assert written["rank_pattern"]
    if opts.get("alpha_pattern"):
        assert written["alpha_pattern"]
    assert written["bias"] == opts.get("bias", "none")
    assert bool(written["modules_to_save"]) == bool(opts.get("modules_to_save"))
    layers = opts.get("layers_to_transform")
    if layers is not None:
        assert written["layers_to_transform"] == (layers if isinstance(layers, list) else [layers])
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), out)
    report(f"{field}-{family}-ftjax_to_peft", ours, torch_logits(peft_model, IDS))
    back = peft.load_adapter(model.cfg, base, out)
    np.testing.assert_allclose(np.asarray(logits(back)), ours, atol=TOL)


@pytest.mark.parametrize(
    "field, family, _, kwargs", _ids([c for c in CASES if c[3] is not None], "peft_to_ftjax")
)
def test_peft_adapter_imports_into_ftjax(loaded, tmp_path, field, family, _, kwargs):
    path, model, base, logits = loaded(family)
    want = peft_made(path, tmp_path, **kwargs)
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL
    report(f"{field}-{family}-peft_to_ftjax", ours, want)
    # Written back by ftjax (PiSSA/OLoRA converted over the base), PEFT loads it alike.
    out = str(tmp_path / "again")
    peft.export_adapter(model.cfg, params, out, method=_options_of(kwargs), initial=base)
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), out)
    np.testing.assert_allclose(torch_logits(peft_model, IDS), want, atol=TOL)


def _options_of(kwargs):
    """The ftjax options that tell the exporter which plain tensors trained."""
    save = kwargs.get("modules_to_save")
    if save and kwargs.get("ensure_weight_tying"):
        save = ["embed_tokens"]
    out = {"bias": kwargs.get("bias", "none"), "modules_to_save": save}
    return {**out, "rank_pattern": kwargs.get("rank_pattern")}


def test_scanned_layers(loaded, tmp_path):
    # Per-module ranks that are the same in every layer stack; a layer
    # subset or per-layer ranks are refused with one line.
    path, model, base, logits = loaded("llama2", scan=True)
    opts = {"name": "lora", "rank": 4, "alpha": 8, "targets": "all-linear",
            "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}}  # fmt: skip
    method = peft.build_method(opts)
    params = randomize(method.apply(base, jax.random.key(0)), method)
    out = str(tmp_path / "scanned")
    peft.export_adapter(model.cfg, params, out, method=opts)
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), out)
    report(
        "rank_pattern-llama2-scanned-ftjax_to_peft", logits(params), torch_logits(peft_model, IDS)
    )
    for bad, match in [
        ({"layers_to_transform": [1]}, "method.layers_to_transform: the layers are stacked"),
        (
            {"rank_pattern": {r"layers\.1\.self_attn\.q_proj": 2}},
            "method.rank_pattern: gives the layers",
        ),
    ]:
        with pytest.raises(peft.PeftError, match=match):
            peft.build_method({**opts, **bad}).apply(base, jax.random.key(0))
    peft_made(path, tmp_path / "partial", r=2, lora_alpha=4, target_modules=["q_proj"],
              layers_to_transform=[0])  # fmt: skip
    with pytest.raises(
        peft.AdapterFormatError, match="adapted in 1 of 2 layers.*scan_layers=False"
    ):
        peft.load_adapter(model.cfg, base, str(tmp_path / "partial"))


# ----------------------------------------------------------------------------- counts

LLAMA = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2)  # fmt: skip
GPT2 = ModelConfig(model_type="gpt2", vocab_size=VOCAB, hidden_size=32, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=4, max_position_embeddings=16,
                   hidden_act="gelu_new", tie_word_embeddings=True)  # fmt: skip


def count(cfg, opts):
    method = peft.build_method({"name": "lora", **opts})
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    params = jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), shapes["params"])
    trainable, _ = method.count(params)
    tree, _ = method.split(params)
    assert sum(x.size for x in jax.tree.leaves(tree)) == trainable
    return trainable


def test_closed_form_counts():
    d, kv, ffn, n, vocab = 32, 16, 48, 2, VOCAB
    # rank r on a (din, dout) kernel: r * (din + dout).
    qv = {"rank": 4, "alpha": 8, "targets": "qv"}
    assert count(LLAMA, qv) == n * (4 * (d + d) + 4 * (d + kv))
    assert count(LLAMA, {**qv, "rank_pattern": {"v_proj": 2}}) == n * (4 * (d + d) + 2 * (d + kv))
    per_layer = {"rank_pattern": {r"model\.layers\.0\.self_attn\.q_proj": 1}}
    assert count(LLAMA, {**qv, **per_layer}) == (1 + 4) * (d + d) + n * 4 * (d + kv)
    # As JSON text, the form a ConfigDict can hold (it refuses dotted keys).
    text = {"rank_pattern": json.dumps(per_layer["rank_pattern"])}
    assert count(LLAMA, {**qv, **text}) == count(LLAMA, {**qv, **per_layer})
    assert count(LLAMA, {**qv, "modules_to_save": "lm_head"}) == count(LLAMA, qv) + d * vocab
    assert count(LLAMA, {**qv, "layers_to_transform": [1]}) == count(LLAMA, qv) // n
    mlp = {"rank": 2, "alpha": 4, "targets": "mlp", "modules_to_save": ["down_proj"]}
    assert count(LLAMA, mlp) == n * (2 * 2 * (d + ffn) + ffn * d)  # down_proj in full, no LoRA
    # GPT-2: c_attn (d -> 3d) adapted; biases everywhere.
    gd, gffn = 32, 128
    attn = {"rank": 4, "alpha": 8, "targets": "qv"}
    lora = n * 4 * (gd + 3 * gd)
    assert count(GPT2, attn) == lora
    assert count(GPT2, {**attn, "bias": "lora_only"}) == lora + n * 3 * gd
    biases = (
        n * (gd + 3 * gd + gd + gd + gffn + gd) + gd
    )  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj; ln_f
    assert count(GPT2, {**attn, "bias": "all"}) == lora + biases
    assert count(GPT2, {**attn, "modules_to_save": "ln_f"}) == lora + 2 * gd


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"init": "loftq"}, "method.init: 'loftq' is refused: data-dependent"),
        ({"init": "corda"}, "method.init: 'corda' is refused: data-dependent"),
        ({"init": "eva"}, "method.init: 'eva' is refused: data-dependent"),
        ({"init": "pissa_niter_x"}, "method.init: 'pissa_niter_x' is not one of"),
        ({"bias": "some"}, "method.bias: 'some' is not one of none, lora_only, all"),
        ({"rank_pattern": {"q_proj": 0}}, r"method.rank_pattern\['q_proj'\]: expected a positive"),
        ({"alpha_pattern": {"(": 2}}, "method.alpha_pattern: invalid regex"),
        ({"layers_to_transform": [-1]}, "method.layers_to_transform: expected a layer index"),
        ({"modules_to_save": [""]}, "method.modules_to_save: expected module names"),
    ],
)
def test_bad_options_are_refused(opts, match):
    with pytest.raises(peft.PeftError, match=match) as info:
        peft.build_method({"name": "lora", **opts})
    assert "\n" not in str(info.value)


def test_what_peft_cannot_represent_is_refused(loaded, tmp_path):
    _, model, base, _ = loaded("gpt2")
    config = {"name": "lora", "rank": 2, "modules_to_save": "wte"}
    params = peft.build_method(config).apply(base, jax.random.key(0))
    with pytest.raises(peft.AdapterFormatError, match="embedding 'transformer.wte' is tied"):
        peft.save_adapter(model.cfg, params, str(tmp_path / "wte"), method=config)
    with pytest.raises(peft.TargetError, match="'lm_head' matches no module .*tied embeddings"):
        peft.build_method({**config, "modules_to_save": "lm_head"}).apply(base, jax.random.key(0))
    # A head trained apart from the tied embedding (PEFT without weight tying).
    path, qwen, qbase, _ = loaded("qwen2")
    peft_made(path, tmp_path / "untied", r=2, lora_alpha=4, target_modules=["q_proj"],
              modules_to_save=["lm_head"])  # fmt: skip
    with pytest.raises(peft.AdapterFormatError, match="trains the head of a model that ties it"):
        peft.load_adapter(qwen.cfg, qbase, str(tmp_path / "untied"))


@pytest.mark.parametrize(
    "init, match",
    [
        ("pissa_niter_4", "sketch .*cannot be reproduced"),
        ("corda", "calibration data"),
        ("loftq", "LoftQ"),
        ("lora_ga", "gradients"),
        ("something", "not one of the inits"),
    ],
)
def test_import_refuses_inits_it_cannot_recompute(loaded, tmp_path, init, match):
    path, model, base, _ = loaded("llama2")
    peft_made(path, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    with open(tmp_path / peft_format.CONFIG_NAME) as f:
        config = json.load(f)
    with open(tmp_path / peft_format.CONFIG_NAME, "w") as f:
        json.dump({**config, "init_lora_weights": init}, f)
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path))
    assert "\n" not in str(info.value)


def test_every_lora_config_field_is_classified():
    # One place: implemented (LORA_CONFIG_FIELDS' checks), bookkeeping, or
    # refused unless off, with a reason.
    fields = {f.name for f in dataclasses.fields(torch_peft.LoraConfig)}
    assert fields - set(peft_format.LORA_CONFIG_FIELDS) == set()
    refused = set(peft_format._OFF)
    bookkeeping = set(peft_format._BOOKKEEPING)
    implemented = set(peft_format.LORA_CONFIG_FIELDS) - refused - bookkeeping
    assert refused.isdisjoint(bookkeeping)
    assert set(peft_format.LORA_FIELDS) <= implemented
    assert all(peft_format._OFF[f] for f in refused)  # each with its reason
    defaults = json.loads(json.dumps(torch_peft.LoraConfig(target_modules=["q_proj"]).to_dict(),
                                     default=str))  # fmt: skip
    peft_format.check_config(defaults, "defaults", peft_format.LORA_CONFIG_FIELDS)


# ----------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_quick_run_with_lm_head_and_biases_exports_for_peft(tmp_path):
    """experiments/quick/train.py (a Llama with attention biases), LoRA on
    every linear layer with lm_head trained in full and bias=lora_only: 4
    steps of the real loop, then the run's adapter loads in `peft` over the
    run's base with the trained logits."""
    import importlib.util

    from hf_fixtures import ROOT

    from ftjax.models import save_pretrained
    from ftjax.train import train
    from ftjax.train.restore import restore_run

    spec = importlib.util.spec_from_file_location(
        "quick_train_config", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("method=lora,rank=4,modules_to_save=lm_head,bias=lora_only")
    # Biases on the attention projections (HF Llama's attention_bias), so that
    # bias="lora_only" has something to train.
    cfg.model.init.update(attention_bias=True, o_proj_bias=True)
    cfg.train.steps = 4
    result = train(cfg, str(tmp_path / "run"))
    base = dict(flatten_paths(result.base_params))
    trained = dict(flatten_paths(result.params))
    for path in ("lm_head/kernel", "model/layers_1/self_attn/v_proj/bias"):
        assert np.abs(np.asarray(trained[path]) - np.asarray(base[path])).max() > 0, path
    mlp = "model/layers_1/mlp/up_proj/kernel"
    np.testing.assert_array_equal(np.asarray(trained[mlp].w), np.asarray(base[mlp]))
    # The checkpoint holds the fully trained modules and biases too.
    _, restored, _, step = restore_run(cfg, str(tmp_path / "run"))
    assert step == 4
    for path, x in flatten_paths(restored):
        if not peft.is_leaf(x):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(trained[path]), err_msg=path)
    with open(tmp_path / "run" / "adapter" / "adapter_config.json") as f:
        written = json.load(f)
    assert written["modules_to_save"] == ["lm_head"] and written["bias"] == "lora_only"
    save_pretrained(result.model, result.base_params, str(tmp_path / "base"))
    peft_model = torch_peft.PeftModel.from_pretrained(
        torch_base(str(tmp_path / "base")), str(tmp_path / "run" / "adapter")
    )
    ids = IDS % cfg.model.init.vocab_size
    ours = jax.jit(lambda p: result.model.apply({"params": p}, ids))(result.params)
    report("modules_to_save+bias-quick_run-ftjax_to_peft", ours, torch_logits(peft_model, ids))
