"""RTN on the default model beside fp32, bf16 and the plain transformers reference, in one run.

    .venv/bin/python benchmarks/rtn.py --windows 100 --out benchmarks/results/rtn.json

Each row: method, config, quantize seconds, size, bits per weight, ppl (and its change against
fp32), perplexity tokens/s, decode tokens/s. The transformers row loads the same GGUF with
transformers' own loader and measures its plain `model(w, labels=w)` perplexity loop and
`generate`. Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from modelpress.data import load_text, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows, transformers_perplexity  # noqa: E402
from modelpress.eval.size import model_size  # noqa: E402
from modelpress.eval.speed import SPEED_PROMPT, decode_tokens_per_s  # noqa: E402
from modelpress.model.load import default_model_path  # noqa: E402

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval.txt"
CONFIGS = {
    "int8": dict(bits=8, group_size=None, symmetric=True),
    "int8-asym": dict(bits=8, group_size=None, symmetric=False),
    "int4-g64": dict(bits=4, group_size=64, symmetric=False),
    "int4-g64-sym": dict(bits=4, group_size=64, symmetric=True),
    "int4-g128": dict(bits=4, group_size=128, symmetric=False),
    "int3-g64": dict(bits=3, group_size=64, symmetric=False),
    "int2-g64": dict(bits=2, group_size=64, symmetric=False),
}


def transformers_decode_tokens_per_s(model, tok, new_tokens: int) -> float:
    """transformers' generate, greedy; prefill subtracted by timing a 1-token generate."""
    ids = torch.tensor([tok(SPEED_PROMPT, add_special_tokens=False)["input_ids"]])
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)

    def timed(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - start

    timed(4)
    return (new_tokens - 1) / (timed(new_tokens) - timed(1))


def row(name, model, wins, tok, decode_tokens, base_ppl=None, **extra):
    r = perplexity_of_windows(model, wins)
    size = model_size(model)
    out = {"method": name, **extra, "size_bytes": size.size_bytes, "bits_per_weight": size.bits_per_weight,
           "linear_bits_per_weight": size.linear_bits_per_weight, "ppl": r.ppl,
           "ppl_change_pct": None if base_ppl is None else 100 * (r.ppl / base_ppl - 1),
           "eval_tokens_per_s": r.tokens_per_s,
           "decode_tokens_per_s": decode_tokens_per_s(model, tok, decode_tokens)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="evaluation text (default: ../shared/data/eval.txt, else pydoc topics)")
    p.add_argument("--windows", type=int, default=20, help="windows of 512 tokens (default 20)")
    p.add_argument("--bf16-windows", type=int, help="fewer windows for the bf16 row (its GEMMs are slow on CPUs without AMX)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers reference row")
    p.add_argument("--out", default="benchmarks/results/rtn.json")
    a = p.parse_args()

    text_path = a.text or (str(SHARED_EVAL) if SHARED_EVAL.is_file() else None)
    text = read_text(text_path) if text_path else load_text(None, "eval")
    start = time.perf_counter()
    model, tok = modelpress.load()
    load_s = time.perf_counter() - start
    wins = windows(tokenize(tok, text), 512, a.windows)
    rows = []
    base = row("fp32", model, wins, tok, a.decode_tokens, load_seconds=load_s)
    rows.append(base)
    if not a.no_transformers:
        from transformers import AutoModelForCausalLM

        path = default_model_path()
        start = time.perf_counter()
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        ref_load = time.perf_counter() - start
        r = transformers_perplexity(ref, wins)
        rows.append({"method": "transformers fp32 (reference)", "load_seconds": ref_load, "ppl": r.ppl,
                     "ppl_change_pct": 100 * (r.ppl / base["ppl"] - 1), "eval_tokens_per_s": r.tokens_per_s,
                     "decode_tokens_per_s": transformers_decode_tokens_per_s(ref, tok, a.decode_tokens)})
        print(json.dumps(rows[-1]), flush=True)
        del ref
    bf16_wins = wins[: a.bf16_windows] if a.bf16_windows else wins
    bf16_base = base["ppl"] if bf16_wins is wins else perplexity_of_windows(model, bf16_wins).ppl
    rows.append(row("bf16", copy.deepcopy(model).to(torch.bfloat16), bf16_wins, tok, a.decode_tokens, bf16_base,
                    windows=bf16_wins.shape[0]))
    for name in filter(None, a.configs.split(",")):
        cfg = modelpress.RTNConfig(**CONFIGS[name])
        q = copy.deepcopy(model)
        start = time.perf_counter()
        modelpress.quantize(q, cfg)
        rows.append(row(f"rtn {name}", q, wins, tok, a.decode_tokens, base["ppl"],
                        config=cfg.to_dict(), quantize_seconds=time.perf_counter() - start))
        del q
    out = write_result(a.out, "rtn", rows, text=text_path or "pydoc_data topics (eval split)", windows=wins.shape[0], ctx=512)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
