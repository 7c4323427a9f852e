"""KV-cache generation against decoding by repeated full forward passes and
against transformers' `generate`; sampling filters; stop tokens; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import (
    LowRankLeaf,
    build_tiny,
    char_tokenizer,
    low_rank_adapt,
    tiny_model,
)

from ftjax.eval import filter_logits, generate, left_pad
from ftjax.models import from_pretrained


@jax.tree_util.register_pytree_node_class
class _Static:
    """(model, params) as one jit argument: the model static, the params traced."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __iter__(self):
        return iter((self.model, self.params))

    def tree_flatten(self):
        return (self.params,), self.model

    @classmethod
    def tree_unflatten(cls, model, children):
        return cls(model, children[0])


PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7], [33, 2, 71, 4]]  # different lengths: left padding


def _tiny(model_type, scan=False):
    return tiny_model(model_type, scan)


@jax.jit
def _full_forward(model_and_params, ids):
    model, params = model_and_params
    return model.apply({"params": params}, ids)


def _greedy_without_cache(model, params, prompt, steps, stop=()):
    """Greedy decoding by a full forward pass over the whole sequence per token.
    The sequence is right-padded to a fixed width (causal attention cannot see
    the padding) so that one compiled forward serves every step."""
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, 32), np.int32)
        padded[0, : len(ids)] = ids
        logits = _full_forward(_Static(model, params), jnp.asarray(padded))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
        if ids[-1] in stop:
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("model_type,scan", [("llama", False), ("gpt2", True)])
def test_cached_greedy_equals_full_forward_decoding(model_type, scan):
    model, params = _tiny(model_type, scan)
    out = generate(model, params, PROMPTS, max_new_tokens=8)
    want = [_greedy_without_cache(model, params, p, 8) for p in PROMPTS]
    assert out.sequences() == want
    assert list(out.lengths) == [8, 8, 8] and not out.stopped.any()
    # The rows must not all be the same sequence, or padding could be ignored unseen.
    assert len({tuple(w) for w in want}) == 3


def test_stop_tokens_end_each_row():
    model, params = _tiny("llama")
    free = generate(model, params, PROMPTS, max_new_tokens=8).sequences()
    stop = free[0][3]  # the 4th token of row 0 becomes a stop token
    out = generate(model, params, PROMPTS, max_new_tokens=8, stop_tokens=[stop], pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        want = _greedy_without_cache(model, params, prompt, 8, stop=[stop])
        n = len(want)
        assert out.lengths[row] == n and bool(out.stopped[row]) == (want[-1] == stop)
        assert list(out.tokens[row, :n]) == want
        assert (out.tokens[row, n:] == 0).all()  # padding after the stop
    assert out.sequences()[0] == free[0][:3]  # stop token stripped
    assert out.sequences(strip_stop=False)[0] == free[0][:4]


def test_sampling_top_k_1_is_greedy_and_sampling_varies():
    model, params = _tiny("llama")
    greedy = generate(model, params, PROMPTS, max_new_tokens=8).sequences()
    top1 = generate(model, params, PROMPTS, max_new_tokens=8, temperature=1.5, top_k=1, rng=3)
    assert top1.sequences() == greedy
    hot = [
        generate(model, params, PROMPTS, max_new_tokens=8, temperature=5.0, rng=s).sequences()
        for s in (0, 1)
    ]
    assert hot[0] != hot[1] and hot[0] != greedy
    # Same seed, same samples.
    again = generate(model, params, PROMPTS, max_new_tokens=8, temperature=5.0, rng=0)
    assert again.sequences() == hot[0]


def test_top_p_samples_stay_in_the_nucleus():
    model, params = _tiny("llama")
    out = generate(model, params, PROMPTS, max_new_tokens=8, temperature=2.0, top_p=0.3, rng=5)
    widths = []
    for prompt, new in zip(PROMPTS, out.sequences(), strict=True):
        for t in range(len(new)):
            padded = np.zeros((1, 32), np.int32)
            padded[0, : len(prompt) + t] = prompt + new[:t]
            logits = _full_forward(_Static(model, params), jnp.asarray(padded))
            nucleus = filter_logits(logits[:, len(prompt) + t - 1] / 2.0, top_p=0.3)
            allowed = np.flatnonzero(np.isfinite(np.asarray(nucleus[0])))
            assert new[t] in allowed
            widths.append(len(allowed))
    assert max(widths) > 1  # some steps had a choice to make


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.25]]))
    kept = lambda f: np.isfinite(np.asarray(f))[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [False, True, True, False]
    # Nucleus: 0.4 < 0.6, 0.4 + 0.3 >= 0.6 -> the two most likely tokens.
    assert kept(filter_logits(logits, top_p=0.6)) == [False, True, True, False]
    assert kept(filter_logits(logits, top_p=0.75)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.1)) == [False, True, False, False]
    assert kept(filter_logits(logits)) == [True] * 4
    # top-p after top-k renormalizes over the k kept: 0.4/0.95 < 0.5 <= 0.7/0.95.
    assert kept(filter_logits(logits, top_k=3, top_p=0.5)) == [False, True, True, False]
    # ... and over 2: 0.4/0.7 = 0.57 >= 0.5 already.
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == [False, True, False, False]


