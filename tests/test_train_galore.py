"""GaLore: the optimizer against a float64 numpy implementation of the
paper's algorithm written here, its state size in closed form, training
through the one train step under FSDP and scanned layers, an exact resume of
a quick run, the benchmark's memory figure, and bad options refused by name."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_parallel import assert_relative_close, make_batch

from ftjax import peft
from ftjax.errors import ConfigError
from ftjax.models import ModelConfig, build_model
from ftjax.models.hf import stack_layers, unstack_layers
from ftjax.peft.base import PeftError, TargetError, flatten_paths
from ftjax.peft.galore import ScaleByGaloreState, galore_adamw
from ftjax.peft.registry import get
from ftjax.train import Parallel, StepConfig, build_optimizer, default_optim_config, init_state

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- float64 reference


def reference_galore(params, grads_seq, targeted, *, rank, gap, scale, b1, b2, eps, wd, lr, clip):
    """GaLore-AdamW in float64, one matrix at a time (a scanned stack's
    layers looped over): the parameters after each step and the projections."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    state, history = {}, []
    for t, grads in enumerate(grads_seq):
        grads = {k: np.asarray(v, np.float64) for k, v in grads.items()}
        norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
        if norm > clip:  # global-norm clipping of the full gradients
            grads = {k: g * clip / norm for k, g in grads.items()}

        def adam(key, g, t=t):
            m, v = state.get(key, (0.0, 0.0))
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
            state[key] = (m, v)
            return (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)

        projections = {}
        for k, g in grads.items():
            if not targeted[k]:
                update = adam(k, g)
            else:
                update = np.empty_like(g)
                projections[k] = []
                for idx in np.ndindex(g.shape[:-2]):
                    mat = g[idx]
                    tall = mat.shape[0] > mat.shape[1]
                    wide = mat.T if tall else mat  # project the shorter side
                    if t % gap == 0:
                        u = np.linalg.svd(wide)[0][:, : min(rank, *wide.shape)]
                        peak = u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])]
                        state[(k, idx, "P")] = u * np.sign(peak)
                    p = state[(k, idx, "P")]
                    back = p @ adam((k, idx), p.T @ wide)
                    update[idx] = scale * (back.T if tall else back)
                    projections[k].append(p)
            if g.ndim >= 2:
                update = update + wd * params[k]
            params[k] = params[k] - lr(t) * update
        history.append((dict(params), projections))
    return history


def find_galore_state(opt_state) -> ScaleByGaloreState:
    (found,) = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByGaloreState))
        if isinstance(x, ScaleByGaloreState)
    ]
    return found


def test_optimizer_matches_float64_reference_across_refreshes():
    rng = np.random.default_rng(0)
    shapes = {"stack": (2, 6, 10), "dense": (12, 5), "embed": (9, 4), "bias": (7,)}
    targeted = {"stack": True, "dense": True, "embed": False, "bias": False}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    # Large and small gradients in turn: the clipping acts on some steps only.
    grads_seq = [
        {k: (rng.normal(size=s) * (1.0 if t % 2 == 0 else 0.05)).astype(np.float32)
         for k, s in shapes.items()}
        for t in range(7)
    ]  # fmt: skip
    hyper = dict(rank=3, gap=3, scale=0.5, b1=0.8, b2=0.95, eps=1e-6, wd=0.1, clip=5.0)
    lr = optax.linear_schedule(0.1, 0.02, 7)
    ref = reference_galore(params, grads_seq, targeted, lr=lambda t: float(lr(t)), **hyper)

    tx = galore_adamw(
        lr, hyper["rank"], hyper["gap"], hyper["scale"], mask=targeted, b1=hyper["b1"],
        b2=hyper["b2"], eps=hyper["eps"], weight_decay=hyper["wd"], clip_norm=hyper["clip"],
    )  # fmt: skip
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    galore = find_galore_state(state)
    # Layout: one projection per layer of the stack; moments r x (longer side).
    proj, mu = galore.proj, galore.inner.mu
    assert proj["stack"].shape == (2, 6, 3) and mu["stack"].shape == (2, 3, 10)
    assert proj["dense"].shape == (5, 3) and mu["dense"].shape == (3, 12)
    assert proj["embed"] is None and mu["embed"].shape == (9, 4)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for grads, (want, want_proj) in zip(grads_seq, ref):
        p, state = step(p, state, grads)
        for k in shapes:
            np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=0, atol=2e-6, err_msg=k)
        proj = find_galore_state(state).proj
        np.testing.assert_allclose(
            np.asarray(proj["stack"]), np.stack(want_proj["stack"]), atol=2e-6
        )
        np.testing.assert_allclose(np.asarray(proj["dense"]), want_proj["dense"][0], atol=2e-6)
    # The projections really were refreshed (steps 0, 3, 6) from new gradients.
    assert int(find_galore_state(state).count) == 7
    assert not np.allclose(ref[2][1]["dense"][0], ref[3][1]["dense"][0], atol=1e-2)


