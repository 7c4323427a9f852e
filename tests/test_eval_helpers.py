"""Checks of the tiny model and tokenizer helpers in `hf_fixtures` (which
the eval tests build on)."""

from __future__ import annotations

import numpy as np
from hf_fixtures import VOCAB, char_tokenizer, tiny_model


def test_char_tokenizer_round_trips():
    tok = char_tokenizer()
    text = "Q: 2+2?\n A: 4"
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) < VOCAB and tok.decode(ids) == text


def test_tiny_model_logits_are_spread():
    model, params = tiny_model("llama")
    logits = np.asarray(model.apply({"params": params}, np.arange(8)[None]))
    assert logits.shape == (1, 8, VOCAB) and logits.std() > 1.0
