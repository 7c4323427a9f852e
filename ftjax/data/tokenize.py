"""Tokenization with `transformers.AutoTokenizer`, batched through
`datasets.map` and cached under a fingerprint of (rows, tokenizer, format), and
the ragged token store the batcher reads from.

    tok = load_tokenizer("path/to/tokenizer")
    ex = tokenize_split(raw.train, spec, tok, add_bos=True, add_eos=True)
    ex = fit_to_length(ex, seq_len=128, truncation=True, chunk=False, locate=raw.train.locate)[0]
    ex.tokens_of(0), ex.labels_of(0)
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import datasets
import numpy as np

from ftjax.data.config import SourceSpec
from ftjax.data.errors import DataError
from ftjax.data.formats import check_format, encode_rows
from ftjax.data.sources import RawSplit

# Bump when encode_rows changes what it writes, to invalidate cached tokenizations.
ENCODING_VERSION = "1"

_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int8")),
        "n_content": datasets.Value("int32"),
    }
)


def load_tokenizer(name_or_path: str):
    """`AutoTokenizer.from_pretrained` with a one-line DataError on failure."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(
            f"tokenizer {name_or_path!r}: could not be loaded ({type(e).__name__}: {first}); "
            "expected a directory with tokenizer files or a hub id (online)"
        ) from e


def pad_id(tokenizer) -> int:
    """The id written into padding (never trained on): pad, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(datasets.fingerprint.Hasher.hash(tokenizer).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Examples:
    """Ragged examples stored flat: example i is `tokens[offsets[i]:offsets[i+1]]`.

    `labels` marks the tokens trained on as targets; `rows` is each example's row
    in its raw split (for error messages and for looking the raw row up).
    """

    tokens: np.ndarray  # int32 (total,)
    labels: np.ndarray  # uint8 (total,)
    offsets: np.ndarray  # int64 (n + 1,)
    rows: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tokens_of(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def labels_of(self, i: int) -> np.ndarray:
        return self.labels[self.offsets[i] : self.offsets[i + 1]]

    @staticmethod
    def empty() -> Examples:
        return Examples(
            np.zeros(0, np.int32),
            np.zeros(0, np.uint8),
            np.zeros(1, np.int64),
            np.zeros(0, np.int64),
        )

    def _gather(self, starts: np.ndarray, lens: np.ndarray, rows: np.ndarray) -> Examples:
        lens = lens.astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        index = np.repeat(starts.astype(np.int64) - offsets[:-1], lens) + np.arange(offsets[-1])
        return Examples(self.tokens[index], self.labels[index], offsets, rows.astype(np.int64))

    def select(self, idx) -> Examples:
        """The examples at `idx`, in that order."""
        idx = np.asarray(idx, np.int64)
        return self._gather(self.offsets[idx], self.lengths[idx], self.rows[idx])

    def clip(self, max_len: int) -> Examples:
        """Every example cut to its first `max_len` tokens."""
        return self._gather(self.offsets[:-1], np.minimum(self.lengths, max_len), self.rows)

    def split_long(self, max_len: int) -> Examples:
        """Examples longer than `max_len` split into consecutive `max_len` pieces."""
        pieces = np.maximum(1, -(-self.lengths // max_len))
        owner = np.repeat(np.arange(len(self)), pieces)
        k = np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = self.offsets[owner] + k * max_len
        lens = np.minimum(self.offsets[owner + 1] - starts, max_len)
        return self._gather(starts, lens, self.rows[owner])

    def target_counts(self) -> np.ndarray:
        """Trained targets per example: labels of every token but the first (the
        first token of a segment is never predicted)."""
        cs = np.concatenate([[0], np.cumsum(self.labels, dtype=np.int64)])
        starts = np.minimum(self.offsets[:-1] + 1, self.offsets[1:])
        return cs[self.offsets[1:]] - cs[starts]

    def hashes(self) -> list[bytes]:
        """A content hash (tokens and labels) per example, for exact-duplicate removal."""
        out = []
        for i in range(len(self)):
            h = hashlib.blake2b(self.tokens_of(i).tobytes(), digest_size=16)
            h.update(self.labels_of(i).tobytes())
            out.append(h.digest())
        return out

    @staticmethod
    def concat(parts: list[Examples]) -> Examples:
        parts = [p for p in parts if len(p)] or [Examples.empty()]
        shift = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        return Examples(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shift, strict=True)]),
            np.concatenate([p.rows for p in parts]),
        )


def tokenize_split(
    split: RawSplit,
    spec: SourceSpec,
    tokenizer,
    *,
    add_bos: bool,
    add_eos: bool,
    num_proc: int = 0,
) -> tuple[Examples, np.ndarray]:
    """(examples, n_content) of one raw split: `datasets.map` in batches, cached.

    The cache key is the dataset's own fingerprint plus the tokenizer, format,
    field names and BOS/EOS choice, so a second run with the same inputs reads
    the tokenized arrays from disk (for file-backed datasets).
    """
    ds = split.dataset
    check_format(spec, ds.column_names, tokenizer, split.origin)
    chat = spec.format == "chat"
    bos_id = tokenizer.bos_token_id if add_bos and not chat else None
    eos_id = tokenizer.eos_token_id if add_eos and not chat else None
    if len(ds) == 0:
        return Examples.empty(), np.zeros(0, np.int32)

    def encode(batch, indices):
        ids, labels, content = encode_rows(
            tokenizer, spec, batch, indices, split.locate, bos_id, eos_id
        )
        return {"input_ids": ids, "labels": labels, "n_content": content}

    key = repr(
        (ds._fingerprint, tokenizer_fingerprint(tokenizer), spec.format, spec.fields, bos_id,
         eos_id, ENCODING_VERSION)
    )  # fmt: skip
    out = ds.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=_FEATURES,
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        num_proc=num_proc or None,
        desc=f"tokenizing {spec.name}",
    )
    table = out.with_format("arrow")[:]

    def flat(name, dtype):
        col = table.column(name).combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        return col.flatten().to_numpy(zero_copy_only=False).astype(dtype), offsets - offsets[0]

    tokens, offsets = flat("input_ids", np.int32)
    labels, _ = flat("labels", np.uint8)
    n_content = table.column("n_content").to_numpy().astype(np.int32)
    return Examples(tokens, labels, offsets, np.arange(len(n_content), dtype=np.int64)), n_content


def fit_to_length(
    ex: Examples, seq_len: int, *, truncation: bool, chunk: bool, locate: Callable[[int], str]
) -> tuple[Examples, int]:
    """Makes every example fit in `seq_len`: split (chunk=True, for `text`), cut
    (truncation=True), or raise naming the first too-long example. Returns the
    examples and how many were split or cut."""
    too_long = np.nonzero(ex.lengths > seq_len)[0]
    if len(too_long) == 0:
        return ex, 0
    if chunk:
        return ex.split_long(seq_len), len(too_long)
    if not truncation:
        i = int(too_long[0])
        raise DataError(
            f"{locate(int(ex.rows[i]))}: example has {int(ex.lengths[i])} tokens, longer than "
            f"seq_len={seq_len} ({len(too_long)} such examples); expected at most seq_len tokens "
            "(set data.truncation=True, or raise data.seq_len)"
        )
    return ex.clip(seq_len), len(too_long)
