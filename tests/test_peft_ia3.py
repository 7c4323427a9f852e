"""IA3 ((IA)^3, Liu et al. 2022) against closed forms and against PyTorch `peft`:
the leaf computes `(x @ w + bias) * l` and `(x * l) @ w + bias`; the default
targets and trainable counts are the closed-form ones; adapters written by
ftjax load in `PeftModel.from_pretrained` with the same logits (Llama, Qwen2
with q/k/v biases, GPT-2's fused Conv1D), adapters made by `peft` import with
the same logits; one train step's update is PEFT's gradient; and a quick run
trains, checkpoints and exports it."""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import ROOT, VOCAB, checkpoint_loader, torch_base, torch_logits

from ftjax import peft
from ftjax.models import ModelConfig, build_model, from_pretrained, layers
from ftjax.peft import ia3_format, peft_format
from ftjax.peft.base import flatten_paths
from ftjax.train import StepConfig, TrainState, build_optimizer, default_optim_config, train_step

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4
LR_SGD = 50.0


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """`loaded(family)`: (checkpoint dir, model, base params, jitted logits), once per family."""
    return checkpoint_loader(tiny_checkpoint, IDS)


def randomize(params, seed=0):
    """Trained-looking IA3 vectors: uniform in [0.5, 1.5] instead of ones."""
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, peft.IA3Weight):
            return x
        return x.replace(l=jnp.asarray(rng.uniform(0.5, 1.5, x.l.shape), x.l.dtype))

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


def ia3_leaves(params):
    return {p: x for p, x in flatten_paths(params) if isinstance(x, peft.IA3Weight)}


# ----------------------------------------------------------------------------- the leaf


@pytest.mark.parametrize("feedforward", [False, True])
def test_leaf_and_merge_are_the_closed_form(feedforward):
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    x = rng.normal(size=(4, 5))
    l = rng.uniform(0.5, 1.5, 5 if feedforward else 3)  # noqa: E741
    want = (x * l) @ w + b if feedforward else (x @ w + b) * l  # HF PEFT's IA3 forward
    leaf = peft.IA3Weight(jnp.asarray(w, jnp.float32), jnp.asarray(l, jnp.float32), feedforward)
    got = layers.linear(jnp.asarray(x, jnp.float32), leaf, jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # merge folds l into the kernel and, for an output scaling, into the bias.
    merged = peft.merge({"dense": {"kernel": leaf, "bias": jnp.asarray(b, jnp.float32)}})
    dense = merged["dense"]
    np.testing.assert_allclose(x @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]), want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    want_kernel = w * (l[:, None] if feedforward else l[None, :])
    np.testing.assert_allclose(np.asarray(dense["kernel"]), want_kernel, rtol=1e-6)


def test_vectors_start_at_ones_and_the_model_is_unchanged(loaded):
    _, model, base, logits = loaded("llama2")
    params = peft.build_method({"name": "ia3"}).apply(base, jax.random.key(0))
    leaves = ia3_leaves(params)
    assert leaves and all(np.all(np.asarray(x.l) == 1.0) for x in leaves.values())
    np.testing.assert_allclose(np.asarray(logits(params)), np.asarray(logits(base)), atol=1e-6)


# ----------------------------------------------------------------------------- targets, counts

LLAMA = ModelConfig(
    vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2
)
GPT2 = ModelConfig(model_type="gpt2", vocab_size=50, hidden_size=32, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=4, max_position_embeddings=16,
                   hidden_act="gelu_new", tie_word_embeddings=True)  # fmt: skip


def abstract_adapted(cfg, config):
    method = peft.build_method(config)
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    return method, jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), shapes["params"])


