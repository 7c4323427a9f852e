"""LoHa and LoKr (HF PEFT's LyCORIS tuners) against closed forms and against
PyTorch `peft`: the leaves compute PEFT's delta weights
(`alpha/r · (w1a@w1b) * (w2a@w2b)`, `alpha/r · kron(w1, w2)` with PEFT's
`factorization` and low-rank rule); the models start unchanged; trainable
counts are the closed forms; adapters written by ftjax load in
`PeftModel.from_pretrained` with the same logits and adapters made by `peft`
import with the same logits (Llama; GPT-2's Conv1D, which PEFT's LyCORIS
tuners cannot adapt, is refused on export); unimplemented config fields are
refused by name; one train step's update is PEFT's gradient."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import VOCAB, checkpoint_loader, torch_base, torch_logits
from peft.tuners.lokr.layer import factorization as peft_factorization

from ftjax import peft
from ftjax.models import ModelConfig, build_model, from_pretrained, layers
from ftjax.peft import lycoris_format, peft_format
from ftjax.peft.base import flatten_paths
from ftjax.peft.lokr import factorization, kron_shapes
from ftjax.train import StepConfig, TrainState, build_optimizer, default_optim_config, train_step

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4
LEAVES = (peft.LohaWeight, peft.LokrWeight)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """`loaded(family)`: (checkpoint dir, model, base params, jitted logits), once per family."""
    return checkpoint_loader(tiny_checkpoint, IDS)


def randomize(params, seed=0, std=0.3):
    """Trained-looking factors: every trainable child drawn N(0, std²)."""
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, LEAVES):
            return x
        new = {n: jnp.asarray(rng.normal(0, std, getattr(x, n).shape), x.dtype)
               for n in x.trainable_children if getattr(x, n) is not None}  # fmt: skip
        return x.replace(**new)

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


def adapter_leaves(params):
    return {p: x for p, x in flatten_paths(params) if isinstance(x, LEAVES)}


# ----------------------------------------------------------------------------- the leaves


def test_loha_leaf_is_peft_delta():
    rng = np.random.default_rng(1)
    fan_in, fan_out, r, alpha = 6, 5, 3, 4.0
    w, x = rng.normal(size=(fan_in, fan_out)), rng.normal(size=(2, fan_in))
    w1a, w1b, w2a, w2b = (rng.normal(size=s) for s in [(fan_out, r), (r, fan_in)] * 2)
    delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r  # PEFT's make_weight, torch layout (out, in)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    leaf = peft.LohaWeight(f32(w), f32(w1b.T), f32(w1a.T), f32(w2b.T), f32(w2a.T), alpha / r)
    np.testing.assert_allclose(np.asarray(layers.linear(f32(x), leaf)), x @ (w + delta.T),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(peft.merge({"k": leaf})["k"]), w + delta.T, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("low1, low2", [(False, False), (False, True), (True, True)])
def test_lokr_leaf_is_peft_kron(low1, low2):
    rng = np.random.default_rng(2)
    (out_l, out_k), (in_m, in_n), r, scale = (3, 4), (2, 5), 2, 1.5
    w, x = rng.normal(size=(in_m * in_n, out_l * out_k)), rng.normal(size=(3, in_m * in_n))
    t1a, t1b, t2a, t2b = (
        rng.normal(size=s) for s in [(out_l, r), (r, in_m), (out_k, r), (r, in_n)]
    )
    t1 = t1a @ t1b if low1 else rng.normal(size=(out_l, in_m))
    t2 = t2a @ t2b if low2 else rng.normal(size=(out_k, in_n))
    delta = np.kron(t1, t2) * scale  # PEFT's make_kron, torch layout (out, in)
    f = lambda v: None if v is None else jnp.asarray(v.T, jnp.float32)  # noqa: E731
    leaf = peft.LokrWeight(
        jnp.asarray(w, jnp.float32),
        None if low1 else f(t1), f(t1b) if low1 else None, f(t1a) if low1 else None,
        None if low2 else f(t2), f(t2b) if low2 else None, f(t2a) if low2 else None,
        scale, r,
    )  # fmt: skip
    got = layers.linear(jnp.asarray(x, jnp.float32), leaf)
    np.testing.assert_allclose(np.asarray(got), x @ (w + delta.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(peft.merge({"k": leaf})["k"]), w + delta.T, rtol=1e-5, atol=1e-5
    )


def test_factorization_is_peft_s():
    for dim in [1, 2, 7, 12, 16, 32, 48, 96, 127, 128, 256, 768, 3072, 4096, 11008]:
        for factor in [-1, 1, 2, 3, 4, 8, 16, 5]:
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("family", ["llama2", "gpt2"])
@pytest.mark.parametrize("config", [{"name": "loha", "rank": 4},
                                    {"name": "lokr", "rank": 1, "decompose_both": True}])  # fmt: skip
def test_models_start_unchanged(loaded, family, config):
    _, _, base, logits = loaded(family)
    params = peft.build_method({**config, "targets": "all-linear"}).apply(base, jax.random.key(0))
    assert adapter_leaves(params)
    np.testing.assert_allclose(np.asarray(logits(params)), np.asarray(logits(base)), atol=1e-6)


# ----------------------------------------------------------------------------- counts

LLAMA = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                    num_kv_heads=2)  # fmt: skip


@pytest.mark.parametrize(
    "config, per_layer",
    [
        # q 32->32, v 32->16: 2r(in + out) each.
        ({"name": "loha", "rank": 4}, 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)),
        # r=8: q: w1 (4x4) + w2 (8x8); v (out 16 = 4x4): w1 (4x4) + w2 (8x4).
        ({"name": "lokr", "rank": 8}, (16 + 64) + (16 + 32)),
        # r=2: w2 low-rank (2 < 8/2): q: 16 + 8x2 + 2x8; v: 16 + 8x2 + 2x4.
        ({"name": "lokr", "rank": 2}, (16 + 16 + 16) + (16 + 16 + 8)),
        # decompose_both, r=1: w1 low-rank too (1 < 4/2): q: 4+4 + 8+8; v: 4+4 + 8+4.
        ({"name": "lokr", "rank": 1, "decompose_both": True}, (8 + 16) + (8 + 12)),
    ],
)
def test_closed_form_counts(config, per_layer):
    method = peft.build_method(config)
    shapes = jax.eval_shape(build_model(LLAMA).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    params = jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), shapes["params"])
    trainable, _ = method.count(params)
    assert trainable == LLAMA.num_layers * per_layer
    trainable_tree, _ = method.split(params)
    assert sum(x.size for x in jax.tree.leaves(trainable_tree)) == trainable


def test_count_from_shapes_llama2_7b():
    """LoHa r=8 on q and v of Llama 2 7B: 32 layers x 2 x 2·8·(4096 + 4096);
    LoKr r=8: 4096 = 64 x 64, so w1 64x64 and w2 low-rank 2·8·64 per kernel."""
    from ftjax.study.param_counts import count_setting

    llama2_7b = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                     num_heads=32, num_kv_heads=32, max_position_embeddings=4096)  # fmt: skip
    loha, _ = count_setting({"model": llama2_7b, "method": {"name": "loha", "rank": 8}})
    assert loha == 32 * 2 * 2 * 8 * (4096 + 4096) == 8_388_608
    assert kron_shapes(4096, 4096, 8) == ((64, 64), (64, 64), False, True)
    lokr, _ = count_setting({"model": llama2_7b, "method": {"name": "lokr", "rank": 8}})
    assert lokr == 32 * 2 * (64 * 64 + 2 * 8 * 64) == 327_680


# ----------------------------------------------------------------------------- HF PEFT files

EXPORTS = [
    ({"name": "loha", "rank": 4, "alpha": 8.0}, ["q_proj", "v_proj"]),
    ({"name": "loha", "rank": 2, "alpha": 3.0, "targets": "all-linear"},
     ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ({"name": "lokr", "rank": 8}, ["q_proj", "v_proj"]),
    ({"name": "lokr", "rank": 2, "alpha": 4.0, "targets": "all-linear"},
     ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ({"name": "lokr", "rank": 1, "decompose_both": True, "targets": ["q_proj", "up_proj"]},
     ["q_proj", "up_proj"]),
    ({"name": "lokr", "rank": 4, "decompose_factor": 4, "targets": ["o_proj", "up_proj"]},
     ["o_proj", "up_proj"]),
]  # fmt: skip


@pytest.mark.parametrize("config, targets", EXPORTS)
def test_ftjax_adapter_loads_in_peft(loaded, tmp_path, config, targets):
    path, model, base, logits = loaded("llama2")
    method = peft.build_method(config)
    params = randomize(jax.jit(method.apply)(base, jax.random.key(0)))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    written = peft.save_adapter(model.cfg, params, str(tmp_path), method=method)
    assert written["peft_type"] == config["name"].upper()
    assert written["target_modules"] == targets
    assert written["alpha"] / written["r"] == pytest.approx(
        config.get("alpha", 8.0) / config["rank"]
    )

    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    kind = torch_peft.LoHaConfig if config["name"] == "loha" else torch_peft.LoKrConfig
    assert isinstance(peft_model.peft_config["default"], kind)
    theirs = torch_logits(peft_model, IDS)
    diff = float(np.abs(theirs - ours).max())
    print(f"\n{config['name']} ftjax -> peft llama2 {config}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    np.testing.assert_allclose(torch_logits(peft_model.merge_and_unload(), IDS), ours, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits(jax.jit(peft.merge)(params))), ours, atol=TOL)
    reloaded = peft.load_adapter(model.cfg, base, str(tmp_path))
    assert {p: type(x) for p, x in adapter_leaves(reloaded).items()} == {
        p: type(x) for p, x in adapter_leaves(params).items()
    }
    np.testing.assert_allclose(np.asarray(logits(reloaded)), ours, atol=1e-6)


@pytest.mark.parametrize(
    "name, peft_config", [("loha", torch_peft.LoHaConfig), ("lokr", torch_peft.LoKrConfig)]
)
def test_gpt2_conv1d_is_refused_as_peft_refuses_it(loaded, tmp_path, name, peft_config):
    path, model, base, logits = loaded("gpt2")
    params = peft.build_method({"name": name, "rank": 2}).apply(base, jax.random.key(0))
    with pytest.raises(
        peft.AdapterFormatError, match=r"torch.nn.Linear layers only.*Conv1D"
    ) as info:
        peft.save_adapter(model.cfg, params, str(tmp_path))
    assert "\n" not in str(info.value)
    # The ground truth: PEFT's LyCORIS tuners cannot wrap GPT-2's Conv1D.
    with pytest.raises((TypeError, ValueError)):
        torch_peft.get_peft_model(torch_base(path), peft_config(target_modules=["c_attn"]))
    # ftjax's own merge of the leaves still works on GPT-2.
    params = randomize(params)
    np.testing.assert_allclose(
        np.asarray(logits(peft.merge(params))), np.asarray(logits(params)), atol=TOL
    )


IMPORTS = [
    (torch_peft.LoHaConfig, dict(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])),
    (torch_peft.LoKrConfig, dict(r=8, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    (torch_peft.LoKrConfig, dict(r=2, alpha=2, target_modules=r".*\.(k_proj|up_proj)")),
    (torch_peft.LoKrConfig, dict(r=1, decompose_both=True, target_modules="all-linear")),
    (torch_peft.LoKrConfig, dict(r=3, decompose_factor=2, target_modules=["o_proj", "gate_proj"])),
]


@pytest.mark.parametrize("config_cls, kwargs", IMPORTS)
def test_peft_adapter_imports_into_ftjax(loaded, tmp_path, config_cls, kwargs):
    path, model, base, logits = loaded("llama2")
    torch.manual_seed(0)
    peft_model = torch_peft.get_peft_model(torch_base(path), config_cls(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.normal_(0, 0.3)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    want = torch_logits(peft_model, IDS)

    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    assert adapter_leaves(params)
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    diff = float(np.abs(ours - want).max())
    print(f"\n{config_cls.__name__} peft -> ftjax llama2 {kwargs}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    scanned_model, scanned_base = from_pretrained(path, scan_layers=True)
    scanned = peft.load_adapter(scanned_model.cfg, scanned_base, str(tmp_path))
    out = jax.jit(lambda p: scanned_model.apply({"params": p}, IDS))(scanned)
    np.testing.assert_allclose(np.asarray(out), want, atol=TOL)
    _, tensors = peft.read_adapter(str(tmp_path))
    _, rewritten = lycoris_format.adapter_state(scanned_model.cfg, scanned)
    assert set(rewritten) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(rewritten[key], np.asarray(value))


@pytest.fixture(scope="module")
def saved(loaded, tmp_path_factory):
    """A LoKr adapter (w2 low-rank) written by `peft` for the tiny Llama."""
    path, *_ = loaded("llama2")
    out = tmp_path_factory.mktemp("peft_lokr")
    config = torch_peft.LoKrConfig(r=2, target_modules=["q_proj", "v_proj"])
    torch_peft.get_peft_model(torch_base(path), config).save_pretrained(str(out))
    return out


def edit(src, dst, extra=None, **changes):
    config, tensors = peft.read_adapter(str(src))
    peft_format.write_files(str(dst), {**config, **changes}, {**tensors, **(extra or {})})


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "changes, extra, match",
    [
        ({"a_future_peft_field": 1}, None, "field 'a_future_peft_field' is unknown .*LoKrConfig"),
        ({"rank_dropout": 0.1}, None, "rank_dropout=0.1 is not supported"),
        ({"module_dropout": 0.2}, None, "module_dropout=0.2 is not supported"),
        ({"use_effective_conv2d": True}, None, "use_effective_conv2d=True is not supported"),
        ({"rank_pattern": {"q_proj": 4}}, None, "rank_pattern=\\{'q_proj': 4\\} is not supported"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save=\\['lm_head'\\] is not supported"),
        # The file's w2 is low-rank; r=8 would make PEFT build a full one.
        ({"r": 8}, None, "q_proj' has tensors .* PEFT builds .*'lokr_w2': \\(8, 8\\)"),
        ({"target_modules": ["q_proj"]}, None, "v_proj' has LOKR tensors but target_modules"),
        ({}, {f"{Q}.lokr_t2": np.zeros((2, 2, 1, 1), np.float32)}, "lokr_t2' is not a LOKR tensor"),
    ],
)  # fmt: skip
def test_import_refuses_what_it_cannot_honour(loaded, saved, tmp_path, changes, extra, match):
    edit(saved, tmp_path, extra, **changes)
    _, model, base, _ = loaded("llama2")
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "kind, config_cls", [("LOHA", torch_peft.LoHaConfig), ("LOKR", torch_peft.LoKrConfig)]
)
def test_every_config_field_is_classified(kind, config_cls):
    fields = {f.name for f in dataclasses.fields(config_cls)}
    assert fields - set(lycoris_format.CONFIG_FIELDS[kind]) == set()
    config = config_cls(target_modules=["q_proj"]).to_dict()
    defaults = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))  # fmt: skip
    peft_format.check_config(defaults, "defaults", lycoris_format.CONFIG_FIELDS[kind], kind=kind)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("config", [{"name": "loha", "rank": 2}, {"name": "lokr", "rank": 2}])
def test_one_train_step_follows_peft_gradient(loaded, tmp_path, config):
    path, model, base, _ = loaded("llama2")
    method = peft.build_method(config)
    params = randomize(method.apply(base, jax.random.key(0)), seed=3)
    peft.save_adapter(model.cfg, params, str(tmp_path))
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:],
             "loss_mask": np.ones(IDS[:, 1:].shape, np.float32)}  # fmt: skip
    lr = 1.0
    optim = default_optim_config()
    optim.update(name="sgd", momentum=0.0, lr=lr, schedule="constant", clip_norm=0.0)
    tx, _ = build_optimizer(optim, 10)
    trainable, frozen = method.split(params)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
                       jax.random.key_data(jax.random.key(0)), jnp.zeros((), jnp.int32))  # fmt: skip
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, cfg=StepConfig()))(
        state, batch
    )

    peft_model = torch_peft.PeftModel.from_pretrained(
        torch_base(path), str(tmp_path), is_trainable=True
    )
    out = peft_model(torch.tensor(batch["input_ids"])).logits
    loss = torch.nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), torch.tensor(batch["targets"]).reshape(-1)
    )
    loss.backward()
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.grad is not None}
    before = adapter_leaves(params)
    after = adapter_leaves(peft.combine(new.trainable, new.frozen))
    _, names = lycoris_format.KINDS[config["name"].upper()]
    checked = 0
    for p, leaf in before.items():
        module = peft_format._module(model.cfg, p)
        for torch_name, child in names.items():
            if getattr(leaf, child) is None:
                continue
            grad = grads[f"base_model.model.{module}.{torch_name}.default"].T
            step = np.asarray(getattr(after[p], child)) - np.asarray(getattr(leaf, child))
            np.testing.assert_allclose(-step / lr, grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
            checked += 1
        np.testing.assert_array_equal(np.asarray(after[p].w), np.asarray(leaf.w))
    assert checked == len(grads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arg, kind", [("method=loha,rank=4", "LOHA"), ("method=lokr,rank=2", "LOKR")]
)
def test_quick_run_trains_checkpoints_and_exports(tmp_path, arg, kind):
    from test_peft_vera import quick_run_trains_checkpoints_and_exports

    result = quick_run_trains_checkpoints_and_exports(tmp_path, arg, kind, LEAVES)
    # PEFT's init sets a2 (LoHa) or w1 (LoKr) to zero; after 4 steps it is not.
    for leaf in adapter_leaves(result.params).values():
        zero_at_init = leaf.a2 if kind == "LOHA" else leaf.w1
        assert np.abs(np.asarray(zero_at_init)).max() > 0


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"rank_dropout": 0.05}, "rank_dropout=0.05 is not supported"),
        ({"use_effective_conv2d": True}, "use_effective_conv2d=True is not supported"),
        ({"alpha_pattern": {"v_proj": 2}}, "alpha_pattern=\\{'v_proj': 2\\} is not supported"),
        (
            {"decompose_both": True},
            "field 'decompose_both' is unknown .*LoHaConfig",
        ),  # a LoKr field
        ({"r": 2}, "q_proj' has tensors .* PEFT builds"),
    ],
)
def test_loha_import_refuses_what_it_cannot_honour(loaded, tmp_path, changes, match):
    path, model, base, _ = loaded("llama2")
    config = torch_peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"])
    torch_peft.get_peft_model(torch_base(path), config).save_pretrained(str(tmp_path / "src"))
    edit(tmp_path / "src", tmp_path / "dst", **changes)
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path / "dst"))
    assert "\n" not in str(info.value)
