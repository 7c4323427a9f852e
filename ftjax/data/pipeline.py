"""`build_pipeline`: from a data config to deterministic train batches, eval
batches and statistics.

    pipe = build_pipeline(cfg.data, process_index=jax.process_index(),
                          process_count=jax.process_count())
    logging.info(pipe.stats_line())
    batch = pipe.batch_at(step)          # this process's rows of global batch `step`
    for batch in pipe.eval_batches("target"):
        ...                              # batch["valid"] marks real examples
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import datasets
import numpy as np

from ftjax.data import batching, stats
from ftjax.data.config import LABELED_FORMATS, SourceSpec, validate_data_config
from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit, carve_eval, load_source
from ftjax.data.tokenize import Examples, fit_to_length, load_tokenizer, tokenize_split


@dataclasses.dataclass(eq=False)
class PreparedSource:
    spec: SourceSpec
    train: Examples
    eval: Examples | None
    eval_split: RawSplit | None  # the raw rows `eval.rows` index into
    counts: dict


def _clean(ex: Examples, n_content: np.ndarray, split: RawSplit, spec: SourceSpec, cfg,
           counts: dict, prefix: str = "") -> Examples:  # fmt: skip
    """Drops empty examples, fits the rest to seq_len, drops those left with no
    trained token, and (with dedup) exact duplicates; counts each."""
    keep = n_content > 0
    counts[prefix + "empty_dropped"] = int((~keep).sum())
    ex = ex.select(np.nonzero(keep)[0])
    chunk = cfg.chunk_text and spec.format == "text"
    ex, cut = fit_to_length(
        ex, cfg.seq_len, truncation=cfg.truncation, chunk=chunk, locate=split.locate
    )
    counts[prefix + "truncated"] = cut
    keep = ex.target_counts() > 0
    counts[prefix + "no_loss_dropped"] = int((~keep).sum())
    ex = ex.select(np.nonzero(keep)[0])
    if cfg.dedup:
        first = {}
        for i, h in enumerate(ex.hashes()):
            first.setdefault(h, i)
        counts[prefix + "duplicates_dropped"] = len(ex) - len(first)
        ex = ex.select(sorted(first.values()))
    return ex


def prepare_source(spec: SourceSpec, cfg, tokenizer) -> PreparedSource:
    """Loads, tokenizes, splits and filters one source."""
    raw = load_source(spec, cfg.cache_dir)
    tok = dict(add_bos=cfg.add_bos, add_eos=cfg.add_eos, num_proc=cfg.num_proc)
    if spec.weight == 0 and raw.eval is not None:  # eval-only: its train split is unused
        ex, n_content = Examples.empty(), np.zeros(0, np.int32)
    else:
        ex, n_content = tokenize_split(raw.train, spec, tokenizer, **tok)
    counts = {"read": len(ex)}
    if raw.eval is not None:
        eval_split = raw.eval
        ev, ev_content = tokenize_split(raw.eval, spec, tokenizer, **tok)
        counts["read"] += len(ev)
    elif spec.weight == 0:  # eval-only source: all of it is eval data
        eval_split, ev, ev_content = raw.train, ex, n_content
        ex, n_content = Examples.empty(), n_content[:0]
    else:
        eval_split = raw.train
        train_rows, eval_rows = carve_eval(len(ex), cfg.eval_fraction, cfg.seed, spec.name)
        ev, ev_content = ex.select(eval_rows), n_content[eval_rows]
        ex, n_content = ex.select(train_rows), n_content[train_rows]
    counts["train_rows"] = len(ex)
    ev_counts: dict = {"eval_rows": len(ev)}
    train = _clean(ex, n_content, raw.train, spec, cfg, counts) if len(ex) else ex
    evals = _clean(ev, ev_content, eval_split, spec, cfg, ev_counts, "eval_") if len(ev) else None
    counts["eval_truncated"] = ev_counts.get("eval_truncated", 0)
    if evals is not None and cfg.max_eval_examples:
        evals = evals.select(np.arange(min(len(evals), cfg.max_eval_examples)))
    if (raw.eval is not None or spec.weight == 0) and (evals is None or len(evals) == 0):
        _raise_empty(spec, eval_split.origin, "eval", ev_counts, "eval_")
    return PreparedSource(spec, train, evals, eval_split, counts)


def _raise_empty(spec, origin, split, counts, prefix=""):
    c = lambda k: counts.get(prefix + k, 0)
    raise DataError(
        f"source {spec.name!r} ({origin}, {split} split): no examples left after filtering "
        f"({counts.get(split + '_rows', 0)} rows in the split; dropped: {c('empty_dropped')} empty, "
        f"{c('no_loss_dropped')} with no trained token after truncation, "
        f"{c('duplicates_dropped')} duplicates, {c('eval_overlap_dropped')} copies of eval "
        "examples); expected at least one"
    )


class Pipeline(batching.BatchLayout):
    """Train batches by step, eval batches by source name, statistics.

    Everything is fixed at construction; `batch_at(step)` reads no iterator
    state, so any step can be produced at any time by any process.
    """

    def __init__(self, cfg, tokenizer, sources: list[PreparedSource], process_index: int,
                 process_count: int):  # fmt: skip
        self._init_layout(cfg, tokenizer, process_index, process_count)
        self.sources = {s.spec.name: s for s in sources}
        training = [s for s in sources if s.spec.weight > 0]
        self.pool = Examples.concat([s.train for s in training])
        sizes = [len(s.train) for s in training]
        weights = [s.spec.weight for s in training]
        quotas = batching.mixture_quotas(sizes, weights, cfg.epoch_examples)
        self.schedule = batching.RowSchedule(
            self.pool,
            sizes,
            quotas,
            [s.spec.name for s in training],
            seq_len=self.seq_len,
            packing=bool(cfg.packing),
            seed=int(cfg.seed),
        )
        mix = {
            s.spec.name: (w / sum(weights), int(q))
            for s, w, q in zip(training, weights, quotas, strict=True)
        }
        per_source = {}
        for s in sources:
            counts = {**s.counts, "train_examples": len(s.train)}
            counts["eval_examples"] = len(s.eval) if s.eval is not None else 0
            per_source[s.spec.name] = {
                "origin": s.spec.origin,
                "format": s.spec.format,
                **stats.source_stats(counts, s.train, *mix.get(s.spec.name, (0.0, 0))),
            }
        self.stats = stats.total_stats(
            per_source,
            self.schedule.layout(0),
            self.pool.lengths,
            self.seq_len,
            self.global_batch_size,
        )

    @property
    def eval_names(self) -> tuple[str, ...]:
        """Sources with an eval set, sorted."""
        return tuple(n for n, s in self.sources.items() if s.eval is not None and len(s.eval))

    @property
    def steps_per_epoch(self) -> float:
        return self.stats["steps_per_epoch"]

    def stats_line(self) -> str:
        return stats.stats_line(self.stats)

    def rows_at(self, step: int) -> list[list[int]]:
        """Example ids (into `self.pool`) of this process's rows of batch `step`."""
        start = step * self.global_batch_size
        return self.schedule.rows(start + self._part.start, start + self._part.stop)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`, a pure function of the
        config and `step` (see `batching` for the arrays).

        Every array has shape `(local_batch_size, seq_len)` (see `build_pipeline`
        for an example).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return batching.assemble(self.pool, self.rows_at(step), self.seq_len, self.pad_id)

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """`batch_at(start_step)`, `batch_at(start_step + 1)`, ... without end."""
        step = start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def _eval_source(self, name: str) -> PreparedSource:
        if name not in self.eval_names:
            raise DataError(f"no eval data for source {name!r}; eval sources: {self.eval_names}")
        return self.sources[name]

    def num_eval_batches(self, name: str) -> int:
        n = len(self._eval_source(name).eval)
        return -(-n // self.eval_batch_size)

    def eval_batches(self, name: str) -> Iterator[dict[str, np.ndarray]]:
        """The eval set of source `name` in fixed order, one example per row
        (padded, never packed), in global batches of `eval_batch_size` of which
        this process yields its rows. Extra per-row arrays: `valid` (float32, 0
        for rows that only fill the last batch; their loss_mask is 0 too) and
        `example_index` (int32 index into `eval_rows(name)`, -1 for fill)."""
        ex = self._eval_source(name).eval
        for step in range(self.num_eval_batches(name)):
            ids = batching.eval_rows(len(ex), self.eval_batch_size, step, self._eval_part)
            # Fill rows repeat example 0 (finite activations) and are masked out.
            batch = batching.assemble(ex, [[max(i, 0)] for i in ids], self.seq_len, self.pad_id)
            valid = np.array([i >= 0 for i in ids], np.float32)
            batch["loss_mask"] *= valid[:, None]
            batch["valid"] = valid
            batch["example_index"] = np.array(ids, np.int32)
            yield batch

    def eval_rows(self, name: str) -> datasets.Dataset:
        """The raw rows of source `name`'s eval set, aligned with `example_index`
        (prompts and answers for generation and exact-match scoring)."""
        src = self._eval_source(name)
        return src.eval_split.dataset.select(src.eval.rows.tolist())


def build_pipeline(data_cfg, tokenizer=None, process_index: int = 0,
                   process_count: int = 1) -> Pipeline:  # fmt: skip
    """Validates the config, loads and tokenizes every source, and returns the
    `Pipeline`. `tokenizer` overrides `data_cfg.tokenizer`.

        >>> from ftjax.data.synthetic import build_char_tokenizer, suite_data_config, write_suite
        >>> files = write_suite("suite", seed=0, general_train=100, target_train=50)
        >>> pipe = build_pipeline(suite_data_config(files, build_char_tokenizer("tok"), seq_len=64))
        >>> batch = pipe.batch_at(0)
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'loss_mask', 'positions', 'segment_ids', 'targets']
        >>> batch["input_ids"].shape == (pipe.local_batch_size, pipe.seq_len) == (32, 64)
        True
        >>> print(pipe.stats_line())  # doctest: +NORMALIZE_WHITESPACE
        data: 2 source(s), 50 train / 700 eval examples | 1,024 tokens, 37.8% trained |
        0 truncated, 0 empty dropped, 0 duplicates dropped | packing 88.9% (2.8 examples/row),
        0.6 steps/epoch
    """
    specs = validate_data_config(data_cfg, need_tokenizer=tokenizer is None)
    # Checked before any loading, so a bad process layout fails fast.
    batching.process_slice(int(data_cfg.batch_size), process_index, process_count)
    if tokenizer is None:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    if specs[0].format in LABELED_FORMATS:  # validate_data_config refuses a mix
        from ftjax.data.classification import build_classification_pipeline

        return build_classification_pipeline(data_cfg, specs, tokenizer, process_index,
                                             process_count)  # fmt: skip
    prepared = [prepare_source(spec, data_cfg, tokenizer) for spec in specs]
    if data_cfg.dedup:
        # A training copy of an eval example would inflate every eval metric.
        eval_hashes = {h for s in prepared if s.eval is not None for h in s.eval.hashes()}
        for s in prepared:
            keep = [i for i, h in enumerate(s.train.hashes()) if h not in eval_hashes]
            s.counts["eval_overlap_dropped"] = len(s.train) - len(keep)
            s.train = s.train.select(keep)
    for s in prepared:
        if s.spec.weight > 0 and len(s.train) == 0:
            _raise_empty(s.spec, s.spec.origin, "train", s.counts)
    return Pipeline(data_cfg, tokenizer, prepared, process_index, process_count)
