"""The data config schema, its defaults and its validation.

A data config is an `ml_collections.ConfigDict`; sources are keyed by name so
that an ablation overrides one of them from the command line
(`--config.data.sources.general.weight=0.2`). A plain list of source dicts,
each with a `name`, is accepted as well.

    cfg = default_data_config()
    cfg.tokenizer = "/path/to/tokenizer"
    cfg.sources.target = source_config(path="train.jsonl", format="prompt_completion")
    validate_data_config(cfg)          # DataConfigError naming each bad field
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from ftjax.data.errors import DataConfigError

FORMATS = ("text", "prompt_completion", "chat", "classification", "token_classification")
# Formats of labeled data (ftjax.data.classification), one run uses only these.
LABELED_FORMATS = ("classification", "token_classification")
DEFAULT_FIELDS = {
    "text": "text",
    "prompt": "prompt",
    "completion": "completion",
    "messages": "messages",
    # `classification` (ftjax.data.classification): `text`, the optional
    # second text of a sentence pair ("" : none) and the label column.
    "text_pair": "",
    "label": "label",
    # `token_classification`: a list of words and a class index per word.
    "tokens": "tokens",
    "tags": "tags",
}


def source_config(
    path: str = "",
    *,
    hub: str = "",
    hub_config: str = "",
    split: str = "train",
    eval_path: str = "",
    eval_split: str = "",
    format: str = "prompt_completion",
    weight: float = 1.0,
    max_examples: int = 0,
    **fields: str,
) -> ml_collections.ConfigDict:
    """One source with every field of the schema filled in.

    `path` is a local json/jsonl/csv/parquet/txt file (or a glob); `hub` a
    Hugging Face dataset id, loaded as `load_dataset(hub, hub_config, split=split)`.
    The eval split is `eval_path`/`eval_split` when given, otherwise carved from
    the train split by `data.eval_fraction`. `weight` is the source's share of the
    training mixture (weights are normalized); weight 0 makes it eval-only.
    Keyword `fields` rename the columns a format reads, e.g. `completion="answer"`.

        >>> source_config("gsm.jsonl", completion="answer").fields.completion
        'answer'
    """
    unknown = set(fields) - set(DEFAULT_FIELDS)
    if unknown:
        raise DataConfigError(f"source_config: unknown field name(s) {sorted(unknown)}")
    return ml_collections.ConfigDict(
        {
            "path": path,
            "hub": hub,
            "hub_config": hub_config,
            "split": split,
            "eval_path": eval_path,
            "eval_split": eval_split,
            "format": format,
            "fields": {**DEFAULT_FIELDS, **fields},
            "weight": float(weight),
            "max_examples": int(max_examples),
        }
    )


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for every top-level field; `sources` starts empty.

    >>> cfg = default_data_config()
    >>> cfg.seq_len, cfg.packing
    (128, True)
    """
    return ml_collections.ConfigDict(
        {
            "sources": ml_collections.ConfigDict(),
            "tokenizer": "",  # local directory or hub id for AutoTokenizer
            "seq_len": 128,
            "batch_size": 32,  # global rows per step, split across processes
            "eval_batch_size": 0,  # 0: same as batch_size
            "packing": True,  # several examples per row; False pads one per row
            "seed": 0,
            "eval_fraction": 0.05,  # carved from train when a source has no eval split
            "max_eval_examples": 0,  # per source; 0 keeps all
            "epoch_examples": 0,  # examples per mixture epoch; 0: all sources' sizes summed
            "truncation": True,  # False: an example longer than seq_len is an error
            "chunk_text": True,  # `text` examples longer than seq_len are split, not cut
            "add_bos": True,  # for text / prompt_completion, when the tokenizer has one
            "add_eos": True,
            "dedup": False,  # drop exact duplicates (and train copies of eval examples)
            "cache_dir": "",  # datasets cache; "" uses the HF default
            "num_proc": 0,  # processes for datasets.map; 0 runs in-process
            # `classification` sources: auto (integer labels are classes, numbers
            # regression), class or regression.
            "label_kind": "auto",
        }
    )


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A validated, normalized source (see `source_config`)."""

    name: str
    path: str
    hub: str
    hub_config: str
    split: str
    eval_path: str
    eval_split: str
    format: str
    fields: tuple[tuple[str, str], ...]
    weight: float
    max_examples: int

    def field(self, key: str) -> str:
        return dict(self.fields)[key]

    @property
    def origin(self) -> str:
        """How error messages and statistics name this source."""
        if self.path:
            return self.path
        cfg = f", config {self.hub_config!r}" if self.hub_config else ""
        return f"hub dataset {self.hub!r}{cfg}"


def _source_items(sources: Any) -> list[tuple[str, Mapping]]:
    if isinstance(sources, (list, tuple)):
        return [(str(s.get("name", "")), s) for s in sources]
    return [(str(k), v) for k, v in sources.items()]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(errors: list[str], ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        errors.append(f"data.{key}: expected {expected}, got {value!r}")


def validate_data_config(cfg, *, need_tokenizer: bool = True) -> list[SourceSpec]:
    """Checks every field and returns the sources as `SourceSpec`s sorted by name.

    Raises `DataConfigError` naming every bad field, on one line.
    """
    errors: list[str] = []
    get = lambda k: cfg.get(k, None)
    unknown = sorted(set(cfg.keys()) - set(default_data_config().keys()))
    if unknown:
        errors.append(f"data: unknown field(s) {unknown}; expected among the defaults")
    _check(errors, _is_int(get("seq_len")) and get("seq_len") > 1, "seq_len", "an int > 1",
           get("seq_len"))  # fmt: skip
    _check(errors, _is_int(get("batch_size")) and get("batch_size") > 0, "batch_size",
           "an int > 0", get("batch_size"))  # fmt: skip
    for key in ("eval_batch_size", "max_eval_examples", "epoch_examples", "num_proc"):
        _check(errors, _is_int(get(key)) and get(key) >= 0, key, "an int >= 0", get(key))
    _check(errors, _is_int(get("seed")), "seed", "an int", get("seed"))
    frac = get("eval_fraction")
    _check(errors, _is_number(frac) and 0 <= frac < 1, "eval_fraction", "a number in [0, 1)", frac)
    for key in ("packing", "truncation", "chunk_text", "add_bos", "add_eos", "dedup"):
        _check(errors, isinstance(get(key), bool), key, "True or False", get(key))
    _check(errors, get("label_kind") in ("auto", "class", "regression"), "label_kind",
           "one of auto, class, regression", get("label_kind"))  # fmt: skip
    for key in ("tokenizer", "cache_dir"):
        _check(errors, isinstance(get(key), str), key, "a string", get(key))
    if need_tokenizer and not get("tokenizer"):
        errors.append("data.tokenizer: expected a tokenizer directory or hub id, got ''")

    specs: list[SourceSpec] = []
    items = _source_items(get("sources") or {})
    if not items:
        errors.append("data.sources: expected at least one source, got none")
    seen = set()
    for name, src in items:
        key = f"sources.{name or '?'}"
        if not name or name in seen:
            errors.append(f"data.{key}: expected a unique, non-empty source name, got {name!r}")
        seen.add(name)
        src = dict(src)
        unknown = sorted(set(src) - set(source_config().keys()) - {"name"})
        if unknown:
            errors.append(
                f"data.{key}: unknown field(s) {unknown}; expected those of source_config"
            )
        path, hub = src.get("path", ""), src.get("hub", "")
        if bool(path) == bool(hub):
            errors.append(
                f"data.{key}: expected exactly one of path (local file) or hub (dataset id), "
                f"got path={path!r} hub={hub!r}"
            )
        fmt = src.get("format", "prompt_completion")
        _check(errors, fmt in FORMATS, f"{key}.format", f"one of {FORMATS}", fmt)
        weight = src.get("weight", 1.0)
        _check(errors, _is_number(weight) and weight >= 0, f"{key}.weight", "a number >= 0", weight)
        max_ex = src.get("max_examples", 0)
        _check(
            errors, _is_int(max_ex) and max_ex >= 0, f"{key}.max_examples", "an int >= 0", max_ex
        )
        fields = {**DEFAULT_FIELDS, **dict(src.get("fields") or {})}
        bad = sorted(set(fields) - set(DEFAULT_FIELDS))
        if bad:
            errors.append(
                f"data.{key}.fields: expected keys among {sorted(DEFAULT_FIELDS)}, got {bad}"
            )
        for k in ("hub_config", "split", "eval_path", "eval_split"):
            _check(errors, isinstance(src.get(k, ""), str), f"{key}.{k}", "a string", src.get(k))
        specs.append(
            SourceSpec(
                name=name,
                path=str(path or ""),
                hub=str(hub or ""),
                hub_config=str(src.get("hub_config", "") or ""),
                split=str(src.get("split", "train") or "train"),
                eval_path=str(src.get("eval_path", "") or ""),
                eval_split=str(src.get("eval_split", "") or ""),
                format=str(fmt),
                fields=tuple(sorted((k, str(v)) for k, v in fields.items())),
                weight=float(weight) if _is_number(weight) else 0.0,
                max_examples=int(max_ex) if _is_int(max_ex) else 0,
            )
        )
    kinds = {s.format in LABELED_FORMATS for s in specs}
    if len(kinds) > 1:
        errors.append(
            "data.sources: classification sources cannot be mixed with language-modelling "
            "formats in one run"
        )
    if items and not any(s.weight > 0 for s in specs) and not errors:
        errors.append("data.sources: expected at least one source with weight > 0, got all 0")
    if errors:
        raise DataConfigError(
            errors[0]
            if len(errors) == 1
            else f"{len(errors)} bad data fields: " + "; ".join(errors)
        )
    return sorted(specs, key=lambda s: s.name)
