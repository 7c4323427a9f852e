"""The chunked cross-entropy (`ftjax.train.loss`): the per-token formula
against a float64 reference; chunked sums and gradients against the dense
loss and an analytic float64 gradient (mask, label smoothing, z-loss, a
padded last chunk, tied/untied/LoRA heads); no full logits in the traced
program; `train_step`/`eval_step` with chunks equal to dense on tiny Llama and
GPT-2 models; the auto rule."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import peft
from ftjax.errors import ConfigError
from ftjax.models import ModelConfig, build_model
from ftjax.models.decoder import OutputHead, head_logits, output_head
from ftjax.peft.lora import LoraWeight
from ftjax.train import (
    StepConfig,
    build_optimizer,
    default_config,
    default_optim_config,
    eval_step,
    init_state,
    train_step,
)
from ftjax.train.config import validate_train_config
from ftjax.train.loss import (
    AUTO_CHUNK_BYTES,
    auto_loss_chunk,
    chunked_loss_sums,
    loss_sums,
    resolve_loss_chunk,
    token_losses,
)

B, T, D, V = 3, 10, 8, 37
SMOOTH, ZLOSS = 0.1, 1e-3


def problem(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    kernel = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    return hidden, kernel, targets, mask


def reference_losses(logits, targets, eps, z):
    """Per-token loss in float64 from its definition: cross-entropy against
    (1-eps) one-hot + eps/V uniform, plus z * (log Z)^2."""
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    logp = logits - log_z[..., None]
    nv = logits.shape[-1]
    onehot = np.eye(nv)[targets]
    target_dist = (1 - eps) * onehot + eps / nv
    return -np.sum(target_dist * logp, -1) + z * log_z**2, log_z, np.exp(logp), target_dist


def reference_sums_and_grads(hidden, kernel, targets, mask, eps, z):
    """(loss sum, correct count, d/d hidden, d/d kernel) in float64, the
    gradient written out: d loss / d logits = p - target_dist + 2 z log Z p."""
    h, w = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)
    logits = h @ w
    losses, log_z, p, target_dist = reference_losses(logits, targets, eps, z)
    correct = (logits.argmax(-1) == targets).astype(np.float64)
    dlogits = mask[..., None] * (p - target_dist + 2 * z * log_z[..., None] * p)
    return (
        np.sum(losses * mask),
        np.sum(correct * mask),
        dlogits @ w.T,
        np.einsum("btd,btv->dv", h, dlogits),
    )


def matmul_head(kernel, h, rng):
    return jnp.matmul(h, kernel)


# ----------------------------------------------------------------------------- formula


@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (SMOOTH, 0.0), (0.0, ZLOSS), (SMOOTH, ZLOSS)])
def test_token_losses_match_float64_definition(eps, z):
    hidden, kernel, targets, _ = problem()
    logits = 3.0 * hidden @ kernel
    got = token_losses(jnp.asarray(logits), jnp.asarray(targets), eps, z)
    # atol: log Z - z_t cancels logits of size ~30 (float32 eps ~ 2e-6 of them).
    ref = reference_losses(logits, targets, eps, z)[0]
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-5)


def test_token_losses_is_still_importable_from_step():
    from ftjax.train.step import token_losses as from_step

    assert from_step is token_losses


# ----------------------------------------------------------------------------- chunked = dense


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 16])  # 3, 4: a padded last chunk; 16 > T
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (SMOOTH, ZLOSS)])
def test_chunked_sums_and_grads_match_reference(chunk, eps, z):
    hidden, kernel, targets, mask = problem()

    def chunked(h, w):
        return chunked_loss_sums(
            matmul_head, w, h, targets, mask, chunk=chunk, label_smoothing=eps, z_loss=z
        )

    def dense(h, w):
        return loss_sums(jnp.matmul(h, w), targets, mask, eps, z)

    (loss, correct), grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(
        hidden, kernel
    )
    ref_loss, ref_correct, ref_dh, ref_dw = reference_sums_and_grads(
        hidden, kernel, targets, mask, eps, z
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert float(correct) == ref_correct
    np.testing.assert_allclose(grads[0], ref_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1], ref_dw, rtol=1e-4, atol=1e-5)
    # And the dense jax path, float32 against float32.
    (d_loss, d_correct), d_grads = jax.value_and_grad(dense, argnums=(0, 1), has_aux=True)(
        hidden, kernel
    )
    np.testing.assert_allclose(loss, d_loss, rtol=1e-6)
    assert float(correct) == float(d_correct)
    chex.assert_trees_all_close(grads, d_grads, rtol=1e-5, atol=1e-6)


def _model_case(kind):
    """(cfg, params) of a tiny model whose head is untied, tied, or GPT-2's."""
    cfg = {
        "untied": ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=16, num_heads=2,
                              num_kv_heads=2, num_layers=1),
        "tied": ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=16, num_heads=2,
                            num_kv_heads=2, num_layers=1, tie_word_embeddings=True),
        "gpt2": ModelConfig(model_type="gpt2", vocab_size=V, hidden_size=D, intermediate_size=16,
                            num_heads=2, num_kv_heads=2, num_layers=1, norm_eps=1e-5),
    }[kind]  # fmt: skip
    params = build_model(cfg).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    return cfg, params


