"""The round-trip table of docs/peft.md: every method with a HF PEFT format,
on the five architectures, in both directions, against PyTorch `peft`.

- ftjax → peft: the method's adapter with every trainable array perturbed
  (so no part is at its identity init), written by `peft.save_adapter`,
  loaded with `PeftModel.from_pretrained`; the logits must agree.
- peft → ftjax: an adapter made by `peft.get_peft_model` with every trainable
  tensor perturbed, saved by `save_pretrained`, read by `peft.load_adapter`.

Where PEFT itself cannot adapt an architecture (LyCORIS tuners and OFT on
GPT-2's Conv1D), the case checks that ftjax refuses the export with one line.

The table in docs/peft.md is this test's output:
`FTJAX_WRITE_ROUNDTRIP_TABLE=1 python -m pytest tests/test_peft_roundtrip_table.py -n 0`
rewrites it; `test_docs_table_is_complete` checks it lists every case.
"""

import os
import re

import jax
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import ROOT, VOCAB, checkpoint_loader, torch_base, torch_logits

from ftjax import peft

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4
ARCHS = {
    "llama": "llama2",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gpt2": "gpt2",
}
DIRECTIONS = ("ftjax → peft", "peft → ftjax")
DOCS = os.path.join(ROOT, "docs", "peft.md")
BEGIN, END = "<!-- roundtrip-table: begin -->", "<!-- roundtrip-table: end -->"


def modules(arch, kind):
    """PEFT target module names of `kind` (attention | mlp_out | all) for `arch`."""
    if arch == "gpt2":
        return {"attention": ["c_attn"], "mlp_out": ["mlp.c_proj"], "all": ["c_attn", "c_proj", "c_fc"]}[kind]  # fmt: skip
    return {
        "attention": ["q_proj", "v_proj"],
        "mlp_out": ["down_proj"],
        "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }[kind]


# method -> (ftjax method config, PEFT config for an arch, archs PEFT cannot adapt)
CASES = {
    "lora": (
        {"name": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"},
        lambda a: torch_peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules(a, "all")),
        (),
    ),
    "dora": (
        {"name": "dora", "rank": 2, "alpha": 4, "targets": "attention"},
        lambda a: torch_peft.LoraConfig(
            r=2, lora_alpha=4, use_dora=True, target_modules=modules(a, "attention")
        ),
        (),
    ),
    "ia3": (
        {"name": "ia3"},
        lambda a: torch_peft.IA3Config(
            target_modules=modules(a, "attention") + modules(a, "mlp_out"),
            feedforward_modules=modules(a, "mlp_out"),
        ),
        (),
    ),
    "vera": (
        {"name": "vera", "rank": 8},
        lambda a: torch_peft.VeraConfig(r=8, target_modules=modules(a, "attention")),
        (),
    ),
    "loha": (
        {"name": "loha", "rank": 2, "alpha": 4.0, "targets": "all-linear"},
        lambda a: torch_peft.LoHaConfig(r=2, alpha=4, target_modules=modules(a, "all")),
        ("gpt2",),
    ),
    "lokr": (
        {"name": "lokr", "rank": 2, "alpha": 4.0, "targets": "all-linear"},
        lambda a: torch_peft.LoKrConfig(r=2, alpha=4, target_modules=modules(a, "all")),
        ("gpt2",),
    ),
    "adalora": (
        {"name": "adalora", "init_r": 4, "target_r": 2, "alpha": 8.0},
        lambda a: torch_peft.AdaLoraConfig(
            init_r=4,
            target_r=2,
            lora_alpha=8,
            total_step=10,
            target_modules=modules(a, "attention"),
        ),  # fmt: skip
        (),
    ),
    "oft": (
        {"name": "oft", "block_size": 8},
        lambda a: torch_peft.OFTConfig(
            r=0, oft_block_size=8, target_modules=modules(a, "attention")
        ),
        ("gpt2",),
    ),
    "prompt_tuning": (
        {"name": "prompt_tuning", "num_virtual_tokens": 5},
        lambda a: torch_peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        (),
    ),
    "prefix_tuning": (
        {"name": "prefix_tuning", "num_virtual_tokens": 5},
        lambda a: torch_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        (),
    ),
}
# PEFT's prompt tuning returns logits at the virtual tokens too, before the real ones.
VIRTUAL_LOGITS = {"prompt_tuning": 5}
CONV1D_REFUSAL = "refused (PEFT cannot wrap GPT-2's Conv1D)"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return checkpoint_loader(tiny_checkpoint, IDS, rename=ARCHS)


@pytest.fixture(scope="module")
def table():
    """(method, arch, direction) -> cell; written into docs/peft.md on request."""
    cells = {}
    yield cells
    if os.environ.get("FTJAX_WRITE_ROUNDTRIP_TABLE") == "1":
        write_table(cells)


def perturbed(method, params, seed=0):
    """Every trainable array moved away from its init by N(0, 0.5) noise."""
    trainable, frozen = method.split(params)
    leaves, treedef = jax.tree.flatten(trainable)
    rng = np.random.default_rng(seed)
    leaves = [x + rng.normal(0, 0.5, x.shape).astype(x.dtype) for x in leaves]
    return peft.combine(jax.tree.unflatten(treedef, leaves), frozen)


def peft_real_logits(name, peft_model):
    return torch_logits(peft_model, IDS)[:, VIRTUAL_LOGITS.get(name, 0) :]


def ftjax_to_peft(name, arch, tmp_path, loaded):
    path, model, base, logits = loaded(arch)
    config, _, refused = CASES[name]
    method = peft.build_method(config)
    params = perturbed(method, jax.jit(method.apply)(base, jax.random.key(0)))
    if arch in refused:
        with pytest.raises(peft.AdapterFormatError, match="Conv1D") as info:
            peft.save_adapter(model.cfg, params, str(tmp_path), method=method)
        assert "\n" not in str(info.value)
        return CONV1D_REFUSAL
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL  # the adapter matters
    peft.save_adapter(model.cfg, params, str(tmp_path), method=method)
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    return float(np.abs(peft_real_logits(name, peft_model) - ours).max())


def peft_to_ftjax(name, arch, tmp_path, loaded):
    path, model, base, logits = loaded(arch)
    _, peft_config, refused = CASES[name]
    if arch in refused:
        # The ground truth for the refusal: PEFT's tuner rejects the Conv1D layers.
        with pytest.raises((TypeError, ValueError)):
            torch_peft.get_peft_model(torch_base(path), peft_config(arch))
        return CONV1D_REFUSAL
    torch.manual_seed(0)
    peft_model = torch_peft.get_peft_model(torch_base(path), peft_config(arch))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    want = peft_real_logits(name, peft_model)
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 100 * TOL
    return float(np.abs(ours - want).max())


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CASES)
def test_round_trip(table, loaded, tmp_path, name, arch, direction):
    run = ftjax_to_peft if direction == DIRECTIONS[0] else peft_to_ftjax
    cell = run(name, arch, tmp_path, loaded)
    table[name, arch, direction] = cell
    if not isinstance(cell, str):
        assert cell <= TOL, f"{name} {arch} {direction}: max |logit diff| {cell:.3g}"


