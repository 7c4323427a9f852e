"""Sentence embeddings of an encoder and how well they still embed meaning:
the forgetting measure of an encoder trained for sentence similarity
(all-MiniLM-L6-v2) and then fine-tuned for something else.

- `sentence_embeddings`: the mean of the final hidden states over real
  tokens, L2-normalized (sentence-transformers' pooling of all-MiniLM-L6-v2:
  its `1_Pooling` mean mode and `Normalize` module).
- `paraphrase_retrieval`: of 2n sentences (n paraphrase pairs), the share
  whose nearest neighbour by cosine similarity (itself excluded) is its
  paraphrase; reported as the probe's `accuracy`.
- `paraphrase_margin`: mean cosine similarity of paraphrase pairs minus that
  of all other pairs.
- `similarity_kept`: Spearman correlation between two models' pairwise
  cosine similarities of the same sentences (1: the similarity structure is
  unchanged).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from ftjax.eval.classification import spearman


@functools.lru_cache(maxsize=8)
def _hidden_fn(model):
    """One compiled forward per model (every probe call reuses it)."""
    return jax.jit(lambda p, ids, mask, types: model.apply(
        {"params": p}, ids, attention_mask=mask, token_type_ids=types, return_hidden=True))  # fmt: skip


def sentence_embeddings(model, params, tokenizer, texts: Sequence[str],
                        batch_size: int = 64) -> np.ndarray:  # fmt: skip
    """(len(texts), hidden) float64 unit vectors: masked mean of the final
    hidden states (padding excluded), normalized. Every batch is padded to one
    length (the longest text, rounded up to 16), so one program serves all."""
    longest = max(len(x) for x in tokenizer(list(texts))["input_ids"])
    length = -(-longest // 16) * 16
    apply = _hidden_fn(model)
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # a fixed batch shape too
        enc = tokenizer(chunk, padding="max_length", max_length=length, return_tensors="np")
        mask = enc["attention_mask"].astype(np.int32)
        types = enc.get("token_type_ids", np.zeros_like(mask)).astype(np.int32)
        hidden = np.asarray(
            apply(params, enc["input_ids"].astype(np.int32), mask, types), np.float64
        )
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        out.append(pooled[: len(texts) - i])
    emb = np.concatenate(out)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _pair_embeddings(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of 2n embeddings laid out [a_0, b_0, a_1, b_1, ...]
    and each one's paraphrase index."""
    n2 = len(emb)
    if n2 % 2 or n2 < 4:
        raise ValueError(f"expected an even number (>= 4) of pair embeddings, got {n2}")
    partner = np.arange(n2) ^ 1  # 0 <-> 1, 2 <-> 3, ...
    return emb @ emb.T, partner


def paraphrase_retrieval(emb: np.ndarray) -> float:
    """Share of the 2n sentences whose nearest other sentence is their paraphrase."""
    sims, partner = _pair_embeddings(emb)
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(np.argmax(sims, axis=1) == partner))


def paraphrase_margin(emb: np.ndarray) -> float:
    sims, partner = _pair_embeddings(emb)
    n2 = len(emb)
    is_pair = np.zeros((n2, n2), bool)
    is_pair[np.arange(n2), partner] = True
    off_diagonal = ~np.eye(n2, dtype=bool)
    return float(sims[is_pair].mean() - sims[off_diagonal & ~is_pair].mean())


def similarity_kept(emb_before: np.ndarray, emb_after: np.ndarray) -> float:
    """Spearman correlation of the two models' pairwise cosine similarities."""
    upper = np.triu_indices(len(emb_before), k=1)
    return spearman((emb_before @ emb_before.T)[upper], (emb_after @ emb_after.T)[upper])


def probe_scores(emb: np.ndarray) -> dict[str, float]:
    """{accuracy: paraphrase retrieval, paraphrase_margin} of the embeddings of
    the probe's sentences, laid out [a_0, b_0, a_1, b_1, ...]."""
    return {"accuracy": paraphrase_retrieval(emb), "paraphrase_margin": paraphrase_margin(emb)}


def probe_texts(pairs: Sequence[Sequence[str]]) -> list[str]:
    return [s for pair in pairs for s in pair]
