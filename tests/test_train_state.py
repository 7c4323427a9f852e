"""The one state builder (`ftjax.train.state`): the seed convention a
bit-identical resume relies on, a rebuild equal to the first build, and the
counts and bytes it reports."""

import chex
import jax
import ml_collections
import numpy as np
import pytest

from ftjax import peft
from ftjax.train import build_run, default_config, init_state, seed_keys, state_info

INIT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=4)  # fmt: skip
LORA = {"name": "lora", "rank": 4, "alpha": 8.0, "targets": "qv"}


def run_config(method=LORA, seed=0):
    cfg = default_config()
    cfg.model.init.update(INIT)
    cfg.method = ml_collections.ConfigDict(method)
    cfg.train.seed = seed
    return cfg


def lora_a(state):
    return np.asarray(state.trainable["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].a)


def test_seed_convention_is_pinned():
    """Existing checkpoints resume only if the keys of a seed never change."""
    keys = seed_keys(3)
    data = lambda k: np.asarray(jax.random.key_data(k))
    np.testing.assert_array_equal(data(keys.init), data(jax.random.key(3)))
    method, train = jax.random.split(jax.random.key(4))
    np.testing.assert_array_equal(data(keys.method), data(method))
    np.testing.assert_array_equal(data(keys.train), data(train))


def test_rebuild_is_bit_identical_and_the_seed_matters():
    first, again = build_run(run_config()), build_run(run_config())
    chex.assert_trees_all_equal(first.state, again.state)
    assert first.identity == again.identity
    assert first.identity["base"] == {"source": "random-init", "seed": 0}
    other = build_run(run_config(seed=1))
    assert not np.array_equal(lora_a(first.state), lora_a(other.state))
    assert other.identity["base"] != first.identity["base"]


def test_state_starts_at_zero_with_separate_counters():
    state = build_run(run_config()).state
    assert int(state.step) == 0 and int(state.skipped) == 0
    # Two buffers: the state is donated to each step, and a buffer is donated once.
    assert state.step is not state.skipped


def test_jitted_build_equals_eager_build():
    """The bench compiles the builder; the trainer runs it eagerly."""
    start = build_run(run_config())
    build = lambda base: init_state(base, start.method, start.tx, seed=0)
    chex.assert_trees_all_close(jax.jit(build)(start.base_params), start.state, atol=1e-6)


@pytest.mark.parametrize("method", [{"name": "full"}, LORA])
def test_state_info_counts_and_bytes(method):
    start = build_run(run_config(method))
    info = state_info(start.state, start.method)
    h, inter, vocab, layers = INIT["hidden_size"], INIT["intermediate_size"], 64, 2
    if method["name"] == "lora":  # q and v: (h x r) + (r x h) each, per layer
        assert info.n_trainable == layers * 2 * 2 * h * LORA["rank"]
        assert info.nbytes["trainable"] == 4 * info.n_trainable
    else:
        assert info.n_trainable == info.n_total
        assert info.nbytes["frozen"] == 0
    # AdamW: two moments per trainable weight (+ scalar counters), nothing for frozen ones.
    assert (
        2 * info.nbytes["trainable"] <= info.nbytes["opt_state"] < 2 * info.nbytes["trainable"] + 64
    )
    b = info.nbytes
    assert info.train_state_bytes == 2 * b["trainable"] + b["frozen"] + b["opt_state"]
    # Every projection and the untied output head are matmuls; the embedding is not.
    per_layer = 4 * h * h + 3 * h * inter
    assert info.n_matmul == layers * per_layer + h * vocab
    assert info.n_total == peft.count(peft.combine(start.state.trainable, start.state.frozen))[1]
