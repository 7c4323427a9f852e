"""Batched generation with a KV cache: one prefill pass over the left-padded
prompts, then one single-token forward pass per new token inside a
`lax.while_loop`, so the prefix is never recomputed and the whole loop is one
compiled program.

Prompts are left-padded so that every row's last prompt token sits in the same
column and the first new token is read from the same logit position for all
rows. Rotary / learned positions are the count of real tokens before each
token, so a row's padding does not shift its positions.

The params are an ordinary jit argument: plain arrays, adapter leaves (LoRA,
quantized, ...) and merged params all work unchanged. Virtual tokens (prompt
and prefix tuning, `ftjax.models.decoder`) too: the prefill puts prompt
tuning's tokens in the cache, which is sized for them, and positions stay
counts of real tokens (the model shifts them past the virtual ones).

In the examples, `model` and `params` are a tiny random Llama and `tok` its
character tokenizer (set up by tests/test_doctests.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ConfigError
from ftjax.models import init_kv_cache
from ftjax.models.decoder import cached_virtual_length, virtual_length


class GenerationOutput(NamedTuple):
    tokens: np.ndarray  # (batch, max_new_tokens); pad_id after a row's stop token
    lengths: np.ndarray  # (batch,) tokens generated per row, its stop token included
    stopped: np.ndarray  # (batch,) bool: the row ended on a stop token

    def sequences(self, strip_stop: bool = True) -> list[list[int]]:
        """Each row's generated tokens as a list, without its stop token by default."""
        out = []
        for row, n, stop in zip(self.tokens, self.lengths, self.stopped, strict=True):
            n = int(n) - int(bool(stop) and strip_stop)
            out.append([int(t) for t in row[:n]])
        return out


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1, min_width: int = 0
):
    """(ids, mask) int32 arrays with every prompt right-aligned.

    The padded length (at least `min_width`) is rounded up to `multiple`, so
    that prompts of similar lengths share one compiled program (as do token
    limits in `generate`).

    >>> left_pad([[5, 6, 7], [8]], pad_id=0)
    (array([[5, 6, 7], [0, 0, 8]], dtype=int32), array([[1, 1, 1], [0, 0, 1]], dtype=int32))
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (prepend BOS to empty prompts)")
    width = max(max(len(p) for p in prompts), min_width)
    width = -(-width // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def filter_logits(logits: jax.Array, *, top_k=0, top_p=1.0) -> jax.Array:
    """Sets logits outside the top-k tokens, then outside the smallest set whose
    probability reaches top_p (nucleus, renormalized after top-k), to -inf.
    top_k 0 and top_p 1.0 switch either off. Both may be traced values: one
    compiled program serves every setting.

    >>> filter_logits(jnp.array([[1.0, 3.0, 2.0]]), top_k=2)
    Array([[-inf,   3.,   2.]], dtype=float32)
    """
    vocab = logits.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=-1, keepdims=True)
    logits = jnp.where(logits < kth, neg_inf, logits)
    ordered = jnp.where(jnp.arange(vocab) < k, ordered, neg_inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token if the tokens ranked above it hold less than top_p; with
    # top_p = 1 keep all, whatever the rounding of the cumulative sum.
    keep = (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1.0)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, neg_inf, logits)


def choose_tokens(logits, rng, *, greedy: bool, temperature=1.0, top_k=0, top_p=1.0):
    """Greedy or sampled next tokens from (batch, vocab) logits."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "buffer", "greedy", "pad_id"))
def _generate(
    params, ids, mask, rng, stop, limit, temperature, top_k, top_p, *, model, buffer, greedy, pad_id
):
    """Up to `limit` (traced) new tokens into a `buffer`-column output (static)."""
    b, width = ids.shape
    choose = functools.partial(
        choose_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p
    )
    cache = init_kv_cache(model.cfg, b, cached_virtual_length(params) + width + buffer)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    logits, cache = model.apply(
        {"params": params}, ids, attention_mask=mask, positions=positions, cache=cache
    )
    rng, key = jax.random.split(rng)
    token = choose(logits[:, -1], key)
    tokens = jnp.full((b, buffer), pad_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stop)
    state = (1, tokens, token, done, jnp.ones((b,), jnp.int32), cache, positions[:, -1] + 1, rng)

    def cond(state):
        i, done = state[0], state[3]
        return (i < limit) & ~jnp.all(done)

    def body(state):
        i, tokens, token, done, lengths, cache, pos, rng = state
        logits, cache = model.apply(
            {"params": params},
            token[:, None],
            attention_mask=jnp.ones((b, 1), jnp.int32),
            positions=pos[:, None],
            cache=cache,
        )
        rng, key = jax.random.split(rng)
        token = jnp.where(done, pad_id, choose(logits[:, 0], key))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.isin(token, stop)
        return i + 1, tokens, token, done, lengths, cache, pos + 1, rng

    _, tokens, _, done, lengths, _, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, lengths, done


