"""Minimal safetensors reader/writer on numpy + ml_dtypes.

The `safetensors` package's numpy backend cannot represent bfloat16, the dtype
most released checkpoints use, and its flax backend puts every tensor on the
default device at once. This reader memory-maps the file and returns numpy
arrays (bfloat16 through ml_dtypes), so a loader can cast and place tensors one
by one. The format: 8-byte little-endian header length, a JSON header mapping
names to {dtype, shape, data_offsets}, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from ftjax.errors import ModelError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(ModelError):
    pass


# A header larger than this is not a safetensors header (the reference
# implementation refuses headers over 100 MB too).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: str) -> tuple[dict, int]:
    """(header dict, offset of the data section). Raises SafetensorsError naming
    the file when the header is not a valid safetensors header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(
                f"{path}: not a safetensors file ({size} bytes; expected an 8-byte header "
                "length, a JSON header and the tensor data)"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(
                f"{path}: not a safetensors file or truncated (header length {n} bytes, but the "
                f"file has {size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}; expected an "
            "object mapping tensor names to dtype, shape and data_offsets)"
        )
    _check_offsets(path, header, size - 8 - n)
    return header, 8 + n


def _check_offsets(path: str, header: dict, data_size: int) -> None:
    """Every tensor's bytes lie inside the data section, match its dtype and
    shape, and no two tensors overlap (the format packs them in order)."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise SafetensorsError(
                    f"{path}: corrupt safetensors header (__metadata__ is a "
                    f"{type(info).__name__}; expected an object)"
                )
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise SafetensorsError(
                f"{where}: corrupt header entry {info!r}; expected dtype, shape and data_offsets"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise SafetensorsError(
                f"{where} has unsupported dtype {dtype!r}; supported: {', '.join(_DTYPES)}"
            )
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise SafetensorsError(f"{where}: bad shape {shape!r}; expected a list of sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise SafetensorsError(
                f"{where}: bad data_offsets {offsets!r}; expected [begin, end] byte offsets"
            )
        begin, end = offsets
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if end < begin or end - begin != nbytes:
            raise SafetensorsError(
                f"{where}: data_offsets {offsets} span {end - begin} bytes, but {dtype} "
                f"shape {shape} needs {nbytes}"
            )
        if end > data_size:
            raise SafetensorsError(
                f"{where}: data ends at byte {end} of the data section, but the file has only "
                f"{data_size} data bytes (truncated file?)"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise SafetensorsError(
                f"{path}: tensors {prev!r} and {name!r} overlap in the data section; "
                "expected disjoint data_offsets"
            )


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def load(path: str) -> dict[str, np.ndarray]:
    """All tensors of a file as read-only memory-mapped numpy arrays; the header
    is checked against the file size first (see `read_header`)."""
    header, start = read_header(path)
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r")  # read_header saw >= 8 bytes
    out = {}
    for name, info in header.items():
        lo, hi = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if hi == lo:  # an empty tensor; memmap cannot map a zero-length file
            out[name] = np.zeros(info["shape"], dtype)
            continue
        out[name] = data[start + lo : start + hi].view(dtype).reshape(info["shape"])
    return out


def metadata(path: str) -> dict:
    return read_header(path)[0].get("__metadata__", {}) or {}


def save(tensors: dict[str, np.ndarray], path: str, meta: dict | None = None) -> None:
    """Writes atomically (temporary file + rename): a crash leaves the old file."""
    header: dict = {}
    if meta:
        header["__metadata__"] = {str(k): str(v) for k, v in meta.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
