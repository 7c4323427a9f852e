"""docs/peft.md's "Adding a method" block, run as it stands: the method it
defines outside ftjax (LayerNorm tuning) is registered, chosen by name in an
experiment's `arg`, trains through `ftjax.train.train`, and changes exactly
the parameters it claims: the normalization layers inside the decoder."""

import importlib.util
import os

import numpy as np
import pytest
from hf_fixtures import doc_module

from ftjax.peft import registry
from ftjax.peft.base import flatten_paths
from ftjax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "peft.md")
QUICK = os.path.join(ROOT, "experiments", "quick", "train.py")


@pytest.fixture(scope="module")
def method():
    try:
        with doc_module(DOC, "Adding a method", "docs_peft_example") as module:
            yield module
    finally:
        registry.unregister("ln_tuning")


def quick_config(arg):
    spec = importlib.util.spec_from_file_location("quick_train_config", QUICK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.slow
def test_the_documented_method_trains_only_the_layer_norms(method, tmp_path):
    cfg = quick_config("method=ln_tuning,include_final=0")
    assert cfg.method.to_dict() == {"name": "ln_tuning", "include_final": False}
    assert cfg.optim.lr == pytest.approx(1e-3 * 10.0)  # the spec's lr_scale
    assert registry.label(cfg.method.to_dict()) == "ln_tuning layers only"
    cfg.train.steps = 3
    result = train(cfg, str(tmp_path / "run"))

    m = cfg.model.init
    # Two RMSNorm scales of `hidden_size` per decoder layer; the final norm stays frozen.
    assert result.summary["trainable_params"] == 2 * m.num_layers * m.hidden_size
    base, tuned = dict(flatten_paths(result.base_params)), dict(flatten_paths(result.params))
    changed = {p for p in base if not np.array_equal(np.asarray(base[p]), np.asarray(tuned[p]))}
    want = {
        f"model/layers_{i}/{norm}/scale"
        for i in range(m.num_layers)
        for norm in ("input_layernorm", "post_attention_layernorm")
    }
    assert changed == want


def test_its_options_are_typed_and_checked(method):
    from ftjax.peft import PeftError

    assert registry.build_method({"name": "ln_tuning", "include_final": "yes"}).config[
        "include_final"
    ]
    with pytest.raises(PeftError, match=r"method.include_final='maybe': 'maybe' is not a boolean"):
        registry.build_method({"name": "ln_tuning", "include_final": "maybe"})
    with pytest.raises(PeftError, match=r"method.rank: not an option of method 'ln_tuning'"):
        registry.build_method({"name": "ln_tuning", "rank": 4})