@pytest.mark.parametrize("kind", ["untied", "tied", "gpt2"])
def test_return_hidden_then_head_logits_is_the_model(kind):
    cfg, params = _model_case(kind)
    model = build_model(cfg)
    ids = jnp.asarray(problem()[2])
    logits = model.apply({"params": params}, ids)
    hidden = model.apply({"params": params}, ids, return_hidden=True)
    assert hidden.shape == (B, T, D)
    head = output_head(cfg, params)
    assert head.tied == (kind != "untied")
    np.testing.assert_array_equal(head_logits(cfg, head, hidden), logits)
    with pytest.raises(ValueError, match="without a KV cache"):
        from ftjax.models import init_kv_cache

        model.apply({"params": params}, ids, cache=init_kv_cache(cfg, B, T), return_hidden=True)


def _lora_head(kernel, seed=2):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(D, 4)).astype(np.float32)
    b = rng.normal(size=(4, V)).astype(np.float32)
    return LoraWeight(jnp.asarray(kernel), jnp.asarray(a), jnp.asarray(b), scale=0.5)


@pytest.mark.parametrize("kind", ["untied", "tied", "gpt2", "lora"])
def test_chunked_head_grads_match_dense(kind):
    """Through `head_logits` as the step uses it: gradients w.r.t. the hidden
    states and every child of the head leaf (LoRA's a and b too)."""
    cfg, params = _model_case("untied" if kind == "lora" else kind)
    hidden, _, targets, mask = problem(3)
    weight = output_head(cfg, params).weight
    if kind == "lora":
        weight = _lora_head(weight)
    tied = kind in ("tied", "gpt2")
    fn = lambda w, h, rng: head_logits(cfg, OutputHead(w, tied), h, rng=rng)

    def chunked(h, w):
        return chunked_loss_sums(fn, w, h, targets, mask, chunk=4, label_smoothing=SMOOTH,
                                 z_loss=ZLOSS)  # fmt: skip

    def dense(h, w):
        return loss_sums(fn(w, h, None), targets, mask, SMOOTH, ZLOSS)

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, weight)
    (loss, correct), grads = grad(chunked)
    (d_loss, d_correct), d_grads = grad(dense)
    np.testing.assert_allclose(loss, d_loss, rtol=1e-6)
    assert float(correct) == float(d_correct)
    chex.assert_trees_all_close(grads, d_grads, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads[1].b if kind == "lora" else grads[1]).sum()) > 0


def test_the_traced_step_holds_no_full_logits():
    """No array of the forward or backward program is as large as the
    (batch, seq, vocab) logits: without `jax.checkpoint`, the scan would stack
    every chunk's logits as residuals, which this catches."""
    b, t, d, v, chunk = 2, 64, 8, 97, 8
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.float32)

    def loss(h, w):
        return chunked_loss_sums(matmul_head, w, h, targets, mask, chunk=chunk)[0]

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, kernel)
    sizes = []

    def walk(jp):
        for eqn in jp.eqns:
            sizes.extend(int(np.prod(var.aval.shape)) for var in eqn.outvars)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert max(sizes) >= b * chunk * v  # the chunk's logits are there ...
    assert max(sizes) < b * t * v  # ... and nothing the size of all of them


# ----------------------------------------------------------------------------- the auto rule


def test_auto_rule_keeps_tiny_models_dense_and_chunks_large_vocabularies():
    tiny = ModelConfig()
    assert tiny.vocab_size == 256
    assert resolve_loss_chunk(-1, 512, tiny.vocab_size) == 0
    assert auto_loss_chunk(512, 50257) == 256  # GPT-2 at 512 tokens: 103 MB of logits a row
    chunk = resolve_loss_chunk(-1, 4096, 128256)  # Llama 3
    assert chunk == 128 and chunk * 128256 * 4 <= AUTO_CHUNK_BYTES < 2 * chunk * 128256 * 4
    # At the threshold: dense; one position more: chunked.
    rows = AUTO_CHUNK_BYTES // (4 * 1024)
    assert auto_loss_chunk(rows, 1024) == 0 and auto_loss_chunk(rows + 1, 1024) == rows
    assert resolve_loss_chunk(0, 4096, 128256) == 0
    assert resolve_loss_chunk(100, 4096, 128256) == 100
    assert resolve_loss_chunk(8192, 4096, 128256) == 4096
    # A family that cannot return hidden states: auto stays dense, N > 0 is refused.
    assert resolve_loss_chunk(-1, 4096, 128256, supported=False) == 0
    with pytest.raises(ConfigError, match="train.loss_chunk=64: the model family"):
        resolve_loss_chunk(64, 4096, 128256, supported=False)
    with pytest.raises(ConfigError, match=r"train.loss_chunk=-2; expected -1 \(auto\)"):
        resolve_loss_chunk(-2, 4096, 128256)


