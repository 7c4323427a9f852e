"""Sources, splits, filters, mixing and config validation, and every bad-input
error: each must name the file (and line or row) and say what was expected."""

import json

import numpy as np
import pandas as pd
import pytest
from hf_fixtures import write_jsonl

from ftjax import data


def make_cfg(tmp_path, sources, **top):
    cfg = data.default_data_config()
    for name, src in sources.items():
        cfg.sources[name] = src
    cfg.update(seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache"), **top)
    return cfg


def pc_rows(n, start=0):
    return [{"prompt": f"q{i}=", "completion": f"a{i}"} for i in range(start, start + n)]


def build(tmp_path, tok, rows, fmt="prompt_completion", name="d.jsonl", **top):
    src = data.source_config(write_jsonl(tmp_path / name, rows), format=fmt)
    return data.build_pipeline(make_cfg(tmp_path, {"s": src}, **top), tokenizer=tok)


# ----------------------------------------------------------------------------- file types


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet", "txt"])
def test_every_local_file_type_loads(tmp_path, tok, suffix):
    texts = [f"line {i}" for i in range(10)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, [{"text": t} for t in texts])
    elif suffix == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif suffix == "csv":
        pd.DataFrame({"text": texts}).to_csv(path, index=False)
    elif suffix == "parquet":
        pd.DataFrame({"text": texts}).to_parquet(path)
    else:
        path.write_text("\n".join(texts) + "\n")
    cfg = make_cfg(tmp_path, {"s": data.source_config(str(path), format="text")}, eval_fraction=0.2)
    pipe = data.build_pipeline(cfg, tokenizer=tok)
    assert (pipe.stats["train_examples"], pipe.stats["eval_examples"]) == (8, 2)
    got = sorted(pipe.tokenizer.decode(pipe.pool.tokens_of(i)[1:-1]) for i in range(8))
    got += list(pipe.eval_rows("s")["text"])
    assert sorted(got) == texts


# ----------------------------------------------------------------------------- bad input


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n{"text": "c"}\n')
    src = data.source_config(str(path), format="text")
    with pytest.raises(
        data.DataError,
        match=r"bad\.jsonl line 3: not valid JSON .*expected one JSON object per line",
    ) as e:
        data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)
    assert "\n" not in str(e.value)


def test_jsonl_line_that_is_not_an_object(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    src = data.source_config(str(path), format="text")
    with pytest.raises(
        data.DataError, match=r"bad\.jsonl line 2: got a JSON list; expected one JSON object"
    ):
        data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)


def test_missing_column_names_file_field_and_expectation(tmp_path, tok):
    rows = [{"prompt": "a", "answer": "b"}] * 3
    with pytest.raises(
        data.DataError,
        match=r"d\.jsonl: no field 'completion'; format 'prompt_completion' expects fields \['prompt', 'completion'\]",
    ):
        build(tmp_path, tok, rows)


def test_missing_field_in_one_row_names_the_line(tmp_path, tok):
    rows = pc_rows(3) + [{"prompt": "x"}] + pc_rows(2)
    with pytest.raises(
        data.DataError, match=r"d\.jsonl line 4: field 'completion' is missing .*expected a string"
    ):
        build(tmp_path, tok, rows)


def test_csv_missing_value_names_the_row(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,\n")
    cfg = make_cfg(tmp_path, {"s": data.source_config(str(path))}, eval_fraction=0.0)
    with pytest.raises(data.DataError, match=r"d\.csv row 2: field 'completion' is missing"):
        data.build_pipeline(cfg, tokenizer=tok)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "txt"])
def test_non_utf8_byte_names_file_and_line(tmp_path, tok, suffix):
    path = tmp_path / f"d.{suffix}"
    first = {"jsonl": '{"text": "ok"}', "json": '{"text": "ok"}', "csv": "text", "txt": "ok"}
    path.write_bytes(first[suffix].encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    src = data.source_config(str(path), format="text")
    with pytest.raises(data.DataError) as e:
        data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)
    msg = str(e.value)
    assert f"d.{suffix} line 2: not valid UTF-8 (byte 0xe9 at column 14)" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("d.jsonl", "", "no JSON object on any line"),
        ("d.jsonl", "\n  \n", "no JSON object on any line"),
        ("d.json", "[]", "an empty JSON array"),
        ("d.txt", "", "no lines"),
        ("d.csv", "", "no header and no rows"),
        ("d.csv", "text\n", "a header line but no rows"),
        ("d.parquet", "", "0 bytes"),
    ],
)
def test_empty_file_says_it_is_empty(tmp_path, tok, name, content, why):
    (tmp_path / name).write_text(content)
    src = data.source_config(str(tmp_path / name), format="text")
    with pytest.raises(data.DataError) as e:
        data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)
    assert str(e.value).endswith(
        f"{name}: the file is empty ({why}); expected at least one example"
    )


