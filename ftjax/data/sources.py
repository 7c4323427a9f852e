"""Where examples come from: local files and Hugging Face hub datasets, read
through `datasets`, and the seeded train/eval carve.

Local files are checked before `datasets` sees them, because its JSON reader
reports a malformed line as an Arrow error without a line number. Every row
keeps a location (`file line N` or `origin row N`) for later error messages.

    raw = load_source(spec, cache_dir="")      # spec: a config.SourceSpec
    raw.train.dataset, raw.train.locate(0)     # -> (datasets.Dataset, "train.jsonl line 1")
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import zlib

import datasets
import numpy as np

from ftjax.data.config import SourceSpec
from ftjax.data.errors import DataError

# File suffix -> the `datasets` packaged builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclasses.dataclass
class RawSplit:
    """One split of one source, untokenized, with a location for every row."""

    dataset: datasets.Dataset
    origin: str  # file name(s) or hub id and split, for messages
    lines: list[tuple[str, int]] | None = None  # (file, line) of each row, where lines exist

    def locate(self, row: int) -> str:
        """'file line N' for line-based files, else 'origin row N' (1-based)."""
        if self.lines is not None and row < len(self.lines):
            file, line = self.lines[row]
            return f"{file} line {line}"
        return f"{self.origin} row {row + 1}"

    def select(self, rows) -> RawSplit:
        rows = [int(r) for r in rows]
        lines = None if self.lines is None else [self.lines[r] for r in rows]
        return RawSplit(self.dataset.select(rows), self.origin, lines)


@dataclasses.dataclass
class RawSource:
    spec: SourceSpec
    train: RawSplit
    eval: RawSplit | None  # the given eval split, if any


def load_source(spec: SourceSpec, cache_dir: str = "") -> RawSource:
    """Reads a source's train split and, when the config names one, its eval split."""
    if spec.path:
        train = load_local(spec.path, cache_dir)
        evals = load_local(spec.eval_path, cache_dir) if spec.eval_path else None
    else:
        train = load_hub(spec.hub, spec.hub_config, spec.split, cache_dir)
        evals = (
            load_hub(spec.hub, spec.hub_config, spec.eval_split, cache_dir)
            if spec.eval_split
            else None
        )
    if spec.max_examples and len(train.dataset) > spec.max_examples:
        train = train.select(range(spec.max_examples))
    return RawSource(spec, train, evals)


# ----------------------------------------------------------------------------- local files


def resolve_files(path: str) -> list[str]:
    """The files a `path` names: itself, or the sorted matches of a glob."""
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"{path}: no file matches this pattern; expected at least one")
        return files
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found; expected a json/jsonl/csv/parquet/txt file")
    return [path]


def _builder(files: list[str], path: str) -> str:
    kinds = set()
    for f in files:
        suffix = os.path.splitext(f)[1].lower()
        if suffix not in BUILDERS:
            raise DataError(
                f"{f}: unsupported file type {suffix or '(none)'!r}; expected one of "
                f"{', '.join(BUILDERS)}"
            )
        kinds.add(BUILDERS[suffix])
    if len(kinds) > 1:
        raise DataError(f"{path}: matches files of different types {sorted(kinds)}; expected one")
    return kinds.pop()


def _utf8_error(file: str, raw: bytes, e: UnicodeDecodeError, first_line: int = 1) -> DataError:
    """'data.jsonl line 3: not valid UTF-8 (byte 0xe9 at column 12); ...' for a
    decode failure at byte `e.start` of `raw`, whose first line is `first_line`."""
    line = first_line + raw.count(b"\n", 0, e.start)
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return DataError(
        f"{file} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
        "expected UTF-8 text (re-encode the file, e.g. iconv -f latin1 -t utf-8)"
    )


def read_lines(file: str):
    """(line number, text) of every line of a UTF-8 file, 1-based; a byte that
    is not UTF-8 raises DataError naming the file and line."""
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(file, raw, e, number) from None


def read_text(file: str) -> str:
    """The whole of a UTF-8 file; a byte that is not UTF-8 raises DataError
    naming the file and line."""
    with open(file, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(file, raw, e) from None


def _empty(file: str, what: str = "no rows") -> DataError:
    return DataError(f"{file}: the file is empty ({what}); expected at least one example")


def check_json_lines(file: str) -> list[int]:
    """Line numbers (1-based) of the non-blank lines of a JSON-lines file, each
    checked to be one JSON object.

    Raises DataError naming the file and line, e.g.
    "data.jsonl line 3: not valid JSON (Expecting ',' delimiter, column 17); expected one JSON object per line".
    A file with no non-blank line is refused as empty.
    """
    lines = []
    for number, line in read_lines(file):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{file} line {number}: not valid JSON ({e.msg}, column {e.colno}); "
                "expected one JSON object per line"
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                f"{file} line {number}: got a JSON {type(value).__name__}; "
                "expected one JSON object per line"
            )
        lines.append(number)
    if not lines:
        raise _empty(file, "no JSON object on any line")
    return lines