def format_cell(cell) -> str:
    return cell if isinstance(cell, str) else f"{cell:.1e}"


def write_table(cells):
    lines = [
        BEGIN,
        "| method | direction | " + " | ".join(ARCHS) + " |",
        "|---|---|" + "---:|" * len(ARCHS),
    ]
    for name in CASES:
        for direction in DIRECTIONS:
            row = [format_cell(cells.get((name, a, direction), "not run")) for a in ARCHS]
            lines.append(f"| {name} | {direction} | " + " | ".join(row) + " |")
    lines.append(END)
    with open(DOCS) as f:
        text = f.read()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    with open(DOCS, "w") as f:
        f.write(text[:start] + "\n".join(lines) + text[stop:])


def test_docs_table_is_complete():
    """docs/peft.md's table has every case of this file, each within the
    tolerance or the refusal (regenerate it as the module docstring says)."""
    with open(DOCS) as f:
        text = f.read()
    assert BEGIN in text and END in text
    body = text[text.index(BEGIN) : text.index(END)]
    rows = {}
    for line in body.splitlines()[3:]:
        cols = [c.strip() for c in line.strip("|").split("|")]
        rows[cols[0], cols[1]] = dict(zip(ARCHS, cols[2:]))
    for name, (_, _, refused) in CASES.items():
        for direction in DIRECTIONS:
            assert (name, direction) in rows, f"docs table lacks {name} {direction}"
            for arch, cell in rows[name, direction].items():
                if arch in refused:
                    assert cell == CONV1D_REFUSAL, (name, arch, cell)
                else:
                    assert re.fullmatch(r"\d\.\de[-+]\d\d", cell), (name, arch, direction, cell)
                    assert float(cell) <= TOL, (name, arch, direction, cell)
