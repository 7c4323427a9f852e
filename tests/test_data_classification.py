"""Classification data: the tokenizer's own special tokens and segment ids,
one target per row, a deterministic resumable stream split across
processes, eval batches aligned to their labels, and bad input refused by
file, line and field."""

from __future__ import annotations

import os

import numpy as np
import pytest
import transformers
from hf_fixtures import write_jsonl
from test_model_encoders import minilm_dir

from ftjax.data import build_pipeline, default_data_config
from ftjax.data.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_dir())


def _rows(n, regression=False):
    return [{"a": f"sentence number {i} is here", "b": f"and its pair {i}",
             "y": (i % 5) * 0.5 if regression else i % 3} for i in range(n)]  # fmt: skip


def _config(tmp_path, rows, eval_rows=None, **data):
    path = write_jsonl(os.path.join(tmp_path, "train.jsonl"), rows)
    cfg = default_data_config()
    src = dict(path=path, format="classification", fields=dict(text="a", text_pair="b", label="y"))
    if eval_rows is not None:
        src["eval_path"] = write_jsonl(os.path.join(tmp_path, "eval.jsonl"), eval_rows)
    cfg.sources = {"task": src}
    cfg.update(seq_len=16, batch_size=4, **data)
    return cfg


def test_batches_are_the_tokenizers_encoding_with_one_target(tmp_path, tokenizer):
    rows = _rows(10)
    pipe = build_pipeline(_config(tmp_path, rows, rows[:5]), tokenizer)
    batch = pipe.batch_at(0)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (4, 16), "attention_mask": (4, 16), "token_type_ids": (4, 16),
        "targets": (4, 1), "loss_mask": (4, 1)}  # fmt: skip
    order = pipe.rows_at(0)
    for r, i in enumerate(order):
        ref = tokenizer(rows[i]["a"], rows[i]["b"], padding="max_length", max_length=16,
                        truncation=True)  # fmt: skip
        np.testing.assert_array_equal(batch["input_ids"][r], ref["input_ids"])
        np.testing.assert_array_equal(batch["token_type_ids"][r], ref["token_type_ids"])
        assert batch["targets"][r, 0] == rows[i]["y"]
    assert batch["targets"].dtype == np.int32 and pipe.num_classes == 3


def test_stream_is_resumable_epoch_complete_and_split_over_processes(tmp_path, tokenizer):
    cfg = _config(tmp_path, _rows(12), _rows(3))
    pipe = build_pipeline(cfg, tokenizer)
    again = build_pipeline(cfg, tokenizer)
    np.testing.assert_array_equal(pipe.batch_at(5)["input_ids"], again.batch_at(5)["input_ids"])
    epoch = np.concatenate([pipe.rows_at(s) for s in range(3)])  # 12 examples, batch 4
    assert sorted(epoch) == list(range(12))
    assert not np.array_equal(epoch, np.concatenate([pipe.rows_at(s) for s in range(3, 6)]))
    halves = [build_pipeline(cfg, tokenizer, process_index=i, process_count=2) for i in (0, 1)]
    np.testing.assert_array_equal(
        np.concatenate([h.batch_at(4)["input_ids"] for h in halves]), pipe.batch_at(4)["input_ids"]
    )


def test_eval_batches_mark_fill_rows_and_align_labels(tmp_path, tokenizer):
    eval_rows = _rows(7, regression=True)
    pipe = build_pipeline(
        _config(tmp_path, _rows(8, regression=True), eval_rows, eval_batch_size=4), tokenizer
    )
    assert pipe.label_kind == "regression" and pipe.stats["num_classes"] == 0
    batches = list(pipe.eval_batches("task"))
    index = np.concatenate([b["example_index"] for b in batches])
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    valid = np.concatenate([b["loss_mask"][:, 0] for b in batches])
    assert valid.tolist() == [1] * 7 + [0]
    targets = np.concatenate([b["targets"][:, 0] for b in batches])[:7]
    np.testing.assert_allclose(targets, [r["y"] for r in eval_rows])
    assert targets.dtype == np.float32


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda rows: rows[3].update(y=-1), r"train.jsonl line 4: field 'y' is -1; expected a class"),
        (lambda rows: rows[2].update(a=None), r"train.jsonl line 3: field 'a' is None; expected a string"),
        (lambda rows: [r.pop("b") for r in rows], r"no field 'b'; format 'classification' reads it"),
        (lambda rows: rows[0].update(y="pos"), r"line 1: field 'y' is 'pos'"),
    ],
)  # fmt: skip
def test_bad_rows_are_refused_by_location(tmp_path, tokenizer, change, match):
    rows = _rows(6)
    change(rows)
    with pytest.raises(DataError, match=match):
        build_pipeline(_config(tmp_path, rows), tokenizer)


