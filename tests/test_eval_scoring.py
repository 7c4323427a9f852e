"""Exact match, continuation log-likelihoods and multiple-choice scores against
float64 numpy computations."""

import numpy as np
import pytest
from hf_fixtures import char_tokenizer, log_probs64, tiny_model

from ftjax.eval import (
    encode_pair,
    exact_match,
    exact_match_scores,
    loglikelihoods,
    normalize_answer,
    score_multiple_choice,
    strip_whitespace,
)


def _numpy_loglikelihood(model, params, context, continuation):
    seq = list(context) + list(continuation)
    logp = log_probs64(model, params, seq[:-1])
    rows = range(len(context) - 1, len(seq) - 1)
    total = sum(logp[t, seq[t + 1]] for t in rows)
    greedy = all(logp[t].argmax() == seq[t + 1] for t in rows)
    return total, greedy


def test_exact_match_with_normalizer_hook():
    preds = ["The Answer: Paris!", "4", " forty-two "]
    refs = [["paris", "Paris, France"], "four", "Forty-two"]
    assert normalize_answer(preds[0]) == "answer paris"
    assert exact_match_scores(preds, refs, normalizer=normalize_answer) == [False, False, True]
    # A task-specific normalizer: keep only what follows "Answer:".
    answer_only = lambda s: normalize_answer(s.split("Answer:")[-1])
    assert exact_match_scores(preds, refs, normalizer=answer_only) == [True, False, True]
    assert exact_match(preds, refs, normalizer=None) == 0.0  # raw strings differ
    assert exact_match(["a"], ["a"], normalizer=None) == 1.0
    with pytest.raises(ValueError, match=r"2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"], normalizer=None)
    with pytest.raises(TypeError, match=r"normalizer"):  # the normalization is never implicit
        exact_match(["a"], ["a"])


def test_exact_string_answers_ignore_only_surrounding_whitespace():
    """The synthetic suite's answers are exact strings: case, punctuation and
    words like "a" are part of them, only generation's stray whitespace is not."""
    preds = [" cba\n", "Cba", "cba.", "a", "the cat", "1 2"]
    refs = ["cba", "cba", "cba", "a", "cat", "12"]
    assert exact_match_scores(preds, refs, normalizer=strip_whitespace) == [
        True, False, False, True, False, False]  # fmt: skip
    # SQuAD's normalization would count three wrong answers right ("Cba", "cba.", "the cat").
    assert exact_match_scores(preds, refs, normalizer=normalize_answer) == [
        True, True, True, True, True, False]  # fmt: skip
    assert exact_match(preds, refs, normalizer=strip_whitespace) == pytest.approx(2 / 6)


def test_exact_match_on_scores_generated_answers():
    """exact_match_on = generate_answers, then exact_match: references made
    from the model's own greedy answers all match, changed ones do not."""
    from ftjax.eval import exact_match_on, generate_answers

    model, params = tiny_model("llama")
    tok = char_tokenizer()
    prompts = ["ab", "hello", "xyz", "q"]
    answers = generate_answers(model, params, tok, prompts, max_new_tokens=4, add_bos=False)
    kw = dict(max_new_tokens=4, batch_size=3, add_bos=False)
    assert exact_match_on(model, params, tok, prompts, answers, **kw) == 1.0
    wrong = answers[:2] + [a + "!" for a in answers[2:]]
    assert exact_match_on(model, params, tok, prompts, wrong, **kw) == 0.5


def test_multiple_choice_equals_numpy_log_likelihoods():
    model, params = tiny_model("llama")
    tok = char_tokenizer()
    items = [
        {
            "context": "The sky is",
            "choices": [" blue", " green", " a very long answer"],
            "label": 0,
        },
        {"context": "2 + 2 = ", "choices": ["4", "five", "22"], "label": 1},
        {"context": "Q: which one?\nA:", "choices": [" x", " yy"], "label": 1},
    ]
    got = score_multiple_choice(model, params, tok, items, batch_size=3)
    hits = {"acc": [], "acc_norm": [], "acc_per_token": []}
    for item, scores in zip(items, got["scores"], strict=True):
        ctx = item["context"].rstrip(" ")
        ll, chars, toks = [], [], []
        for choice in item["choices"]:
            cont = item["context"][len(ctx) :] + choice  # trailing spaces move to the choice
            ll.append(_numpy_loglikelihood(model, params, tok.encode(ctx), tok.encode(cont))[0])
            chars.append(len(choice))
            toks.append(len(cont))
        np.testing.assert_allclose(scores, ll, rtol=1e-5, atol=1e-4)
        ll = np.array(ll)
        hits["acc"].append(ll.argmax() == item["label"])
        hits["acc_norm"].append((ll / np.array(chars)).argmax() == item["label"])
        hits["acc_per_token"].append((ll / np.array(toks)).argmax() == item["label"])
    for name, h in hits.items():
        assert got[name] == pytest.approx(np.mean(h)), name
    assert got["n"] == 3


def test_loglikelihoods_truncation_and_greedy_flag():
    model, params = tiny_model("llama")
    rng = np.random.default_rng(0)
    context = rng.integers(1, 97, 20).tolist()
    greedy_cont = []
    for _ in range(3):
        greedy_cont.append(int(log_probs64(model, params, context + greedy_cont)[-1].argmax()))
    other = [(greedy_cont[0] + 1) % 97, *greedy_cont[1:]]
    requests = [
        (context, greedy_cont),
        (context, other),
        (context[:5], [7]),
        (context[-3:], [9, 9]),
    ]
    got = loglikelihoods(model, params, requests, batch_size=2)
    for (ctx, cont), ll, greedy in zip(requests, got.logprob, got.is_greedy, strict=True):
        want_ll, want_greedy = _numpy_loglikelihood(model, params, ctx, cont)
        np.testing.assert_allclose(ll, want_ll, rtol=1e-5, atol=1e-4)
        assert greedy == want_greedy
    assert got.is_greedy[0] and not got.is_greedy[1]
    assert got.num_tokens.tolist() == [3, 3, 1, 2]
    # With a 12-token window, the context loses its oldest tokens.
    short = loglikelihoods(model, params, requests[:1], max_length=12)
    want = _numpy_loglikelihood(model, params, context[-(13 - 3) :], greedy_cont)[0]
    np.testing.assert_allclose(short.logprob[0], want, rtol=1e-5, atol=1e-4)
    assert abs(short.logprob[0] - got.logprob[0]) > 1e-4  # the cut changed something


def test_bad_scoring_requests():
    model, params = tiny_model("llama")
    with pytest.raises(ValueError, match=r"continuation of 13 tokens does not fit .* 12 tokens"):
        loglikelihoods(model, params, [([1], list(range(1, 14)))], max_length=12)
    with pytest.raises(ValueError, match=r"empty continuation"):
        loglikelihoods(model, params, [([1, 2], [])])
    with pytest.raises(ValueError, match=r"empty context"):
        loglikelihoods(model, params, [([], [3])])
    with pytest.raises(ValueError, match=r"label 3 is not an index into 2 choices"):
        score_multiple_choice(
            model, params, char_tokenizer(), [{"context": "a", "choices": ["b", "c"], "label": 3}]
        )


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = char_tokenizer()
    ctx, cont = encode_pair(tok, "The answer is ", "blue")
    assert tok.decode(ctx) == "The answer is" and tok.decode(cont) == " blue"
    ctx, cont = encode_pair(tok, "", "blue")
    assert ctx == [tok.eos_token_id] and tok.decode(cont) == "blue"
