"""One train step, every parallel mode: same numbers on 8 simulated CPU devices;
gradient accumulation; no optimizer state for frozen weights; bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import peft
from ftjax.models import ModelConfig, build_model
from ftjax.train import Parallel, StepConfig, build_optimizer, default_optim_config, init_state
from ftjax.train.optim import ConfigError

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4
)
METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "rank": 4, "targets": "all-linear"}}
# Every check runs with LoRA in the fast subset, with full fine-tuning in the slow one.
METHOD_PARAMS = [pytest.param("full", marks=pytest.mark.slow), "lora"]


def make_batch(step, rows=8, seq=16):
    rng = np.random.default_rng(step)
    ids = rng.integers(0, CFG.vocab_size, (rows, seq)).astype(np.int32)
    lengths = seq - rng.integers(0, 5, rows)  # ragged right padding
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": (mask * rng.integers(0, 2, (rows, seq))).astype(np.float32),
        "attention_mask": mask,
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
        "segment_ids": mask.copy(),
    }


def initial_state(method_name, accum=1, *, model_cfg=CFG, optim=None, steps=10):
    """(model, tx, state at step 0), the state from the trainer's own builder."""
    model = build_model(model_cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    if optim is None:
        optim = default_optim_config()
        optim.lr, optim.weight_decay, optim.accum_steps, optim.warmup_steps = 1e-2, 0.01, accum, 1
    tx, _ = build_optimizer(optim, steps)
    return model, tx, init_state(params, peft.build_method(METHODS[method_name]), tx, seed=0)


def run(method_name, mode, steps=3, accum=1, batches=None, offload=False):
    model, tx, state = initial_state(method_name, accum)
    par = Parallel(mode, model, tx, StepConfig(accum_steps=accum), offload_optimizer=offload)
    state = par.place_state(state)
    losses = []
    for i in range(steps):
        batch = make_batch(i) if batches is None else batches[i]
        state, metrics = par.train_step(state, par.place_batch(batch))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(par.host_state(state).trainable)


def assert_relative_close(tree, ref, tol):
    """Per array, ||x - ref|| <= tol * ||ref||: Adam's normalized updates turn
    float reassociation between layouts into element-wise noise near zero, so
    the norm is the meaningful measure of "the same parameters"."""
    chex.assert_trees_all_equal_structs(tree, ref)
    for x, r in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
        x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
        assert np.linalg.norm(x - r) <= tol * max(np.linalg.norm(r), 1e-12), np.linalg.norm(
            x - r
        ) / np.linalg.norm(r)


@pytest.fixture(scope="module", autouse=True)
def causal_block_attention():
    """Training-length sequences take the causal block attention; these
    16-token batches take it too, so every mode is compared on that path."""
    from ftjax.models import layers

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers, "CAUSAL_BLOCK_MIN", 4)
        yield


@pytest.fixture(scope="module", params=METHOD_PARAMS)
def reference(request):
    return request.param, run(request.param, "single")


@pytest.mark.parametrize("mode", ["data", "fsdp", "tensor", "pmap"])
def test_modes_match_single_device(reference, mode):
    assert jax.device_count() == 8
    method_name, (ref_losses, ref_params) = reference
    losses, params = run(method_name, mode)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_relative_close(params, ref_params, 1e-5)
    # The parameters moved, so the equality above is not the trivial one.
    assert losses[0] != losses[-1]


@pytest.mark.parametrize("mode", ["single", "fsdp"])
def test_optimizer_state_offloaded_to_host_trains_identically(reference, mode):
    method_name, (ref_losses, ref_params) = reference
    losses, params = run(method_name, mode, offload=True)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_relative_close(params, ref_params, 1e-5)
    # Between steps the moments really are in host memory.
    model, tx, state = initial_state(method_name)
    par = Parallel(mode, model, tx, StepConfig(), offload_optimizer=True)
    state, _ = par.train_step(par.place_state(state), par.place_batch(make_batch(0)))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    assert kinds == {"pinned_host"}
    assert state.trainable and all(
        x.sharding.memory_kind == "device" for x in jax.tree.leaves(state.trainable)
    )


def test_offloaded_optimizer_refused_under_pmap():
    model, tx, _ = initial_state("lora")
    with pytest.raises(ConfigError, match="offload_optimizer"):
        Parallel("pmap", model, tx, StepConfig(), offload_optimizer=True)