def test_overlong_example_without_truncation_is_refused(tmp_path, tokenizer):
    rows = _rows(4)
    rows[1]["a"] = "word " * 40
    with pytest.raises(
        DataError, match=r"train.jsonl line 2: \d+ tokens, longer than data.seq_len=16"
    ):
        build_pipeline(_config(tmp_path, rows, truncation=False), tokenizer)
    pipe = build_pipeline(_config(tmp_path, rows), tokenizer)
    assert pipe.stats["sources"]["task"]["truncated"] >= 1


def test_mixing_with_language_modelling_sources_is_refused(tmp_path, tokenizer):
    cfg = _config(tmp_path, _rows(4))
    cfg.sources.lm = dict(path=write_jsonl(os.path.join(tmp_path, "lm.jsonl"), [{"text": "x"}]),
                          format="text")  # fmt: skip
    with pytest.raises(DataError, match="cannot be mixed with language-modelling"):
        build_pipeline(cfg, tokenizer)


def _tagged(n):
    words = ["the", "unbelievably", "quiet", "nurse", "reads"]
    return [{"tokens": words[: 2 + i % 4], "tags": [j % 3 for j in range(2 + i % 4)]}
            for i in range(n)]  # fmt: skip


def _token_config(tmp_path, rows, eval_rows):
    cfg = default_data_config()
    cfg.sources = {"ner": dict(path=write_jsonl(os.path.join(tmp_path, "t.jsonl"), rows),
                               eval_path=write_jsonl(os.path.join(tmp_path, "e.jsonl"), eval_rows),
                               format="token_classification")}  # fmt: skip
    cfg.update(seq_len=12, batch_size=4)
    return cfg


def test_token_labels_sit_on_each_words_first_piece(tmp_path, tokenizer):
    rows = _tagged(8)
    pipe = build_pipeline(_token_config(tmp_path, rows, rows[:3]), tokenizer)
    assert pipe.label_kind == "token" and pipe.num_classes == 3
    batch = pipe.batch_at(0)
    assert batch["targets"].shape == batch["loss_mask"].shape == (4, 12)
    pieces = tokenizer.tokenize("unbelievably")
    assert len(pieces) > 1  # the check below is about a word split into pieces
    for r, i in enumerate(pipe.rows_at(0)):
        words, tags = rows[i]["tokens"], rows[i]["tags"]
        # [CLS], then each word's pieces: its tag on the first, nothing on the rest.
        expected_mask, expected_tags = [0], []
        for w, t in zip(words, tags):
            n = len(tokenizer.tokenize(w))
            expected_mask += [1] + [0] * (n - 1)
            expected_tags.append(t)
        expected_mask += [0] * (12 - len(expected_mask))
        assert batch["loss_mask"][r].tolist() == expected_mask
        assert batch["targets"][r][batch["loss_mask"][r] > 0].tolist() == expected_tags


def test_token_rows_are_checked(tmp_path, tokenizer):
    rows = _tagged(4)
    rows[2]["tags"] = rows[2]["tags"][:-1]
    with pytest.raises(DataError, match="t.jsonl line 3: fields 'tokens', 'tags' are"):
        build_pipeline(_token_config(tmp_path, rows, rows[:1]), tokenizer)


@pytest.mark.slow
def test_token_classification_trains_and_scores(tmp_path):
    """A tiny BERT token classifier through the loop: per-token loss on first
    pieces only, and accuracy / macro-F1 over the labeled tokens."""
    from ftjax.train import default_config, train

    cfg = default_config()
    cfg.data = _token_config(tmp_path, _tagged(32), _tagged(8))
    cfg.data.tokenizer = minilm_dir()
    cfg.model.init.update(model_type="bert", vocab_size=30522, hidden_size=32,
                          intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=4,
                          max_position_embeddings=32, type_vocab_size=2)  # fmt: skip
    cfg.model.update(task="token_classification", num_labels=3)
    cfg.method = {"name": "lora", "rank": 4, "targets": "qv"}
    cfg.optim.update(lr=1e-2, warmup_steps=1)
    cfg.train.update(steps=30, log_every=10, tensorboard=False)
    summary = train(cfg, str(tmp_path / "run"), quiet=True).summary
    # The tags are a function of the word's position: learnable from positions.
    assert summary["eval/ner/accuracy"] > 0.6
    assert {"eval/ner/macro_f1", "eval/ner/mcc"} <= set(summary)
    assert summary["eval/ner/accuracy"] == pytest.approx(summary["eval/ner/token_accuracy"])
