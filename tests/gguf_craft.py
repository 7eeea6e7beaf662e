"""Crafting damaged GGUF files for the hardening tests: where each header field sits (an independent
reading of the layout, not modelpress' reader), and a rewrite with changed metadata through the
official gguf writer.

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: u64 len + bytes, type: u32, value)
    n_tensors x (name: u64 len + bytes, n_dims: u32, dims: n_dims x u64, type: u32, offset: u64)
"""
import struct

import numpy as np

_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def fields(path):
    """[(name, offset, struct format)] of every count, length, type, dim and offset in the header,
    and the offset where the header ends."""
    b = open(path, "rb").read()
    out = [("n_tensors", 8, "<Q"), ("n_kv", 16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    pos = 24

    def string(label):
        nonlocal pos
        n = struct.unpack_from("<Q", b, pos)[0]
        out.append((f"{label} length", pos, "<Q"))
        pos += 8 + n
        return b[pos - n:pos].decode()

    def value(vtype, label):
        nonlocal pos
        if vtype == 8:
            string(label)
        elif vtype == 9:
            out.append((f"{label} element type", pos, "<I"))
            etype = struct.unpack_from("<I", b, pos)[0]
            out.append((f"{label} count", pos + 4, "<Q"))
            count = struct.unpack_from("<Q", b, pos + 4)[0]
            pos += 12
            if etype in (8, 9):
                for i in range(count):
                    value(etype, f"{label}[{i}]")
            else:
                pos += count * _SIZE[etype]
        else:
            out.append((f"{label} value", pos, "<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[_SIZE[vtype]]))
            pos += _SIZE[vtype]

    for _ in range(n_kv):
        key = string("key")
        out.append((f"{key} type", pos, "<I"))
        vtype = struct.unpack_from("<I", b, pos)[0]
        pos += 4
        value(vtype, key)
    for _ in range(n_tensors):
        name = string("tensor name")
        out.append((f"{name} n_dims", pos, "<I"))
        n_dims = struct.unpack_from("<I", b, pos)[0]
        pos += 4
        for d in range(n_dims):
            out.append((f"{name} dim {d}", pos, "<Q"))
            pos += 8
        out.append((f"{name} type", pos, "<I"))
        out.append((f"{name} offset", pos + 4, "<Q"))
        pos += 12
    return out, pos


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value % (1 << (8 * struct.calcsize(fmt))))
    return bytes(b)


def field_offset(path, name):
    return next((off, fmt) for n, off, fmt in fields(path)[0] if n == name)


def rewrite(src, dst, changes=None, tensors=None):
    """Copy a GGUF with metadata `changes` ({key: (value, GGUFValueType, sub type) or None to drop});
    `tensors(list)` may edit the tensor list [(name, uint8 rows, GGML type)] first."""
    import gguf

    from modelpress.formats.gguf_reader import metadata_fields, read_gguf

    _, ts = read_gguf(src)
    kv = {k: (v, gguf.GGUFValueType(t), None if sub is None else gguf.GGUFValueType(sub))
          for k, v, t, sub in metadata_fields(src)}
    for k, v in (changes or {}).items():
        if v is None:
            kv.pop(k, None)
        else:
            kv[k] = v
    arch = kv.pop("general.architecture", ("llama",))[0]
    w = gguf.GGUFWriter(str(dst), arch)
    for k, (v, t, sub) in kv.items():
        if k != "general.alignment" or t != gguf.GGUFValueType.UINT32:
            w.add_key_value(k, v, t, sub)
        else:
            w.add_key_value(k, v, t)
    items = [(t.name, np.array(t.data), t.ggml_type) for t in ts]
    if tensors is not None:
        items = tensors(items)
    for name, data, kind in items:
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
