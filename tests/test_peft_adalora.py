"""AdaLoRA (Zhang et al. 2023) against float64 closed forms and against PyTorch
`peft`: the leaf computes PEFT's `x @ w + (x @ (A * E)ᵀ @ Bᵀ) · alpha /
(init_r + 1e-5)`; the rank allocator, fed PEFT's own sequence of weights
and gradients, draws PEFT's masks and zeroes the same singular values at
every step of every phase; one train step's update is PEFT's gradient,
orthogonality regularizer included; adapters written by ftjax (some
triplets pruned) load in `PeftModel.from_pretrained` with the same logits
and adapters made and allocated by `peft` import with the same logits, on
every architecture; config fields are classified and refused by name;
options are checked in one line; counts are `init_r (in + out + 1)` per
kernel; the quick training run trains, resumes exactly and exports."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as torch_peft
import pytest
import torch
from hf_fixtures import VOCAB, checkpoint_loader, torch_base, torch_logits

from ftjax import peft
from ftjax.models import ModelConfig, build_model, from_pretrained, layers
from ftjax.peft import adalora_format, peft_format
from ftjax.peft.adalora import AdaLoraWeight, orthogonality_penalty
from ftjax.peft.adalora_allocator import (
    RankSchedule,
    allocate_ranks,
    allocation_step,
    init_allocator_state,
)
from ftjax.peft.base import flatten_paths
from ftjax.train import StepConfig, TrainState, build_optimizer, default_optim_config, train_step

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4
FAMILIES = {"llama": "llama2", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
            "gpt2": "gpt2"}  # fmt: skip


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """`loaded(family)`: (checkpoint dir, model, base params, jitted logits), once per family."""
    return checkpoint_loader(tiny_checkpoint, IDS)


def adalora_leaves(params):
    return {p: x for p, x in flatten_paths(params) if isinstance(x, AdaLoraWeight)}


def randomize(params, seed=0, prune=0.4):
    """Trained-looking leaves: a, b ~ N(0, 0.3²), e ~ N(0, 1), and about
    `prune` of the triplets pruned (e = 0), all of one leaf's included when
    `prune` > 0."""
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, AdaLoraWeight):
            return x
        draw = lambda v, s: jnp.asarray(s * rng.normal(size=v.shape), v.dtype)  # noqa: E731
        e = draw(x.e, 1.0) * jnp.asarray(rng.random(x.e.shape) >= prune, x.e.dtype)
        return x.replace(a=draw(x.a, 0.3), e=e, b=draw(x.b, 0.3))

    out = jax.tree.map(f, params, is_leaf=peft.is_leaf)
    if not prune:
        return out
    first = next(iter(adalora_leaves(out)))
    leaf = adalora_leaves(out)[first]
    return peft.tree.replace_leaves(out, {first: leaf.replace(e=jnp.zeros_like(leaf.e))})


# ----------------------------------------------------------------------------- the leaf


def test_leaf_and_merge_are_peft_forward():
    rng = np.random.default_rng(1)
    fan_in, fan_out, r, alpha = 5, 3, 4, 6.0
    w, bias, x = rng.normal(size=(fan_in, fan_out)), rng.normal(size=fan_out), rng.normal(size=(2, fan_in))  # fmt: skip
    lora_a, lora_e, lora_b = rng.normal(size=(r, fan_in)), rng.normal(size=(r, 1)), rng.normal(size=(fan_out, r))  # fmt: skip
    lora_e[1] = 0.0  # a pruned triplet
    # PEFT's SVDLinear: result + x @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)
    want = x @ w + bias + x @ (lora_a * lora_e).T @ lora_b.T * alpha / (r + 1e-5)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    leaf = AdaLoraWeight(f32(w), f32(lora_a.T), f32(lora_e[:, 0]), f32(lora_b.T), alpha=alpha)
    np.testing.assert_allclose(np.asarray(layers.linear(f32(x), leaf, f32(bias))), want, rtol=1e-5, atol=1e-5)  # fmt: skip
    merged = peft.merge({"dense": {"kernel": leaf, "bias": f32(bias)}})["dense"]
    np.testing.assert_allclose(x @ np.asarray(merged["kernel"]) + bias, want, rtol=1e-5, atol=1e-5)
    assert np.asarray(leaf.kept()).tolist() == [True, False, True, True]


def test_init_is_peft_init_and_leaves_the_model_unchanged(loaded):
    _, _, base, logits = loaded("llama2")
    method = peft.build_method({"name": "adalora", "init_r": 64, "targets": "all-linear"})
    params = method.apply(base, jax.random.key(0))
    leaves = adalora_leaves(params)
    assert len(leaves) == 2 * 7
    a = np.concatenate([np.asarray(x.a).ravel() for x in leaves.values()])
    assert all(np.all(np.asarray(x.e) == 0) for x in leaves.values())
    assert abs(a.std() - 0.02) < 0.001 and abs(a.mean()) < 0.001  # N(0, 0.02²)
    np.testing.assert_array_equal(np.asarray(logits(params)), np.asarray(logits(base)))


def test_penalty_is_the_mean_frobenius_distance_per_stacked_matrix():
    """float64: ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F averaged over 2 x 3 stacked layers."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 4, 5))
    want = np.mean([np.linalg.norm(m.T @ m - np.eye(4)) for m in a]
                   + [np.linalg.norm(m @ m.T - np.eye(4)) for m in b])  # fmt: skip
    leaf = AdaLoraWeight(None, jnp.asarray(a, jnp.float32), jnp.ones((3, 4)), jnp.asarray(b, jnp.float32))  # fmt: skip
    got = orthogonality_penalty({"layers": {"kernel": leaf}, "norm": None}, 0.3)
    np.testing.assert_allclose(float(got), 0.3 * want, rtol=1e-5)