def test_fsdp_and_tensor_actually_shard():
    model, tx, state = initial_state("full")
    for mode, axis in (("fsdp", "data"), ("tensor", "model")):
        par = Parallel(mode, model, tx, StepConfig())
        placed = par.place_state(state)
        q = placed.trainable["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert axis in str(q.sharding.spec), (mode, q.sharding)
        assert q.addressable_shards[0].data.size < q.size


@pytest.mark.parametrize("method_name", METHOD_PARAMS)
def test_gradient_accumulation_equals_large_batch(method_name):
    big = make_batch(0, rows=8)
    one, p1 = run(method_name, "single", steps=1, accum=1, batches=[big])
    four, p4 = run(method_name, "single", steps=1, accum=4, batches=[big])
    np.testing.assert_allclose(four, one, rtol=1e-6)
    assert_relative_close(p4, p1, 1e-5)


def test_lora_has_no_optimizer_state_for_frozen_weights():
    _, tx, state = initial_state("lora")
    trainable_bytes = peft.nbytes(state.trainable)
    # AdamW keeps two moments per trainable array, plus scalar step counters.
    moment_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moment_bytes == 2 * trainable_bytes
    frozen_bytes = peft.nbytes(state.frozen)
    assert frozen_bytes > 4 * trainable_bytes
    # No frozen array appears anywhere in the optimizer state or gradients.
    trainable_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state.trainable))
    opt_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert opt_shapes == sorted(trainable_shapes * 2)
    for kernel in ("q_proj", "down_proj"):
        leaf = state.trainable["model"]["layers_0"]["self_attn" if kernel == "q_proj" else "mlp"][
            kernel
        ]["kernel"]
        assert leaf.w is None and leaf.a is not None


def test_nan_guard_skips_the_update():
    model, tx, state = initial_state("full")
    par = Parallel("single", model, tx, StepConfig())
    state = par.place_state(state)
    before = jax.device_get(state.trainable)
    bad = jax.tree.map(lambda x: x, state)
    bad = bad._replace(
        trainable=jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 2 else x, bad.trainable)
    )
    bad_before = jax.device_get(bad.trainable)
    new, metrics = par.train_step(bad, par.place_batch(make_batch(0)))
    assert int(metrics["skipped"]) == 1
    chex.assert_trees_all_equal(jax.device_get(new.trainable), bad_before)
    del before


def test_bad_optimizer_and_mode_and_batch():
    ocfg = default_optim_config()
    ocfg.name = "adam_typo"
    with pytest.raises(ConfigError, match=r"optim\.name='adam_typo'; expected one of adamw"):
        build_optimizer(ocfg, 10)
    model, tx, _ = initial_state("full")
    with pytest.raises(ValueError, match=r"parallel\.mode='ddp'; expected one of single"):
        Parallel("ddp", model, tx, StepConfig())
    with pytest.raises(ValueError, match=r"data\.batch_size=12 .*not divisible by the 8"):
        Parallel("data", model, tx, StepConfig()).check_batch_size(12)


@pytest.mark.parametrize("name", ["adafactor", "lion", "sgd"])
def test_other_optimizers_reduce_loss(name):
    ocfg = default_optim_config()
    ocfg.name, ocfg.lr = name, {"adafactor": 1e-2, "lion": 1e-3, "sgd": 0.5}[name]
    model, tx, state = initial_state("full", optim=ocfg, steps=20)
    par = Parallel("single", model, tx, StepConfig())
    state = par.place_state(state)
    batch = par.place_batch(make_batch(0))
    losses = []
    for _ in range(8):
        state, m = par.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.slow
def test_mixed_precision_keeps_fp32_master_weights():
    cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
    model, tx, state = initial_state("full", model_cfg=cfg, optim=default_optim_config())
    par = Parallel("single", model, tx, StepConfig())
    state = par.place_state(state)
    batch = par.place_batch(make_batch(0))
    losses = []
    for _ in range(4):
        state, m = par.train_step(state, batch)
        losses.append(float(m["loss"]))
    dtypes = {x.dtype for x in jax.tree.leaves((state.trainable, state.opt_state)) if x.ndim}
    assert dtypes == {jnp.dtype("float32")}
    # The forward really runs in bf16: its logits differ from an fp32 forward.
    p = jax.device_get(state.trainable)
    ids = make_batch(0)["input_ids"]
    lo = build_model(cfg).apply({"params": p}, ids)
    hi = build_model(cfg.replace(dtype="float32")).apply({"params": p}, ids)
    assert 1e-4 < float(jnp.abs(lo - hi).max()) < 0.5
    assert losses[-1] < losses[0]