def test_config_field_defaults_to_auto_and_is_validated():
    cfg = default_config()
    assert cfg.train.loss_chunk == -1
    validate_train_config(cfg.train)
    cfg.train.loss_chunk = -3
    with pytest.raises(ConfigError, match=r"train.loss_chunk=-3; expected -1 \(auto\)"):
        validate_train_config(cfg.train)
    wrong_type = ml_collections.ConfigDict({**cfg.train.to_dict(), "loss_chunk": 1.5})
    with pytest.raises(ConfigError, match="train.loss_chunk=1.5; expected an integer"):
        validate_train_config(wrong_type)


# ----------------------------------------------------------------------------- the step


def step_batch(vocab, rows=4, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    lengths = seq - rng.integers(0, 4, rows)
    valid = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": (valid * rng.integers(0, 2, (rows, seq))).astype(np.float32),
        "attention_mask": valid,
    }


STEP_CASES = {
    # name: (model_type, tie, method, accum)
    "llama-full": ("llama", False, {"name": "full"}, 1),
    "llama-tied-full-accum": ("llama", True, {"name": "full"}, 2),
    "llama-lora-head-accum": (
        "llama", False, {"name": "lora", "rank": 4, "targets": ["q_proj", "v_proj", "lm_head"]}, 2,
    ),
    "gpt2-full-accum": ("gpt2", True, {"name": "full"}, 2),
}  # fmt: skip


def _step_setup(case):
    model_type, tie, method, accum = STEP_CASES[case]
    cfg = ModelConfig(model_type=model_type, vocab_size=61, hidden_size=16, intermediate_size=32,
                      num_layers=2, num_heads=2, num_kv_heads=2, tie_word_embeddings=tie,
                      norm_eps=1e-5)  # fmt: skip
    model = build_model(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    optim = default_optim_config()
    optim.lr, optim.warmup_steps, optim.accum_steps = 1e-2, 1, accum
    tx, _ = build_optimizer(optim, 10)
    # LoRA starts with b = 0; the second step sees the head adapter's update.
    state = init_state(params, peft.build_method(method), tx, seed=0)
    return cfg, model, tx, state, accum


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_train_step_chunked_equals_dense(case):
    cfg, model, tx, state, accum = _step_setup(case)

    def run(chunk):
        step_cfg = StepConfig(accum_steps=accum, label_smoothing=SMOOTH, z_loss=ZLOSS,
                              loss_chunk=chunk)  # fmt: skip
        step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, cfg=step_cfg))
        s, out = state, []
        for i in range(2):
            s, metrics = step(s, step_batch(cfg.vocab_size, seed=i))
            out.append(metrics)
        return s, out

    dense_state, dense = run(0)
    chunk_state, chunked = run(5)  # 12 positions: chunks of 5, 5 and 2 + 3 padded
    for m, d in zip(chunked, dense):
        np.testing.assert_allclose(m["loss"], d["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], d["grad_norm"], rtol=1e-4)
        np.testing.assert_allclose(m["token_accuracy"], d["token_accuracy"], rtol=1e-6)
    assert float(dense[0]["loss"]) != float(dense[1]["loss"])
    chex.assert_trees_all_close(chunk_state.trainable, dense_state.trainable, rtol=1e-4,
                                atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("case", ["llama-tied-full-accum", "gpt2-full-accum"])
def test_eval_step_chunked_equals_dense(case):
    cfg, model, _, state, _ = _step_setup(case)
    batch = step_batch(cfg.vocab_size, seed=5)
    sums = lambda chunk: eval_step(state.trainable, state.frozen, batch, model=model,
                                   loss_chunk=chunk)  # fmt: skip
    dense, chunked = sums(0), sums(5)
    np.testing.assert_allclose(chunked["loss_sum"], dense["loss_sum"], rtol=1e-6)
    assert float(chunked["correct_sum"]) == float(dense["correct_sum"])
    assert float(chunked["count"]) == float(dense["count"]) == batch["loss_mask"].sum()


@pytest.mark.parametrize("mode", ["fsdp", pytest.param("tensor", marks=pytest.mark.slow), "pmap"])
def test_chunked_step_under_parallel_modes_equals_dense_single_device(mode):
    """The chunks keep the batch axis whole, so a batch sharded over 8
    devices (jit over a mesh, or pmap with psum) gives the dense numbers."""
    from ftjax.train import Parallel

    cfg, model, tx, state, accum = _step_setup("llama-tied-full-accum")
    state = jax.device_get(state)  # host copies: each run donates its placed state

    def run(mode, chunk):
        par = Parallel(mode, model, tx, StepConfig(accum_steps=accum, loss_chunk=chunk))
        s = par.place_state(state)
        s, metrics = par.train_step(s, par.place_batch(step_batch(cfg.vocab_size, rows=16)))
        return float(metrics["loss"]), jax.device_get(par.host_state(s).trainable)

    ref_loss, ref_params = run("single", 0)
    loss, params = run(mode, 5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-6)
