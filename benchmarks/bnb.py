"""bitsandbytes' formats, modelpress beside bitsandbytes itself, on the default model, in one run.

    .venv/bin/python benchmarks/bnb.py --windows 100 --decode-tokens 0 --out benchmarks/results/bnb.json
    .venv/bin/python benchmarks/bnb.py --windows 0 --out benchmarks/results/bnb-decode.json  # quiet machine

For NF4, NF4 + double quant, FP4 and LLM.int8: modelpress quantizes the fp32 default model and
transformers + bitsandbytes quantizes the same fp32 weights (saved as a transformers folder);
each row gives ppl on the same windows, size and bits per weight, decode tokens/s (the same
greedy loop, modelpress.eval.speed, for both), and how many quantized tensors are bit-identical.
Then a modelpress NF4 checkpoint is loaded by transformers + bitsandbytes and its logits are
compared with modelpress' own. Nothing here asserts a timing.
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
from benchmarks.common import scratch, write_result  # noqa: E402
from modelpress.data import load_text, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.eval.size import model_size  # noqa: E402
from modelpress.eval.speed import decode_tokens_per_s  # noqa: E402

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval.txt"
METHODS = {
    "nf4": (modelpress.NF4Config(), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "nf4-dq": (modelpress.NF4Config(double_quant=True),
               dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "fp4": (modelpress.FP4Config(), dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "int8": (modelpress.LLMInt8Config(), dict(load_in_8bit=True)),
}


def load_bnb(folder: Path, kwargs: dict) -> tuple[torch.nn.Module, float]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**kwargs),
                                                 device_map="cpu", dtype=torch.float32).eval()
    return model, time.perf_counter() - start


def identical_tensors(ours: torch.nn.Module, theirs: torch.nn.Module) -> tuple[int, int]:
    """(bit-identical, compared) over the quantized layers' tensors (bitsandbytes' keys)."""
    mine, other = ours.state_dict(), theirs.state_dict()
    keys = [k for k in mine if k in other and ".layers." in k and not k.endswith("norm.weight")]
    return sum(torch.equal(mine[k], other[k].to(mine[k].device)) for k in keys), len(keys)


def measure(model, wins, tok, decode_tokens) -> dict:
    """ppl on `wins` (none if empty) and decode tokens/s (none if decode_tokens is 0)."""
    out = {}
    if wins.shape[0]:
        r = perplexity_of_windows(model, wins)
        out.update(ppl=r.ppl, eval_tokens_per_s=r.tokens_per_s)
    if decode_tokens:
        out["decode_tokens_per_s"] = decode_tokens_per_s(model, tok, decode_tokens)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="evaluation text (default: ../shared/data/eval.txt, else pydoc topics)")
    p.add_argument("--windows", type=int, default=20, help="windows of 512 tokens (default 20; 0: no ppl)")
    p.add_argument("--decode-tokens", type=int, default=64, help="0: no decode speed (measure it on a quiet "
                   "machine in a separate run: ppl needs no quiet, speed does)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--out", default="benchmarks/results/bnb.json")
    a = p.parse_args()
    import bitsandbytes

    text_path = a.text or (str(SHARED_EVAL) if SHARED_EVAL.is_file() else None)
    text = read_text(text_path) if text_path else load_text(None, "eval")
    model, tok = modelpress.load()
    ids = tokenize(tok, text)
    wins = windows(ids, 512, a.windows) if a.windows else torch.empty(0, 512, dtype=torch.long)
    work = scratch("mp-bnb-")
    fp32_dir = modelpress.save(model, tok, work / "fp32")  # a transformers folder bitsandbytes quantizes
    base = {"method": "fp32", "tool": "modelpress", **measure(model, wins, tok, a.decode_tokens),
            "size_bytes": model_size(model).size_bytes}
    print(json.dumps(base), flush=True)
    rows = [base]
    for name in filter(None, a.methods.split(",")):
        config, bnb_kwargs = METHODS[name]
        q = copy.deepcopy(model)
        start = time.perf_counter()
        modelpress.quantize(q, config)
        quant_s = time.perf_counter() - start
        size = model_size(q)
        ours = {"method": name, "tool": "modelpress", "config": config.to_dict(), "quantize_seconds": quant_s,
                "size_bytes": size.size_bytes, "bits_per_weight": size.bits_per_weight,
                "linear_bits_per_weight": size.linear_bits_per_weight, **measure(q, wins, tok, a.decode_tokens)}
        print(json.dumps(ours), flush=True)
        theirs_model, load_s = load_bnb(fp32_dir, bnb_kwargs)
        same, compared = identical_tensors(q, theirs_model)
        theirs = {"method": name, "tool": f"bitsandbytes {bitsandbytes.__version__} (transformers)",
                  "quantize_seconds": load_s, "memory_footprint_bytes": theirs_model.get_memory_footprint(),
                  **measure(theirs_model, wins, tok, a.decode_tokens),
                  "tensors_bit_identical": same, "tensors_compared": compared}
        if "ppl" in base:
            for r in (ours, theirs):
                r["ppl_change_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
            ours["ppl_equal_to_bitsandbytes"] = ours["ppl"] == theirs["ppl"]
        if a.decode_tokens:
            ours["decode_speedup"] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        print(json.dumps(theirs), flush=True)
        rows += [ours, theirs]
        if name == "nf4":  # modelpress' checkpoint, loaded by transformers + bitsandbytes
            from transformers import AutoModelForCausalLM

            ck = modelpress.save(q, tok, work / "nf4")
            loaded = AutoModelForCausalLM.from_pretrained(ck, device_map="cpu", dtype=torch.float32).eval()
            x = ids[None, :128]
            with torch.no_grad():
                prefill = (q(x).logits - loaded(x).logits).abs().max().item()
                step = (q(x[:, :1]).logits - loaded(x[:, :1]).logits).abs().max().item()
            rows.append({"method": "nf4 checkpoint -> transformers + bitsandbytes",
                         "max_abs_logit_diff_prefill_128": prefill, "max_abs_logit_diff_one_token": step})
            print(json.dumps(rows[-1]), flush=True)
            del loaded
        del q, theirs_model
    out = write_result(a.out, "bitsandbytes formats", rows, text=text_path or "pydoc_data topics (eval split)", windows=wins.shape[0], ctx=512,
                       bitsandbytes=bitsandbytes.__version__)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
