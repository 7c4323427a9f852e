"""LoRA+ (`loraplus_ratio`, Hayou et al. 2024) and LoRA-FA (`fa`, Zhang et al.
2023) as LoRA options: one step of the real train step equals a step of PEFT's
own LoRA+ optimizer (`peft.optimizers.create_loraplus_optimizer`) in PyTorch,
with SGD and AdamW; b's update is exactly `ratio` times the plain one and a's
is unchanged; with `fa`, a stays bit-identical while b trains, and has no
gradient or optimizer state; both export as ordinary LoRA that PEFT loads
with the same logits."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import ROOT, VOCAB, torch_base, torch_logits
from peft.optimizers import create_loraplus_optimizer

from ftjax import peft
from ftjax.models import from_pretrained
from ftjax.peft import peft_format, registry
from ftjax.peft.base import flatten_paths
from ftjax.train import StepConfig, TrainState, build_optimizer, default_optim_config, train_step

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
BATCH = {
    "input_ids": IDS[:, :-1],
    "targets": IDS[:, 1:],
    "loss_mask": np.ones(IDS[:, 1:].shape, np.float32),
}
TOL = 1e-4
LR = 1e-2


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    path = tiny_checkpoint("llama2")
    model, base = from_pretrained(path)
    return path, model, base


def perturb(params, seed=0):
    """Trained-looking adapters: b away from zero, so that a gets a gradient too."""
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, peft.LoraWeight):
            return x
        return x.replace(b=jnp.asarray(0.3 * rng.normal(size=x.b.shape), x.b.dtype))

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


def optimizer(name, method, **changes):
    optim = default_optim_config()
    optim.update(name=name, lr=LR, schedule="constant", clip_norm=0.0, momentum=0.0, **changes)
    return build_optimizer(optim, 10, lr_scales=method.lr_scales())[0]


def run_steps(model, method, params, tx, steps=1):
    trainable, frozen = method.split(params)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
                       jax.random.key_data(jax.random.key(0)), jnp.zeros((), jnp.int32))  # fmt: skip
    step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, cfg=StepConfig()))
    for _ in range(steps):
        state, _ = step(state, BATCH)
    return state, peft.combine(state.trainable, state.frozen)


def lora_tensors(model, params) -> dict[str, np.ndarray]:
    """PEFT-named `lora_A` / `lora_B` tensors of the LoRA leaves of `params`."""
    return peft_format.adapter_state(model.cfg, params)[1]


def test_options_are_typed_checked_and_labelled():
    method = registry.build_method(
        {"name": "lora", **registry.parse_options("lora", {"loraplus_ratio": "16", "fa": "1"})}
    )
    assert (method.config["loraplus_ratio"], method.config["fa"]) == (16.0, True)
    assert method.lr_scales() == {"b": 16.0}
    assert registry.label(method.config) == "lora r=8 qv lora+16 fa"
    assert peft.build_method("lora").lr_scales() == {}
    assert peft.build_method({"name": "dora", "loraplus_ratio": 4}).lr_scales() == {"b": 4.0}
    with pytest.raises(peft.PeftError, match=r"method.loraplus_ratio: must be a positive number"):
        peft.build_method({"name": "lora", "loraplus_ratio": 0})
    with pytest.raises(peft.PeftError, match=r"method.fa='maybe': 'maybe' is not a boolean"):
        registry.parse_options("lora", {"fa": "maybe"})
    # Off (ratio 1), the optimizer and its state are exactly what they were.
    tx_plain = build_optimizer(default_optim_config(), 10)[0]
    tx_off = build_optimizer(default_optim_config(), 10, lr_scales={"b": 1.0})[0]
    params = {"k": peft.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)))}
    assert jax.tree.structure(tx_off.init(params)) == jax.tree.structure(tx_plain.init(params))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_loraplus_step_equals_peft_loraplus_optimizer(llama, tmp_path, opt):
    path, model, base = llama
    ratio = 16.0
    method = peft.build_method({"name": "lora", "rank": 4, "alpha": 8, "targets": "attention",
                                "loraplus_ratio": ratio})  # fmt: skip
    plain = peft.build_method({"name": "lora", "rank": 4, "alpha": 8, "targets": "attention"})
    params = perturb(method.apply(base, jax.random.key(0)))
    peft.save_adapter(model.cfg, params, str(tmp_path), method=method)
    before = lora_tensors(model, params)

    _, stepped = run_steps(model, method, params, optimizer(opt, method))
    _, stepped_plain = run_steps(model, plain, params, optimizer(opt, plain))
    ours, ours_plain = lora_tensors(model, stepped), lora_tensors(model, stepped_plain)

    # PyTorch: PEFT's LoRA+ optimizer (B at ratio x lr), one step on the same batch.
    peft_model = torch_peft.PeftModel.from_pretrained(
        torch_base(path), str(tmp_path), is_trainable=True
    )
    cls, kwargs = (torch.optim.SGD, {}) if opt == "sgd" else (torch.optim.AdamW, {"eps": 1e-8})
    torch_opt = create_loraplus_optimizer(peft_model, cls, lr=LR, loraplus_lr_ratio=ratio, **kwargs)
    out = peft_model(torch.tensor(BATCH["input_ids"])).logits
    loss = torch.nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), torch.tensor(BATCH["targets"]).reshape(-1)
    )
    loss.backward()
    torch_opt.step()
    theirs = {
        k: v.detach().numpy() for k, v in torch_peft.get_peft_model_state_dict(peft_model).items()
    }
    assert set(theirs) == set(ours) == set(before)
    for key in before:
        delta, delta_plain = ours[key] - before[key], ours_plain[key] - before[key]
        delta_torch = theirs[key] - before[key]
        scale = np.abs(delta_torch).max()
        assert scale > 0, key  # both factors move
        np.testing.assert_allclose(delta, delta_torch, rtol=1e-3, atol=1e-3 * scale, err_msg=key)
        # (Two compiled programs: their gradients agree to float32 rounding.)
        if key.endswith("lora_B.weight"):  # B: `ratio` times the plain update
            np.testing.assert_allclose(delta, ratio * delta_plain, rtol=1e-3, atol=1e-3 * scale)
        else:  # A: the plain update
            np.testing.assert_allclose(delta, delta_plain, rtol=1e-3, atol=1e-3 * scale)
    if opt == "adamw":  # Adam's first step is -lr * g / (|g| + eps): about lr per entry
        b_key = next(k for k in before if k.endswith("lora_B.weight"))
        assert np.abs(ours[b_key] - before[b_key]).max() == pytest.approx(ratio * LR, rel=1e-3)


def test_lora_fa_freezes_a_and_trains_b(llama, tmp_path):
    path, model, base = llama
    config = {"name": "lora", "rank": 4, "alpha": 8, "targets": "qv", "fa": True,
              "loraplus_ratio": 4.0}  # fmt: skip
    method = peft.build_method(config)
    params = method.apply(base, jax.random.key(0))
    trainable, frozen = method.split(params)
    leaves = [x for _, x in flatten_paths(trainable) if peft.is_leaf(x)]
    assert leaves and all(x.a is None and x.b is not None for x in leaves)
    # Only b trains: rank x out per adapted kernel (q and v: 32 outputs each, 2 layers).
    assert method.count(params)[0] == 2 * (4 * 32 + 4 * 32)
    tx = optimizer("adamw", method, weight_decay=0.1)  # decay would move a, were it trained
    assert {x.shape for x in jax.tree.leaves(tx.init(trainable))} <= {(), (4, 32)}

    _, trained = run_steps(model, method, params, tx, steps=3)
    start, end = dict(flatten_paths(params)), dict(flatten_paths(trained))
    for path_, leaf in start.items():
        if isinstance(leaf, peft.LoraWeight):
            np.testing.assert_array_equal(np.asarray(end[path_].a), np.asarray(leaf.a))
            assert np.abs(np.asarray(end[path_].b)).max() > 0  # b moved from zero

    # The trained adapter is an ordinary LoRA to PEFT, with the same logits.
    written = peft.save_adapter(model.cfg, trained, str(tmp_path), method=method)
    assert (written["peft_type"], written["r"], written["lora_alpha"]) == ("LORA", 4, 8.0)
    assert not written["use_dora"] and written["target_modules"] == ["q_proj", "v_proj"]
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    ours = np.asarray(jax.jit(lambda p: model.apply({"params": p}, IDS))(trained))
    diff = float(np.abs(torch_logits(peft_model, IDS) - ours).max())
    print(f"\nLoRA-FA + LoRA+ ftjax -> peft: max |logit diff| = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.slow
def test_quick_run_with_lora_plus_and_fa(tmp_path):
    from ftjax.train import seed_keys, train

    spec = importlib.util.spec_from_file_location(
        "quick_train_config", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("method=lora,rank=4,fa=1,loraplus_ratio=16")
    assert cfg.method.loraplus_ratio == 16.0 and cfg.method.fa is True
    cfg.train.steps = 3
    result = train(cfg, str(tmp_path / "run"))

    m, r = cfg.model.init, 4
    kv = m.num_kv_heads * m.hidden_size // m.num_heads
    # The study preset adapts all linear layers: b is r x out for each of them.
    outs = 2 * m.hidden_size + 2 * kv + 2 * m.intermediate_size + m.hidden_size
    assert cfg.method.targets == "all-linear"
    assert result.summary["trainable_params"] == m.num_layers * r * outs
    initial = peft.build_method(cfg.method).apply(
        result.base_params, seed_keys(cfg.train.seed).method
    )
    start, end = dict(flatten_paths(initial)), dict(flatten_paths(result.params))
    for path, leaf in start.items():
        if isinstance(leaf, peft.LoraWeight):
            np.testing.assert_array_equal(np.asarray(end[path].a), np.asarray(leaf.a))
            assert np.abs(np.asarray(end[path].b)).max() > 0
    config, _ = peft.read_adapter(str(tmp_path / "run" / "adapter"))
    assert config["peft_type"] == "LORA" and config["r"] == r
