"""The synthetic task suite: seeded, correct, short, with recorded label noise,
and its tokenizer loadable through AutoTokenizer."""

import filecmp
import json
import os

import pytest
import transformers

from ftjax import data
from ftjax.data import synthetic

SIZES = dict(general_train=300, general_eval=40, target_train=120, target_eval=30)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return data.write_suite(str(tmp_path_factory.mktemp("suite")), seed=0, **SIZES)


def test_same_seed_same_suite_other_seed_different(tmp_path, suite):
    again = data.write_suite(str(tmp_path / "a"), seed=0, **SIZES)
    other = data.write_suite(str(tmp_path / "b"), seed=1, **SIZES)
    for key in ("general_train", "general_eval", "target_train", "target_eval", "manifest"):
        assert filecmp.cmp(suite[key], again[key], shallow=False), key
        assert not filecmp.cmp(suite[key], other[key], shallow=False), key


def _solve(task, prompt):
    body = prompt.split(":", 1)[1][:-1]
    if task == "copy":
        return body
    if task == "reverse":
        return body[::-1]
    if task == "sort":
        return "".join(sorted(body))
    if task == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if task == "lookup":
        pairs, key = body.split("?")
        return dict((p[0], p[1]) for p in pairs.split(","))[key]
    if task == "rot":
        return "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in body)
    if task == "modop":
        a, b = body.split("#")
        return str((int(a) + 2 * int(b)) % 10)
    raise AssertionError(task)


@pytest.mark.parametrize("target_task", ["rot", "modop"])
def test_rows_are_correct_short_and_eval_is_unseen(tmp_path, target_task):
    paths = data.write_suite(str(tmp_path), seed=2, target_task=target_task, **SIZES)
    general, target = read(paths["general_train"]), read(paths["target_train"])
    assert {r["task"] for r in general} == set(synthetic.GENERAL_TASKS)
    assert {r["task"] for r in target} == {target_task}
    for name in ("general_train", "general_eval", "target_train", "target_eval"):
        rows = read(paths[name])
        assert len(rows) == SIZES[name]
        for r in rows:
            assert r["answer"] == r["completion"] == _solve(r["task"], r["prompt"])
            assert len(r["prompt"] + r["completion"]) <= synthetic.MAX_CHARS
            assert r["text"] == r["prompt"] + r["completion"]
    for split in ("general", "target"):
        train = {r["prompt"] for r in read(paths[f"{split}_train"])}
        assert not train & {r["prompt"] for r in read(paths[f"{split}_eval"])}
    # The target operation never appears in the general data.
    op = "rot:" if target_task == "rot" else "#"
    assert not any(op in r["prompt"] for r in general)


def test_label_noise_is_recorded(tmp_path):
    paths = data.write_suite(str(tmp_path), seed=0, label_noise=0.25, **SIZES)
    rows = {r["id"]: r for r in read(paths["target_train"])}
    corrupted = json.load(open(paths["manifest"]))["corrupted"]
    noisy = [r for r in rows.values() if r["noisy"]]
    assert len(noisy) == len(corrupted) and 15 <= len(corrupted) <= 50
    for rec in corrupted:
        row = rows[rec["id"]]
        assert row["completion"] == rec["wrong"] != rec["answer"] == row["answer"]
        assert len(rec["wrong"]) == len(rec["answer"])  # plausible: same shape
    clean = [r for r in rows.values() if not r["noisy"]]
    assert all(r["completion"] == r["answer"] for r in clean)
    # Eval and general data stay clean.
    assert not any(r["noisy"] for r in read(paths["target_eval"]) + read(paths["general_train"]))


def test_tokenizer_roundtrips_through_autotokenizer(tmp_path):
    a = data.build_char_tokenizer(str(tmp_path / "a"))
    b = data.build_char_tokenizer(str(tmp_path / "b"))
    for f in os.listdir(a):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    tok = transformers.AutoTokenizer.from_pretrained(a)
    text = "add:12+7=19"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s><|user|>hi<|end|><|assistant|>"
    assert len(tok(chat, add_special_tokens=False)["input_ids"]) == 6
    assert tok.decode(tok(chat)["input_ids"], skip_special_tokens=True) == "hi"


def test_suite_goes_through_the_pipeline(tmp_path, suite):
    tok_dir = data.build_char_tokenizer(str(tmp_path / "tok"))
    cfg = data.suite_data_config(suite, tok_dir, general_weight=0.0, batch_size=4,
                                 cache_dir=str(tmp_path / "cache"))  # fmt: skip
    pipe = data.build_pipeline(cfg)
    s = pipe.stats
    assert pipe.eval_names == ("general", "target")
    assert s["train_examples"] == SIZES["target_train"] and s["truncated"] == 0
    assert s["sources"]["general"]["eval_examples"] == SIZES["general_eval"]
    assert len(pipe.pool) == SIZES["target_train"]  # general is eval-only at weight 0
    assert pipe.batch_at(0)["input_ids"].shape == (4, cfg.seq_len)
    # The exact-match answers travel with the eval rows, aligned with example_index.
    rows = pipe.eval_rows("target")
    b = next(pipe.eval_batches("target"))
    first = b["input_ids"][0][b["attention_mask"][0] > 0]
    assert pipe.tokenizer.decode(first) == f"<s>{rows[0]['prompt']}{rows[0]['answer']}</s>"
    assert pipe.stats_line().startswith("data: 2 source(s), 120 train / 70 eval examples")
