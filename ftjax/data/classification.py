"""Classification and regression data (GLUE-style): one example per row, the
tokenizer's own special tokens (`[CLS] a [SEP] b [SEP]`, `<s> a </s></s> b </s>`),
and one target per row, in batches the train step and `evaluate` read as they
read language-modelling batches.

A source of format `classification` reads the columns `fields.text`,
`fields.text_pair` (when set: sentence pairs) and `fields.label`. A label is
a class index (`int`, 0 <= label < num_labels) or, for regression (STS-B), a
number; the source's kind follows from its labels (all integers: classes),
or from `data.label_kind` when set. Rows with a missing label (GLUE's test
splits hold -1) are refused with their location.

A batch (`local_batch_size` rows):

    input_ids       int32    (rows, seq_len) tokens, padding holds the pad id
    attention_mask  int32    (rows, seq_len) 1 on tokens
    token_type_ids  int32    (rows, seq_len) 0 for the first text, 1 for the pair
    targets         int32 class / float32 value   (rows, 1)
    loss_mask       float32  (rows, 1) 1 on real rows

The stream is a pure function of (config, seed) as the language-modelling
pipeline's: epoch e is a seeded permutation of the training examples, epochs
follow each other without a gap, and global batch `step` is rows
`[step * batch_size, (step + 1) * batch_size)` of that stream, so a resumed
run reads exactly the batches it would have read. One source trains (weight
> 0); others may be eval-only (weight 0, e.g. MNLI's mismatched set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ftjax.data import batching
from ftjax.data.config import SourceSpec
from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit, carve_eval, load_source, seeded_rng
from ftjax.data.tokenize import pad_id

LABEL_KINDS = ("auto", "class", "regression")


@dataclasses.dataclass
class LabeledSet:
    """Tokenized examples of one split: padded ids and one label each."""

    input_ids: np.ndarray  # (n, seq_len) int32
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray  # (n,) int32 classes or float32 values
    rows: np.ndarray  # (n,) row of each example in the raw split
    cut: np.ndarray  # (n,) bool: the example was longer than seq_len and truncated

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def truncated(self) -> int:
        return int(self.cut.sum())

    def take(self, idx) -> LabeledSet:
        idx = np.asarray(idx, np.int64)
        return LabeledSet(self.input_ids[idx], self.attention_mask[idx], self.token_type_ids[idx],
                          self.labels[idx], self.rows[idx], self.cut[idx])  # fmt: skip


def _column(split: RawSplit, field: str, fmt: str, key: str) -> list:
    """The values of `field` (the source's `fields.<key>`), or one line naming it."""
    columns = split.dataset.column_names
    if field not in columns:
        raise DataError(
            f"{split.origin}: no field {field!r}; format {fmt!r} reads it as its {key} "
            f"(columns found: {columns}; rename with fields.{key}=...)"
        )
    return list(split.dataset[field])


def _labels(split: RawSplit, field: str, kind: str) -> np.ndarray:
    values = _column(split, field, "classification", "label")
    for i, v in enumerate(values):
        bad_type = isinstance(v, bool) or not isinstance(v, (int, float))
        if bad_type or (kind != "regression" and isinstance(v, int) and v < 0):
            raise DataError(
                f"{split.locate(i)}: field {field!r} is {v!r}; expected a class index >= 0 "
                "or a number (GLUE test splits have no labels: evaluate on validation)"
            )
    is_class = all(isinstance(v, int) for v in values) if kind == "auto" else kind == "class"
    if is_class and not all(float(v).is_integer() for v in values):
        bad = next(i for i, v in enumerate(values) if not float(v).is_integer())
        raise DataError(
            f"{split.locate(bad)}: field {field!r} is {values[bad]!r}; label_kind 'class' "
            "expects integer class indices"
        )
    return np.asarray(values, np.int32 if is_class else np.float32)


def _texts(split: RawSplit, field: str, key: str) -> list[str]:
    out = _column(split, field, "classification", key)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise DataError(f"{split.locate(i)}: field {field!r} is {v!r}; expected a string")
    return out


def _word_rows(split: RawSplit, spec: SourceSpec) -> tuple[list[list[str]], list[list[int]]]:
    """The `tokens` (words) and `tags` (a class per word) of a token
    classification split, checked row by row."""
    words, tags = (
        _column(split, spec.field(k), "token_classification", k) for k in ("tokens", "tags")
    )
    for i, (w, t) in enumerate(zip(words, tags)):
        ok_words = isinstance(w, list) and w and all(isinstance(x, str) for x in w)
        ok_tags = isinstance(t, list) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in t
        )
        if not (ok_words and ok_tags and len(w) == len(t)):
            raise DataError(
                f"{split.locate(i)}: fields {spec.field('tokens')!r}, {spec.field('tags')!r} are "
                f"{w!r}, {t!r}; expected a non-empty list of words and one class index >= 0 each"
            )
    return words, tags


