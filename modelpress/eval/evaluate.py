"""`modelpress eval`'s measurements of one model: perplexity, size, bits per weight, decode speed."""
from __future__ import annotations

from typing import Any

import torch

from ..record import record
from .perplexity import perplexity
from .size import disk_bytes, model_size
from .speed import decode_tokens_per_s


def evaluate(model: torch.nn.Module, tokenizer: Any, text: str, ctx: int = 512, max_windows: int | None = None,
             decode_tokens: int = 64, progress: bool = True, compute_dtype: str = "float32") -> dict[str, Any]:
    """ppl over windows of `ctx` tokens of `text` (products in `compute_dtype`: eval/perplexity.py), the
    model's size, and (decode_tokens > 0) its batch-1 decode speed, as one flat dict (what `eval --json`
    prints)."""
    r = perplexity(model, tokenizer, text, ctx=ctx, max_windows=max_windows, progress=progress,
                   compute_dtype=compute_dtype)
    size = model_size(model)
    speed = decode_tokens_per_s(model, tokenizer, new_tokens=decode_tokens, progress=progress) if decode_tokens else None
    source = record(model).source
    return {"ppl": r.ppl, "windows": r.windows, "ctx": r.ctx, "compute_dtype": compute_dtype, "size_bytes": size.size_bytes,
            "bits_per_weight": size.bits_per_weight, "linear_bits_per_weight": size.linear_bits_per_weight,
            "tokens_per_s": speed, "eval_tokens_per_s": r.tokens_per_s, "source": source,
            "source_disk_bytes": disk_bytes(source) if source else None}


def summary(r: dict[str, Any]) -> str:
    """The lines `eval` prints for a person."""
    return (f"ppl {r['ppl']:.4f} over {r['windows']} windows of {r['ctx']} tokens ({r['eval_tokens_per_s']:.0f} tokens/s)\n"
            f"size {r['size_bytes'] / 1e6:.1f} MB, {r['bits_per_weight']:.2f} bits/weight "
            f"(linear layers {r['linear_bits_per_weight']:.2f})\n"
            + (f"decode {r['tokens_per_s']:.1f} tokens/s\n" if r["tokens_per_s"] else "")
            + f"loaded in {r.get('load_seconds', 0):.1f} s from {r['source']}")
