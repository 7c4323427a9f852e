"""VeRA (Kopiczko et al. 2024) against closed forms and against PyTorch `peft`:
the leaf computes `x @ w + lambda_b * ((lambda_d * (x @ a)) @ b)`; one shared
pair of projections sized by the largest target, sliced per layer; the
trainable counts are `r + out` per kernel (the paper's RoBERTa-base count
from shapes); adapters written by ftjax load in `PeftModel.from_pretrained`
with the same logits (Llama, GPT-2's Conv1D, targets of different sizes),
adapters made by `peft` import with the same logits; bad config fields are
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

from ftjax import peft
from ftjax.models import ModelConfig, build_model, from_pretrained, layers
from ftjax.peft import peft_format, vera_format
from ftjax.peft.base import flatten_paths
from ftjax.peft.tree import replace_leaves
from ftjax.train import StepConfig, TrainState, build_optimizer, default_optim_config, train_step

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """`loaded(family)`: (checkpoint dir, model, base params, jitted logits), once per family."""
    return checkpoint_loader(tiny_checkpoint, IDS)


def randomize(params, seed=0):
    """Trained-looking vectors: lambda_b and lambda_d drawn N(0, 1) instead of 0 and 0.1."""
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, peft.VeraWeight):
            return x
        draw = lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype)  # noqa: E731
        return x.replace(lambda_b=draw(x.lambda_b), lambda_d=draw(x.lambda_d))

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


def vera_leaves(params):
    return {p: x for p, x in flatten_paths(params) if isinstance(x, peft.VeraWeight)}


def test_leaf_and_merge_are_peft_forward():
    rng = np.random.default_rng(1)
    fan_in, fan_out, r = 5, 3, 4
    w, bias, x = (
        rng.normal(size=(fan_in, fan_out)),
        rng.normal(size=fan_out),
        rng.normal(size=(2, fan_in)),
    )
    vera_a, vera_b = rng.normal(size=(r, 7)), rng.normal(size=(6, r))  # PEFT's shared, larger
    lambda_d, lambda_b = rng.normal(size=r), rng.normal(size=fan_out)
    # PEFT: result + lambda_b * F.linear(lambda_d * F.linear(x, A[:, :in]), B[:out])
    want = x @ w + bias + lambda_b * ((lambda_d * (x @ vera_a[:, :fan_in].T)) @ vera_b[:fan_out].T)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    leaf = peft.init_vera(f32(w), f32(vera_a.T), f32(vera_b.T)).replace(
        lambda_d=f32(lambda_d), lambda_b=f32(lambda_b)
    )
    got = layers.linear(f32(x), leaf, f32(bias))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    merged = peft.merge({"dense": {"kernel": leaf, "bias": f32(bias)}})["dense"]
    np.testing.assert_allclose(x @ np.asarray(merged["kernel"]) + bias, want, rtol=1e-5, atol=1e-5)


def test_init_shares_projections_and_leaves_the_model_unchanged(loaded):
    _, _, base, logits = loaded("llama2")
    method = peft.build_method(
        {"name": "vera", "rank": 16, "targets": ["q_proj", "up_proj", "down_proj"]}
    )
    params = method.apply(base, jax.random.key(0))
    leaves = vera_leaves(params)
    assert len(leaves) == 3 * 2
    widest_a = max((x.a for x in leaves.values()), key=lambda a: a.shape[0])
    widest_b = max((x.b for x in leaves.values()), key=lambda b: b.shape[1])
    assert widest_a.shape == (48, 16) and widest_b.shape == (16, 48)
    for leaf in leaves.values():
        fan_in, fan_out = leaf.w.shape
        np.testing.assert_array_equal(np.asarray(leaf.a), np.asarray(widest_a)[:fan_in])
        np.testing.assert_array_equal(np.asarray(leaf.b), np.asarray(widest_b)[:, :fan_out])
        assert np.all(np.asarray(leaf.lambda_b) == 0) and np.allclose(
            np.asarray(leaf.lambda_d), 0.1
        )
    # PEFT's kaiming-uniform bounds: sqrt(6 / in_max) for A, sqrt(6 / r) for B.
    assert np.abs(np.asarray(widest_a)).max() <= (6 / 48) ** 0.5
    assert np.abs(np.asarray(widest_b)).max() <= (6 / 16) ** 0.5
    np.testing.assert_allclose(np.asarray(logits(params)), np.asarray(logits(base)), atol=1e-6)


LLAMA = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                    num_kv_heads=2)  # fmt: skip
GPT2 = ModelConfig(model_type="gpt2", vocab_size=50, hidden_size=32, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=4, max_position_embeddings=16,
                   hidden_act="gelu_new", tie_word_embeddings=True)  # fmt: skip


@pytest.mark.parametrize(
    "cfg, targets, outs",
    [(LLAMA, "qv", [32, 16]), (LLAMA, ["up_proj", "down_proj"], [48, 32]), (GPT2, "qv", [96])],
)
def test_closed_form_counts(cfg, targets, outs):
    r = 8
    method = peft.build_method({"name": "vera", "rank": r, "targets": targets})
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    params = jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), shapes["params"])
    trainable, total = method.count(params)
    assert trainable == cfg.num_layers * sum(r + out for out in outs)
    trainable_tree, _ = method.split(params)
    assert sum(x.size for x in jax.tree.leaves(trainable_tree)) == trainable


def test_paper_count_roberta_base_shapes():
    """VeRA paper, RoBERTa-base, r = 1024 on query and value: 0.043M, i.e.
    12 layers x 2 modules x (1024 + 768) = 43,008. Counted from the shapes
    of a model with RoBERTa-base's q and v projections (768 -> 768, 12 layers)."""
    from ftjax.study.param_counts import count_setting

    roberta_like = dict(vocab_size=50265, hidden_size=768, intermediate_size=3072, num_layers=12,
                        num_heads=12, num_kv_heads=12, max_position_embeddings=514)  # fmt: skip
    method = {"name": "vera", "rank": 1024, "targets": "qv"}
    trainable, _ = count_setting({"model": roberta_like, "method": method})
    assert trainable == 12 * 2 * (1024 + 768) == 43_008


