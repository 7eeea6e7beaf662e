"""Pruning (issue 26), one run on the default model, calibrated on calib.txt, evaluated on eval.txt:
ppl at 50 % unstructured and 2:4 for magnitude, Wanda and SparseGPT (and SparseGPT 2:4 with int4
codes in the same sweep); structured MLP pruning (25 % of the intermediate channels) before and after
a short distillation recovery, with the decode speed of its Q4_K_M GGUF in llama.cpp and in
modelpress' engine beside the unpruned model's.

    LLAMA_CPP_LIB_PATH=<llama.cpp build> .venv/bin/python benchmarks/prune.py

The Wanda and SparseGPT reference repositories are not on PyPI (nothing else can be fetched here), so
no side-by-side with their code. Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import emitter  # noqa: E402
from benchmarks.gguf_decode import PROMPT, llama_greedy  # noqa: E402
from modelpress import MagnitudeConfig, SparseGPTConfig, StructuredConfig, WandaConfig  # noqa: E402
from modelpress.data import calibration_windows, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.eval.size import model_size  # noqa: E402
from modelpress.eval.speed import decode_ids_per_s  # noqa: E402
from modelpress.generate import encode_prompt  # noqa: E402
from modelpress.methods.prune import weight_sparsity  # noqa: E402
from modelpress.record import record  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--recover", type=int, default=40, help="distillation steps after structured pruning")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/prune.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    base, tok = modelpress.load()
    wins = windows(tokenize(tok, read_text(DATA / "eval.txt")), 512, a.eval_windows)
    calib = calibration_windows(tok, DATA / "calib.txt", 512, a.calib_windows)
    work = Path(tempfile.mkdtemp(prefix="mp-prune-"))
    _, emit = emitter(a.out, "prune", eval_windows=a.eval_windows, calib_windows=a.calib_windows,
                      train_text="calib.txt", eval_text="eval.txt")

    def ppl(m: torch.nn.Module) -> float:
        return perplexity_of_windows(m, wins, progress=False).ppl

    emit({"method": "fp32", "ppl": ppl(base), "size_bytes": model_size(base).size_bytes})
    for pattern in (None, "2:4"):
        for cfg in (MagnitudeConfig(pattern=pattern), WandaConfig(pattern=pattern), SparseGPTConfig(pattern=pattern)):
            t0 = time.perf_counter()
            m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
            emit({"method": cfg.method, "pattern": pattern or "50 % unstructured", "ppl": ppl(m),
                  "seconds": time.perf_counter() - t0, "sparsity": weight_sparsity(m)})
    cfg = SparseGPTConfig(pattern="2:4", bits=4, group_size=64)
    t0 = time.perf_counter()
    m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
    emit({"method": "sparsegpt + int4 g64 (one sweep)", "pattern": "2:4", "ppl": ppl(m),
          "seconds": time.perf_counter() - t0, "sparsity": weight_sparsity(m), "size_bytes": model_size(m).size_bytes})

    prompt = encode_prompt(tok, PROMPT, True)
    variants = {"unpruned": base}
    for steps in (0, a.recover):
        t0 = time.perf_counter()
        m = modelpress.quantize(copy.deepcopy(base), StructuredConfig(mlp=0.25, recover=steps), calib)
        rec = record(m).recovery
        emit({"method": "structured mlp 25 %", "recover_steps": steps, "ppl": ppl(m),
              "intermediate_size": m.config.intermediate_size, "size_bytes": model_size(m).size_bytes,
              "seconds": time.perf_counter() - t0, **({"kl_first": rec[0]["kl"], "kl_last": rec[-1]["kl"]} if rec else {})})
        variants[f"structured mlp 25 % (recover {steps})"] = m
    for name in ("unpruned", f"structured mlp 25 % (recover {a.recover})"):
        path = work / "q4km.gguf"
        modelpress.export_gguf(variants[name], tok, path, "Q4_K_M", progress=False)
        gguf_model, _ = modelpress.load(path, keep_blocks=True)
        ours, theirs = [], []
        for _ in range(a.repeats):
            ours.append(decode_ids_per_s(gguf_model, prompt, a.decode_tokens))
            theirs.append(llama_greedy(path, prompt[0].tolist(), a.decode_tokens)[1])
        emit({"method": name, "gguf": "Q4_K_M", "gguf_bytes": path.stat().st_size,
              "gguf ppl (modelpress, dequantized)": ppl(modelpress.load(path)[0]),
              "modelpress engine tokens_per_s": float(np.median(ours)), "llama.cpp tokens_per_s": float(np.median(theirs)),
              "modelpress runs": ours, "llama.cpp runs": theirs})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
