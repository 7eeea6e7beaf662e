"""Batch-1 decode of every stored format in the engine beside llama.cpp on the GGUF of the nearest size,
one run (issue 24): the default model as AWQ w4 g64, GPTQ w4 g64 with act order (permuted columns),
RTN w4 g64, NF4 with double quantization, RTN int8 per channel and LLM.int8, each decoded by the
engine's fused path (and, for the "before" column, by its torch path), against llama.cpp decoding
Q4_0 and Q4_1 (4-bit rows) or Q8_0 (8-bit rows) exported from the same fp32 weights. Speeds alternate
between modelpress and llama.cpp, --repeats times; each figure is the median.

    LLAMA_CPP_LIB_PATH=<llama.cpp build> .venv/bin/python benchmarks/formats_speed.py
Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from benchmarks.gguf_decode import PROMPT, llama_greedy  # noqa: E402
from modelpress import AWQConfig, GPTQConfig, LLMInt8Config, NF4Config, RTNConfig  # noqa: E402
from modelpress.data import calibration_windows  # noqa: E402
from modelpress.eval.speed import decode_ids_per_s  # noqa: E402
from modelpress.formats.gguf_writer import write_gguf  # noqa: E402
from modelpress.generate import encode_prompt  # noqa: E402
from modelpress.record import record  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FORMATS = {  # name: (config, calibrated, the GGUF types beside it)
    "awq w4 g64": (AWQConfig(bits=4, group_size=64), True, ("Q4_0", "Q4_1")),
    "gptq w4 g64 act order": (GPTQConfig(bits=4, group_size=64, act_order=True, static_groups=False), True,
                              ("Q4_0", "Q4_1")),
    "rtn w4 g64": (RTNConfig(bits=4, group_size=64), False, ("Q4_0", "Q4_1")),
    "nf4 double quant": (NF4Config(double_quant=True), False, ("Q4_0", "Q4_1")),
    "rtn int8 per channel": (RTNConfig(bits=8, group_size=None, symmetric=True), False, ("Q8_0",)),
    "llm.int8": (LLMInt8Config(), False, ("Q8_0",)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/formats_speed.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    base, tok = modelpress.load()
    prompt = encode_prompt(tok, PROMPT, True)
    calib = calibration_windows(tok, DATA / "calib.txt", 512, a.calib_windows)
    work = scratch("mp-formats-")
    ggufs = {}
    for mix in ("Q4_0", "Q4_1", "Q8_0"):
        ggufs[mix] = work / f"{mix}.gguf"
        write_gguf(ggufs[mix], base, mix, record(base).source, progress=False)
    rows = []
    for name, (config, calibrated, peers) in FORMATS.items():
        t0 = time.perf_counter()
        model = modelpress.quantize(copy.deepcopy(base), config, calib if calibrated else None)
        quantize_s = time.perf_counter() - t0
        ours, torch_path, theirs = [], [], {mix: [] for mix in peers}
        for _ in range(a.repeats):
            ours.append(decode_ids_per_s(model, prompt, a.tokens))
            for mix in peers:
                theirs[mix].append(llama_greedy(ggufs[mix], prompt[0].tolist(), a.tokens)[1])
        torch_path.append(decode_ids_per_s(model, prompt, min(a.tokens, 32), fused=False))
        row = {"format": name, "quantize_s": quantize_s, "modelpress_tokens_per_s": float(np.median(ours)),
               "modelpress_torch_path_tokens_per_s": torch_path[0], "modelpress_runs": ours}
        for mix in peers:
            tps = float(np.median(theirs[mix]))
            row[f"llama.cpp {mix} tokens_per_s"] = tps
            row[f"ratio vs {mix}"] = row["modelpress_tokens_per_s"] / tps
        rows.append(row)
        print(row, flush=True)
        del model
    write_result(Path(a.out), "formats_speed", rows, tokens=a.tokens, repeats=a.repeats, prompt=PROMPT,
                 note="fused decode: 4-bit integers on their packed nibbles and int8 codes a byte each, with x "
                      "rounded to int8 per 32 (AFFINE4_Q8 / AFFINE_Q8), NF4 / FP4 on the packed codes with fp32 x "
                      "(CODE4); llama.cpp files exported by modelpress (byte-exact with llama.cpp's quantizer for "
                      "these types: benchmarks/gguf_export.py)")


if __name__ == "__main__":
    main()