def test_untargeted_leaves_get_exactly_optax_adamw():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "b": jnp.ones(6)}
    mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
    ours = galore_adamw(1e-2, 2, 1, 1.0, mask={"w": False, "b": False}, weight_decay=0.1)
    theirs = optax.adamw(1e-2, weight_decay=0.1, mask=mask)
    s1, s2 = ours.init(params), theirs.init(params)
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = theirs.update(g, s2, params)
        for k in params:
            np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]))


# ----------------------------------------------------------------------------- state size


def galore_setup(model_cfg=CFG, optim=None, steps=10, **options):
    """(model, params, method, tx, state at step 0); a scanned model gets the
    unrolled model's weights, stacked."""
    model = build_model(model_cfg)
    params = build_model(model_cfg.replace(scan_layers=False)).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    if model_cfg.scan_layers:
        params = stack_layers(model_cfg, params)
    method = peft.build_method({"name": "galore", "rank": 4, "update_proj_gap": 2, **options})
    if optim is None:
        optim = default_optim_config()
        optim.lr, optim.weight_decay, optim.warmup_steps = 1e-2, 0.01, 1
    tx, schedule = build_optimizer(optim, steps, lr_scales=method.lr_scales())
    tx = method.optimizer(tx, schedule, steps, optim)
    return model, params, method, tx, init_state(params, method, tx, seed=0)


def expected_state_size(params, rank: int) -> tuple[int, int]:
    """(GaLore's, AdamW's) optimizer-state entries in closed form: per
    linear-layer matrix m x n, r' = min(r, m, n): 2 r' max(m, n) + r' min(m, n);
    everything else two full moments."""
    galore = adam = 0
    for path, x in flatten_paths(params):
        adam += 2 * x.size
        if path.split("/")[-2] in LLAMA_LINEAR:
            *lead, m, n = x.shape
            r = min(rank, m, n)
            galore += int(np.prod(lead, dtype=int)) * (2 * r * max(m, n) + r * min(m, n))
        else:
            galore += 2 * x.size
    return galore, adam


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("rank", [8, 24])  # 24 > the 16 of k/v (32 x 16): r' = 16 there
def test_optimizer_state_size_is_closed_form(scan, rank):
    _, params, _, _, state = galore_setup(CFG.replace(scan_layers=scan), rank=rank)
    entries = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    galore, adam = expected_state_size(params, rank)
    assert entries == galore
    # Smaller than AdamW's where r is well below the sides (r = 8 of 32..64),
    # larger where it is not (3 r^2 > 2 n^2 for the 32 x 32 kernels at r = 24).
    assert (galore < adam) == (rank == 8)
    # q_proj (32 x 32) at r = 8: moments 2 * 8 * 32 + P 32 * 8 = 768 of AdamW's 2048.
    if not scan and rank == 8:
        attn = find_galore_state(state.opt_state).proj["model"]["layers_0"]["self_attn"]
        assert attn["q_proj"]["kernel"].shape == (32, 8)
        assert attn["k_proj"]["kernel"].shape == (16, 8)


# ----------------------------------------------------------------------------- training


def train(model, tx, state, mode, steps=3):
    par = Parallel(mode, model, tx, StepConfig())
    state = par.place_state(state)
    losses = []
    for i in range(steps):
        state, metrics = par.train_step(state, par.place_batch(make_batch(i)))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, par


def test_fsdp_and_scanned_layers_train_like_one_device():
    """3 steps with a refresh at step 2: FSDP equals one device, the moments
    and projections are sharded, and a scanned stack trains like the unrolled
    layers (one batched projection per layer)."""
    assert jax.device_count() == 8
    model, params, _, tx, state0 = galore_setup()
    state0 = jax.device_get(state0)  # host copies: each run's placed state is donated
    ref_losses, ref_state, _ = train(model, tx, state0, "single")
    assert ref_losses[0] != ref_losses[-1]
    ref_params = jax.device_get(ref_state.trainable)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))]  # fmt: skip
    assert min(moved) > 0  # every parameter trains, as in full fine-tuning

    losses, state, par = train(model, tx, state0, "fsdp")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_relative_close(jax.device_get(par.host_state(state).trainable), ref_params, 2e-5)
    galore = find_galore_state(state.opt_state)
    up = "model/layers_0/mlp/up_proj/kernel"
    for x in (dict(flatten_paths(galore.inner.mu))[up], dict(flatten_paths(galore.proj))[up]):
        assert "data" in str(x.sharding.spec) and x.addressable_shards[0].data.size < x.size

    model_s, _, _, tx_s, state_s = galore_setup(CFG.replace(scan_layers=True))
    state_s = jax.device_get(state_s)
    assert find_galore_state(state_s.opt_state).proj["model"]["layers"]["mlp"]["up_proj"][
        "kernel"
    ].shape == (2, 32, 4)
    scan_losses, scanned, par = train(model_s, tx_s, state_s, "fsdp")
    np.testing.assert_allclose(scan_losses, ref_losses, rtol=1e-5)
    unstacked = unstack_layers(CFG, jax.device_get(par.host_state(scanned).trainable))
    # Matrices only: weight decay (`decay_mask`: ndim >= 2) also reaches the
    # stacked (L, d) norm scales of a scanned model, which it skips unrolled.
    matrices = lambda tree: jax.tree.map(lambda x: x if np.ndim(x) >= 2 else None, tree)
    assert_relative_close(matrices(unstacked), matrices(ref_params), 2e-5)


