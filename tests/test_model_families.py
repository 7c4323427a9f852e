"""The model-family registry (`ftjax.models.registry`) and the consumers that
read it instead of their own model_type branches or layer regexes: each
built-in spec against its real params tree (presets, tensor-parallel rules,
name mapping, layer stack), the registry's errors, and `freeze`, the weight
analysis and the profile on GPT-2's `transformer/h_<i>` stack. Shapes only
(`jax.eval_shape`): no weights are computed."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ftjax import peft
from ftjax.analysis import weight_matrices
from ftjax.bench.profile import _op_source
from ftjax.errors import ModelError, PeftError
from ftjax.models import (
    TARGET_PRESETS,
    ModelConfig,
    build_model,
    config_from_hf,
    config_to_hf,
    get_family,
    hf_name,
    layers_prefix,
    model_types,
    register_family,
    stack_layers,
)
from ftjax.models.registry import all_families, families_of, locate_layer
from ftjax.peft import targets
from ftjax.peft.base import TargetError, flatten_paths
from ftjax.peft.targets import kernel_paths
from ftjax.train.parallel import tensor_spec

CONFIGS = {
    "llama": ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3),
    "gpt2": ModelConfig(
        model_type="gpt2", vocab_size=50, hidden_size=32, intermediate_size=128, num_layers=3
    ),
}


def shapes(cfg):
    return jax.eval_shape(build_model(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32))[
        "params"
    ]


def test_builtin_model_types_and_one_spec_per_family():
    assert set(model_types()) >= {"llama", "mistral", "qwen2", "qwen3", "gpt2"}
    assert {get_family(t).name for t in ("llama", "mistral", "qwen2", "qwen3")} == {"llama"}
    assert get_family("gpt2").name == "gpt2"
    assert len(all_families()) == len({s.name for s in all_families()})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_describes_its_params_tree(name):
    """Every preset, every tensor-parallel rule and the layer stack of a spec
    name things that exist in the family's params; `all-linear` is every
    projection but the output head."""
    cfg = CONFIGS[name]
    spec = get_family(cfg.model_type)
    params = shapes(cfg)
    kernels = kernel_paths(params)
    assert families_of(kernels) == [spec]
    container, layer = layers_prefix(cfg)
    assert all(f"{layer}_{i}" in params[container] for i in range(cfg.num_layers))
    for preset in TARGET_PRESETS:
        chosen = targets.select(params, preset)
        assert chosen and all(locate_layer(p.split("/"))[1] is not None for p in chosen)
    in_layers = [p for p in kernels if locate_layer(p.split("/"))]
    assert sorted(targets.select(params, "all-linear")) == sorted(in_layers)
    for module in spec.column_parallel + spec.row_parallel:
        assert any(re.search(rf"(^|/){module}/kernel$", p) for p in kernels), module
    # Every projection in a layer is split one way or the other.
    rules = spec.column_parallel + spec.row_parallel
    assert all(any(f"/{m}/" in p for m in rules) for p in in_layers)


def test_tensor_parallel_rules_come_from_the_spec():
    llama, gpt2 = get_family("llama"), get_family("gpt2")
    assert tensor_spec("model/layers_0/self_attn/q_proj/kernel", (32, 32), 2, llama) == P(
        None, "model"
    )
    assert tensor_spec("model/layers_0/mlp/down_proj/kernel", (48, 32), 2, llama) == P(
        "model", None
    )
    # GPT-2's `c_proj` is row-parallel in both blocks; its bias is not split.
    assert tensor_spec("transformer/h_1/attn/c_proj/kernel", (32, 32), 2, gpt2) == P("model", None)
    assert tensor_spec("transformer/h_1/mlp/c_proj/bias", (32,), 2, gpt2) == P(None)
    assert tensor_spec("transformer/h_1/mlp/c_fc/kernel", (32, 128), 2, gpt2) == P(None, "model")
    # An adapter child follows its kernel: LoRA's b of a column kernel splits its output.
    assert tensor_spec("transformer/h_1/attn/c_attn/kernel/b", (4, 96), 2, gpt2) == P(None, "model")
    # Another family's names do not apply.
    assert tensor_spec("transformer/h_1/attn/c_attn/kernel", (32, 96), 2, llama) == P(None, None)


def test_name_mapping_and_peft_details():
    llama, gpt2 = CONFIGS["llama"], CONFIGS["gpt2"]
    assert hf_name(llama, ("model", "layers_2", "self_attn", "q_proj", "kernel")) == (
        "model.layers.2.self_attn.q_proj.weight",
        True,
    )
    assert hf_name(llama, ("model", "norm", "scale")) == ("model.norm.weight", False)
    assert hf_name(gpt2, ("transformer", "h_0", "attn", "c_attn", "kernel")) == (
        "transformer.h.0.attn.c_attn.weight",
        False,  # Conv1D: already (in, out)
    )
    assert get_family("gpt2").fan_in_fan_out and not get_family("qwen2").fan_in_fan_out


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_config_round_trips_through_hf(model_type):
    cfg = ModelConfig(model_type=model_type, num_kv_heads=2 if model_type != "gpt2" else 4)
    if model_type == "mistral":
        cfg = cfg.replace(sliding_window=8)
    hf = config_to_hf(cfg)
    assert hf["model_type"] == model_type
    back = config_from_hf(hf)
    fields = ("num_layers", "num_heads", "num_kv_heads", "hidden_size", "sliding_window")
    assert [getattr(back, f) for f in fields] == [getattr(cfg, f) for f in fields]


def test_unknown_model_type_and_bad_specs():
    with pytest.raises(ModelError, match=r"unsupported model_type 'mamba'; supported: .*gpt2"):
        ModelConfig(model_type="mamba")
    with pytest.raises(ModelError, match=r"unsupported model_type 'mamba'"):
        config_from_hf({"model_type": "mamba"}, "x/config.json")
    with pytest.raises(ModelError, match=r"x/config\.json: missing field 'n_embd' for gpt2"):
        config_from_hf({"model_type": "gpt2"}, "x/config.json")
    spec = get_family("gpt2")
    with pytest.raises(ValueError, match="'gpt2' is already registered"):
        register_family(dataclasses.replace(spec, name="gpt2-copy"))
    with pytest.raises(ValueError, match="targets lacks the preset.*mlp"):
        dataclasses.replace(spec, targets={"qv": ("c_attn",), "attention": ("c_attn",)})
    with pytest.raises(ModelError, match="num_kv_heads=2 must equal num_heads=4"):
        ModelConfig(model_type="gpt2", num_kv_heads=2)


def test_presets_refuse_a_tree_of_no_family():
    params = {"encoder": {"block_0": {"query": {"kernel": np.zeros((4, 4))}}}}
    with pytest.raises(TargetError, match=r"match no registered model family.*name the module"):
        targets.select(params, "qv")
    assert targets.select(params, ["query"]) == ["encoder/block_0/query/kernel"]


def test_locate_layer():
    assert locate_layer("model/layers_12/mlp/up_proj/kernel".split("/")) == (1, 12)
    assert locate_layer("transformer/h/attn/c_attn/kernel".split("/")) == (1, None)
    assert locate_layer("transformer/wte/embedding".split("/")) is None
    assert locate_layer("model/hidden/kernel".split("/")) is None  # `h` only under `transformer`
    assert locate_layer("lm_head/kernel".split("/")) is None


def test_freeze_last_layers_on_gpt2():
    cfg = CONFIGS["gpt2"]
    method = peft.build_method({"name": "freeze", "last_layers": 1})
    trainable, _ = method.split(shapes(cfg))
    paths = [p for p, x in flatten_paths(trainable) if x is not None]
    assert paths and all(p.startswith("transformer/h_2/") for p in paths)
    with pytest.raises(PeftError, match="layers are stacked"):
        method.split(jax.eval_shape(lambda p: stack_layers(cfg, p), shapes(cfg)))


def test_weight_matrices_split_stacked_gpt2_and_skip_output_heads():
    cfg = CONFIGS["gpt2"].replace(num_layers=2)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes(cfg))
    scanned = stack_layers(cfg, params)
    assert sorted(weight_matrices(scanned)) == sorted(weight_matrices(params))
    assert "transformer/h_1/mlp/c_fc/kernel" in weight_matrices(scanned)
    llama = CONFIGS["llama"].replace(num_layers=1)
    names = weight_matrices(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes(llama)))
    assert "lm_head/kernel" not in names and len(names) == 7


def test_profile_sources_fold_each_familys_layers():
    bwd = "jit(train_step)/transpose(jvp(GPT2LMHeadModel))/"
    assert _op_source(bwd + "transformer/h_11/mlp/c_fc/dot_general") == "bwd mlp/c_fc"
    assert _op_source(bwd + "transformer/wte/gather") == "bwd wte"
    fwd = "jit(train_step)/jvp(LlamaForCausalLM)/"
    assert _op_source(fwd + "model/layers/self_attn/q_proj/dot_general") == "fwd self_attn/q_proj"
