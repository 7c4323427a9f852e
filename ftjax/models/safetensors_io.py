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


def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise SafetensorsError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


def load(path: str) -> dict[str, np.ndarray]:
    """All tensors of a file as read-only memory-mapped numpy arrays."""
    header, start = read_header(path)
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        buf = data[start + lo : start + hi]
        out[name] = buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
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