# ----------------------------------------------------------------------------- options, counts


@pytest.mark.parametrize(
    "options, match",
    [
        ({"init_r": 0}, "method.init_r: must be an integer >= 1"),
        ({"target_r": 12}, "method.target_r: must be below init_r=12"),
        ({"beta1": 1.0}, r"method.beta1: must be in \(0, 1\)"),
        ({"orth_reg_weight": -1.0}, "method.orth_reg_weight: must be a number >= 0"),
        ({"alpha": 0.0}, "method.alpha: must be a number > 0"),
        ({"delta_t": 0}, "method.delta_t: must be an integer >= 1"),
        ({"total_step": 10, "tinit": 6, "tfinal": 4}, "method.tinit: tinit=6 must be < total_step - tfinal"),
        ({"dropout": 1.0}, r"method.dropout: must be in \[0, 1\)"),
    ],
)  # fmt: skip
def test_bad_options_give_one_line(options, match):
    with pytest.raises(peft.PeftError, match=match) as info:
        peft.build_method({"name": "adalora", **options})
    assert "\n" not in str(info.value)


def test_schedule_against_the_run_length_is_checked_when_the_optimizer_is_built():
    method = peft.build_method({"name": "adalora", "tinit": 5, "tfinal": 5})
    with pytest.raises(peft.PeftError, match="method.tinit: tinit=5 must be < total_step - tfinal = 10 - 5"):  # fmt: skip
        method.optimizer(optax.sgd(0.1), None, 10)
    assert isinstance(method.optimizer(optax.sgd(0.1), None, 11), optax.GradientTransformation)


LLAMA = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                    num_kv_heads=2)  # fmt: skip
GPT2 = ModelConfig(model_type="gpt2", vocab_size=50, hidden_size=32, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=4, max_position_embeddings=16,
                   hidden_act="gelu_new", tie_word_embeddings=True)  # fmt: skip


