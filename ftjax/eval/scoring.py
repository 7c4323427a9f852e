"""Scoring: exact match of generated answers, and log-likelihoods of
continuations for multiple-choice tasks (HellaSwag / ARC / WinoGrande style).

`loglikelihoods` is the one batched, jitted primitive: for (context,
continuation) token lists it returns log p(continuation | context) summed over
the continuation tokens and whether greedy decoding would have produced it. The
multiple-choice scorer and the lm-evaluation-harness adapter both use it.

In the examples, `model` and `params` are a tiny random Llama and `tok` its
character tokenizer (set up by tests/test_doctests.py).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import DataError
from ftjax.eval.metrics import token_log_probs

# ----------------------------------------------------------------------------- exact match

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization, for free-form answers in natural language:
    lower case, no punctuation, no articles, single spaces.

    >>> normalize_answer("  The  Eiffel-Tower! ")
    'eiffeltower'
    """
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def strip_whitespace(text: str) -> str:
    """Surrounding whitespace removed, nothing else: the normalization of
    answers that are exact strings (the synthetic suite's tasks, where case
    and punctuation are part of the answer).

    >>> strip_whitespace("  Abc. ")
    'Abc.'
    """
    return text.strip()


def exact_match_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    normalizer: Callable[[str], str] | None,
) -> list[bool]:
    """Per item: does the normalized prediction equal any normalized reference?

    A reference may be one string or a list of acceptable answers. The
    normalization is the caller's choice, always explicit: `normalize_answer`
    for natural-language answers, `strip_whitespace` for exact-string tasks,
    None to compare the raw strings.

    >>> exact_match_scores(["Paris.", "4"], [["paris", "Paris, France"], "four"],
    ...                    normalizer=normalize_answer)
    [True, False]
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    norm = normalizer or (lambda s: s)
    out = []
    for pred, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else list(refs)
        out.append(norm(pred) in {norm(r) for r in refs})
    return out


def exact_match(predictions, references, *, normalizer: Callable[[str], str] | None) -> float:
    """Fraction of exact matches; see `exact_match_scores`.

    >>> exact_match(["Paris.", "4"], ["paris", "four"], normalizer=normalize_answer)
    0.5
    >>> exact_match(["Paris.", "4 "], ["paris", "4"], normalizer=strip_whitespace)
    0.5
    """
    scores = exact_match_scores(predictions, references, normalizer=normalizer)
    if not scores:
        raise ValueError("exact_match of an empty list")
    return float(np.mean(scores))


def exact_match_on(
    model,
    params,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    add_bos: bool = True,
    normalizer: Callable[[str], str] | None = strip_whitespace,
) -> float:
    """Exact match of the model's greedy answers to `prompts` against
    `answers` (`generate_answers`, then `exact_match`). The default
    normalization is `strip_whitespace`, for exact-string tasks."""
    from ftjax.eval.generate import generate_answers

    outs = generate_answers(
        model, params, tokenizer, list(prompts),
        max_new_tokens=max_new_tokens, batch_size=batch_size, add_bos=add_bos,
    )  # fmt: skip
    return exact_match(outs, list(answers), normalizer=normalizer)


# ----------------------------------------------------------------------------- log-likelihood


class Loglikelihoods(NamedTuple):
    logprob: np.ndarray  # (n,) float64: sum of log p over each continuation's tokens
    num_tokens: np.ndarray  # (n,) continuation lengths in tokens
    is_greedy: np.ndarray  # (n,) bool: argmax at every continuation position


@functools.partial(jax.jit, static_argnames=("model",))
def _score_batch(params, ids, targets, mask, start, *, model):
    logits = model.apply({"params": params}, ids, attention_mask=mask)
    logp = token_log_probs(logits, targets)
    col = jnp.arange(ids.shape[1])[None, :]
    scored = (col >= start[:, None]) & (mask > 0)
    total = jnp.sum(jnp.where(scored, logp, 0.0), axis=-1)
    greedy = jnp.all(jnp.where(scored, jnp.argmax(logits, -1) == targets, True), axis=-1)
    return total, greedy


def _row(context, continuation, max_length):
    """(inputs, targets, number of scored tokens) with the context cut from the
    left when the pair does not fit, as the harness does."""
    context, continuation = list(context), list(continuation)
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    if not context:
        raise ValueError("empty context: condition on at least one token (e.g. BOS or EOS)")
    if len(continuation) > max_length:
        raise ValueError(
            f"continuation of {len(continuation)} tokens does not fit the context of "
            f"{max_length} tokens"
        )
    seq = (context + continuation)[-(max_length + 1) :]
    return seq[:-1], seq[1:], len(continuation)


def loglikelihoods(
    model,
    params,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    pad_to_multiple: int = 16,
) -> Loglikelihoods:
    """log p(continuation | context) for each (context ids, continuation ids).

    Rows are right-padded (causal attention makes the padding invisible to the
    real tokens), sorted by length so that a batch wastes little padding, and
    padded to a multiple of `pad_to_multiple` columns and a fixed batch size so
    that few shapes compile. Contexts longer than `max_length` (default: the
    model's max_position_embeddings) lose their oldest tokens.

    >>> requests = [([1, 5, 6], [7, 8]), ([1, 5, 6], [7]), ([1, 5, 6, 7], [8])]
    >>> r = loglikelihoods(model, params, requests)
    >>> r.num_tokens, r.logprob.dtype
    (array([2, 1, 1]), dtype('float64'))
    >>> bool(np.isclose(r.logprob[0], r.logprob[1] + r.logprob[2]))   # the chain rule
    True
    """
    max_length = max_length or model.cfg.max_position_embeddings
    rows = [_row(c, x, max_length) for c, x in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    logprob = np.zeros(len(rows), np.float64)
    greedy = np.zeros(len(rows), bool)
    pending = []
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        width = max(len(rows[i][0]) for i in chunk)
        width = min(-(-width // pad_to_multiple) * pad_to_multiple, max_length)
        ids = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        start = np.full((batch_size,), width, np.int32)
        for r, i in enumerate(chunk):
            inp, tgt, n = rows[i]
            ids[r, : len(inp)], targets[r, : len(tgt)], mask[r, : len(inp)] = inp, tgt, 1
            start[r] = len(inp) - n
        pending.append((chunk, _score_batch(params, ids, targets, mask, start, model=model)))
    for chunk, (total, is_greedy) in pending:
        total, is_greedy = jax.device_get((total, is_greedy))
        logprob[chunk] = total[: len(chunk)]
        greedy[chunk] = is_greedy[: len(chunk)]
    num_tokens = np.array([n for _, _, n in rows], np.int64)
    return Loglikelihoods(logprob, num_tokens, greedy)


# ----------------------------------------------------------------------------- multiple choice


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation as the model sees them joined.

    The pair is encoded as one string and split where the context's own
    encoding ends, so that tokens merging across the boundary are scored as the
    model would read them; trailing spaces of the context move to the
    continuation (" Paris" is one token in most vocabularies). An empty context
    becomes the BOS (else EOS) token.
    """
    if not context:
        prefix = tokenizer.bos_token_id
        prefix = tokenizer.eos_token_id if prefix is None else prefix
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def _field(item, name):
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


def score_multiple_choice(
    model,
    params,
    tokenizer,
    items: Sequence,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict:
    """Accuracy of picking the most likely continuation among each item's choices.

    Items are mappings or objects with `context` (str), `choices` (list of
    str) and `label` (index of the right choice). Three scores, as in the
    literature:

    - `acc`: argmax of the summed log-likelihood of each choice;
    - `acc_norm`: argmax of log-likelihood divided by the choice's length in
      characters (the harness's `acc_norm`, used for HellaSwag and ARC);
    - `acc_per_token`: argmax of log-likelihood divided by its number of tokens.

    `scores` holds the raw log-likelihoods, one list per item.

    >>> items = [{"context": "The sky is", "choices": [" blue", " green"], "label": 0}]
    >>> r = score_multiple_choice(model, params, tok, items)
    >>> sorted(r), r["n"], len(r["scores"][0])
    (['acc', 'acc_norm', 'acc_per_token', 'n', 'scores'], 1, 2)
    >>> r["acc"] == float(np.argmax(r["scores"][0]) == 0)
    True
    """
    if not items:
        raise ValueError("score_multiple_choice needs at least one item")
    requests, owner, chars = [], [], []
    for k, item in enumerate(items):
        context, choices = _field(item, "context"), list(_field(item, "choices"))
        label = int(_field(item, "label"))
        if not 0 <= label < len(choices):
            raise DataError(f"item {k}: label {label} is not an index into {len(choices)} choices")
        for choice in choices:
            requests.append(encode_pair(tokenizer, context, choice))
            owner.append(k)
            chars.append(len(choice))
    result = loglikelihoods(model, params, requests, batch_size=batch_size, max_length=max_length)
    owner = np.asarray(owner)
    hits = {"acc": [], "acc_norm": [], "acc_per_token": []}
    scores = []
    for k, item in enumerate(items):
        sel = owner == k
        ll = result.logprob[sel]
        label = int(_field(item, "label"))
        hits["acc"].append(np.argmax(ll) == label)
        hits["acc_norm"].append(np.argmax(ll / np.maximum(np.asarray(chars)[sel], 1)) == label)
        hits["acc_per_token"].append(np.argmax(ll / result.num_tokens[sel]) == label)
        scores.append([float(x) for x in ll])
    out = {name: float(np.mean(h)) for name, h in hits.items()}
    return {**out, "n": len(items), "scores": scores}