# ----------------------------------------------------------------------------- HF PEFT files


@pytest.mark.parametrize(
    "family, targets, want_targets",
    [
        ("llama2", "qv", ["q_proj", "v_proj"]),
        # Different sizes: PEFT sizes vera_A/vera_B by the largest (48) and slices.
        ("llama2", ["q_proj", "up_proj", "down_proj"], ["down_proj", "q_proj", "up_proj"]),
        ("gpt2", "qv", ["c_attn"]),
        ("gpt2", ["attn/c_attn", "mlp/c_fc", "mlp/c_proj"], ["c_attn", "c_fc", "mlp.c_proj"]),
    ],
)
def test_ftjax_vera_adapter_loads_in_peft(loaded, tmp_path, family, targets, want_targets):
    path, model, base, logits = loaded(family)
    method = peft.build_method({"name": "vera", "rank": 16, "targets": targets})
    params = randomize(jax.jit(method.apply)(base, jax.random.key(0)))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    written = peft.save_adapter(model.cfg, params, str(tmp_path), method=method)
    assert (written["peft_type"], written["r"], written["target_modules"]) == (
        "VERA",
        16,
        want_targets,
    )
    assert written["save_projection"] is True

    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    assert isinstance(peft_model.peft_config["default"], torch_peft.VeraConfig)
    theirs = torch_logits(peft_model, IDS)
    diff = float(np.abs(theirs - ours).max())
    print(f"\nVeRA ftjax -> peft {family} {targets}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    np.testing.assert_allclose(torch_logits(peft_model.merge_and_unload(), IDS), ours, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits(jax.jit(peft.merge)(params))), ours, atol=TOL)
    reloaded = peft.load_adapter(model.cfg, base, str(tmp_path))
    assert set(vera_leaves(reloaded)) == set(vera_leaves(params))
    np.testing.assert_allclose(np.asarray(logits(reloaded)), ours, atol=1e-6)


@pytest.mark.parametrize(
    "family, targets",
    [("llama2", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])],
)
def test_peft_vera_adapter_imports_into_ftjax(loaded, tmp_path, family, targets):
    path, model, base, logits = loaded(family)
    torch.manual_seed(0)
    config = torch_peft.VeraConfig(r=16, target_modules=targets, projection_prng_key=7)
    peft_model = torch_peft.get_peft_model(torch_base(path), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "vera_lambda" in name:
                p.normal_()
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    want = torch_logits(peft_model, IDS)

    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    diff = float(np.abs(ours - want).max())
    print(f"\nVeRA peft -> ftjax {family} {targets}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    scanned_model, scanned_base = from_pretrained(path, scan_layers=True)
    scanned = peft.load_adapter(scanned_model.cfg, scanned_base, str(tmp_path))
    out = jax.jit(lambda p: scanned_model.apply({"params": p}, IDS))(scanned)
    np.testing.assert_allclose(np.asarray(out), want, atol=TOL)
    # Written back from the stacked tree, the tensors are the ones PEFT wrote.
    _, tensors = peft.read_adapter(str(tmp_path))
    _, rewritten = vera_format.adapter_state(scanned_model.cfg, scanned)
    assert set(rewritten) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(rewritten[key], np.asarray(value))


@pytest.fixture(scope="module")
def saved(loaded, tmp_path_factory):
    path, *_ = loaded("llama2")
    out = tmp_path_factory.mktemp("peft_vera")
    config = torch_peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"])
    torch_peft.get_peft_model(torch_base(path), config).save_pretrained(str(out))
    return out


def edit(src, dst, drop=(), **changes):
    config, tensors = peft.read_adapter(str(src))
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    peft_format.write_files(str(dst), {**config, **changes}, tensors)


@pytest.mark.parametrize(
    "changes, drop, match",
    [
        ({"a_future_peft_field": 1}, (), "field 'a_future_peft_field' is unknown .*VeraConfig"),
        ({"vera_dropout": 0.1}, (), "vera_dropout=0.1 is not supported"),
        ({"bias": "all"}, (), "bias='all' is not supported"),
        ({"save_projection": False}, (), "save_projection=False is not supported"),
        ({}, ("base_model.vera_A",), "no base_model.vera_A/base_model.vera_B .*torch's generator"),
        ({"r": 4}, (), r"vera_A \(8, 32\) .* not the \(4, 32\)"),
        ({"target_modules": ["q_proj"]}, (), "v_proj' has VeRA vectors but target_modules"),
        ({"layers_to_transform": [0]}, (), "layers_to_transform=\\[0\\] is not supported"),
    ],
)  # fmt: skip
def test_import_refuses_what_it_cannot_honour(loaded, saved, tmp_path, changes, drop, match):
    edit(saved, tmp_path, drop, **changes)
    _, model, base, _ = loaded("llama2")
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_every_vera_config_field_is_classified():
    fields = {f.name for f in dataclasses.fields(torch_peft.VeraConfig)}
    assert fields - set(vera_format.CONFIG_FIELDS) == set()
    config = torch_peft.VeraConfig(target_modules=["q_proj"]).to_dict()
    defaults = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))  # fmt: skip
    peft_format.check_config(defaults, "defaults", vera_format.CONFIG_FIELDS, kind="VeraConfig")


