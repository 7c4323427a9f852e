"""Runs the `>>>` examples in ftjax's docstrings, so that what they show is
what the code returns.

Every module with an example is listed in `MODULES` (a test checks that none
is missing). Examples run in a fresh temporary working directory, so files
they write with relative paths land there. Modules in `WITH_MODEL` also see
`model` and `params` (a tiny random two-layer Llama over a character
vocabulary), `tok` (its character tokenizer) and `batch` (one batch of it);
the docstrings of those modules say so."""

from __future__ import annotations

import doctest
import functools
import importlib
import io
import pathlib
import re

import numpy as np
import pytest
from hf_fixtures import char_tokenizer, tiny_model

ROOT = pathlib.Path(__file__).resolve().parent.parent

MODULES = [
    "ftjax.analysis.spectra",
    "ftjax.analysis.subspace",
    "ftjax.analysis.weights",
    "ftjax.cli",
    "ftjax.data.batching",
    "ftjax.data.config",
    "ftjax.data.formats",
    "ftjax.data.pipeline",
    "ftjax.data.sources",
    "ftjax.data.sentences",
    "ftjax.data.synthetic",
    "ftjax.eval.forgetting",
    "ftjax.eval.generate",
    "ftjax.eval.metrics",
    "ftjax.eval.scoring",
    "ftjax.experiment",
    "ftjax.models.hf",
    "ftjax.models.registry",
    "ftjax.peft.adalora",
    "ftjax.peft.adalora_allocator",
    "ftjax.peft.dora",
    "ftjax.peft.galore",
    "ftjax.peft.ia3",
    "ftjax.peft.loha",
    "ftjax.peft.lokr",
    "ftjax.peft.lora",
    "ftjax.peft.lora_fields",
    "ftjax.peft.lora_fields_format",
    "ftjax.peft.methods",
    "ftjax.peft.oft",
    "ftjax.peft.peft_format",
    "ftjax.peft.quant",
    "ftjax.peft.registry",
    "ftjax.peft.targets",
    "ftjax.peft.tree",
    "ftjax.peft.vera",
    "ftjax.rundir",
    "ftjax.study.stats",
    "ftjax.train.loss",
    "ftjax.train.optim",
    "ftjax.train.state",
]

WITH_MODEL = {
    "ftjax.analysis.subspace",
    "ftjax.analysis.weights",
    "ftjax.eval.generate",
    "ftjax.eval.metrics",
    "ftjax.eval.scoring",
    "ftjax.peft.methods",
    "ftjax.peft.peft_format",
    "ftjax.peft.targets",
    "ftjax.peft.tree",
    "ftjax.peft.vera",
}


@functools.cache
def model_globs() -> dict:
    model, params = tiny_model("llama")
    tok = char_tokenizer()
    ids = np.asarray([tok.encode("Q: 2+2?\nA: 4")], np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones(ids[:, 1:].shape, np.float32),
    }
    return {"model": model, "params": params, "tok": tok, "batch": batch}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_module_with_examples_is_run():
    with_examples = {
        _module_name(p)
        for p in (ROOT / "ftjax").rglob("*.py")
        if re.search(r"^\s*>>> ", p.read_text(encoding="utf-8"), re.M)
    }
    assert with_examples == set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    extra = model_globs() if name in WITH_MODEL else {}
    tests = doctest.DocTestFinder().find(module, name, globs={**vars(module), **extra})
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    out = io.StringIO()
    for test in tests:
        runner.run(test, out=out.write)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{name} has no examples; remove it from MODULES"
    assert results.failed == 0, out.getvalue()
