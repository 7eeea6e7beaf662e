"""Read a GGUF file's header (metadata + tensor table) in bulk; tensor data stays memory-mapped.

gguf-py's GGUFReader builds one Python object per array element, which costs ~5 s for a 49k-token
vocabulary with its merges; this reader decodes the same header in ~0.1 s and leaves the tensor
bytes to `gguf.quants.dequantize`, the official implementation of every block format.

Layout (GGUF v2/v3, little-endian):
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: str, type: u32, value)          str = u64 length + utf-8 bytes
    n_tensors x (name: str, n_dims: u32, dims: n_dims x u64 (innermost first), type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelpressError

# GGUF metadata value types -> numpy scalar dtype (8 = string, 9 = array handled apart)
_SCALAR = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
           6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclasses.dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]   # torch order (outermost first)
    ggml_type: int
    data: np.ndarray         # uint8 view of the raw bytes, (rows, row_bytes)


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0]

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype == 9:
                return [self.value(9) for _ in range(count)]
            dt = np.dtype(_SCALAR[etype]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return arr.tolist()
        dt = np.dtype(_SCALAR[vtype]).newbyteorder("<")
        v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0]
        self.pos += dt.itemsize
        return v.item()


# metadata key -> (GGUF value type, array element type or None), of the keys read last
VALUE_TYPES: dict[str, tuple[int, int | None]] = {}


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF file. Raises ModelpressError for a file that is not valid GGUF.
    The value types of the metadata are left in VALUE_TYPES (see metadata_fields)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    try:
        if bytes(mm[:4]) != b"GGUF":
            raise ModelpressError(f"{path} is not a GGUF file (no GGUF magic); check the path")
        cur.pos = 4
        version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
        if version not in (2, 3):
            raise ModelpressError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.take("<I")
            sub = struct.unpack_from("<I", cur.buf, cur.pos)[0] if vtype == 9 else None
            meta[key] = cur.value(vtype)
            VALUE_TYPES[key] = (vtype, sub)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    except (struct.error, ValueError, KeyError, IndexError) as e:
        raise ModelpressError(f"{path} is truncated or corrupt ({e}); re-download or re-export it") from None
    align = int(meta.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = []
    for name, dims, gtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise ModelpressError(f"{path}: tensor {name} has GGML type {gtype}, which the gguf package "
                                  "does not know; upgrade it (pip install -U gguf)") from None
        row_bytes = dims[0] // block * type_size
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        lo = start + offset
        if lo + rows * row_bytes > len(mm):
            raise ModelpressError(f"{path} is truncated: tensor {name} runs past the end of the file "
                                  "(an interrupted download?); re-download or re-export it")
        data = mm[lo:lo + rows * row_bytes].reshape(rows, row_bytes)
        tensors.append(GGUFTensor(name, tuple(reversed(dims)), gtype, data))
    return meta, tensors


def metadata_fields(path: str | Path) -> list[tuple[str, Any, int, int | None]]:
    """(key, value, value type, array element type) of every metadata entry, for copying them
    into another file with their exact types."""
    meta, _ = read_gguf(path)
    return [(k, v, *VALUE_TYPES[k]) for k, v in meta.items()]


def dequantize(t: GGUFTensor) -> np.ndarray:
    """fp32 values of a tensor, in torch shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    out = gguf_dequantize(t.data, GGMLQuantizationType(t.ggml_type))
    return np.asarray(out, dtype=np.float32).reshape(t.shape)
