"""Read a GGUF file's header (metadata + tensor table) in bulk; tensor data stays memory-mapped.

gguf-py's GGUFReader builds one Python object per array element, which costs ~5 s for a 49k-token
vocabulary with its merges; this reader decodes the same header in ~0.1 s and leaves the tensor
bytes to `gguf.quants.dequantize`, the official implementation of every block format.

Layout (GGUF v2/v3, little-endian):
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: str, type: u32, value)          str = u64 length + utf-8 bytes
    n_tensors x (name: str, n_dims: u32, dims: n_dims x u64 (innermost first), type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it.

Nothing is trusted before it is checked against the file's size: every count, string length and
array length must fit in the bytes left, a tensor has 1 to 4 dimensions (GGML_MAX_DIMS), each at
least 1, a row a whole number of blocks, an offset aligned (llama.cpp's gguf.cpp checks the same),
and no two tensors share a name or a byte.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

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


class _Corrupt(ValueError):
    """A header field that cannot be right (read_gguf turns it into a ModelpressError)."""


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0]

    def count(self, what: str, each: int) -> int:
        """A u64 count of items of at least `each` bytes, refused if they cannot fit in the rest."""
        n = self.take("<Q")
        if n * each > len(self.buf) - self.pos:
            raise _Corrupt(f"{what} {n} does not fit in the {len(self.buf) - self.pos} bytes left")
        return n

    def string(self) -> str:
        n = self.count("a string length of", 1)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            if depth > 4:
                raise _Corrupt("arrays nested more than 4 deep")
            etype = self.take("<I")
            if etype not in _SCALAR and etype not in (8, 9):
                raise _Corrupt(f"an array of unknown value type {etype}")
            each = 8 if etype == 8 else 12 if etype == 9 else np.dtype(_SCALAR[etype]).itemsize
            count = self.count("an array length of", each)
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype == 9:
                return [self.value(9, depth + 1) for _ in range(count)]
            dt = np.dtype(_SCALAR[etype]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return arr.tolist()
        if vtype not in _SCALAR:
            raise _Corrupt(f"unknown value type {vtype}")
        dt = np.dtype(_SCALAR[vtype]).newbyteorder("<")
        v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0]
        self.pos += dt.itemsize
        return v.item()


# metadata key -> (GGUF value type, array element type or None), of the keys read last
VALUE_TYPES: dict[str, tuple[int, int | None]] = {}


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF file. Raises ModelpressError for a file that is not valid GGUF.
    The value types of the metadata are left in VALUE_TYPES (see metadata_fields)."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:  # magic, version, n_tensors, n_kv
        raise ModelpressError(f"{path} is not a GGUF file ({size} bytes, less than a GGUF header); check the path")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(mm[:4]) != b"GGUF":
        raise ModelpressError(f"{path} is not a GGUF file (no GGUF magic); check the path")
    try:
        meta, types, infos, end = _header(_Cursor(memoryview(mm)), path)
        tensors = _tensors(mm, meta, types, infos, end)
    except (struct.error, ValueError, KeyError, IndexError, OverflowError) as e:
        raise ModelpressError(f"{path} is truncated or corrupt ({e}); re-download or re-export it") from None
    VALUE_TYPES.clear()
    VALUE_TYPES.update(types)
    return meta, tensors


def _header(cur: _Cursor, path: Path) -> tuple[dict[str, Any], dict, list, int]:
    """(metadata, value types, tensor infos (name, dims, type, offset), end of the header)."""
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ModelpressError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
    n_tensors = cur.count("a tensor count of", 24)  # name length, n_dims, type, offset at least
    n_kv = cur.count("a metadata count of", 13)     # key length, value type, one byte at least
    meta: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in meta:
            raise _Corrupt(f"metadata key {key!r} appears twice")
        vtype = cur.take("<I")
        sub = struct.unpack_from("<I", cur.buf, cur.pos)[0] if vtype == 9 else None
        meta[key] = cur.value(vtype)
        types[key] = (vtype, sub)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to 4)")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    return meta, types, infos, cur.pos


def _tensors(mm: np.ndarray, meta: dict[str, Any], types: dict, infos: list, end: int) -> list[GGUFTensor]:
    """The tensor table checked against the file: names unique, shapes whole blocks, data aligned,
    inside the file and apart from every other tensor's."""
    align = meta.get("general.alignment", 32)
    if "general.alignment" in meta and types["general.alignment"][0] != 4:
        raise _Corrupt("general.alignment is not a u32")
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Corrupt(f"general.alignment {align!r} is not a power of two")
    start = (end + align - 1) // align * align
    seen: set[str] = set()
    spans, tensors = [], []
    for name, dims, gtype, offset in infos:
        if name in seen:
            raise _Corrupt(f"tensor {name} appears twice")
        seen.add(name)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise ModelpressError(f"tensor {name} has GGML type {gtype}, which the gguf package does not know; "
                                  "upgrade it (pip install -U gguf)") from None
        if min(dims) < 1 or dims[0] % block:
            raise _Corrupt(f"tensor {name} has dims {dims}: each must be at least 1 and the first a multiple of "
                           f"{block} (its type's block)")
        row_bytes = dims[0] // block * type_size
        rows = int(np.prod([int(d) for d in dims[1:]], dtype=object)) if len(dims) > 1 else 1
        lo, nbytes = start + offset, rows * row_bytes
        if offset % align:
            raise _Corrupt(f"tensor {name}'s offset {offset} is not a multiple of the alignment {align}")
        if lo + nbytes > len(mm):
            raise _Corrupt(f"tensor {name} runs past the end of the file (an interrupted download?)")
        spans.append((lo, lo + nbytes, name))
        data = mm[lo:lo + nbytes].reshape(rows, row_bytes)
        tensors.append(GGUFTensor(name, tuple(reversed(dims)), gtype, data))
    spans.sort()
    for (_, a_end, a), (b_lo, _, b) in zip(spans, spans[1:]):
        if b_lo < a_end:
            raise _Corrupt(f"tensors {a} and {b} overlap in the file")
    return tensors


def metadata_fields(path: str | Path) -> list[tuple[str, Any, int, int | None]]:
    """(key, value, value type, array element type) of every metadata entry, for copying them
    into another file with their exact types."""
    meta, _ = read_gguf(path)
    return [(k, v, *VALUE_TYPES[k]) for k, v in meta.items()]


def dequantize(t: GGUFTensor) -> np.ndarray:
    """fp32 values of a tensor, in torch shape."""
    out = gguf_dequantize(t.data, GGMLQuantizationType(t.ggml_type))
    return np.asarray(out, dtype=np.float32).reshape(t.shape)
