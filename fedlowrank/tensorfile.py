"""Safetensors files checked before anything is allocated: the header is read and validated on its own (size,
JSON, dtypes, shapes, byte ranges inside the file and covering it without holes or overlaps), so a hostile or
damaged file is refused with a message naming it and the tensor, before any tensor exists. Loading goes through
``safetensors`` only after that (nothing is ever unpickled).

Format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}``, then the data buffer the offsets index."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
TORCH_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}  # torch dtype -> header name


class TensorFileError(ValueError):
    """A safetensors file that is malformed, truncated or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it: dtype name (``F32``), shape, byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _json(raw: bytes, where: str):
    try:
        return json.loads(raw)
    except RecursionError:
        raise TensorFileError(f"{where}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"{where}: not valid JSON ({e})") from None


def _entry(path: Path, name: str, spec: object) -> TensorInfo:
    if not isinstance(spec, dict) or set(spec) - {"dtype", "shape", "data_offsets"}:
        raise TensorFileError(f"{path}: tensor {name!r}: header entry must be {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise TensorFileError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(type(s) is int and s >= 0 for s in shape):
        raise TensorFileError(f"{path}: tensor {name!r}: shape {str(shape)[:80]} is not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise TensorFileError(f"{path}: tensor {name!r}: data_offsets {str(offsets)[:80]} is not [begin, end]")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.end - info.begin != info.numel * DTYPE_BYTES[dtype]:
        raise TensorFileError(f"{path}: tensor {name!r}: shape {list(shape)} of {dtype} needs "
                              f"{info.numel * DTYPE_BYTES[dtype]:,} bytes, its data_offsets span {offsets}")
    return info


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, validated against the file's size; reads the header only."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
                raise TensorFileError(f"{path}: not a safetensors file (header length {n:,} for a file of "
                                      f"{size:,} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise TensorFileError(f"{path}: cannot read ({e})") from None
    header = _json(raw, str(path))
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TensorFileError(f"{path}: __metadata__ must map strings to strings")
    tensors = {name: _entry(path, name, spec) for name, spec in header.items()}
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise TensorFileError(f"{path}: tensor {name!r}: data_offsets start at {info.begin:,}, expected {pos:,} "
                                  "(tensors overlap or leave a hole)")
        pos = info.end
    if pos != size - 8 - n:
        raise TensorFileError(f"{path}: the tensors cover {pos:,} bytes of a {size - 8 - n:,}-byte data buffer "
                              "(truncated or padded file)")
    return tensors, meta


def check_against(path: Path, want: dict[str, torch.Tensor], require_all: bool = True) -> None:
    """The file holds ``want``'s names (all of them, or with ``require_all=False`` a subset), each with its shape
    and dtype, read from the header alone (``want`` may hold meta tensors); :class:`TensorFileError` otherwise."""
    have, _ = read_header(path)
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have)) if require_all else []
    if extra or missing:
        raise TensorFileError(f"{path}: not this run's model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, info in have.items():
        dtype = TORCH_DTYPES.get(want[k].dtype)
        if info.shape != tuple(want[k].shape) or (dtype is not None and info.dtype != dtype):
            raise TensorFileError(f"{path}: tensor {k!r} is {info.dtype} {list(info.shape)}; the run's model has "
                                  f"{dtype or want[k].dtype} {list(want[k].shape)}")


def load_checked(path: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors (or only ``names``), after :func:`read_header` accepted it."""
    from safetensors import safe_open

    tensors, _ = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in tensors if names is None or k in names}
    except Exception as e:  # SafetensorError and friends: the header passed, so the data itself is unreadable
        raise TensorFileError(f"{path}: unreadable tensor data ({type(e).__name__}: {str(e)[:200]})") from None


__all__ = ["DTYPE_BYTES", "FLOAT_DTYPES", "MAX_HEADER_BYTES", "TORCH_DTYPES", "TensorFileError", "TensorInfo",
           "check_against", "load_checked", "read_header"]
