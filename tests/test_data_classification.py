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