@pytest.mark.parametrize(
    "cfg, modules, feedforward, per_layer",
    [
        # k and v: num_kv_heads * head_dim = 2 * 8 outputs each; down: 48 inputs.
        (LLAMA, {"self_attn/k_proj", "self_attn/v_proj", "mlp/down_proj"}, {"mlp/down_proj"},
         16 + 16 + 48),
        # GPT-2 (HF PEFT's default): the fused c_attn's 3 * 32 outputs, the MLP c_proj's 128 inputs.
        (GPT2, {"attn/c_attn", "mlp/c_proj"}, {"mlp/c_proj"}, 96 + 128),
    ],
)  # fmt: skip
def test_default_targets_and_closed_form_counts(cfg, modules, feedforward, per_layer):
    method, params = abstract_adapted(cfg, {"name": "ia3"})
    leaves = ia3_leaves(params)
    module = lambda p: "/".join(p.split("/")[-3:-1])
    assert {module(p) for p in leaves} == modules
    assert len(leaves) == len(modules) * cfg.num_layers
    for path, leaf in leaves.items():
        assert leaf.feedforward == (module(path) in feedforward)
        fan_in, fan_out = leaf.w.shape
        assert leaf.l.shape == ((fan_in,) if leaf.feedforward else (fan_out,))
        assert leaf.l.dtype == jnp.float32
    trainable, total = method.count(params)
    assert trainable == per_layer * cfg.num_layers
    _, base_total = peft.build_method("full").count(
        jax.eval_shape(build_model(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32))[
            "params"
        ]
    )
    assert total == base_total + trainable
    trainable_tree, _ = method.split(params)
    assert sum(x.size for x in jax.tree.leaves(trainable_tree)) == trainable


def test_llama2_7b_count_from_shapes():
    from ftjax.study.param_counts import count_setting

    llama2_7b = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                     num_heads=32, num_kv_heads=32, max_position_embeddings=4096)  # fmt: skip
    trainable, _ = count_setting({"model": llama2_7b, "method": {"name": "ia3"}})
    assert trainable == 32 * (4096 + 4096 + 11008) == 614_400


def test_bad_options_are_one_line_errors():
    with pytest.raises(peft.PeftError, match=r"method.feedforward_targets: .* selects model/layers_0/mlp/up_proj/kernel .*which method.targets does not adapt"):  # fmt: skip
        abstract_adapted(LLAMA, {"name": "ia3", "feedforward_targets": ["up_proj"]})
    with pytest.raises(peft.PeftError, match=r"method.dtype: 'int8' is not a floating-point"):
        peft.build_method({"name": "ia3", "dtype": "int8"})
    with pytest.raises(peft.PeftError, match=r"method.rank: not an option of method 'ia3'"):
        peft.build_method({"name": "ia3", "rank": 4})
    # An explicit empty list: no feedforward target, every vector scales outputs.
    _, params = abstract_adapted(LLAMA, {"name": "ia3", "feedforward_targets": []})
    assert not any(x.feedforward for x in ia3_leaves(params).values())


# ----------------------------------------------------------------------------- HF PEFT files