@pytest.mark.parametrize("cfg, shapes", [(LLAMA, [(32, 32), (32, 16)]), (GPT2, [(32, 96)])])
def test_closed_form_counts(cfg, shapes):
    r = 6
    method = peft.build_method({"name": "adalora", "init_r": r, "target_r": 2})
    abstract = jax.eval_shape(build_model(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    params = jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), abstract["params"])
    trainable, _ = method.count(params)
    assert trainable == cfg.num_layers * sum(r * (i + o + 1) for i, o in shapes)


@pytest.mark.slow
def test_count_params_script_counts_adalora():
    from hf_fixtures import ROOT, run_script

    result = run_script("count_params.py", "--config=experiments/quick/train.py:method=adalora,init_r=4,target_r=2",
                        cwd=ROOT, env={"JAX_PLATFORMS": "cpu"}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # experiments/quick/train.py's Llama (hidden 32, kv 16, MLP 64, 2 layers) under
    # the study preset's all-linear targets: q, k, v, o, gate, up, down.
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    assert f"{2 * sum(4 * (i + o + 1) for i, o in shapes):,}" in result.stdout


# ----------------------------------------------------------------------------- the allocator


def _torch_snapshot(peft_model, what):
    """{module: {"a", "e", "b"} arrays in ftjax's layout} of PEFT's params or grads."""
    out = {}
    for name, p in peft_model.named_parameters():
        for part in ("A", "E", "B"):
            tag = f".lora_{part}.default"
            if name.endswith(tag):
                name = name.removeprefix("base_model.model.")
                t = p if what == "param" else p.grad
                value = t.detach().numpy().copy()
                value = value[:, 0] if part == "E" else value.T
                out.setdefault(name[: -len(tag)], {})[part.lower()] = value
    return out


def _tree(snapshot):
    return {
        m: AdaLoraWeight(None, *(jnp.asarray(v[c]) for c in "aeb")) for m, v in snapshot.items()
    }


def test_allocator_reproduces_peft_rank_allocator(loaded):
    """PEFT trains a tiny Llama with SGD and calls `update_and_allocate(t)`
    after each step; the same (stepped weights, gradient) pairs go through
    `allocation_step`. Steps: 0-1 warm-up, 2 and 4 allocations (deltaT=2),
    3 and 5 none, 6 the final mask (total_step 8 - tfinal 2), 7 re-masking."""
    path, *_ = loaded("llama2")
    torch.manual_seed(0)
    config = torch_peft.AdaLoraConfig(init_r=4, target_r=1, tinit=1, tfinal=2, deltaT=2, total_step=8,
                                      beta1=0.8, beta2=0.7, target_modules=["q_proj", "v_proj"])  # fmt: skip
    model = torch_peft.get_peft_model(torch_base(path), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_E." in name:
                p.normal_()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    schedule = RankSchedule(target_r=1, total_step=8, tinit=1, tfinal=2, delta_t=2, beta1=0.8, beta2=0.7)  # fmt: skip
    step_fn = jax.jit(lambda *args: allocation_step(schedule, *args))
    rng = np.random.default_rng(0)
    state = None
    masked_at = []
    for t in range(8):
        ids = torch.tensor(rng.integers(0, VOCAB, (2, 9)))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        stepped, grads = _torch_snapshot(model, "param"), _torch_snapshot(model, "grad")
        before = model.peft_config["default"].rank_pattern
        model.base_model.update_and_allocate(t)
        opt.zero_grad()
        theirs = _torch_snapshot(model, "param")
        pattern = model.peft_config["default"].rank_pattern

        tree = _tree(stepped)
        if state is None:
            state = init_allocator_state(tree)
        ipt, unc, keep, mask_now = step_fn(jnp.int32(t), *state, tree, _tree(grads))
        state = (ipt, unc, keep)
        for module, parts in theirs.items():
            ours_e = np.where(bool(mask_now) & ~np.asarray(keep[module]), 0.0, stepped[module]["e"])
            np.testing.assert_array_equal(ours_e, parts["e"], err_msg=f"step {t} {module}")
            if pattern is not None:
                want = np.asarray(pattern[f"{module}.lora_E.default"])
                np.testing.assert_array_equal(np.asarray(keep[module]), want, err_msg=f"step {t}")
        if t < 6:  # PEFT's averages (reset once the final mask is drawn)
            allocator = model.base_model.rankallocator
            for module in theirs:
                for c in "ABE":
                    key = f"{module}.lora_{c}.default"
                    want = allocator.exp_avg_ipt[key].numpy()
                    want = want[:, 0] if c == "E" else want.T
                    np.testing.assert_allclose(np.asarray(getattr(ipt[module], c.lower())), want, rtol=1e-5, atol=1e-12)  # fmt: skip
        if pattern is not before or t == 7:
            masked_at.append(t)
    assert masked_at == [2, 4, 6, 7]
    kept = sum(int(np.sum(np.asarray(k))) for k in jax.tree.leaves(state[2]))
    assert kept == 1 * 4  # target_r per matrix on average: 4 matrices
    print(
        f"\nAdaLoRA allocator vs PEFT RankAllocator: masks and E equal at steps 0-7 (masks drawn at {masked_at})"
    )


def test_final_masks_hold_under_adam_and_stacked_layers_allocate_as_unstacked():
    rng = np.random.default_rng(3)
    draw = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    stacked = {"k": AdaLoraWeight(None, draw(2, 5, 4), draw(2, 4), draw(2, 4, 3))}
    split = {f"k{i}": jax.tree.map(lambda x, i=i: x[i], stacked["k"]) for i in range(2)}
    schedule = RankSchedule(target_r=2, total_step=4, tfinal=1)
    results = []
    for params in (stacked, split):
        tx = allocate_ranks(optax.adam(0.1), schedule)
        state = tx.init(params)
        update = jax.jit(tx.update)
        es = []
        for t in range(7):
            grads = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)), params)
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
            es.append(np.stack([np.asarray(x.e) for x in jax.tree.leaves(params, is_leaf=peft.is_leaf)]).reshape(-1, 4))  # fmt: skip
        results.append(es)
        final = es[3] == 0  # step 3 = total_step - tfinal: the final mask
        assert final.sum() == 2 * (4 - 2)
        for later in es[4:]:  # Adam's momentum would move them; the mask holds them at 0
            assert np.all(later[final] == 0) and np.all(later[~final] != 0)
        assert int(state.step) == 7
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ----------------------------------------------------------------------------- one train step


