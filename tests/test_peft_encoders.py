"""PEFT adapters of BERT and RoBERTa classifiers, both directions, with the
head trained in full and carried as `modules_to_save`: every ftjax adapter
loads in `peft.PeftModel.from_pretrained` on `AutoModelForSequenceClassification`
(or token classification) with the same logits, and PEFT's own adapters
import into ftjax."""

from __future__ import annotations

import jax
import numpy as np
import peft as torch_peft
import pytest
import torch
import transformers
from hf_fixtures import encoder_batch, save_tiny_encoder, torch_encoder_outputs

from ftjax import peft
from ftjax.models import from_pretrained
from ftjax.peft.base import AdapterFormatError

METHODS = {
    "lora": {"name": "lora", "rank": 4, "targets": "qv"},
    "ia3": {"name": "ia3"},
    "vera": {"name": "vera", "rank": 8},
    "loha": {"name": "loha", "rank": 2},
    "lokr": {"name": "lokr", "rank": 2},
    "oft": {"name": "oft", "block_size": 8},
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2},
}
AUTO = {
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "token_classification": transformers.AutoModelForTokenClassification,
}


def _logits(model, params, kind, seed=0):
    ids, mask, types = encoder_batch(kind, seed=seed)
    out = np.asarray(
        model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    )
    out = out[:, 0] if model.cfg.task == "sequence_classification" else out[mask.astype(bool)]
    return out, (ids, mask, types)


def _torch_logits(torch_model, kind, batch):
    out = torch_encoder_outputs(torch_model, *batch)
    return out if out.ndim == 2 else out[batch[1].astype(bool)]


def _trained(method_cfg, base, seed=1):
    """The method applied, with every trainable array moved off its init (the
    head included), as after some training."""
    method = peft.build_method(method_cfg)
    params = method.apply(base, jax.random.key(0))
    trainable, frozen = method.split(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(trainable))))
    trainable = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), trainable)
    return method, trainable, peft.combine(trainable, frozen)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_ftjax_adapter_with_head_loads_in_peft(tmp_path, kind, name):
    path = save_tiny_encoder(kind, tmp_path / "base", "sequence_classification", 3)
    model, base = from_pretrained(path)
    _, trainable, params = _trained(METHODS[name], base)
    assert trainable["classifier"] is not None  # the head trains under every method
    config = peft.save_adapter(model.cfg, params, str(tmp_path / "adapter"), method=METHODS[name])
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    got, batch = _logits(model, params, kind)
    torch_model = AUTO["sequence_classification"].from_pretrained(path, dtype=torch.float32)
    peft_model = torch_peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter"))
    ref = _torch_logits(peft_model.eval(), kind, batch)
    base_logits, _ = _logits(model, base, kind)
    assert np.abs(ref - base_logits).max() > 1e-2  # the adapter and head changed something
    assert np.abs(got - ref).max() <= 1e-4
    back = peft.load_adapter(model.cfg, base, str(tmp_path / "adapter"))
    assert np.abs(_logits(model, back, kind)[0] - ref).max() <= 1e-4


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("peft_config", ["lora", "ia3"])
def test_peft_classifier_adapter_imports_into_ftjax(tmp_path, kind, peft_config):
    path = save_tiny_encoder(kind, tmp_path / "base", "sequence_classification", 2)
    torch.manual_seed(0)
    torch_model = AUTO["sequence_classification"].from_pretrained(path, dtype=torch.float32)
    if peft_config == "lora":
        config = torch_peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                       target_modules=["query", "value"], init_lora_weights=False)  # fmt: skip
    else:
        config = torch_peft.IA3Config(task_type="SEQ_CLS", init_ia3_weights=False)
    peft_model = torch_peft.get_peft_model(torch_model, config)
    with torch.no_grad():  # a trained head, not the base's
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model, base = from_pretrained(path)
    params = peft.load_adapter(model.cfg, base, str(tmp_path / "adapter"))
    got, batch = _logits(model, params, kind)
    ref = _torch_logits(peft_model.eval(), kind, batch)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(np.asarray(params["classifier"][next(iter(params["classifier"]))]["kernel"]
                             if kind == "roberta" else params["classifier"]["kernel"])).max() > 0  # fmt: skip


def test_token_classification_adapter_round_trip(tmp_path):
    path = save_tiny_encoder("bert", tmp_path / "base", "token_classification", 5)
    model, base = from_pretrained(path)
    _, _, params = _trained(METHODS["lora"], base)
    config = peft.save_adapter(model.cfg, params, str(tmp_path / "adapter"), method=METHODS["lora"])
    assert config["task_type"] == "TOKEN_CLS"
    got, batch = _logits(model, params, "bert")
    torch_model = AUTO["token_classification"].from_pretrained(path, dtype=torch.float32)
    peft_model = torch_peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter"))
    assert np.abs(got - _torch_logits(peft_model.eval(), "bert", batch)).max() <= 1e-4


def test_bare_encoder_adapter_is_feature_extraction_without_head(tmp_path):
    model, base = from_pretrained(save_tiny_encoder("bert", tmp_path / "base"))
    method, trainable, params = _trained(METHODS["lora"], base)
    assert "classifier" not in params
    config = peft.save_adapter(model.cfg, params, str(tmp_path / "adapter"), method=METHODS["lora"])
    assert config["task_type"] == "FEATURE_EXTRACTION" and not config.get("modules_to_save")


def test_adapter_without_the_head_is_refused(tmp_path):
    """PEFT would keep the base's random classifier: an adapter written for
    the bare encoder, loaded into a classification model, is refused by name."""
    path = save_tiny_encoder("roberta", tmp_path / "base")
    bare_model, bare = from_pretrained(path)
    _, _, params = _trained(METHODS["lora"], bare)
    peft.save_adapter(bare_model.cfg, params, str(tmp_path / "adapter"), method=METHODS["lora"])
    model, base = from_pretrained(path, task="sequence_classification", num_labels=2)
    with pytest.raises(AdapterFormatError, match="lacks the classification head 'classifier'"):
        peft.load_adapter(model.cfg, base, str(tmp_path / "adapter"))