@pytest.mark.parametrize(
    "family, config, targets, feedforward",
    [
        ("llama2", {"name": "ia3"}, ["down_proj", "k_proj", "v_proj"], ["down_proj"]),
        # Qwen2's k and v have biases, which PEFT scales with the output.
        ("qwen2", {"name": "ia3"}, ["down_proj", "k_proj", "v_proj"], ["down_proj"]),
        ("gpt2", {"name": "ia3"}, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        # attn.c_proj scales outputs and mlp.c_proj inputs: PEFT's plain-suffix
        # feedforward rule must not mark attn.c_proj.
        ("gpt2", {"name": "ia3", "targets": ["attn/c_proj", "mlp/c_proj", "mlp/c_fc"],
                  "feedforward_targets": ["mlp/c_proj"]},
         ["c_fc", "c_proj", "mlp.c_proj"], ["mlp.c_proj"]),
    ],
)  # fmt: skip
def test_ftjax_ia3_adapter_loads_in_peft(loaded, tmp_path, family, config, targets, feedforward):
    path, model, base, logits = loaded(family)
    method = peft.build_method(config)
    params = randomize(jax.jit(method.apply)(base, jax.random.key(0)))
    ours = np.asarray(logits(params))
    assert (
        np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    )  # the vectors matter (GPT-2: ~60x)
    written = peft.save_adapter(model.cfg, params, str(tmp_path), method=method)
    assert written["peft_type"] == "IA3"
    assert (written["target_modules"], written["feedforward_modules"]) == (targets, feedforward)
    assert written["fan_in_fan_out"] == (family == "gpt2")

    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    assert isinstance(peft_model.peft_config["default"], torch_peft.IA3Config)
    theirs = torch_logits(peft_model, IDS)
    diff = float(np.abs(theirs - ours).max())
    print(f"\nIA3 ftjax -> peft {family} {config}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    merged = peft_model.merge_and_unload()
    np.testing.assert_allclose(torch_logits(merged, IDS), ours, atol=TOL)
    # ftjax's own merge (kernel and bias) gives the same function.
    np.testing.assert_allclose(np.asarray(logits(jax.jit(peft.merge)(params))), ours, atol=TOL)
    # Back into ftjax from the same files: the same leaves, the same logits.
    reloaded = peft.load_adapter(model.cfg, base, str(tmp_path))
    assert {p: x.feedforward for p, x in ia3_leaves(reloaded).items()} == {
        p: x.feedforward for p, x in ia3_leaves(params).items()
    }
    np.testing.assert_allclose(np.asarray(logits(reloaded)), ours, atol=1e-6)


@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("llama2", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
        # A regex for the feedforward modules (PEFT full-matches it).
        ("qwen2", dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                       feedforward_modules=r".*\.(up|down)_proj")),
        ("gpt2", {}),  # PEFT's own GPT-2 defaults: c_attn and mlp.c_proj (feedforward)
    ],
)  # fmt: skip
def test_peft_ia3_adapter_imports_into_ftjax(loaded, tmp_path, family, kwargs):
    path, model, base, logits = loaded(family)
    torch.manual_seed(0)
    peft_model = torch_peft.get_peft_model(torch_base(path), torch_peft.IA3Config(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    want = torch_logits(peft_model, IDS)

    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    leaves = ia3_leaves(params)
    assert leaves and any(x.feedforward for x in leaves.values())
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    diff = float(np.abs(ours - want).max())
    print(f"\nIA3 peft -> ftjax {family} {kwargs}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    # Scanned params get stacked vectors with the same function.
    scanned_model, scanned_base = from_pretrained(path, scan_layers=True)
    scanned = peft.load_adapter(scanned_model.cfg, scanned_base, str(tmp_path))
    out = jax.jit(lambda p: scanned_model.apply({"params": p}, IDS))(scanned)
    np.testing.assert_allclose(np.asarray(out), want, atol=TOL)
    # Written back from the stacked tree, the tensors are the ones PEFT wrote.
    _, tensors = peft.read_adapter(str(tmp_path))
    _, rewritten = ia3_format.adapter_state(scanned_model.cfg, scanned)
    assert set(rewritten) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(rewritten[key], np.asarray(value))


@pytest.fixture(scope="module")
def saved(loaded, tmp_path_factory):
    """An IA3 adapter written by `peft` for the tiny Llama."""
    path, *_ = loaded("llama2")
    out = tmp_path_factory.mktemp("peft_ia3")
    config = torch_peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                  feedforward_modules=["down_proj"])  # fmt: skip
    torch_peft.get_peft_model(torch_base(path), config).save_pretrained(str(out))
    return out


def edit(src, dst, **changes):
    config, tensors = peft.read_adapter(str(src))
    peft_format.write_files(str(dst), {**config, **changes}, tensors)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"a_future_peft_field": 1}, "field 'a_future_peft_field' is unknown .*IA3Config"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=\\['lm_head'\\] is not supported"),
        ({"feedforward_modules": None}, "feedforward_modules=None is not supported .*not guessed"),
        ({"target_modules": ["k_proj", "down_proj"]}, "'model.layers.0.self_attn.v_proj' has an ia3_l but target_modules"),
        # down_proj no longer feedforward: PEFT would build (32, 1), the file holds (1, 48).
        ({"feedforward_modules": []}, "down_proj' has an ia3_l of shape \\(1, 48\\).*expects \\(32, 1\\)"),
        ({"init_ia3_weights": "random"}, "init_ia3_weights='random' is not supported"),
    ],
)  # fmt: skip
def test_import_refuses_what_it_cannot_honour(loaded, saved, tmp_path, changes, match):
    edit(saved, tmp_path, **changes)
    _, model, base, _ = loaded("llama2")
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_every_ia3_config_field_is_classified():
    # A tripwire for PEFT upgrades, as for LoRA's allow-list.
    fields = {f.name for f in dataclasses.fields(torch_peft.IA3Config)}
    assert fields - set(ia3_format.CONFIG_FIELDS) == set()
    config = torch_peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]).to_dict()
    defaults = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))  # fmt: skip
    peft_format.check_config(defaults, "defaults", ia3_format.CONFIG_FIELDS, kind="IA3Config")