def test_one_train_step_follows_peft_gradient_with_the_regularizer(loaded, tmp_path):
    path, model, base, _ = loaded("llama2")
    method = peft.build_method({"name": "adalora", "init_r": 4, "target_r": 2, "total_step": 10,
                                "targets": ["q_proj", "v_proj", "down_proj"]})  # fmt: skip
    params = randomize(method.apply(base, jax.random.key(0)), seed=3, prune=0.0)
    peft.registry.get("adalora").export(model.cfg, params, str(tmp_path), method.config)
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:],
             "loss_mask": np.ones(IDS[:, 1:].shape, np.float32)}  # fmt: skip
    lr = 1.0
    optim = default_optim_config()
    optim.update(name="sgd", momentum=0.0, lr=lr, schedule="constant", clip_norm=0.0)
    tx, schedule = build_optimizer(optim, 10)
    tx = method.optimizer(tx, schedule, 10)
    trainable, frozen = method.split(params)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
                       jax.random.key_data(jax.random.key(0)), jnp.zeros((), jnp.int32))  # fmt: skip
    cfg = StepConfig(penalty=method.penalty())
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, cfg=cfg))(state, batch)

    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path), is_trainable=True)  # fmt: skip
    ids = torch.tensor(IDS)
    loss = peft_model(input_ids=ids, labels=ids).loss  # PEFT adds the regularizer to it
    loss.backward()
    np.testing.assert_allclose(float(metrics["loss"] + metrics["penalty"]), loss.item(), rtol=1e-5)
    assert float(metrics["penalty"]) > 0.1
    grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.grad is not None}
    before, after = adalora_leaves(params), adalora_leaves(peft.combine(new.trainable, new.frozen))
    assert len(grads) == 3 * len(before) == 3 * 6
    for p, leaf in before.items():
        name = peft_format._module(model.cfg, p)
        for child in ("a", "e", "b"):
            grad = grads[f"base_model.model.{name}.lora_{child.upper()}.default"]
            grad = grad[:, 0] if child == "e" else grad.T
            step = np.asarray(getattr(after[p], child)) - np.asarray(getattr(leaf, child))
            np.testing.assert_allclose(-step / lr, grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
        np.testing.assert_array_equal(np.asarray(after[p].w), np.asarray(leaf.w))


# ----------------------------------------------------------------------------- HF PEFT files


@pytest.mark.parametrize("arch", list(FAMILIES), ids=lambda a: f"{a}-ftjax_to_peft")
def test_ftjax_adalora_adapter_loads_in_peft(loaded, tmp_path, arch):
    path, model, base, logits = loaded(FAMILIES[arch])
    method = peft.build_method({"name": "adalora", "init_r": 6, "target_r": 2, "alpha": 12.0,
                                "total_step": 20, "tinit": 3})  # fmt: skip
    params = randomize(jax.jit(method.apply)(base, jax.random.key(0)), seed=1)
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    written = peft.registry.get("adalora").export(model.cfg, params, str(tmp_path), method.config)
    assert written["peft_type"] == "ADALORA" and written["init_r"] == 6
    assert (written["total_step"], written["tinit"], written["lora_alpha"]) == (20, 3, 12.0)
    assert written["target_modules"] == (["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"])
    leaves = {peft_format._module(model.cfg, p): x for p, x in adalora_leaves(params).items()}
    _, tensors = peft.read_adapter(str(tmp_path))
    for module, leaf in leaves.items():
        kept = np.asarray(leaf.e) != 0
        assert written["rank_pattern"][f"{module}.lora_E"] == kept.tolist()
        assert tensors[f"base_model.model.{module}.lora_E"].shape == (kept.sum(), 1)
    assert any(not any(v) for v in written["rank_pattern"].values())  # one module pruned to rank 0

    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    assert isinstance(peft_model.peft_config["default"], torch_peft.AdaLoraConfig)
    theirs = torch_logits(peft_model, IDS)
    diff = float(np.abs(theirs - ours).max())
    print(f"\nAdaLoRA {arch} ftjax -> peft: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    np.testing.assert_allclose(np.asarray(logits(jax.jit(peft.merge)(params))), ours, atol=TOL)
    reloaded = peft.load_adapter(model.cfg, base, str(tmp_path))
    for p, leaf in adalora_leaves(reloaded).items():
        for c in ("a", "e", "b"):
            want = np.asarray(getattr(adalora_leaves(params)[p], c))
            kept = np.asarray(adalora_leaves(params)[p].e) != 0
            got = np.asarray(getattr(leaf, c))
            index = (slice(None), kept) if c == "a" else kept
            np.testing.assert_array_equal(got[index], want[index])
    np.testing.assert_allclose(np.asarray(logits(reloaded)), ours, atol=1e-6)


@pytest.mark.parametrize("arch", list(FAMILIES), ids=lambda a: f"{a}-peft_to_ftjax")
def test_peft_adalora_adapter_imports_into_ftjax(loaded, tmp_path, arch):
    """PEFT builds the adapter with its per-architecture default targets (q,
    v; GPT-2's c_attn),
    randomizes it, allocates ranks once (step 1 of a 3-step schedule) and
    saves the resized tensors with their rank_pattern."""
    path, model, base, logits = loaded(FAMILIES[arch])
    torch.manual_seed(0)
    # PEFT 0.21 has no AdaLoRA default for Mistral: its LoRA default (q, v), ftjax's `qv`.
    targets = ["q_proj", "v_proj"] if arch == "mistral" else None
    config = torch_peft.AdaLoraConfig(init_r=6, target_r=2, total_step=3, lora_alpha=10,
                                      target_modules=targets)  # fmt: skip
    peft_model = torch_peft.get_peft_model(torch_base(path), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=1.0 if ".lora_E." in name else 0.3)
    ids = torch.tensor(IDS)
    for t in range(2):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        peft_model.base_model.update_and_allocate(t)
        peft_model.zero_grad()
    peft_model.eval()
    want = torch_logits(peft_model, IDS)
    peft_model.save_pretrained(str(tmp_path))
    saved, tensors = peft.read_adapter(str(tmp_path))
    kept = {k: sum(v) for k, v in saved["rank_pattern"].items()}
    assert 0 < sum(kept.values()) < 6 * len(kept)  # pruned, and the tensors resized to it
    assert {tensors[f"base_model.model.{k}"].shape[0] for k in kept} == set(kept.values())

    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    diff = float(np.abs(ours - want).max())
    print(f"\nAdaLoRA {arch} peft -> ftjax: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    if arch in ("llama", "gpt2"):
        scanned_model, scanned_base = from_pretrained(path, scan_layers=True)
        scanned = peft.load_adapter(scanned_model.cfg, scanned_base, str(tmp_path))
        out = jax.jit(lambda p: scanned_model.apply({"params": p}, IDS))(scanned)
        np.testing.assert_allclose(np.asarray(out), want, atol=TOL)
        # Written back from the stacked tree, the tensors and pattern are PEFT's.
        rewritten_config, rewritten = adalora_format.adapter_state(scanned_model.cfg, scanned)
        assert rewritten_config["rank_pattern"] == saved["rank_pattern"]
        assert set(rewritten) == set(tensors)
        for key, value in tensors.items():
            np.testing.assert_array_equal(rewritten[key], np.asarray(value))


@pytest.fixture(scope="module")
def saved(loaded, tmp_path_factory):
    path, *_ = loaded("llama2")
    out = tmp_path_factory.mktemp("peft_adalora")
    config = torch_peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj", "v_proj"])
    torch_peft.get_peft_model(torch_base(path), config).save_pretrained(str(out))
    return out


def edit(src, dst, drop=(), **changes):
    config, tensors = peft.read_adapter(str(src))
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    peft_format.write_files(str(dst), {**config, **changes}, tensors)


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "changes, drop, match",
    [
        ({"a_future_peft_field": 1}, (), "field 'a_future_peft_field' is unknown .*AdaLoraConfig"),
        ({"lora_alpha": 0}, (), "lora_alpha=0 is not supported .*scales by the rank"),
        ({"bias": "all"}, (), "bias='all' is not supported"),
        ({"alpha_pattern": {"q_proj": 2}}, (), "alpha_pattern=.* is not supported"),
        ({"layers_to_transform": [0]}, (), r"layers_to_transform=\[0\] is not supported"),
        ({"init_r": 3}, (), r"lora_A of shape \(4, 32\); PEFT expects \(3, 32\)"),
        ({"rank_pattern": {f"{Q0}.lora_E": [True, False, True, True]}}, (),
         r"lora_A of shape \(4, 32\); PEFT expects \(3, 32\) .*3 triplets kept"),
        ({"rank_pattern": {f"{Q0}.lora_E.default": [True] * 4}}, (), "rank_pattern key .* is not"),
        ({"target_modules": ["q_proj"]}, (), "v_proj' has AdaLoRA tensors but target_modules"),
        ({}, (f"base_model.model.{Q0}.lora_E",), r"has lora_E of shape None"),
        ({}, tuple(f"base_model.model.{Q0}.lora_{c}" for c in "AEB"),
         f"selects '{Q0}', which has no AdaLoRA tensors"),
    ],
)  # fmt: skip
def test_import_refuses_what_it_cannot_honour(loaded, saved, tmp_path, changes, drop, match):
    edit(saved, tmp_path, drop, **changes)
    _, model, base, _ = loaded("llama2")
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_every_adalora_config_field_is_classified():
    fields = {f.name for f in dataclasses.fields(torch_peft.AdaLoraConfig)}
    assert fields - set(adalora_format.CONFIG_FIELDS) == set()
    config = torch_peft.AdaLoraConfig(target_modules=["q_proj"], total_step=5).to_dict()
    defaults = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))  # fmt: skip
    peft_format.check_config(defaults, "defaults", adalora_format.CONFIG_FIELDS, kind="AdaLoraConfig")  # fmt: skip


