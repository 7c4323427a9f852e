"""Every registered method through the one train step: the same numbers on one
device and under each parallel mode (8 simulated CPU devices), scanned layers
the same as unrolled ones, and a checkpoint restored mid-run continuing
bit-identically. A method registered without an entry in `OPTIONS` fails
`test_every_method_is_covered`, so a new method cannot skip these checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_parallel import assert_relative_close, make_batch

from ftjax import peft
from ftjax.models import ModelConfig, build_model
from ftjax.models.hf import stack_layers
from ftjax.train import Parallel, StepConfig, build_optimizer, default_optim_config, init_state
from ftjax.train.checkpoint import Checkpointer

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4
)
STEPS = 2
# Small settings per method (the defaults where they are small already).
OPTIONS = {
    "full": {},
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "qlora": {"rank": 4, "quantize": "all-linear"},
    "bitfit": {},
    "freeze": {"last_layers": 1},
    "ia3": {},
    "vera": {"rank": 8},
    "loha": {"rank": 2},
    "lokr": {"rank": 2},
    "oft": {},
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "delta_t": 1},
    "galore": {"rank": 4, "update_proj_gap": 2},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3},
}
# Methods trained under the unrolled model only (their options address layers).
UNSCANNED_ONLY = {"freeze"}


def method_config(name):
    # Passed whole: an option the method does not have is refused, not dropped.
    return {"name": name, **OPTIONS[name]}


def setup(name, *, steps=10):
    """(model, method, tx, step config, state at step 0) as `build_run` makes them."""
    model = build_model(CFG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    method = peft.build_method(method_config(name))
    optim = default_optim_config()
    optim.lr, optim.weight_decay, optim.warmup_steps = 1e-2, 0.01, 1
    tx, schedule = build_optimizer(optim, steps, lr_scales=method.lr_scales())
    tx = method.optimizer(tx, schedule, steps, optim)
    step_cfg = StepConfig(penalty=method.penalty())
    return model, method, tx, step_cfg, init_state(params, method, tx, seed=0)


def train(par, state, first, last):
    losses = []
    for i in range(first, last):
        state, metrics = par.train_step(state, par.place_batch(make_batch(i)))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


def scanned(name):
    """`setup(name)` with the layers stacked for `nn.scan`: the same adapted
    weights (adapter inits drawn per layer), and the optimizer state of the
    stacked trainable tree."""
    _, _, tx, step_cfg, state = setup(name)
    cfg = CFG.replace(scan_layers=True)
    trainable, frozen = stack_layers(cfg, state.trainable), stack_layers(cfg, state.frozen)
    state = state._replace(trainable=trainable, frozen=frozen, opt_state=tx.init(trainable))
    return build_model(cfg), tx, step_cfg, state


def run(name, mode, *, scan=False):
    if scan:
        model, tx, step_cfg, state = scanned(name)
    else:
        model, _, tx, step_cfg, state = setup(name)
    par = Parallel(mode, model, tx, step_cfg)
    state, losses = train(par, par.place_state(state), 0, STEPS)
    return losses, jax.device_get(par.host_state(state).trainable)


def registered():
    return peft.known_methods()


def test_every_method_is_covered():
    missing = sorted(set(registered()) - set(OPTIONS))
    assert not missing, f"add test settings for {missing} to OPTIONS"


@pytest.fixture(scope="module")
def single():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run(name, "single")
        return cache[name]

    return get


@pytest.mark.parametrize("mode", ["data", "fsdp", "tensor", "pmap"])
@pytest.mark.parametrize("name", registered())
def test_every_mode_matches_one_device(single, name, mode):
    assert jax.device_count() == 8
    ref_losses, ref_params = single(name)
    assert ref_losses[0] != ref_losses[-1], "the method did not train"
    losses, params = run(name, mode)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_relative_close(params, ref_params, 2e-5)


@pytest.mark.parametrize("name", [n for n in registered() if n not in UNSCANNED_ONLY])
def test_scanned_layers_train_like_unrolled(single, name):
    ref_losses, _ = single(name)
    losses, _ = run(name, "single", scan=True)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.parametrize("name", registered())
def test_restored_checkpoint_continues_bit_identically(name, tmp_path):
    model, method, tx, step_cfg, state0 = setup(name)
    par = Parallel("fsdp", model, tx, step_cfg)
    straight, straight_losses = train(par, par.place_state(state0), 0, STEPS)
    # Interrupted after step 1: saved, restored into a fresh step-0 state, continued.
    first, _ = train(par, par.place_state(state0), 0, 1)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), {"method": name}, async_save=False)
    ckpt.save(first, force=True)
    ckpt.close()
    _, _, _, _, fresh = setup(name)
    reader = Checkpointer(str(tmp_path / "ckpt"), {"method": name}, read_only=True)
    restored, step = reader.restore_latest(par.place_state(fresh))
    assert step == 1
    resumed, resumed_losses = train(par, restored, 1, STEPS)
    np.testing.assert_array_equal(resumed_losses, straight_losses[1:])
    for a, b in zip(
        jax.tree.leaves(par.host_state(resumed)), jax.tree.leaves(par.host_state(straight))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
