"""Loss / perplexity / accuracy over eval sets against float64 numpy, and the
forgetting numbers."""

import jax
import numpy as np
import pytest
from hf_fixtures import VOCAB, tiny_model

from ftjax.eval import (
    evaluate_batches,
    evaluate_sets,
    flatten_sets,
    forgetting,
    lower_is_better,
    metric_change,
    perplexity,
    summarize,
    unflatten_sets,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def _batch(rng, rows, width, lengths, prompt_lengths, packed=False):
    ids = rng.integers(0, VOCAB, (rows, width + 1)).astype(np.int32)
    attention = np.zeros((rows, width), np.int32)
    loss_mask = np.zeros((rows, width), np.float32)
    for r, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        attention[r, :n] = 1
        loss_mask[r, p:n] = 1  # no loss on the prompt or on the padding
    batch = {
        "input_ids": ids[:, :-1] * attention,
        "targets": ids[:, 1:],
        "loss_mask": loss_mask,
        "attention_mask": attention,
    }
    if packed:  # two documents in row 0: positions restart, attention stays inside each
        seg = attention.copy()
        seg[0, 5:] = 2 * attention[0, 5:]
        pos = np.zeros_like(attention)
        pos[0, :5], pos[0, 5:] = np.arange(5), np.arange(width - 5)
        pos[1:] = np.arange(width)
        batch.update(segment_ids=seg, positions=pos * attention)
    return batch


def _numpy_sums(model, params, batch):
    kwargs = {k: batch[k] for k in ("attention_mask", "positions", "segment_ids") if k in batch}
    logits = jax.jit(model.apply)({"params": params}, batch["input_ids"], **kwargs)
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    w = batch["loss_mask"].astype(np.float64)
    correct = (logits.argmax(-1) == batch["targets"]).astype(np.float64)
    return (nll * w).sum(), (correct * w).sum(), w.sum()


def test_loss_is_token_weighted_over_batches(tiny):
    model, params = tiny
    rng = np.random.default_rng(0)
    batches = [
        _batch(rng, 2, 12, lengths=[12, 7], prompt_lengths=[3, 0]),
        _batch(rng, 3, 8, lengths=[2, 8, 5], prompt_lengths=[1, 4, 0], packed=True),
    ]
    sums = np.array([_numpy_sums(model, params, b) for b in batches])
    got = evaluate_batches(model, params, batches)
    want_loss = sums[:, 0].sum() / sums[:, 2].sum()
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-6)
    np.testing.assert_allclose(got["perplexity"], np.exp(want_loss), rtol=1e-6)
    np.testing.assert_allclose(got["accuracy"], sums[:, 1].sum() / sums[:, 2].sum(), rtol=1e-6)
    assert got["tokens"] == sums[:, 2].sum() == 26 and got["batches"] == 2
    # The construction must tell the two averages apart, or the check proves nothing.
    assert abs(np.mean(sums[:, 0] / sums[:, 2]) - want_loss) > 1e-3


def test_evaluate_sets_names_each_set(tiny):
    model, params = tiny
    rng = np.random.default_rng(1)
    a = [_batch(rng, 2, 8, [8, 8], [0, 0])]
    b = [_batch(rng, 2, 8, [4, 8], [0, 2]), _batch(rng, 2, 8, [8, 3], [2, 0])]
    got = evaluate_sets(model, params, {"task": a, "general": iter(b)})
    assert set(got) == {"task", "general"}
    assert got["general"]["batches"] == 2 and got["general"]["tokens"] == 4 + 6 + 6 + 3
    assert got["task"]["loss"] != got["general"]["loss"]
    limited = evaluate_sets(model, params, {"general": b}, max_batches=1)
    assert limited["general"]["batches"] == 1


def test_no_loss_tokens_is_a_clear_error(tiny):
    model, params = tiny
    batch = _batch(np.random.default_rng(2), 2, 8, [8, 8], [8, 8])  # everything is prompt
    with pytest.raises(ValueError, match=r"'empty' has no loss tokens"):
        evaluate_sets(model, params, {"empty": [batch]})
    with pytest.raises(ValueError, match=r"yielded no batches"):
        evaluate_batches(model, params, [])
    with pytest.raises(KeyError, match=r"missing \['loss_mask'\]"):
        evaluate_batches(
            model, params, [{"input_ids": batch["input_ids"], "targets": batch["targets"]}]
        )