def generate(
    model,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    rng: jax.Array | int = 0,
    pad_id: int = 0,
    pad_to_multiple: int = 8,
    min_prompt_width: int = 0,
    max_length: int | None = None,
) -> GenerationOutput:
    """Generates up to `max_new_tokens` tokens after each prompt (token-id lists).

    temperature 0 is greedy decoding; otherwise logits are divided by the
    temperature, filtered by `top_k` (0: off) and `top_p` (1.0: off) and
    sampled. A row ends at its first token in `stop_tokens`; the loop ends when
    every row has. `max_length` (default: the model's max_position_embeddings)
    bounds prompt plus new tokens. Prompts are left-padded to at least
    `min_prompt_width` (rounded up to `pad_to_multiple`): batches padded to one
    width (and one row count) share one compiled program.

    >>> out = generate(model, params, [[1, 5, 9], [1, 7]], max_new_tokens=8)
    >>> out.tokens.shape, out.lengths.tolist(), out.stopped.tolist()
    ((2, 8), [8, 8], [False, False])
    >>> first = out.sequences()[0]
    >>> cut = generate(model, params, [[1, 5, 9], [1, 7]], max_new_tokens=8, stop_tokens=[first[2]])
    >>> cut.sequences()[0] == first[:2], int(cut.lengths[0]), bool(cut.stopped[0])  # stop stripped
    (True, 3, True)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    ids, mask = left_pad(prompts, pad_id, pad_to_multiple, min_prompt_width)
    context = max_length or model.cfg.max_position_embeddings
    longest = max(len(p) for p in prompts)
    virtual = virtual_length(params)
    if virtual + longest + max_new_tokens > context:
        extra = f" after {virtual} virtual tokens" if virtual else ""
        raise ConfigError(
            f"generation request too long: prompt of {longest} tokens + {max_new_tokens} new "
            f"tokens{extra} exceeds the model's context of {context} tokens"
        )
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    # Sampling settings, stop tokens and the token limit are traced, and the
    # output buffer is rounded up: changing them rarely recompiles.
    stop = np.asarray([int(t) for t in stop_tokens] or [-1], np.int32)
    tokens, lengths, done = _generate(
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        rng,
        jnp.asarray(stop),
        jnp.int32(max_new_tokens),
        jnp.float32(max(temperature, 1e-6)),
        jnp.int32(top_k),
        jnp.float32(top_p),
        model=model,
        buffer=-(-int(max_new_tokens) // pad_to_multiple) * pad_to_multiple,
        greedy=temperature == 0.0,
        pad_id=int(pad_id),
    )
    tokens, lengths, done = jax.device_get((tokens, lengths, done))
    return GenerationOutput(tokens[:, :max_new_tokens], lengths, done)


def truncate_at(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string.

    >>> truncate_at("4\\n\\nQuestion: ...", ["\\n\\n"])
    '4'
    """
    cut = len(text)
    for s in stop_strings:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def generate_text(
    model,
    params,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    add_special_tokens: bool = True,
    **kwargs,
) -> list[str]:
    """Decoded continuations of text prompts with a Hugging Face tokenizer.

    Generation stops at the tokenizer's EOS token (plus any `stop_tokens` in
    kwargs); the text is then cut at the first of `stop_strings`, which may
    span several tokens.

    >>> texts = generate_text(model, params, tok, ["Q: 2+2?", "Q: 3+3?"], max_new_tokens=8,
    ...                       stop_strings=["\\n"])
    >>> len(texts), all(len(t) <= 8 and "\\n" not in t for t in texts)
    (2, True)
    """
    stop_tokens = list(kwargs.pop("stop_tokens", ()))
    if tokenizer.eos_token_id is not None:
        stop_tokens.append(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs.setdefault("pad_id", pad_id)
    encoded = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    out = generate(
        model, params, encoded, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, **kwargs
    )
    texts = tokenizer.batch_decode(out.sequences(strip_stop=True), skip_special_tokens=True)
    return [truncate_at(t, stop_strings) for t in texts]


def encode_prompts(tokenizer, prompts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
    """Prompt token ids exactly as the data pipeline builds them for training
    (BOS added by hand when the tokenizer has one, no EOS): a mismatch here
    would measure the tokenization, not the model."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]


def generate_answers(
    model,
    params,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    add_bos: bool = True,
) -> list[str]:
    """Greedy answers to `prompts`, decoded without special tokens, in batches
    of `batch_size` that all share one shape (one prompt width; the last batch
    filled up with repeats whose answers are dropped): one compiled program
    per call, not per batch."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_prompts(tokenizer, prompts, add_bos)
    if not encoded:
        return []
    width = max(len(p) for p in encoded)
    rows = min(batch_size, len(encoded))
    texts = []
    for i in range(0, len(encoded), rows):
        batch = encoded[i : i + rows]
        real = len(batch)
        batch = batch + [batch[0]] * (rows - real)
        out = generate(
            model,
            params,
            batch,
            max_new_tokens=max_new_tokens,
            stop_tokens=stop,
            pad_id=pad,
            min_prompt_width=width,
        )
        sequences = out.sequences(strip_stop=True)[:real]
        texts += tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return texts
