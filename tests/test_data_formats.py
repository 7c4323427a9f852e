"""Formats: which tokens are trained on, checked token by token on small
hand-built examples, and the chat-template failure modes."""

import numpy as np
import pytest
from hf_fixtures import write_jsonl

from ftjax import data
from ftjax.data.synthetic import build_char_tokenizer
from ftjax.data.tokenize import load_tokenizer

REVERSED_TEMPLATE = (  # renders the last message first: prefixes are not stable
    "{% for m in messages|reverse %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def pipeline(tmp_path, tok, rows, fmt, seq_len=48, **fields):
    cfg = data.default_data_config()
    cfg.sources.s = data.source_config(
        write_jsonl(tmp_path / "d.jsonl", rows), format=fmt, **fields
    )
    cfg.update(seq_len=seq_len, batch_size=1, packing=False, eval_fraction=0.0)
    cfg.cache_dir = str(tmp_path / "cache")
    return data.build_pipeline(cfg, tokenizer=tok)


def trained_pairs(tok, batch):
    """(input token, target token) at every position with loss_mask 1."""
    ids, tgt, mask = batch["input_ids"][0], batch["targets"][0], batch["loss_mask"][0]
    conv = tok.convert_ids_to_tokens
    return [(conv(int(i)), conv(int(t))) for i, t, m in zip(ids, tgt, mask, strict=True) if m]


def test_prompt_completion_trains_exactly_the_completion_and_eos(tmp_path, tok):
    pipe = pipeline(tmp_path, tok, [{"prompt": "ab=", "completion": "cd"}], "prompt_completion")
    b = pipe.batch_at(0)
    tokens = tok.convert_ids_to_tokens(b["input_ids"][0][:7].tolist())
    assert tokens == ["<s>", "a", "b", "=", "c", "d", "</s>"]
    # Position t predicts token t+1: "=" predicts "c", "c" -> "d", "d" -> "</s>".
    np.testing.assert_array_equal(b["loss_mask"][0][:8], [0, 0, 0, 1, 1, 1, 0, 0])
    assert trained_pairs(tok, b) == [("=", "c"), ("c", "d"), ("d", "</s>")]
    assert b["loss_mask"][0][7:].sum() == 0 and b["attention_mask"][0].sum() == 7


def test_field_names_are_configurable(tmp_path, tok):
    rows = [{"question": "x?", "answer": "y"}]
    pipe = pipeline(
        tmp_path, tok, rows, "prompt_completion", prompt="question", completion="answer"
    )
    assert trained_pairs(tok, pipe.batch_at(0)) == [("?", "y"), ("y", "</s>")]


def test_text_trains_every_token_after_the_first(tmp_path, tok):
    pipe = pipeline(tmp_path, tok, [{"text": "abc"}], "text")
    assert trained_pairs(tok, pipe.batch_at(0)) == [
        ("<s>", "a"),
        ("a", "b"),
        ("b", "c"),
        ("c", "</s>"),
    ]


def test_chat_trains_exactly_the_assistant_turns(tmp_path, tok):
    messages = [
        {"role": "system", "content": "be"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "k"},
    ]
    pipe = pipeline(tmp_path, tok, [{"messages": messages}], "chat")
    b = pipe.batch_at(0)
    # Hand-built expectation: every token of the rendering, and whether it is a target.
    expected = (
        [("<s>", 0), ("<|system|>", 0), ("b", 0), ("e", 0), ("<|end|>", 0)]
        + [("<|user|>", 0), ("h", 0), ("i", 0), ("<|end|>", 0), ("<|assistant|>", 0)]
        + [("y", 1), ("o", 1), ("<|end|>", 1)]
        + [("<|user|>", 0), ("o", 0), ("k", 0), ("?", 0), ("<|end|>", 0), ("<|assistant|>", 0)]
        + [("k", 1), ("<|end|>", 1)]
    )
    n = len(expected)
    assert tok.convert_ids_to_tokens(b["input_ids"][0][:n].tolist()) == [t for t, _ in expected]
    labels = [m for _, m in expected]
    # loss_mask[t] is the label of token t+1; the last token predicts nothing.
    np.testing.assert_array_equal(b["loss_mask"][0][: n - 1], labels[1:])
    assert b["loss_mask"][0][n - 1 :].sum() == 0
    assert trained_pairs(tok, b) == [
        ("<|assistant|>", "y"), ("y", "o"), ("o", "<|end|>"),
        ("<|assistant|>", "k"), ("k", "<|end|>"),
    ]  # fmt: skip


def test_chat_pieces_split_at_the_generation_prompt(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert data.chat_pieces(tok, msgs) == [
        ("<s><|user|>hi<|end|><|assistant|>", False),
        ("yo<|end|>", True),
    ]


def test_chat_without_template_is_a_clear_error(tmp_path):
    bare = load_tokenizer(build_char_tokenizer(str(tmp_path / "tok"), chat_template=None))
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(data.DataError, match=r"d\.jsonl: format 'chat' .*has none") as e:
        pipeline(tmp_path, bare, rows, "chat")
    assert "\n" not in str(e.value)


def test_chat_template_that_is_not_prefix_stable_is_refused(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    tok = load_tokenizer(tok.name_or_path)
    tok.chat_template = REVERSED_TEMPLATE
    with pytest.raises(data.DataError, match=r"d\.jsonl line 1: .*prefix by prefix at message 1"):
        pipeline(tmp_path, tok, rows, "chat")


def test_bad_messages_name_the_line(tmp_path, tok):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user"}]},
    ]
    with pytest.raises(data.DataError, match=r"d\.jsonl line 2: message 0 has no 'content' string"):
        pipeline(tmp_path, tok, rows, "chat")


@pytest.mark.parametrize("role", ["robot", "asistant"])
def test_unknown_role_is_refused_not_dropped(tmp_path, tok, role):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": role, "content": "b"}]},
    ]
    with pytest.raises(data.DataError) as e:
        pipeline(tmp_path, tok, rows, "chat")
    assert str(e.value).endswith(
        f"d.jsonl line 2: message 1 has unknown role {role!r}; expected one of "
        "system, user, assistant, tool"
    )