def test_forgetting_signs_and_means():
    before = {
        "wiki": {"loss": 2.0, "perplexity": np.exp(2.0), "accuracy": 0.40},
        "arc": {"acc": 0.60, "acc_norm": 0.62},
        "task": {"loss": 3.0},
    }
    after = {
        "wiki": {"loss": 2.5, "perplexity": np.exp(2.5), "accuracy": 0.30},
        "arc": {"acc": 0.55, "acc_norm": 0.64},
    }
    got = forgetting(before, after)
    assert set(got) == {"wiki", "arc", "mean"}  # "task" has no after: not a common set
    assert got["wiki"]["loss_increase"] == pytest.approx(0.5)
    assert got["wiki"]["accuracy_drop"] == pytest.approx(0.10)
    assert got["wiki"]["perplexity_increase"] == pytest.approx(np.exp(2.5) - np.exp(2.0))
    assert got["arc"]["acc_drop"] == pytest.approx(0.05)
    assert got["arc"]["acc_norm_drop"] == pytest.approx(-0.02)  # improved: negative forgetting
    assert got["mean"]["loss_increase"] == pytest.approx(0.5)
    assert got["arc"]["acc_before"] == 0.60 and got["arc"]["acc_after"] == 0.55
    with pytest.raises(KeyError, match=r"'task' is missing from the after"):
        forgetting(before, after, sets=["task"])
    with pytest.raises(ValueError, match=r"no eval set in common"):
        forgetting({"a": {"loss": 1.0}}, {"b": {"loss": 1.0}})


def test_one_perplexity_everywhere():
    """exp(loss) without a finite cap: inf only where exp overflows; summarize
    (the reduction the training loop shares) uses it."""
    assert perplexity(2.0) == pytest.approx(np.exp(2.0), rel=1e-15)
    assert perplexity(60.0) == pytest.approx(np.exp(60.0), rel=1e-15)  # no cap at e^50
    assert perplexity(709.0) < float("inf") and perplexity(710.0) == float("inf")
    got = summarize({"loss_sum": 30.0, "correct_sum": 4.0, "weight_sum": 10.0})
    assert got == {"loss": 3.0, "perplexity": perplexity(3.0), "accuracy": 0.4, "tokens": 10.0}


def test_summary_keys_round_trip():
    sets = {"target": {"loss": 1.5, "accuracy": 0.6, "tokens": 9.0}, "a/b": {"loss": 2.0}}
    flat = flatten_sets(sets, "final")
    assert flat == {"final/target/loss": 1.5, "final/target/token_accuracy": 0.6,
                    "final/a/b/loss": 2.0}  # fmt: skip
    assert unflatten_sets({**flat, "final/loss": 9.0, "eval/target/loss": 7.0}, "final") == {
        "target": {"loss": 1.5, "accuracy": 0.6}, "a/b": {"loss": 2.0}}  # fmt: skip
    assert flatten_sets(sets, "base", metrics=("loss",)) == {
        "base/target/loss": 1.5, "base/a/b/loss": 2.0}  # fmt: skip


def test_metric_change_direction_and_names():
    assert metric_change("loss", 2.0, 2.5) == ("loss_increase", 0.5)
    assert metric_change("word_perplexity", 10.0, 12.0) == ("word_perplexity_increase", 2.0)
    assert metric_change("exact_match", 0.75, 0.5) == ("exact_match_drop", 0.25)
    # lm-eval's filtered names take the direction of their metric.
    assert metric_change("exact_match_strict-match", 0.5, 0.25) == (
        "exact_match_strict-match_drop", 0.25)  # fmt: skip
    assert metric_change("acc_norm", 0.5, 0.75) == ("acc_norm_drop", -0.25)
    assert metric_change("tokens", 10, 12) is None and lower_is_better("mystery") is None
    # forgetting() keeps only metrics of known direction.
    got = forgetting({"s": {"loss": 1.0, "tokens": 5.0, "score": 0.5}},
                     {"s": {"loss": 1.5, "tokens": 6.0, "score": 0.25}})  # fmt: skip
    assert set(got["s"]) == {"loss_before", "loss_after", "loss_increase",
                             "score_before", "score_after", "score_drop"}  # fmt: skip
    with pytest.raises(ValueError, match=r"no metric that both sides report"):
        forgetting({"s": {"tokens": 1.0}}, {"s": {"tokens": 2.0}})
