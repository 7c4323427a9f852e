"""Classification and embedding metrics against their references:
scikit-learn's accuracy, F1 and Matthews correlation, scipy's Pearson and
Spearman (what GLUE's own scoring uses), and closed forms for the
sentence-embedding probe."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from ftjax.eval import classification as cls
from ftjax.eval import embeddings


@pytest.mark.parametrize("k,n,seed", [(2, 50, 0), (2, 7, 1), (3, 80, 2), (5, 200, 3)])
def test_class_metrics_match_sklearn(k, n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    assert cls.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p))
    assert cls.matthews(y, p) == pytest.approx(skm.matthews_corrcoef(y, p))
    assert cls.f1(y, p) == pytest.approx(skm.f1_score(y, p, labels=[1], average="macro"))
    classes = np.union1d(y, p)
    assert cls.macro_f1(y, p) == pytest.approx(skm.f1_score(y, p, labels=classes, average="macro"))


def test_degenerate_cases():
    assert cls.matthews([1, 1, 1], [1, 1, 1]) == 0.0  # constant marginals: sklearn's 0 too
    assert cls.f1([0, 0], [0, 0]) == 0.0
    assert cls.pearson([1, 2, 3], [5, 5, 5]) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=60)
    y = 0.5 * x + rng.normal(size=60)
    y[:10] = np.round(y[:10])  # ties
    x[5:15] = 1.0
    assert cls.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert cls.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    np.testing.assert_allclose(cls.ranks(x), scipy.stats.rankdata(x))


def test_score_eval_set_aligns_rows_and_drops_fill():
    """Rows arrive in batches with fill rows (-1) and in any order; each
    example's prediction meets its own label."""
    labels = np.array([0, 1, 1, 0, 1])
    rows = [np.array([3, 0, 4]), np.array([2, 1, -1])]
    preds = [np.array([[0], [0], [0]]), np.array([[1], [0], [1]])]
    out = cls.score_eval_set(labels, rows, preds, "class")
    by_row = {3: 0, 0: 0, 4: 0, 2: 1, 1: 0}
    p = np.array([by_row[i] for i in range(5)])
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, p))
    assert out["f1"] == pytest.approx(skm.f1_score(labels, p))
    reg = cls.score_eval_set(np.array([0.0, 1.0, 2.0]), [np.array([2, 0, 1])],
                             [np.array([2.1, 0.2, 0.9])], "regression")  # fmt: skip
    assert reg["pearson"] == pytest.approx(scipy.stats.pearsonr([0.2, 0.9, 2.1], [0, 1, 2])[0])


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_paraphrase_retrieval_and_margin_closed_form():
    # Pairs (0,1) and (2,3): each sentence nearest its partner, except 3,
    # which is nearest to 1.
    emb = _unit([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.8, 0.3, 0.1]])
    sims = emb @ emb.T
    assert np.argmax(np.where(np.eye(4, dtype=bool), -9, sims)[3]) == 1
    assert embeddings.paraphrase_retrieval(emb) == 0.75
    pair = [sims[0, 1], sims[1, 0], sims[2, 3], sims[3, 2]]
    other = [sims[i, j] for i in range(4) for j in range(4) if i != j and j != i ^ 1]
    assert embeddings.paraphrase_margin(emb) == pytest.approx(np.mean(pair) - np.mean(other))
    assert embeddings.similarity_kept(emb, emb) == pytest.approx(1.0)


def test_minilm_sentence_embeddings_match_the_pytorch_pooling():
    """Mean pooling + normalization of ftjax's MiniLM equals the same pooling
    over transformers' hidden states (sentence-transformers' recipe)."""
    import torch
    import transformers
    from test_model_encoders import SENTENCES, minilm_dir

    from ftjax.models import from_pretrained

    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model, params = from_pretrained(path)
    got = embeddings.sentence_embeddings(model, params, tok, SENTENCES, batch_size=3)
    ref_model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert np.abs(got - ref).max() <= 1e-5
