"""llama.cpp's importance-matrix files, read and written in both of its formats.

GGUF (llama-imatrix's default since 2025; common/imatrix-loader.cpp reads it):
    metadata  general.type = "imatrix", imatrix.datasets [str], imatrix.chunk_count u32,
              imatrix.chunk_size u32
    tensors   "<weight name>.in_sum2"  F32 (n_mat, n_cols)  sum over tokens of x^2 per input column
              "<weight name>.counts"   F32 (n_mat, 1)       tokens summed
Legacy ".dat" (anything not GGUF), little-endian:
    i32 n_entries; per entry, by sorted name: i32 len, name bytes, i32 ncall, i32 nval,
    f32[nval] = (sum / count) * ncall; then i32 chunk_count, i32 len, dataset bytes.
    ncall = ceil(count / chunk_size).

The importance llama-quantize uses is sum / count per column (the mean of x^2), in fp32; n_mat
is 1 for every dense model (it counts experts in a mixture of experts).

    im = load_imatrix("imatrix.gguf"); im.importance()["blk.0.ffn_down.weight"]  # (1536,) fp32
"""
from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import ModelpressError
from .gguf_reader import read_gguf

GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass
class Imatrix:
    sums: dict[str, torch.Tensor]       # weight name -> fp32 (n_cols,): sum of x^2 over tokens
    counts: dict[str, int]              # weight name -> tokens summed
    chunk_count: int = 0                # windows of text run
    chunk_size: int = 512               # tokens per window
    datasets: list[str] = dataclasses.field(default_factory=list)

    def importance(self) -> dict[str, torch.Tensor]:
        """{weight name: fp32 mean x^2 per column}, as llama-quantize computes it (1 where no data)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name]
            out[name] = s.float() / torch.tensor(float(c), dtype=torch.float32) if c > 0 else torch.ones_like(s)
        return out

    def gguf_metadata(self, file: str | None = None) -> dict[str, str | int]:
        """The quantize.imatrix.* keys llama-quantize writes into a GGUF quantized with this matrix."""
        meta: dict[str, str | int] = {"quantize.imatrix.file": file or "(computed by modelpress)",
                                      "quantize.imatrix.entries_count": len(self.sums),
                                      "quantize.imatrix.chunks_count": self.chunk_count}
        if self.datasets:
            meta["quantize.imatrix.dataset"] = self.datasets[0]
        return meta


def save_imatrix(path: str | Path, im: Imatrix) -> Path:
    """Write GGUF when the name ends in .gguf (llama-imatrix's rule), else the legacy format; to a
    temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        if path.suffix.lower() == ".gguf":
            _write_gguf(tmp, im)
        else:
            tmp.write_bytes(_legacy_bytes(im))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_gguf(path: Path, im: Imatrix) -> None:
    w = gguf.GGUFWriter(str(path), arch="")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix's files name no architecture
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(im.datasets))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, im.chunk_count)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, im.chunk_size)
    for name in sorted(im.sums):
        w.add_tensor(f"{name}.in_sum2", im.sums[name].float().reshape(1, -1).numpy())
        w.add_tensor(f"{name}.counts", np.array([[float(im.counts[name])]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _legacy_bytes(im: Imatrix) -> bytes:
    out = [struct.pack("<i", len(im.sums))]
    for name in sorted(im.sums):
        count = im.counts[name]
        ncall = -(-count // im.chunk_size)
        s = im.sums[name].float()
        vals = (s / np.float32(count) * np.float32(ncall)) if count > 0 else torch.full_like(s, float(ncall))
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, s.numel()),
                vals.numpy().astype("<f4").tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    out += [struct.pack("<ii", im.chunk_count, len(dataset)), dataset]
    return b"".join(out)


def load_imatrix(path: str | Path) -> Imatrix:
    """Either format. Legacy files keep only sum/count * ncall: sums and counts are rebuilt as
    llama-imatrix does (x chunk_size), so that importance() is their value / ncall."""
    path = Path(path)
    if not path.is_file():
        raise ModelpressError(f"no imatrix file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path.read_bytes())
    except (struct.error, ValueError, KeyError, IndexError) as e:
        raise ModelpressError(f"{path} is not a llama.cpp imatrix file ({e})") from None


def _read_gguf(path: Path) -> Imatrix:
    meta, tensors = read_gguf(path)
    if meta.get("general.type", "imatrix") != "imatrix":
        raise ModelpressError(f"{path} is a GGUF {meta['general.type']}, not an imatrix file")
    sums, counts = {}, {}
    for t in tensors:
        values = np.array(t.data).view("<f4").reshape(-1).astype(np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = torch.from_numpy(values)
        elif t.name.endswith(".counts"):
            if values.size != 1:
                raise ModelpressError(f"{path}: {t.name} counts {values.size} experts; "
                                      "modelpress reads the imatrix files of dense models")
            counts[t.name[: -len(".counts")]] = int(round(float(values[0])))
    if not sums or sums.keys() != counts.keys():
        raise ModelpressError(f"{path} holds no imatrix entries (or sums without counts)")
    return Imatrix(sums, counts, int(meta.get("imatrix.chunk_count", 0)), int(meta.get("imatrix.chunk_size", 512)),
                   list(meta.get("imatrix.datasets", [])))


def _read_legacy(raw: bytes, chunk_size: int = 512) -> Imatrix:
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        vals = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return vals

    (n,) = take("<i")
    if n < 1:
        raise ValueError("no entries")
    sums, counts = {}, {}
    for _ in range(n):
        (ln,) = take("<i")
        name = raw[pos:pos + ln].decode()
        pos += ln
        ncall, nval = take("<ii")
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        sums[name] = torch.from_numpy(vals * np.float32(chunk_size))
        counts[name] = ncall * chunk_size
    chunk_count, datasets = 0, []
    if pos < len(raw):
        (chunk_count,) = take("<i")
        if pos < len(raw):
            (ln,) = take("<i")
            if ln > 0:
                datasets.append(raw[pos:pos + ln].decode())
    return Imatrix(sums, counts, chunk_count, chunk_size, datasets)