def _check_json_file(file: str) -> list[int] | None:
    """A `.json` file is either one array of objects (rows, no lines) or JSON lines."""
    text = read_text(file)
    if not text.strip():
        raise _empty(file, "no JSON in it")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return check_json_lines(file)
    if isinstance(value, dict) and len(text.strip().splitlines()) == 1:
        return check_json_lines(file)  # JSON lines with a single row
    if not isinstance(value, list):
        raise DataError(
            f"{file}: got a JSON {type(value).__name__}; expected an array of objects "
            "or one object per line"
        )
    if not value:
        raise _empty(file, "an empty JSON array")
    for i, row in enumerate(value):
        if not isinstance(row, dict):
            raise DataError(
                f"{file} row {i + 1}: got a JSON {type(row).__name__}; expected an object"
            )
    return None


def _text_lines(file: str) -> list[int]:
    numbers = [n for n, _ in read_lines(file)]
    if not numbers:
        raise _empty(file, "no lines")
    return numbers


def _check_csv(file: str) -> None:
    """UTF-8 throughout, and at least one row after the header line."""
    non_blank = sum(1 for _, line in read_lines(file) if line.strip())
    if non_blank == 0:
        raise _empty(file, "no header and no rows")
    if non_blank == 1:
        raise _empty(file, "a header line but no rows")


def load_local(path: str, cache_dir: str = "") -> RawSplit:
    """A local json/jsonl/csv/parquet/txt file (or glob) as a `datasets.Dataset`.

    Text files are checked first: UTF-8, well-formed JSON lines, not empty; a
    failure names the file and line.
    """
    files = resolve_files(path)
    builder = _builder(files, path)
    lines: list[tuple[str, int]] | None = []
    for f in files:
        numbers = None
        if builder == "json":
            numbers = check_json_lines(f) if f.endswith(".jsonl") else _check_json_file(f)
        elif builder == "text":
            numbers = _text_lines(f)
        elif builder == "csv":
            _check_csv(f)
        elif os.path.getsize(f) == 0:
            raise _empty(f, "0 bytes")
        if numbers is None or lines is None:
            lines = None
        else:
            lines.extend((f, n) for n in numbers)
    try:
        ds = datasets.load_dataset(
            builder, data_files=files, split="train", cache_dir=cache_dir or None
        )
    except Exception as e:  # Arrow/builder errors: keep them to one line
        raise DataError(f"{path}: datasets could not read it ({_first_line(e)})") from e
    if len(ds) == 0:
        raise DataError(f"{path}: no rows in it; expected at least one example")
    if lines is not None and len(lines) != len(ds):
        lines = None  # a reader that skips or splits rows differently: fall back to row numbers
    return RawSplit(ds, path, lines)


# ----------------------------------------------------------------------------- hub


def _offline() -> bool:
    try:
        import huggingface_hub.constants as hub_constants

        hub_offline = bool(hub_constants.HF_HUB_OFFLINE)
    except Exception:
        hub_offline = False
    return hub_offline or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def load_hub(name: str, config: str, split: str, cache_dir: str = "") -> RawSplit:
    """`datasets.load_dataset(name, config, split=split)`; any failure becomes one line."""
    origin = (
        f"hub dataset {name!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
    )
    try:
        ds = datasets.load_dataset(name, config or None, split=split, cache_dir=cache_dir or None)
    except Exception as e:
        hint = (
            "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and not in the local cache; "
            "go online once or use a local file (path=...)"
            if _offline()
            else _first_line(e)
        )
        raise DataError(f"{origin}: could not be loaded: {hint}") from e
    return RawSplit(ds, origin, None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------- splits


def seeded_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy Generator from the seed and stable keys (strings hashed with crc32,
    not Python's per-process `hash`), so every run draws the same numbers."""
    words = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        words.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF)
    return np.random.default_rng(np.random.SeedSequence(words))


def carve_eval(n: int, fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, eval_rows): a seeded `fraction` of `n` rows held out for eval,
    both sorted. Depends only on (n, fraction, seed, name).

        >>> tr, ev = carve_eval(10, 0.2, seed=0, name="target")
        >>> len(tr), len(ev), sorted(set(tr) | set(ev)) == list(range(10))
        (8, 2, True)
    """
    n_eval = int(round(n * fraction))
    if fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    perm = seeded_rng(seed, "eval-carve", name).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])
