"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning") as a method: `num_virtual_tokens` trainable embeddings that
the model puts before every sequence (`ftjax.models.decoder`); the whole
model stays frozen. `n x hidden` parameters: 20 tokens on Llama 2 7B train
20 x 4096 = 81,920.

Inits as HF PEFT's `prompt_tuning_init`: `random` draws N(0, 1) (torch's
embedding init, PEFT's RANDOM), `vocab` copies the embeddings of uniformly
drawn token ids (SAMPLE_VOCAB), `text` those of `init_text` tokenized by
`tokenizer` (special tokens included), repeated or cut to n (TEXT).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models.decoder import VIRTUAL_TOKENS
from ftjax.peft.base import PeftError
from ftjax.peft.prompt import PromptWeight, token_embedding, virtual_family
from ftjax.peft.registry import MethodSpec, Option, register

INITS = ("random", "vocab", "text")

OPTIONS = {
    "num_virtual_tokens": Option(20, int, "virtual tokens put before every sequence"),
    "init": Option("random", str, "random (N(0,1)), vocab (sampled token embeddings) or text"),
    "init_text": Option(
        "", str, "with init=text: the text whose token embeddings start the prompt"
    ),
    "tokenizer": Option("", str, "with init=text: the tokenizer (directory or hub id)"),
}


def check_count(opts) -> None:
    n = opts["num_virtual_tokens"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PeftError(f"method.num_virtual_tokens: must be a positive integer, got {n!r}")


def _check(opts):
    check_count(opts)
    if opts["init"] not in INITS:
        raise PeftError(f"method.init: {opts['init']!r}; expected one of {', '.join(INITS)}")
    text = opts["init"] == "text"
    for field in ("init_text", "tokenizer"):
        if not isinstance(opts[field], str):
            raise PeftError(f"method.{field}: must be a string, got {opts[field]!r}")
        if text and not opts[field]:
            raise PeftError(f"method.{field}: required with init='text'")
        if not text and opts[field]:
            raise PeftError(
                f"method.{field}: only used with init='text', got init={opts['init']!r}"
            )


def text_token_ids(text: str, tokenizer: str, n: int) -> list[int]:
    """PEFT's TEXT init ids: `tokenizer(text)` repeated until n, then cut to n."""
    from ftjax.data.tokenize import load_tokenizer

    ids = list(load_tokenizer(tokenizer)(text)["input_ids"])
    if not ids:
        raise PeftError(f"method.init_text: {text!r} has no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


def initial_prompt(opts, table, rng) -> jax.Array:
    """The (n, hidden) float32 start of the prompt from the token embedding `table`."""
    n, (vocab, hidden) = opts["num_virtual_tokens"], table.shape
    if opts["init"] == "random":
        return jax.random.normal(rng, (n, hidden), jnp.float32)
    if opts["init"] == "vocab":
        ids = jax.random.randint(rng, (n,), 0, vocab)
    else:
        ids = np.asarray(text_token_ids(opts["init_text"], opts["tokenizer"], n))
        if ids.max() >= vocab:
            raise PeftError(
                f"method.tokenizer: token id {int(ids.max())} is outside the model's vocabulary "
                f"of {vocab}"
            )
    return jnp.take(jnp.asarray(table, jnp.float32), ids, axis=0)


def _build(opts):
    def apply(params, rng):
        spec = virtual_family(params, "prompt_tuning")
        table = initial_prompt(opts, token_embedding(params, spec), rng)
        return {**params, VIRTUAL_TOKENS: PromptWeight(table)}

    return apply, (lambda paths: set())  # only the leaf's table trains


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT PROMPT_TUNING files (`ftjax.peft.prompt_format`)."""
    del initial
    from ftjax.peft.prompt_format import save_adapter

    return save_adapter(model_cfg, params, out_dir, init=opts)


SPEC = register(
    MethodSpec(
        name="prompt_tuning",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=lambda opts: [f"n={opts['num_virtual_tokens']}", opts["init"]],
        # A few thousand parameters need far larger steps than a whole model
        # (PEFT's examples train prompts at 3e-2 with AdamW).
        lr_scale=100.0,
        export=export_adapter,
        doc="trainable virtual-token embeddings before every sequence (Lester et al., 2021)",
    )
)