def test_adapter_leaves_generate_like_merged_params():
    model, params = _tiny("llama")
    adapted = low_rank_adapt(params, rank=2, a_std=0.5, b_std=0.5)
    merged = jax.tree.map(
        lambda x: x.materialize() if isinstance(x, LowRankLeaf) else x,
        adapted,
        is_leaf=lambda x: isinstance(x, LowRankLeaf),
    )
    got = generate(model, adapted, PROMPTS, max_new_tokens=8).sequences()
    assert got == generate(model, merged, PROMPTS, max_new_tokens=8).sequences()
    assert got != generate(model, params, PROMPTS, max_new_tokens=8).sequences()


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_greedy_equals_transformers_generate(family, tiny_checkpoint):
    torch_model = build_tiny(family)
    torch_model.generation_config.eos_token_id = None  # run the full length, as ours does
    torch_model.generation_config.pad_token_id = 0
    model, params = from_pretrained(tiny_checkpoint(family))
    ids, mask = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        hf = torch_model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
        )
    want = hf[:, ids.shape[1] :].numpy().tolist()
    assert generate(model, params, PROMPTS, max_new_tokens=8).sequences() == want


def test_bad_requests_are_clear_errors():
    model, params = _tiny("gpt2")
    with pytest.raises(
        ValueError, match=r"too long: prompt of 7 tokens \+ 60 new tokens exceeds .* 64"
    ):
        generate(model, params, PROMPTS, max_new_tokens=60)
    with pytest.raises(ValueError, match=r"at least one token"):
        generate(model, params, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1"):
        generate(model, params, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"top_p"):
        generate(model, params, PROMPTS, max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_answers_in_uniform_batches_equal_one_prompt_at_a_time():
    """The study's exact-match generation pads every batch to one width and
    fills the last batch with repeats (one compiled program per eval set); the
    answers must be those of each prompt decoded alone without a cache."""
    from ftjax.eval import generate_answers

    model, params = _tiny("llama")
    tok = char_tokenizer()
    prompts = ["ab", "hello w", "x", "qrs", "zz top", "m"]  # 6 prompts, batches of 4
    got = generate_answers(model, params, tok, prompts, max_new_tokens=5, batch_size=4,
                           add_bos=False)  # fmt: skip
    want = []
    for p in prompts:
        ids = _greedy_without_cache(model, params, tok.encode(p), 5, stop=(tok.eos_token_id,))
        want.append(tok.decode([i for i in ids if i != tok.eos_token_id]))
    assert got == want
    assert len(set(want)) > 1
