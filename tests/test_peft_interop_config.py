"""adapter_config.json on import: every field is implemented, bookkeeping, or
at its off value; anything else (a later PEFT's new field included) is refused
by name, never ignored. Configs written by `peft` itself load with PEFT's
logits, as do the "all-linear" shorthand and base-preserving inits such as
"gaussian"; inits that rewrite the base are refused, but for PiSSA and OLoRA,
whose base the importer recomputes (test_peft_lora_fields.py)."""

import dataclasses
import json
import os

import jax
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import VOCAB, torch_base, torch_logits

from ftjax import peft
from ftjax.models import from_pretrained
from ftjax.peft import peft_format

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama2")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, base = from_pretrained(checkpoint)
    return model, base, jax.jit(lambda p: model.apply({"params": p}, IDS))


def save_peft(checkpoint, out, **kwargs):
    """An adapter saved by `peft` itself, with random (trained-looking) A and B;
    returns PEFT's logits."""
    torch.manual_seed(0)
    model = torch_peft.get_peft_model(torch_base(checkpoint), torch_peft.LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.eval()
    model.save_pretrained(str(out))
    return torch_logits(model, IDS)


def edit_config(path, **changes):
    with open(os.path.join(path, peft_format.CONFIG_NAME)) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, peft_format.CONFIG_NAME), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def saved(checkpoint, tmp_path_factory):
    """A plain adapter saved by peft (attention and MLP), and its logits."""
    out = tmp_path_factory.mktemp("saved")
    return out, save_peft(checkpoint, out, r=2, lora_alpha=4, target_modules="all-linear")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=2, lora_alpha=4, target_modules="all-linear"),  # saved as the expanded list
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            exclude_modules=["model.layers.0.self_attn.v_proj"],
            init_lora_weights="gaussian",
            lora_dropout=0.1,
        ),
        dict(r=2, lora_alpha=2, target_modules=r".*\.(k_proj|up_proj)", init_lora_weights=False),
    ],
)
def test_configs_written_by_peft_load(checkpoint, loaded, tmp_path, kwargs):
    want = save_peft(checkpoint, tmp_path, **kwargs)
    model, base, logits = loaded
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL
    np.testing.assert_allclose(ours, want, atol=TOL)


def test_all_linear_shorthand(checkpoint, loaded, saved, tmp_path):
    # Handwritten configs (and other tools) keep PEFT's shorthand; PEFT expands
    # it to every linear layer but the output head.
    src, want = saved
    config, tensors = peft.read_adapter(str(src))
    peft.write_adapter(str(tmp_path), {**config, "target_modules": "ALL-LINEAR"}, tensors)
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(checkpoint), str(tmp_path))
    np.testing.assert_allclose(torch_logits(peft_model, IDS), want, atol=TOL)
    model, base, logits = loaded
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    np.testing.assert_allclose(np.asarray(logits(params)), want, atol=TOL)
    # The output head is not "all-linear": tensors for it would be dropped by PEFT.
    head = {
        f"{peft_format.PREFIX}lm_head.lora_A.weight": np.zeros((2, 32), np.float32),
        f"{peft_format.PREFIX}lm_head.lora_B.weight": np.zeros((VOCAB, 2), np.float32),
    }
    with pytest.raises(peft.AdapterFormatError, match="module 'lm_head' has tensors"):
        peft.write_adapter(str(tmp_path / "head"), {**config, "target_modules": "all-linear"},
                           {**tensors, **head})  # fmt: skip


def test_excluded_module_with_tensors_is_refused(loaded, saved, tmp_path):
    src, _ = saved
    config, tensors = peft.read_adapter(str(src))
    peft.write_adapter(str(tmp_path), config, tensors)
    edit_config(tmp_path, exclude_modules=["o_proj"])
    model, base, _ = loaded
    with pytest.raises(
        peft.AdapterFormatError,
        match=r"'model.layers.0.self_attn.o_proj' has tensors .*exclude_modules=\['o_proj'\]",
    ):
        peft.load_adapter(model.cfg, base, str(tmp_path))


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_base_preserving_inits_are_accepted(loaded, saved, tmp_path, init):
    src, want = saved
    peft.write_adapter(str(tmp_path), *peft.read_adapter(str(src)))
    edit_config(tmp_path, init_lora_weights=init)
    model, base, logits = loaded
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    np.testing.assert_allclose(np.asarray(logits(params)), want, atol=TOL)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("layer_replication", [[0, 2], [1, 2]], "layer_replication=.*not supported"),
        ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens=.*not supported"),
        ("use_qalora", True, "use_qalora=True is not supported"),
        ("bias", "some", "bias='some' is not supported"),
        # Honoured (test_peft_lora_fields.py): here it contradicts the tensors.
        ("rank_pattern", {"q_proj": 4}, r"its rank is 4 \(r=2, rank_pattern="),
        ("target_parameters", ["mlp.experts"], "target_parameters=.*not supported"),
        ("a_future_peft_field", 1, "field 'a_future_peft_field' is unknown"),
        # (pissa and olora bases are recomputed: test_peft_lora_fields.py)
        ("init_lora_weights", "corda", "init_lora_weights='corda' is not one of the inits"),
        ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4'"),
        ("init_lora_weights", "lora_ga", "init_lora_weights='lora_ga'"),
        ("init_lora_weights", "loftq", "init_lora_weights='loftq'"),
        # (IA3, VERA, LOHA, LOKR, OFT, ADALORA and the prompt types have importers
        # of their own.)
        ("peft_type", "BOFT", "peft_type='BOFT' is not supported"),
        ("target_modules", None, "target_modules=None is not supported"),
    ],
)
def test_fields_that_change_the_computation_are_refused(
    loaded, saved, tmp_path, field, value, match
):
    src, _ = saved
    peft.write_adapter(str(tmp_path), *peft.read_adapter(str(src)))
    edit_config(tmp_path, **{field: value})
    model, base, _ = loaded
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_every_lora_config_field_is_classified():
    # A tripwire for PEFT upgrades: a new LoraConfig field needs a decision in
    # peft_format.CONFIG_FIELDS (until then, files that set it are refused).
    fields = {f.name for f in dataclasses.fields(torch_peft.LoraConfig)}
    assert fields - set(peft_format.CONFIG_FIELDS) == set()
    defaults = json.loads(json.dumps(torch_peft.LoraConfig(target_modules=["q_proj"]).to_dict(),
                                     default=str))  # fmt: skip
    peft_format.check_config(defaults, "defaults")  # PEFT's own defaults are all accepted