def encode_words(split: RawSplit, spec: SourceSpec, tokenizer, cfg) -> LabeledSet:
    """Token classification: each word's class on its first sub-token, -1
    (not trained, not scored) on the others and on special tokens, as
    `transformers`' token-classification examples align labels."""
    seq_len = int(cfg.seq_len)
    words, tags = _word_rows(split, spec)
    lengths = np.array([len(x) for x in tokenizer(words, is_split_into_words=True)["input_ids"]])
    if not cfg.truncation and (lengths > seq_len).any():
        i = int(np.argmax(lengths > seq_len))
        raise DataError(f"{split.locate(i)}: {lengths[i]} tokens, longer than data.seq_len="
                        f"{seq_len} (set data.truncation=True to cut it)")  # fmt: skip
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=seq_len,
                    padding="max_length", return_token_type_ids=True)  # fmt: skip
    labels = np.full((len(words), seq_len), -1, np.int32)
    for i in range(len(words)):
        previous = None
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w != previous:
                labels[i, j] = tags[i][w]
            previous = w
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    types = np.asarray(enc.get("token_type_ids", np.zeros_like(ids)), np.int32)
    ids[mask == 0] = pad_id(tokenizer)
    return LabeledSet(ids, mask, types, labels, np.arange(len(words)), lengths > seq_len)


def encode_split(split: RawSplit, spec: SourceSpec, tokenizer, cfg) -> LabeledSet:
    """Tokenizes one split with the tokenizer's special tokens, padded to
    `seq_len`; longer examples are cut (counted) or, with `truncation=False`,
    refused with their location."""
    if spec.format == "token_classification":
        return encode_words(split, spec, tokenizer, cfg)
    seq_len = int(cfg.seq_len)
    texts = _texts(split, spec.field("text"), "text")
    pair_field = spec.field("text_pair")
    pairs = _texts(split, pair_field, "text_pair") if pair_field else None
    labels = _labels(split, spec.field("label"), cfg.get("label_kind", "auto"))
    full = tokenizer(texts, pairs, add_special_tokens=True, truncation=False)["input_ids"]
    lengths = np.array([len(x) for x in full])
    if not cfg.truncation and (lengths > seq_len).any():
        i = int(np.argmax(lengths > seq_len))
        raise DataError(
            f"{split.locate(i)}: {lengths[i]} tokens, longer than data.seq_len={seq_len} "
            "(set data.truncation=True to cut it)"
        )
    enc = tokenizer(texts, pairs, add_special_tokens=True, truncation="longest_first",
                    max_length=seq_len, padding="max_length", return_token_type_ids=True)  # fmt: skip
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    # RoBERTa-style tokenizers give no segment ids; the model's table has one type.
    types = np.asarray(enc.get("token_type_ids", np.zeros_like(ids)), np.int32)
    ids[mask == 0] = pad_id(tokenizer)
    rows = np.arange(len(labels))
    return LabeledSet(ids, mask, types, labels, rows, lengths > seq_len)


@dataclasses.dataclass(eq=False)
class LabeledSource:
    spec: SourceSpec
    train: LabeledSet | None
    eval: LabeledSet | None
    eval_split: RawSplit | None


