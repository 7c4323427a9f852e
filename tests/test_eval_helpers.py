"""Helpers shared by the eval tests (tiny random models, a character-level
tokenizer), and checks of the helpers themselves.

The random params are drawn with numpy rather than `model.init`: compiling
the init's random-number programs costs seconds on a CPU, the numpy draw
milliseconds."""

from __future__ import annotations

import functools

import jax
import numpy as np
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ftjax.models import ModelConfig, build_model

VOCAB = 97  # <eos> + 95 printable ASCII characters + newline


def random_params(model, seed: int = 0, logit_scale: float = 40.0):
    """Random params of `model`'s shapes: norm scales near 1, small biases, and
    weights of std 0.02, except the embedding and output head, scaled up so
    that the logits are spread (greedy choices not decided by rounding)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]

    def draw(path, spec):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        noise = rng.normal(0.0, 1.0, spec.shape).astype(np.float32)
        if name.endswith("scale"):
            return 1.0 + 0.1 * noise
        if name.endswith("bias"):
            return 0.1 * noise
        std = 0.02 * (logit_scale if any(s in name for s in ("embed", "wte", "lm_head")) else 1)
        return std * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def tiny_model(model_type: str = "llama", scan: bool = False, seed: int = 0, max_len: int = 64):
    """(model, params) of a 2-layer random model over the character vocabulary."""
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if model_type == "llama" else 4,
        max_position_embeddings=max_len,
        scan_layers=scan,
    )
    model = build_model(cfg)
    return model, random_params(model, seed)


def char_tokenizer():
    """A Hugging Face fast tokenizer with one token per character; id 0 is
    <eos> (also the pad token), no BOS."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>"
    )


def test_char_tokenizer_round_trips():
    tok = char_tokenizer()
    text = "Q: 2+2?\n A: 4"
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) < VOCAB and tok.decode(ids) == text


def test_tiny_model_logits_are_spread():
    model, params = tiny_model("llama")
    logits = np.asarray(model.apply({"params": params}, np.arange(8)[None]))
    assert logits.shape == (1, 8, VOCAB) and logits.std() > 1.0