# ----------------------------------------------------------------------------- training


def test_one_train_step_follows_peft_gradient(loaded, tmp_path):
    """One plain-SGD step of the real train step moves each l by -lr * the
    gradient PyTorch computes for PEFT's ia3_l on the same batch."""
    path, model, base, _ = loaded("llama2")
    method = peft.build_method({"name": "ia3"})
    params = randomize(method.apply(base, jax.random.key(0)), seed=3)
    peft.save_adapter(model.cfg, params, str(tmp_path))
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:],
             "loss_mask": np.ones(IDS[:, 1:].shape, np.float32)}  # fmt: skip

    optim = default_optim_config()
    optim.update(name="sgd", momentum=0.0, lr=LR_SGD, schedule="constant", clip_norm=0.0)
    tx, _ = build_optimizer(optim, 10)
    trainable, frozen = method.split(params)
    assert {type(x) for x in jax.tree.leaves(trainable, is_leaf=peft.is_leaf)} == {peft.IA3Weight}
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
    grads = {
        n: p.grad.numpy().reshape(-1) for n, p in peft_model.named_parameters() if "ia3_l" in n
    }
    before, after = ia3_leaves(params), ia3_leaves(peft.combine(new.trainable, new.frozen))
    assert len(grads) == len(before) == 6
    for path_, leaf in before.items():
        name = peft_format._module(model.cfg, path_)
        grad = grads[f"base_model.model.{name}.ia3_l.default"]
        step = np.asarray(after[path_].l) - np.asarray(leaf.l)
        # (A large lr, so that rounding l + step near 1 is small beside the step.)
        np.testing.assert_allclose(-step / LR_SGD, grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
        np.testing.assert_array_equal(np.asarray(after[path_].w), np.asarray(leaf.w))  # frozen


@pytest.mark.slow
def test_quick_run_trains_checkpoints_and_exports_ia3(tmp_path):
    from ftjax.train import train
    from ftjax.train.restore import restore_run

    spec = importlib.util.spec_from_file_location(
        "quick_train_config", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("method=ia3")
    cfg.train.steps = 4
    result = train(cfg, str(tmp_path / "run"))

    m = cfg.model.init
    kv = m.num_kv_heads * m.hidden_size // m.num_heads
    assert result.summary["trainable_params"] == m.num_layers * (2 * kv + m.intermediate_size)
    leaves = ia3_leaves(result.params)
    assert len(leaves) == 3 * m.num_layers
    assert all(np.abs(np.asarray(x.l) - 1).max() > 0 for x in leaves.values())  # it trained
    base = dict(flatten_paths(result.base_params))
    for path, leaf in leaves.items():
        np.testing.assert_array_equal(np.asarray(leaf.w), np.asarray(base[path]))
    # The last checkpoint holds the trained vectors.
    _, restored, _, step = restore_run(cfg, str(tmp_path / "run"))
    assert step == 4
    for path, leaf in ia3_leaves(restored).items():
        np.testing.assert_array_equal(np.asarray(leaf.l), np.asarray(leaves[path].l))
    # The run exported PEFT IA3 files, which load back to the trained function.
    with open(tmp_path / "run" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "IA3"
    model = result.model
    back = peft.load_adapter(model.cfg, result.base_params, str(tmp_path / "run" / "adapter"))
    ids = IDS % m.vocab_size
    run = jax.jit(lambda p: model.apply({"params": p}, ids))
    np.testing.assert_allclose(np.asarray(run(back)), np.asarray(run(result.params)), atol=1e-6)
