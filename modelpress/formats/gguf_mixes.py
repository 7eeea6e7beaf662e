"""llama.cpp's quantization mixes ("file types", `llama-quantize ... Q4_K_M`) as data: the base
block type of each mix, the tensors that get more bits, and the fallbacks for rows whose length is
not a multiple of the block (src/llama-quant.cpp: llama_tensor_get_type_impl and
tensor_type_fallback), for dense Llama-family models (no experts, not Falcon, not 70B).

    types = tensor_types([(name, shape), ...], "Q4_K_M", n_head=9, n_head_kv=3)
    # {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0", "blk.0.attn_norm.weight": "F32", ...}

Names and shapes are GGUF's (shape outermost first: (rows, row length)).
"""
from __future__ import annotations

import re

from ..core.kquants import BLOCK

# mix -> (llama_ftype number written as general.file_type, base type of the quantizable tensors)
MIXES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q2_K": (10, "Q2_K"), "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
}

# (category, mixes, condition, type): within a category the first rule whose mix and condition
# hold wins (llama.cpp's if / else-if chain). Conditions read i, the tensor's index among its
# category in file order, and n, their count (attn_v: the attn_v tensors; ffn_down: the layers).
RULES: tuple[tuple[str, frozenset[str], str, str], ...] = tuple(
    (cat, frozenset(mixes.split()), cond, typ) for cat, mixes, cond, typ in (
        ("attn_v", "Q2_K", "gqa>=4", "Q4_K"),
        ("attn_v", "Q2_K", "always", "Q3_K"),
        ("attn_v", "Q3_K_M", "i<2", "Q5_K"),
        ("attn_v", "Q3_K_M", "always", "Q4_K"),
        ("attn_v", "Q3_K_L", "always", "Q5_K"),
        ("attn_v", "Q4_K_M Q5_K_M", "more_bits", "Q6_K"),
        ("attn_v", "Q4_K_S", "i<4", "Q5_K"),
        ("ffn_down", "Q2_K", "always", "Q3_K"),
        ("ffn_down", "Q3_K_M", "i<n/16", "Q5_K"),
        ("ffn_down", "Q3_K_M", "always", "Q4_K"),
        ("ffn_down", "Q3_K_L", "always", "Q5_K"),
        ("ffn_down", "Q4_K_M", "more_bits", "Q6_K"),
        ("ffn_down", "Q5_K_M", "more_bits", "Q6_K"),
        ("ffn_down", "Q4_K_S", "i<n/8", "Q5_K"),
        ("ffn_down", "Q4_0", "imatrix and i<n/8", "Q4_1"),
        ("ffn_down", "Q5_0", "imatrix and i<n/8", "Q5_1"),
        ("attn_output", "Q2_K", "always", "Q3_K"),
        ("attn_output", "Q3_K_M", "always", "Q4_K"),
        ("attn_output", "Q3_K_L", "always", "Q5_K"),
    ))

# a 256-block type on rows it does not divide -> a 32-block type; still not dividing -> F16
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# llama-quant.cpp's categories; a fused qkv (phi3) is counted and typed as attn_v (category_is_attn_v)
_CATEGORY = (("attn_v.weight", "attn_v"), ("attn_qkv.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
             ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
             ("ffn_down", "ffn_down"))


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    return next((c for part, c in _CATEGORY if part in name), "other")


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """2-D weights other than norms (tensor_allows_quantization, for Llama)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _holds(cond: str, i: int, n: int, gqa: int, imatrix: bool) -> bool:
    return {"always": True, "gqa>=4": gqa >= 4, "i<2": i < 2, "i<4": i < 4, "more_bits": _more_bits(i, n),
            "i<n/16": i < n // 16, "i<n/8": i < n // 8, "imatrix and i<n/8": imatrix and i < n // 8}[cond]


def _block(kind: str) -> int:
    return BLOCK[kind][0] if kind in BLOCK else 1


def tensor_types(tensors: list[tuple[str, tuple[int, ...]]], mix: str, n_head: int, n_head_kv: int,
                 imatrix: bool = False) -> dict[str, str]:
    """The type of every tensor under `mix`, as llama.cpp's quantizer picks it from an F32 file
    (non-quantizable tensors keep F32)."""
    if mix not in MIXES:
        raise ValueError(f"unknown GGUF mix {mix!r}; known: {', '.join(MIXES)}")
    base = MIXES[mix][1]
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    counts = {"attn_v": sum(category(n) == "attn_v" for n in names),
              "ffn_down": 1 + max((int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))), default=-1)}
    seen = {"attn_v": 0, "ffn_down": 0}
    out = {}
    for name, shape in tensors:
        if not quantizable(name, shape):
            out[name] = "F32"
            continue
        kind, cat, cols = base, category(name), shape[-1]
        if base in BLOCK:  # quantized mixes only: the rules and fallbacks
            if cat == "output" or (tied and cat == "token_embd"):
                kind = "Q8_0" if cols % _block(kind) else ("Q6_K" if kind != "Q8_0" else kind)
            elif cat in seen or cat == "attn_output":
                i, n = seen.get(cat, 0), counts.get(cat, 0)
                for rcat, mixes, cond, typ in RULES:
                    if rcat == cat and mix in mixes and _holds(cond, i, n, n_head // n_head_kv, imatrix):
                        kind = typ
                        break
                if cat in seen:
                    seen[cat] += 1
            if cols % _block(kind):
                kind = FALLBACK.get(kind, kind)
                if cols % _block(kind):
                    kind = "F16"
        out[name] = kind
    return out