def quick_config(arg, steps):
    import importlib.util

    from hf_fixtures import ROOT

    spec = importlib.util.spec_from_file_location(
        "quick_train_config", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    # The lr schedule must not depend on train.steps for a shorter run to be
    # the first half of a longer one.
    cfg.optim.schedule = "constant"
    cfg.train.update(steps=steps, checkpoint_every=2, export_hf=True)
    return cfg


def saved_state(workdir):
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
    step = mgr.latest_step()
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    return step, state


@pytest.mark.slow  # three runs of the real loop (~30 s on one core)
def test_quick_run_trains_checkpoints_resumes_exactly_and_exports_hf(tmp_path):
    """The real loop (what scripts/train.py runs): 4 steps straight, and 2
    steps then a resume to 4, with a projection refresh at step 2 right after
    the resume: the same checkpointed state, bit for bit."""
    from ftjax.models import from_pretrained
    from ftjax.train import train as train_run

    arg = "method=galore,rank=4,update_proj_gap=2"
    straight = train_run(quick_config(arg, 4), str(tmp_path / "straight"))
    train_run(quick_config(arg, 2), str(tmp_path / "resumed"))
    resumed = train_run(quick_config(arg, 4), str(tmp_path / "resumed"))
    assert resumed.summary["status"] == "completed"
    step, want = saved_state(str(tmp_path / "straight"))
    got_step, got = saved_state(str(tmp_path / "resumed"))
    assert step == got_step == 4
    leaves, ref = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(leaves) == len(ref)
    for a, b in zip(leaves, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(tmp_path / "resumed" / "metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2, 3, 4]
    # No PEFT files (there is no GaLore format); the merged HF weights are the trained ones.
    assert not (tmp_path / "straight" / "adapter").exists()
    _, exported = from_pretrained(str(tmp_path / "straight" / "hf"))
    for (path, x), (_, y) in zip(flatten_paths(exported), flatten_paths(straight.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
    base = dict(flatten_paths(straight.base_params))
    q = "model/layers_0/self_attn/q_proj/kernel"
    assert np.abs(np.asarray(dict(flatten_paths(straight.params))[q]) - base[q]).max() > 0


# ----------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_benchmark_reports_galore_state_in_closed_form():
    from ftjax import bench

    cfg = bench.BenchConfig(
        preset="tiny", batch=2, seq=16, steps=1, warmup=0, methods=("full", "galore"), rank=4,
        inference=False, peak_matmul=64, memory_preset="", isolate=False, torch=False,
        compile_options={"xla_backend_optimization_level": 0},
    )  # fmt: skip
    rows = {r["method"]: r for r in bench.run(cfg, log=lambda msg: None)["train"]}
    model = build_model(ModelConfig(**cfg.model_fields()))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    galore, adam = expected_state_size(params, 4)
    # float32 entries, plus int32 step counts (GaLore's, Adam's, the schedule's).
    assert rows["galore"]["state_bytes"]["opt_state"] == 4 * galore + 3 * 4
    assert rows["full"]["state_bytes"]["opt_state"] == 4 * adam + 2 * 4
    assert rows["galore"]["step_s"] > 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options, field",
    [
        ({"rank": 0}, "method.rank"),
        ({"rank": 2.5}, "method.rank"),
        ({"update_proj_gap": 0}, "method.update_proj_gap"),
        ({"scale": 0.0}, "method.scale"),
        ({"scale": "big"}, "method.scale"),
        ({"targets": 3}, "method.targets"),
        ({"alpha": 8}, "method.alpha"),
    ],
)
def test_bad_options_are_refused_by_name(options, field):
    with pytest.raises(PeftError, match=rf"^{field}\b"):
        peft.build_method({"name": "galore", **options})


@pytest.mark.parametrize("name", ["sgd", "lion", "adafactor"])
def test_other_optimizers_are_refused_naming_optim_name(name):
    optim = default_optim_config()
    optim.name = name
    with pytest.raises(ConfigError, match=rf"^optim\.name='{name}'.*expected optim\.name='adamw'"):
        galore_setup(optim=optim)


def test_targets_matching_nothing_are_refused_by_name():
    with pytest.raises(TargetError, match=r"^method\.targets"):
        galore_setup(targets=["no_such_proj"])


def test_no_adapter_format():
    spec = get("galore")
    assert spec.export is None and "full fine-tuning" in spec.no_export