def test_export_refuses_projections_that_are_not_shared(loaded, tmp_path):
    _, model, base, _ = loaded("llama2")
    params = peft.build_method({"name": "vera", "rank": 8}).apply(base, jax.random.key(0))
    path = next(iter(vera_leaves(params)))
    other = peft.build_method({"name": "vera", "rank": 8}).apply(base, jax.random.key(1))
    bad = vera_leaves(params)[path].replace(a=vera_leaves(other)[path].a)
    with pytest.raises(peft.AdapterFormatError, match="not slices of one shared pair"):
        peft.save_adapter(model.cfg, replace_leaves(params, {path: bad}), str(tmp_path))


def test_one_train_step_follows_peft_gradient(loaded, tmp_path):
    path, model, base, _ = loaded("llama2")
    method = peft.build_method(
        {"name": "vera", "rank": 8, "targets": ["q_proj", "v_proj", "down_proj"]}
    )
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
    before, after = vera_leaves(params), vera_leaves(peft.combine(new.trainable, new.frozen))
    assert len(grads) == 2 * len(before) == 12  # only the vectors train, in both
    for p, leaf in before.items():
        name = peft_format._module(model.cfg, p)
        for child in ("lambda_b", "lambda_d"):
            grad = grads[f"base_model.model.{name}.vera_{child}.default"]
            step = np.asarray(getattr(after[p], child)) - np.asarray(getattr(leaf, child))
            np.testing.assert_allclose(-step / lr, grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
        for child in ("w", "a", "b"):
            np.testing.assert_array_equal(
                np.asarray(getattr(after[p], child)), np.asarray(getattr(leaf, child))
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    "arg, trainable",
    [
        # experiments/quick/train.py's Llama: hidden 32, v out 16, MLP 64, 2 layers.
        ("method=vera,rank=16", 2 * ((16 + 32) + (16 + 16))),
        ("method=loha,rank=4", 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16))),
        # q: w1 4x4, w2 = (8x2)(2x8); v (out 16 = 4x4): w1 4x4, w2 = (8x2)(2x4).
        ("method=lokr,rank=2", 2 * ((16 + 16 + 16) + (16 + 16 + 8))),
    ],
)
def test_count_params_script_counts_the_new_methods(arg, trainable):
    from hf_fixtures import ROOT, run_script

    result = run_script("count_params.py", f"--config=experiments/quick/train.py:{arg}", cwd=ROOT,
                        env={"JAX_PLATFORMS": "cpu"}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert any(f"{trainable:,}" in row for row in cells), result.stdout


def quick_run_trains_checkpoints_and_exports(tmp_path, arg, kind, leaf_type):
    """experiments/quick/train.py with `arg`: 4 steps of the real loop; the
    frozen base is untouched, the checkpoint holds the trained leaves, and
    the run's PEFT files load back to the trained function."""
    import importlib.util
    import os

    from hf_fixtures import ROOT

    from ftjax.train import train
    from ftjax.train.restore import restore_run

    spec = importlib.util.spec_from_file_location(
        "quick_train_config", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    cfg.train.steps = 4
    result = train(cfg, str(tmp_path / "run"))
    leaves = {p: x for p, x in flatten_paths(result.params) if isinstance(x, leaf_type)}
    assert leaves
    base = dict(flatten_paths(result.base_params))
    for path, leaf in leaves.items():
        np.testing.assert_array_equal(np.asarray(leaf.w), np.asarray(base[path]))
    _, restored, _, step = restore_run(cfg, str(tmp_path / "run"))
    assert step == 4
    for path, leaf in flatten_paths(restored):
        if isinstance(leaf, leaf_type):
            for got, want in zip(jax.tree.leaves(leaf), jax.tree.leaves(leaves[path])):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with open(tmp_path / "run" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == kind
    model = result.model
    back = peft.load_adapter(model.cfg, result.base_params, str(tmp_path / "run" / "adapter"))
    ids = IDS % cfg.model.init.vocab_size
    run = jax.jit(lambda p: model.apply({"params": p}, ids))
    np.testing.assert_allclose(np.asarray(run(back)), np.asarray(run(result.params)), atol=1e-6)
    return result


@pytest.mark.slow
def test_quick_run_trains_checkpoints_and_exports_vera(tmp_path):
    result = quick_run_trains_checkpoints_and_exports(
        tmp_path, "method=vera,rank=16", "VERA", peft.VeraWeight
    )
    leaves = vera_leaves(result.params)
    assert all(np.abs(np.asarray(x.lambda_b)).max() > 0 for x in leaves.values())  # it trained


def test_leaves_share_no_buffer(loaded):
    """The train step donates the frozen tree: the per-layer slices of the
    shared projections must be distinct buffers even when built eagerly."""
    _, _, base, _ = loaded("llama2")
    params = peft.build_method({"name": "vera", "rank": 8}).apply(base, jax.random.key(0))
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)]
    assert len(set(pointers)) == len(pointers)