def test_empty_file_in_a_glob_is_named(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", pc_rows(5))
    (tmp_path / "b.jsonl").write_text("")
    src = data.source_config(str(tmp_path / "*.jsonl"))
    with pytest.raises(data.DataError, match=r"b\.jsonl: the file is empty"):
        data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)


def test_empty_after_filtering_is_an_error(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "completion": ""} for i in range(5)]
    with pytest.raises(
        data.DataError,
        match=r"source 's' \(.*d\.jsonl, train split\): no examples left after filtering \(4 rows in the split; dropped: 4 empty.*expected at least one",
    ):
        build(tmp_path, tok, rows)


def test_too_long_example_without_truncation_names_the_line(tmp_path, tok):
    rows = pc_rows(3) + [{"prompt": "x" * 40, "completion": "y"}]
    with pytest.raises(
        data.DataError,
        match=r"d\.jsonl line 4: example has 43 tokens, longer than seq_len=32 .*expected at most seq_len",
    ):
        build(tmp_path, tok, rows, truncation=False, eval_fraction=0.0)


def test_truncation_cuts_and_counts(tmp_path, tok):
    rows = pc_rows(3) + [
        {"prompt": "x" * 20, "completion": "y" * 20},
        {"prompt": "x" * 40, "completion": "y"},
    ]
    pipe = build(tmp_path, tok, rows, eval_fraction=0.0)
    s = pipe.stats
    # The second long one kept only prompt tokens after the cut: dropped, not trained on.
    assert (s["truncated"], s["no_loss_dropped"], s["train_examples"]) == (2, 1, 4)
    assert pipe.pool.lengths.max() == 32


def test_hub_dataset_offline_fails_with_one_line(tmp_path, tok):
    src = data.source_config(hub="someone/no-such-dataset", hub_config="main")
    with pytest.raises(data.DataError) as e:
        data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)
    msg = str(e.value)
    assert "\n" not in msg and "'someone/no-such-dataset'" in msg and "offline" in msg


def test_missing_file_and_unknown_suffix(tmp_path, tok):
    with pytest.raises(data.DataError, match=r"nope\.jsonl: file not found"):
        data.build_pipeline(
            make_cfg(tmp_path, {"s": data.source_config(str(tmp_path / "nope.jsonl"))}),
            tokenizer=tok,
        )
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(data.DataError, match=r"d\.xml: unsupported file type '\.xml'"):
        data.build_pipeline(
            make_cfg(tmp_path, {"s": data.source_config(str(tmp_path / "d.xml"))}), tokenizer=tok
        )


def test_config_errors_name_every_bad_field_on_one_line(tmp_path):
    cfg = data.default_data_config()
    cfg.sources.a = data.source_config("x.jsonl", hub="y", format="chatml")
    cfg.seq_len = 0
    cfg.eval_fraction = 1.5
    cfg.seqlen = 64  # a typo must not pass silently
    cfg.sources.a.weigth = 0.5
    with pytest.raises(data.DataConfigError) as e:
        data.validate_data_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("7 bad data fields: "), msg
    assert "data: unknown field(s) ['seqlen']" in msg
    assert "data.sources.a: unknown field(s) ['weigth']" in msg
    assert "; data.seq_len: expected an int > 1, got 0; " in msg
    assert "data.sources.a.format: expected one of" in msg
    assert "data.sources.a: expected exactly one of path" in msg
    assert "data.eval_fraction" in msg
    assert "data.tokenizer" in msg
    with pytest.raises(data.DataConfigError, match="expected at least one source"):
        data.validate_data_config(data.default_data_config(), need_tokenizer=False)


def test_batch_size_must_split_across_processes(tmp_path, tok):
    cfg = make_cfg(
        tmp_path, {"s": data.source_config(write_jsonl(tmp_path / "d.jsonl", pc_rows(8)))}
    )
    cfg.batch_size = 6
    with pytest.raises(data.DataError, match="batch_size=6 is not divisible by process_count=4"):
        data.build_pipeline(cfg, tokenizer=tok, process_index=0, process_count=4)


# ----------------------------------------------------------------------------- splits, filters, mixing


