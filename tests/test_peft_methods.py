"""The method registry on abstract params (`jax.eval_shape`, no weights):
presets for the Llama family and GPT-2, what each method trains and its
closed-form count, adapter extraction and reinsertion, and the bad-input
errors (one line, naming the field)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import peft
from ftjax.models import ModelConfig, build_model, stack_layers

LLAMA = ModelConfig(
    vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2
)
QWEN2 = LLAMA.replace(model_type="qwen2", attention_bias=True)
GPT2 = ModelConfig(
    model_type="gpt2",
    vocab_size=50,
    hidden_size=32,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    max_position_embeddings=16,
    hidden_act="gelu_new",
    tie_word_embeddings=True,
)
IDS = np.zeros((1, 4), np.int32)


def shapes(cfg):
    return jax.eval_shape(build_model(cfg).init, jax.random.key(0), IDS)["params"]


def stacked(cfg):
    return jax.eval_shape(lambda p: stack_layers(cfg, p), shapes(cfg))


def adapted(cfg, config):
    method = peft.build_method(config)
    return method, jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), shapes(cfg))


def adapted_paths(params):
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=peft.is_leaf)[0]
    return sorted(
        "/".join(str(k.key) for k in kp) for kp, x in flat if isinstance(x, peft.LoraWeight)
    )


@pytest.mark.parametrize(
    "cfg, preset, modules",
    [
        (LLAMA, "qv", ["self_attn/q_proj", "self_attn/v_proj"]),
        (LLAMA, "attention", ["self_attn/k_proj", "self_attn/o_proj", "self_attn/q_proj", "self_attn/v_proj"]),
        (LLAMA, "mlp", ["mlp/down_proj", "mlp/gate_proj", "mlp/up_proj"]),
        (GPT2, "qv", ["attn/c_attn"]),
        (GPT2, "attention", ["attn/c_attn", "attn/c_proj"]),
        (GPT2, "mlp", ["mlp/c_fc", "mlp/c_proj"]),
        (GPT2, "all-linear", ["attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"]),
    ],
)  # fmt: skip
def test_presets(cfg, preset, modules):
    _, params = adapted(cfg, {"name": "lora", "rank": 2, "targets": preset})
    container, layer = ("transformer", "h") if cfg.model_type == "gpt2" else ("model", "layers")
    want = sorted(
        f"{container}/{layer}_{i}/{m}/kernel" for i in range(cfg.num_layers) for m in modules
    )
    assert adapted_paths(params) == want


def test_all_linear_excludes_embedding_and_head_and_regex_and_lists_select():
    _, params = adapted(LLAMA, {"name": "lora", "rank": 2, "targets": "all-linear"})
    assert len(adapted_paths(params)) == 7 * 3
    assert not isinstance(params["lm_head"]["kernel"], peft.LoraWeight)
    _, params = adapted(LLAMA, {"name": "lora", "rank": 2, "targets": r"layers_2/.*(up|down)_proj"})
    assert adapted_paths(params) == [
        "model/layers_2/mlp/down_proj/kernel",
        "model/layers_2/mlp/up_proj/kernel",
    ]
    _, params = adapted(LLAMA, {"name": "lora", "rank": 2, "targets": ["o_proj", "lm_head"]})
    assert len(adapted_paths(params)) == 3 + 1


def test_lora_count_closed_form_and_scan():
    method, params = adapted(LLAMA, {"name": "lora", "rank": 4, "targets": "qv"})
    per_layer = 4 * (32 + 32) + 4 * (32 + 16)  # q: 32->32, v: 32->16
    base_total = peft.count(shapes(LLAMA))[1]
    assert method.count(params) == (3 * per_layer, base_total + 3 * per_layer)
    assert peft.count(params) == method.count(params)  # split's inference: adapters train
    scanned = jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), stacked(LLAMA))
    leaf = scanned["model"]["layers"]["self_attn"]["v_proj"]["kernel"]
    assert (leaf.a.shape, leaf.b.shape) == ((3, 32, 4), (3, 4, 16))
    assert method.count(scanned) == method.count(params)


def test_full_bitfit_freeze_select_what_they_say():
    params = shapes(LLAMA)
    total = peft.count(params)[1]
    full = peft.build_method(ml_collections.ConfigDict({"name": "full"}))
    assert full.count(params) == (total, total) == peft.count(params)
    # Bias-free Llama: BitFit trains the norm scales (2 per layer and the final one).
    bitfit = peft.build_method({"name": "bitfit"})
    assert bitfit.count(params) == ((2 * 3 + 1) * 32, total)
    # Qwen2 has q/k/v biases: only those train.
    qwen = shapes(QWEN2)
    trainable, _ = bitfit.split(qwen)
    leaves = jax.tree_util.tree_leaves_with_path(trainable)
    assert all(jax.tree_util.keystr(p).endswith("['bias']") for p, _ in leaves)
    assert bitfit.count(qwen)[0] == 3 * (32 + 16 + 16)
    # freeze: the last layer only.
    freeze = peft.build_method({"name": "freeze", "last_layers": 1})
    trainable, frozen = freeze.split(params)
    assert set(trainable["model"]) == set(frozen["model"])  # same structure, None where absent
    assert trainable["model"]["layers_0"]["mlp"]["up_proj"]["kernel"] is None
    assert trainable["model"]["layers_2"]["mlp"]["up_proj"]["kernel"] is not None
    per_layer = 32 * (32 + 16 + 16 + 32) + 3 * 32 * 48 + 2 * 32
    assert freeze.count(params)[0] == per_layer
    with_head = peft.build_method({"name": "freeze", "last_layers": 1, "trainable": "lm_head"})
    assert with_head.count(params)[0] == per_layer + 32 * 50
    with pytest.raises(peft.PeftError, match="method.last_layers: .*scan_layers=False"):
        freeze.split(stacked(LLAMA))


def test_adapter_params_extract_and_put_back():
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes(LLAMA))
    method = peft.build_method({"name": "dora", "rank": 2, "targets": "qv"})
    trained = jax.tree.map(
        lambda x: x.replace(b=x.b + 1.0, m=x.m * 2) if isinstance(x, peft.DoraWeight) else x,
        method.apply(params, jax.random.key(0)),
        is_leaf=peft.is_leaf,
    )
    adapter = method.adapter_params(trained)
    flat = jax.tree_util.tree_leaves_with_path(adapter)
    assert len(flat) == 3 * 2 * 3  # layers x (q, v) x (a, b, m)
    assert set(adapter) == {"model"} and all(isinstance(x, jax.Array) for _, x in flat)
    restored = peft.with_adapter_params(method.apply(params, jax.random.key(9)), adapter)
    for want, got in zip(jax.tree.leaves(trained), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(peft.PeftError, match="adapter: .*shape"):
        bad = jax.tree.map(lambda x: x[..., :1], adapter)
        peft.with_adapter_params(trained, bad)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_target_matching_nothing_lists_available_paths():
    with pytest.raises(peft.TargetError) as e:
        adapted(LLAMA, {"name": "lora", "targets": "qkv_proj"})
    msg = one_line(e)
    assert msg.startswith("method.targets: 'qkv_proj' matches no kernel; available: ")
    assert "model/layers_*/self_attn/q_proj/kernel" in msg and "(22 in all)" in msg


def test_one_unknown_entry_of_a_target_list_is_refused():
    with pytest.raises(peft.TargetError) as e:
        adapted(LLAMA, {"name": "lora", "targets": ["q_proj", "v_projj"]})
    msg = one_line(e)
    assert msg.startswith("method.targets[1]: module name 'v_projj' matches no kernel;")
    assert "available module names: down_proj, gate_proj, k_proj, lm_head, o_proj" in msg


def test_target_list_entries_may_name_a_parent():
    _, params = adapted(GPT2, {"name": "lora", "rank": 2, "targets": ["attn/c_proj"]})
    assert adapted_paths(params) == [f"transformer/h_{i}/attn/c_proj/kernel" for i in range(2)]
    with pytest.raises(peft.TargetError, match=r"'attn/c_fc' matches no kernel.*c_attn, c_fc"):
        adapted(GPT2, {"name": "lora", "targets": ["attn/c_proj", "attn/c_fc"]})


def test_rank_larger_than_a_matrix_side_names_the_path():
    with pytest.raises(peft.RankError) as e:
        adapted(LLAMA, {"name": "lora", "rank": 17, "targets": "qv"})
    msg = one_line(e)
    assert (
        "method.rank: 17 exceeds min(in, out) = 16 of model/layers_0/self_attn/v_proj/kernel" in msg
    )


def test_unknown_method_and_option():
    with pytest.raises(peft.UnknownMethodError) as e:
        peft.build_method({"name": "lroa", "rank": 8})
    assert one_line(e) == (
        "method.name: unknown method 'lroa'; known: adalora, bitfit, dora, freeze, full, galore, "
        "ia3, loha, lokr, lora, oft, prefix_tuning, prompt_tuning, qlora, vera"
    )
    with pytest.raises(peft.PeftError) as e:
        peft.build_method({"name": "lora", "rnak": 8})
    assert one_line(e).startswith("method.rnak: not an option of method 'lora'; options: alpha,")
    with pytest.raises(peft.PeftError, match="method.init: 'xavier'"):
        peft.build_method({"name": "lora", "init": "xavier"})
    with pytest.raises(peft.PeftError, match="method.compute: 'merged' cannot apply LoRA dropout"):
        peft.build_method({"name": "lora", "compute": "merged", "dropout": 0.1})
