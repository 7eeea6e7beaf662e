"""GGUF export of the default model beside llama.cpp's own quantizer, in one run.

    .venv/bin/python benchmarks/gguf_export.py --out benchmarks/results/gguf.json [--mixes Q4_0,Q8_0,...]

The fp32 weights (the Q4_1 default dequantized) go out once as an F32 GGUF. For each mix,
modelpress exports the model directly (`write_gguf`) and llama.cpp (llama-cpp-python's
`llama_model_quantize`, 2 threads) quantizes that F32 file; each row counts the tensors whose type
and bytes are identical, both quantize times, the file size, and the ppl of modelpress' file on
every 512-token window of ../shared/data/eval.txt (loaded back by modelpress). Nothing here asserts
a timing.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from modelpress.data import read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.formats.gguf_reader import read_gguf  # noqa: E402
from modelpress.formats.gguf_writer import write_gguf  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MIXES = "Q4_0,Q8_0,Q4_K_M,Q5_K_M,Q6_K,Q3_K_M,Q2_K"


def llama_quantize(src: Path, dst: Path, mix: str, threads: int = 2) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({mix}) returned {rc}")
    return time.perf_counter() - start


def compare(ours: Path, theirs: Path) -> dict:
    _, a = read_gguf(ours)
    _, b = read_gguf(theirs)
    tb = {t.name: t for t in b}
    same_type = [t for t in a if t.name in tb and tb[t.name].ggml_type == t.ggml_type]
    identical = [t for t in same_type if np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data))]
    return {"tensors": len(a), "llama_cpp_tensors": len(b), "same_type": len(same_type),
            "identical": len(identical), "differing": sorted({t.name for t in a} - {t.name for t in identical})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixes", default=MIXES)
    p.add_argument("--eval-windows", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results/gguf.json")
    a = p.parse_args()

    model, tok = modelpress.load()
    source = Path(model.modelpress_source)
    ev = windows(tokenize(tok, read_text(SHARED / "eval.txt")), 512, a.eval_windows)
    work = Path(tempfile.mkdtemp(prefix="mp-gguf-"))
    f32 = work / "f32.gguf"
    write_gguf(f32, model, "F32", source)
    rows = [{"mix": "F32 (reference)", "ppl": perplexity_of_windows(model, ev).ppl, "size_bytes": f32.stat().st_size}]
    print(rows[0], flush=True)
    for mix in a.mixes.split(","):
        ours, theirs = work / f"mp-{mix}.gguf", work / f"llama-{mix}.gguf"
        start = time.perf_counter()
        write_gguf(ours, model, mix, source, progress=False)
        ours_s = time.perf_counter() - start
        theirs_s = llama_quantize(f32, theirs, mix)
        loaded, _ = modelpress.load(ours)
        row = {"mix": mix, **compare(ours, theirs), "modelpress_seconds": ours_s, "llama_cpp_seconds": theirs_s,
               "size_bytes": ours.stat().st_size, "llama_cpp_size_bytes": theirs.stat().st_size,
               "ppl": perplexity_of_windows(loaded, ev).ppl}
        row["ppl_change_pct"] = 100 * (row["ppl"] / rows[0]["ppl"] - 1)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "differing"}, flush=True)
        write_result(a.out, "gguf export", rows, evaluation=f"../shared/data/eval.txt, {ev.shape[0]} windows of 512",
                     reference="llama-cpp-python 0.3.36 llama_model_quantize (2 threads) on modelpress' F32 export")
        ours.unlink()
        theirs.unlink()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
