"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous
Prompts for Generation") as a method: per layer, `num_virtual_tokens` trainable
keys and values that every query attends to before the sequence
(`ftjax.models.decoder`); the whole model stays frozen.
`n x num_layers x 2 x kv_width` parameters: 20 tokens on GPT-2 Medium train
20 x 24 x 2 x 1024 = 983,040.

With `prefix_projection` the prefix is reparametrized as in the paper (and
HF PEFT): an (n, kv_width) embedding through a two-layer tanh MLP of width
`encoder_hidden_size` (0: kv_width, PEFT's default) trains instead, and only
its output, the prefix, is exported. Inits as PEFT's: N(0, 1) embeddings and
torch's default Linear init; `init=zero` zeroes the prefix (or the MLP's last
layer), PEFT's `init_weights="zero"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.models.decoder import KV_PREFIX
from ftjax.peft.base import PeftError
from ftjax.peft.methods.prompt_tuning import check_count
from ftjax.peft.prompt import PrefixMlpWeight, PromptWeight, prefix_dims, virtual_family
from ftjax.peft.registry import MethodSpec, Option, parse_bool, register

INITS = ("random", "zero")

OPTIONS = {
    "num_virtual_tokens": Option(20, int, "prefix length: keys and values per layer"),
    "prefix_projection": Option(False, parse_bool, "train the prefix through a tanh MLP"),
    "encoder_hidden_size": Option(0, int, "the MLP's width (0: the keys' width)"),
    "init": Option("random", str, "random (PEFT's) or zero"),
}


def _check(opts):
    check_count(opts)
    if not isinstance(opts["prefix_projection"], bool):
        raise PeftError(
            f"method.prefix_projection: must be a bool, got {opts['prefix_projection']!r}"
        )
    width = opts["encoder_hidden_size"]
    if not isinstance(width, int) or isinstance(width, bool) or width < 0:
        raise PeftError(f"method.encoder_hidden_size: must be an integer >= 0, got {width!r}")
    if width and not opts["prefix_projection"]:
        raise PeftError("method.encoder_hidden_size: only used with prefix_projection=True")
    if opts["init"] not in INITS:
        raise PeftError(f"method.init: {opts['init']!r}; expected one of {', '.join(INITS)}")


def _uniform(rng, shape, fan_in):
    """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def initial_prefix(opts, num_layers: int, kv_width: int, rng):
    """The prefix leaf: a `PromptWeight` (n, num_layers * 2 * kv_width), or
    with `prefix_projection` a `PrefixMlpWeight` producing one."""
    n, out = opts["num_virtual_tokens"], num_layers * 2 * kv_width
    zero = opts["init"] == "zero"
    k_emb, k1, k2, k3, k4 = jax.random.split(rng, 5)
    if not opts["prefix_projection"]:
        shape = (n, out)
        return PromptWeight(jnp.zeros(shape) if zero else jax.random.normal(k_emb, shape))
    hidden = opts["encoder_hidden_size"] or kv_width
    w2 = jnp.zeros((hidden, out)) if zero else _uniform(k3, (hidden, out), hidden)
    b2 = jnp.zeros((out,)) if zero else _uniform(k4, (out,), hidden)
    return PrefixMlpWeight(
        jax.random.normal(k_emb, (n, kv_width), jnp.float32),
        _uniform(k1, (kv_width, hidden), kv_width),
        _uniform(k2, (hidden,), kv_width),
        w2,
        b2,
    )


def _build(opts):
    def apply(params, rng):
        spec = virtual_family(params, "prefix_tuning")
        return {**params, KV_PREFIX: initial_prefix(opts, *prefix_dims(params, spec), rng)}

    return apply, (lambda paths: set())  # only the prefix leaf trains


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT PREFIX_TUNING files (`ftjax.peft.prompt_format`): the prefix itself."""
    del initial
    from ftjax.peft.prompt_format import save_adapter

    return save_adapter(model_cfg, params, out_dir, init=opts)


def _describe(opts):
    out = [f"n={opts['num_virtual_tokens']}"]
    if opts["prefix_projection"]:
        out.append(f"mlp={opts['encoder_hidden_size'] or 'kv'}")
    return out


SPEC = register(
    MethodSpec(
        name="prefix_tuning",
        options=OPTIONS,
        build=_build,
        check=_check,
        describe=_describe,
        lr_scale=100.0,  # as prompt tuning: PEFT's examples train prefixes at 1e-2 to 3e-2
        export=export_adapter,
        doc="trainable per-layer key/value prefixes (Li & Liang, 2021)",
    )
)