def prepare_labeled(spec: SourceSpec, cfg, tokenizer) -> LabeledSource:
    raw = load_source(spec, cfg.cache_dir)
    train = encode_split(raw.train, spec, tokenizer, cfg)
    if raw.eval is not None:
        return LabeledSource(spec, train, encode_split(raw.eval, spec, tokenizer, cfg), raw.eval)
    if spec.weight == 0:  # eval-only: all of it is eval data
        return LabeledSource(spec, None, train, raw.train)
    train_rows, eval_rows = carve_eval(len(train), cfg.eval_fraction, cfg.seed, spec.name)
    evals = train.take(eval_rows) if len(eval_rows) else None
    return LabeledSource(spec, train.take(train_rows), evals, raw.train)


class ClassificationPipeline(batching.BatchLayout):
    """Train batches by step and eval batches by source name, with the
    interface of `ftjax.data.pipeline.Pipeline` (`batch_at`, `eval_batches`,
    `eval_names`, `stats`)."""

    kind = "classification"

    def __init__(self, cfg, tokenizer, sources: list[LabeledSource], process_index: int,
                 process_count: int):  # fmt: skip
        self._init_layout(cfg, tokenizer, process_index, process_count)
        self.seed = int(cfg.seed)
        self.sources = {s.spec.name: s for s in sources}
        training = [s for s in sources if s.spec.weight > 0]
        if len(training) != 1:
            names = [s.spec.name for s in training]
            raise DataError(
                f"data.sources: classification trains on exactly one source (weight > 0), got "
                f"{names}; give the others weight 0 to evaluate on them"
            )
        self.train = training[0].train
        if self.train is None or not len(self.train):
            raise DataError(f"source {training[0].spec.name!r}: no training examples")
        kinds = {s.spec.name: _kind(x) for s in sources for x in (s.train, s.eval) if x is not None}
        if len(set(kinds.values())) > 1:
            raise DataError(f"data.sources: mixed kinds of labels ({kinds})")
        self.label_kind = next(iter(kinds.values()))
        self.num_classes = (
            int(
                max(
                    int(x.labels.max())
                    for s in sources
                    for x in (s.train, s.eval)
                    if x is not None and len(x)
                )
                + 1
            )  # fmt: skip
            if self.label_kind in ("class", "token")
            else 0
        )
        n = len(self.train)
        per_source = {
            s.spec.name: {
                "origin": s.spec.origin,
                "format": s.spec.format,
                "train_examples": len(s.train) if s.train is not None else 0,
                "eval_examples": len(s.eval) if s.eval is not None else 0,
                "truncated": sum(x.truncated for x in (s.train, s.eval) if x is not None),
            }
            for s in sources
        }
        self.stats = {
            "sources": per_source,
            "label_kind": self.label_kind,
            "num_classes": self.num_classes,
            "train_examples": n,
            "steps_per_epoch": n / self.global_batch_size,
            "tokens_per_batch": self.global_batch_size * self.seq_len,
        }

    @property
    def eval_names(self) -> tuple[str, ...]:
        return tuple(
            sorted(n for n, s in self.sources.items() if s.eval is not None and len(s.eval))
        )

    @property
    def steps_per_epoch(self) -> float:
        return self.stats["steps_per_epoch"]

    def stats_line(self) -> str:
        s = self.stats
        evals = sum(v["eval_examples"] for v in s["sources"].values())
        truncated = sum(v["truncated"] for v in s["sources"].values())
        what = {"class": f"{s['num_classes']} classes", "regression": "regression",
                "token": f"{s['num_classes']} classes per token"}[s["label_kind"]]  # fmt: skip
        return (
            f"data: {len(s['sources'])} source(s), {s['train_examples']:,} train / {evals:,} eval "
            f"examples, {what} | {truncated} truncated | {s['steps_per_epoch']:.1f} steps/epoch"
        )

    def check_model(self, num_labels: int, type_vocab_size: int) -> None:
        """The model must fit the data: its head the labels, its token-type
        table the tokenizer's segment ids (a BERT tokenizer gives a sentence
        pair's second text type 1; RoBERTa's table has one type)."""
        types = max(int(x.token_type_ids.max(initial=0)) for s in self.sources.values()
                    for x in (s.train, s.eval) if x is not None)  # fmt: skip
        if type_vocab_size and types >= type_vocab_size:
            raise DataError(
                f"data.tokenizer gives token type ids up to {types}, but the model has "
                f"type_vocab_size={type_vocab_size}; expected the model's own tokenizer"
            )
        self.check_labels(num_labels)

    def check_labels(self, num_labels: int) -> None:
        """The model's head must fit the labels (the one place both are known)."""
        if self.label_kind == "regression" and num_labels != 1:
            raise DataError(f"the data's labels are numbers (regression); model.num_labels="
                            f"{num_labels}, expected 1")  # fmt: skip
        if self.label_kind in ("class", "token") and self.num_classes > num_labels:
            raise DataError(
                f"the data has class labels up to {self.num_classes - 1}; model.num_labels="
                f"{num_labels} (expected at least {self.num_classes})"
            )

    def _order(self, epoch: int) -> np.ndarray:
        return seeded_rng(self.seed, "classification", epoch).permutation(len(self.train))

    def rows_at(self, step: int) -> np.ndarray:
        """Training example indices of this process's rows of batch `step`."""
        n = len(self.train)
        start = step * self.global_batch_size
        stream = np.arange(start + self._part.start, start + self._part.stop)
        out = np.empty(len(stream), np.int64)
        for epoch in np.unique(stream // n):
            sel = stream // n == epoch
            out[sel] = self._order(int(epoch))[stream[sel] % n]
        return out

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return _assemble(self.train.take(self.rows_at(step)), np.ones(self.local_batch_size))

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def _eval_set(self, name: str) -> LabeledSet:
        if name not in self.eval_names:
            raise DataError(f"no eval data for source {name!r}; eval sources: {self.eval_names}")
        return self.sources[name].eval

    def num_eval_batches(self, name: str) -> int:
        return -(-len(self._eval_set(name)) // self.eval_batch_size)

    def eval_batches(self, name: str) -> Iterator[dict[str, np.ndarray]]:
        """The eval set in fixed order; `valid` marks real rows, `example_index`
        their index in the set (-1 for rows that fill the last batch)."""
        ex = self._eval_set(name)
        for step in range(self.num_eval_batches(name)):
            ids = batching.eval_rows(len(ex), self.eval_batch_size, step, self._eval_part)
            valid = np.array([i >= 0 for i in ids], np.float32)
            batch = _assemble(ex.take([max(i, 0) for i in ids]), valid)
            batch["valid"] = valid
            batch["example_index"] = np.array(ids, np.int32)
            yield batch

    def eval_labels(self, name: str) -> np.ndarray:
        return self._eval_set(name).labels


def _kind(x: LabeledSet) -> str:
    if x.labels.ndim == 2:
        return "token"
    return "class" if x.labels.dtype == np.int32 else "regression"


def _assemble(ex: LabeledSet, valid: np.ndarray) -> dict[str, np.ndarray]:
    valid = valid.astype(np.float32)[:, None]
    if ex.labels.ndim == 2:  # a class per token; -1 marks tokens not trained on
        targets, loss_mask = np.maximum(ex.labels, 0), (ex.labels >= 0) * valid
    else:
        targets, loss_mask = ex.labels[:, None], valid
    return {
        "input_ids": ex.input_ids,
        "attention_mask": ex.attention_mask,
        "token_type_ids": ex.token_type_ids,
        "targets": targets,
        "loss_mask": loss_mask.astype(np.float32),
    }


def build_classification_pipeline(data_cfg, specs, tokenizer, process_index: int,
                                  process_count: int) -> ClassificationPipeline:  # fmt: skip
    if data_cfg.get("label_kind", "auto") not in LABEL_KINDS:
        raise DataError(
            f"data.label_kind={data_cfg.label_kind!r}; expected one of {', '.join(LABEL_KINDS)}"
        )
    prepared = [prepare_labeled(spec, data_cfg, tokenizer) for spec in specs]
    return ClassificationPipeline(data_cfg, tokenizer, prepared, process_index, process_count)
