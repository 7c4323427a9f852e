"""Batches: packing keeps attention inside segments (checked with a real
model), the batch at step N is a pure function of N, processes get disjoint
slices that form the global batch, and eval batches cover each example once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import write_jsonl

from ftjax import data
from ftjax.data.errors import DataError
from ftjax.models import ModelConfig, build_model

SEQ = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("t", 37), ("g", 91)):
        rows = []
        for i in range(n):
            word = "".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 9)))
            rows.append({"prompt": f"{name}{i}:{word}=", "completion": word[::-1]})
        out[name] = write_jsonl(root / f"{name}.jsonl", rows)
    out["cache"] = str(root / "cache")
    return out


def make_cfg(files, **top):
    cfg = data.default_data_config()
    cfg.sources.t = data.source_config(files["t"], weight=0.6)
    cfg.sources.g = data.source_config(files["g"], weight=0.4)
    cfg.update(seq_len=SEQ, batch_size=8, eval_fraction=0.1, seed=3, cache_dir=files["cache"])
    cfg.update(top)
    return cfg


@pytest.fixture(scope="module")
def pipe(files, tok):
    return data.build_pipeline(make_cfg(files), tokenizer=tok)


@pytest.mark.parametrize("packing", [True, False])
def test_batch_arrays_are_consistent(files, tok, pipe, packing):
    if not packing:
        pipe = data.build_pipeline(make_cfg(files, packing=False), tokenizer=tok)
    for step in range(0, 30, 3):
        b = pipe.batch_at(step)
        assert set(b) == set(data.BATCH_KEYS)
        for k, v in b.items():
            chex.assert_shape(v, (8, SEQ))
            assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
        seg, pos = b["segment_ids"], b["positions"]
        same_next = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        # Targets are the next token wherever the next token is in the same segment...
        np.testing.assert_array_equal(
            b["targets"][:, :-1][same_next], b["input_ids"][:, 1:][same_next]
        )
        # ... and nothing is trained across a boundary, on padding, or at the row end.
        assert not b["loss_mask"][:, :-1][~same_next].any() and not b["loss_mask"][:, -1].any()
        # Positions restart at 0 in every segment and count up inside it.
        starts = np.concatenate([np.ones((8, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        np.testing.assert_array_equal(pos[starts & (seg > 0)], 0)
        np.testing.assert_array_equal(pos[:, 1:][same_next], pos[:, :-1][same_next] + 1)
        np.testing.assert_array_equal(b["attention_mask"], seg > 0)
        assert (b["input_ids"][seg == 0] == pipe.pad_id).all()
        if not packing:
            assert b["segment_ids"].max() == 1
    if packing:
        assert pipe.stats["packing_efficiency"] > 0.8 and pipe.stats["examples_per_row"] > 2
    else:
        assert pipe.stats["examples_per_row"] == 1 and pipe.stats["packing_efficiency"] < 0.5


def test_packed_logits_equal_each_example_alone(pipe):
    cfg = ModelConfig(model_type="llama", vocab_size=len(pipe.tokenizer), hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)  # fmt: skip
    model = build_model(cfg)
    b = pipe.batch_at(0)
    r = int(np.argmax(b["segment_ids"].max(axis=1)))  # the row with most segments
    seg = b["segment_ids"][r]
    n_seg = int(seg.max())
    assert n_seg >= 3
    # One model call on rows of the same shape (one compilation):
    #   row 0: the packed row as the pipeline made it;
    #   row 1: the same row with segment ids erased (attention may leak across);
    #   rows 2..: each example alone at the start of an otherwise padded row.
    rows = {k: [b[k][r]] for k in ("input_ids", "attention_mask", "positions", "segment_ids")}
    rows["input_ids"].append(b["input_ids"][r])
    rows["attention_mask"].append(b["attention_mask"][r])
    rows["positions"].append(b["positions"][r])
    rows["segment_ids"].append(b["attention_mask"][r])
    spans = [np.nonzero(seg == s)[0] for s in range(1, n_seg + 1)]
    for where in spans:
        alone = np.zeros(SEQ, np.int32)
        alone[: len(where)] = 1
        ids = np.full(SEQ, pipe.pad_id, np.int32)
        ids[: len(where)] = b["input_ids"][r, where]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append(alone)
        rows["positions"].append(np.arange(SEQ, dtype=np.int32))
        rows["segment_ids"].append(alone)
    args = [np.stack(rows[k]) for k in ("input_ids", "attention_mask", "positions", "segment_ids")]
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(args[0][:1]))["params"]
    logits = np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args))
    for s, where in enumerate(spans):
        chex.assert_trees_all_close(logits[0, where], logits[2 + s, : len(where)], atol=2e-5)
    # The check has teeth: without segment ids, the second example sees the first.
    assert not np.allclose(logits[1, spans[1]], logits[0, spans[1]], atol=1e-3)


def test_batch_at_step_is_the_same_fresh_or_resumed(files, tok, pipe):
    steps_per_epoch = pipe.steps_per_epoch
    last = int(3 * steps_per_epoch) + 2  # crosses two epoch boundaries
    walked = [pipe.batch_at(s) for s in range(last + 1)]
    resumed = data.build_pipeline(make_cfg(files), tokenizer=tok)
    for s in (last, int(steps_per_epoch), 0):  # out of order, from a fresh object
        chex.assert_trees_all_equal(resumed.batch_at(s), walked[s])
    assert list(pipe.batches(last - 1).__next__()["input_ids"][0]) == list(
        walked[last - 1]["input_ids"][0]
    )
    other_seed = data.build_pipeline(make_cfg(files, seed=4), tokenizer=tok)
    assert not np.array_equal(other_seed.batch_at(0)["input_ids"], walked[0]["input_ids"])


def test_epochs_draw_sources_by_quota_and_evenly(files, tok, pipe):
    # Pool: g (name order) then t; t (weight .6) is drawn about twice per epoch.
    sizes = [pipe.stats["sources"][n]["train_examples"] for n in ("g", "t")]
    quotas = [pipe.stats["sources"][n]["examples_per_epoch"] for n in ("g", "t")]
    assert sum(quotas) == sum(sizes) and quotas[1] > 2 * sizes[1]
    ids = np.array([i for e in range(3) for row in pipe.schedule.layout(e) for i in row])
    g, t = ids[ids < sizes[0]], ids[ids >= sizes[0]]
    assert len(g) == 3 * quotas[0] and len(t) == 3 * quotas[1]
    # Each source is walked through in whole passes: no example is drawn a second
    # time before every other one has been drawn once.
    for draws, size, offset in ((g, sizes[0], 0), (t, sizes[1], sizes[0])):
        counts = np.bincount(draws - offset, minlength=size)
        assert counts.max() - counts.min() <= 1, counts


def test_two_processes_get_disjoint_slices_of_the_global_batch(files, tok):
    # One source, so that a batch inside the first epoch never repeats an example.
    cfg = lambda: make_cfg(files, sources={"t": {"weight": 0.0}})
    pipe = data.build_pipeline(cfg(), tokenizer=tok)
    procs = [data.build_pipeline(cfg(), tokenizer=tok, process_index=i, process_count=2)
             for i in range(2)]  # fmt: skip
    assert procs[0].local_batch_size == 4
    assert pipe.steps_per_epoch >= 3
    for step in (0, 1, 2):
        parts = [p.batch_at(step) for p in procs]
        whole = pipe.batch_at(step)
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        rows = [{i for row in p.rows_at(step) for i in row} for p in procs]
        assert rows[0] and rows[1] and not rows[0] & rows[1]


def test_eval_batches_cover_each_example_once(files, tok):
    for count in (1, 2):
        procs = [data.build_pipeline(make_cfg(files, eval_batch_size=4), tokenizer=tok,
                                     process_index=i, process_count=count) for i in range(count)]  # fmt: skip
        n = len(procs[0].eval_rows("g"))
        seen = []
        for p in procs:
            batches = list(p.eval_batches("g"))
            assert len(batches) == -(-n // 4) == p.num_eval_batches("g")
            for b in batches:
                assert b["segment_ids"].max() <= 1
                valid = b["valid"] > 0
                np.testing.assert_array_equal(valid, b["example_index"] >= 0)
                assert not b["loss_mask"][~valid].any()
                assert (b["loss_mask"][valid].sum(axis=1) > 0).all()
                seen += b["example_index"][valid].tolist()
        assert sorted(seen) == list(range(n))
        # Deterministic: a second pass gives the same arrays.
        again = list(procs[0].eval_batches("g"))
        chex.assert_trees_all_equal(again, list(procs[0].eval_batches("g")))
    with pytest.raises(DataError, match="no eval data for source 'x'"):
        next(procs[0].eval_batches("x"))


def test_pack_rows_and_quotas():
    rows = data.pack_rows(np.arange(6), np.array([5, 4, 3, 8, 1, 2]), seq_len=8, packing=True)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 4, 3, 8, 1, 2][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3
    assert data.pack_rows(np.array([2, 0]), np.array([1, 1, 1]), 8, packing=False) == [[2], [0]]
    assert data.mixture_quotas([10, 1000], [1.0, 0.0]).tolist() == [10, 0]
    assert data.mixture_quotas([10, 1000], [1.0, 1.0], epoch_examples=7).tolist() == [4, 3]