def test_eval_carve_is_seeded_disjoint_and_complete(tmp_path, tok):
    rows = pc_rows(50)
    a = build(tmp_path, tok, rows, eval_fraction=0.2, seed=1)
    b = build(tmp_path, tok, rows, eval_fraction=0.2, seed=1)
    c = build(tmp_path, tok, rows, eval_fraction=0.2, seed=2)
    ev = lambda p: list(p.eval_rows("s")["prompt"])
    assert ev(a) == ev(b) != ev(c) and len(ev(a)) == 10
    train = {a.tokenizer.decode(a.pool.tokens_of(i)) for i in range(len(a.pool))}
    assert len(train) == 40 and not any(f"<s>{p}" in t for t in train for p in ev(a))


def test_given_eval_file_and_eval_only_source(tmp_path, tok):
    target = data.source_config(
        write_jsonl(tmp_path / "t.jsonl", pc_rows(20)),
        eval_path=write_jsonl(tmp_path / "te.jsonl", pc_rows(6, 100)),
    )
    general = data.source_config(write_jsonl(tmp_path / "g.jsonl", pc_rows(9, 200)), weight=0.0)
    pipe = data.build_pipeline(make_cfg(tmp_path, {"t": target, "g": general}), tokenizer=tok)
    assert pipe.eval_names == ("g", "t")
    assert pipe.stats["sources"]["t"]["train_examples"] == 20  # nothing carved
    assert pipe.stats["sources"]["t"]["eval_examples"] == 6
    assert pipe.stats["sources"]["g"]["eval_examples"] == 9  # eval-only: all of it
    assert len(pipe.pool) == 20


def test_dedup_drops_duplicates_and_train_copies_of_eval(tmp_path, tok):
    rows = pc_rows(10) + pc_rows(3)  # three exact duplicates
    target = data.source_config(
        write_jsonl(tmp_path / "t.jsonl", rows),
        eval_path=write_jsonl(tmp_path / "te.jsonl", pc_rows(2, 8)),  # q8, q9 leak into train
    )
    pipe = data.build_pipeline(make_cfg(tmp_path, {"t": target}, dedup=True), tokenizer=tok)
    s = pipe.stats
    assert (s["duplicates_dropped"], s["eval_overlap_dropped"], s["train_examples"]) == (3, 2, 8)
    assert "5 duplicates dropped" in pipe.stats_line()


def test_mixture_follows_the_weights(tmp_path, tok):
    target = data.source_config(write_jsonl(tmp_path / "t.jsonl", pc_rows(40)), weight=0.75)
    general = data.source_config(write_jsonl(tmp_path / "g.jsonl", pc_rows(400, 1000)), weight=0.25)
    cfg = make_cfg(tmp_path, {"t": target, "g": general}, eval_fraction=0.0)
    pipe = data.build_pipeline(cfg, tokenizer=tok)
    assert pipe.stats["sources"]["t"]["examples_per_epoch"] == 330  # 0.75 * 440
    epoch = [i for row in pipe.schedule.layout(0) for i in row]
    assert len(epoch) == 440
    # Sources are pooled in name order: g (400) then t (40).
    from_target = np.mean(np.asarray(epoch) >= 400)
    assert from_target == pytest.approx(0.75)
    # Every target example is used 330 // 40 or one more times; none skipped.
    counts = np.bincount(np.asarray(epoch)[np.asarray(epoch) >= 400] - 400, minlength=40)
    assert counts.min() >= 8 and counts.max() <= 9


def test_long_text_is_chunked_not_cut(tmp_path, tok):
    pipe = build(tmp_path, tok, [{"text": "abcdefghij" * 7}], fmt="text", eval_fraction=0.0)
    # 70 chars + BOS + EOS = 72 tokens -> chunks of 32, 32, 8.
    assert sorted(pipe.pool.lengths.tolist()) == [8, 32, 32]
    text = "".join(pipe.tokenizer.decode(pipe.pool.tokens_of(i)) for i in range(3))
    assert text == "<s>" + "abcdefghij" * 7 + "</s>"


def test_tokenization_is_cached_across_builds(tmp_path, tok, monkeypatch):
    import ftjax.data.tokenize as tokenize_module

    calls = []
    real = tokenize_module.encode_rows
    monkeypatch.setattr(
        tokenize_module, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    src = data.source_config(write_jsonl(tmp_path / "d.jsonl", pc_rows(20)))
    first = data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)
    assert calls
    calls.clear()
    second = data.build_pipeline(make_cfg(tmp_path, {"s": src}), tokenizer=tok)
    assert not calls  # read back from the datasets cache
    np.testing.assert_array_equal(first.pool.tokens, second.pool.tokens)
    # A different encoding of the same rows is not a cache hit.
    data.build_pipeline(make_cfg(tmp_path, {"s": src}, add_eos=False), tokenizer=tok)
    assert calls