def test_export_refuses_mixed_leaves(loaded, tmp_path):
    _, model, base, _ = loaded("llama2")
    params = peft.build_method({"name": "adalora", "init_r": 4, "target_r": 2}).apply(base, jax.random.key(0))  # fmt: skip
    first = next(iter(adalora_leaves(params)))
    odd = peft.tree.replace_leaves(
        params, {first: adalora_leaves(params)[first].replace(alpha=3.0)}
    )
    with pytest.raises(peft.AdapterFormatError, match="differ in init_r, alpha or dropout"):
        peft.save_adapter(model.cfg, odd, str(tmp_path))


# ----------------------------------------------------------------------------- the real loop


def _quick_config(steps):
    import importlib.util
    import os

    from hf_fixtures import ROOT

    spec = importlib.util.spec_from_file_location(
        "quick_train_config", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # total_step fixed: the schedule must not follow train.steps across the resume.
    cfg = module.get_config("method=adalora,init_r=4,target_r=2,tinit=1,tfinal=2,total_step=6")
    cfg.optim.schedule = "constant"
    cfg.train.steps = steps
    return cfg


@pytest.mark.slow
def test_quick_run_trains_prunes_resumes_and_exports(tmp_path):
    """experiments/quick/train.py: 6 steps uninterrupted, and 4 steps then a
    resume to 6, give identical states (the allocator's included); the final
    ranks are target_r per kernel on average; the exported adapter loads
    back to the trained function."""
    import chex
    import orbax.checkpoint as ocp

    from ftjax.train import train

    def last_saved(workdir):
        """The last checkpoint's arrays (optimizer state included), through orbax."""
        mgr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta"))
        step = mgr.latest_step()
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        mgr.close()
        return step, state["state"]

    whole = train(_quick_config(6), str(tmp_path / "whole"))
    train(_quick_config(4), str(tmp_path / "split"))
    resumed = train(_quick_config(6), str(tmp_path / "split"))
    leaves = adalora_leaves(whole.params)
    matrices = sum(int(np.prod(x.e.shape[:-1])) for x in leaves.values())
    assert matrices == 14  # all-linear (the study preset), 2 layers; 2 of each's 4 are kept
    assert sum(int(np.sum(np.asarray(x.e) != 0)) for x in leaves.values()) == 2 * matrices
    for path, leaf in leaves.items():
        np.testing.assert_array_equal(np.asarray(leaf.w), np.asarray(dict(flatten_paths(whole.base_params))[path]))  # fmt: skip
    step, state = last_saved(tmp_path / "whole")
    assert step == 6
    chex.assert_trees_all_equal((step, state), last_saved(tmp_path / "split"))
    # The allocator's state is in the checkpoint: its step and last mask.
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert any("keep" in k and v.dtype == bool for k, v in flat.items()), sorted(flat)[:5]
    for got, want in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(whole.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with open(tmp_path / "whole" / "adapter" / "adapter_config.json") as f:
        written = json.load(f)
    assert written["peft_type"] == "ADALORA" and written["total_step"] == 6
    model = whole.model
    back = peft.load_adapter(model.cfg, whole.base_params, str(tmp_path / "whole" / "adapter"))
    ids = IDS % 128
    run = jax.jit(lambda p: model.apply({"params": p}, ids))
    np.testing.assert_allclose(np.asarray(run(back)), np.asarray(run(whole.params)), atol=1e-6)
