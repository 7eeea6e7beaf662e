"""GGUF export of the default model beside llama.cpp's own quantizer, in one run.

    .venv/bin/python benchmarks/gguf_export.py --out benchmarks/results/gguf.json [--mixes Q4_0,Q8_0,...]

The fp32 weights (the Q4_1 default dequantized) go out once as an F32 GGUF. For each mix,
modelpress exports the model directly (`write_gguf`) and llama.cpp (llama-cpp-python's
`llama_model_quantize`, 2 threads) quantizes that F32 file; each row counts the tensors whose type
and bytes are identical, both quantize times, the file size, and the ppl of modelpress' file on
every 512-token window of ../shared/data/eval.txt (loaded back by modelpress).

With --imatrix (the default), each mix is done again with an importance matrix: modelpress'
(computed on ../shared/data/calib.txt, 512-token windows), handed to both quantizers; llama.cpp's
own imatrix (collected from llama.cpp's forward passes over the same windows, as llama-imatrix
does; computed only for --best-of) gives the row "llama.cpp imatrix" of --best-of (Q4_K_M); then
modelpress' calibrated exports of that mix: AWQ -> mix and GPTQ -> mix, each with an imatrix computed after the method.
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from modelpress.data import read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.formats.gguf_reader import read_gguf  # noqa: E402
from modelpress.formats.gguf_writer import write_gguf  # noqa: E402
from modelpress.record import record

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MIXES = "Q4_0,Q8_0,Q4_K_M,Q5_K_M,Q6_K,Q3_K_M,Q2_K"


def llama_quantize(src: Path, dst: Path, mix: str, threads: int = 2, imatrix: dict | None = None) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = threads
    if imatrix:  # llama_model_imatrix_data[], ended by a null entry (tools/quantize/quantize.cpp)
        keep = {k: np.ascontiguousarray(v.numpy(), dtype=np.float32) for k, v in imatrix.items()}
        arr = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for i, (k, v) in enumerate(keep.items()):
            arr[i].name, arr[i].size = k.encode(), v.size
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = arr
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
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--no-imatrix", dest="imatrix", action="store_false", help="only the rows without an imatrix")
    p.add_argument("--best-of", default="Q4_K_M", help="the mix of the llama.cpp-imatrix, AWQ and GPTQ rows "
                   "('' for none)")
    p.add_argument("--out", default="benchmarks/results/gguf.json")
    a = p.parse_args()

    model, tok = modelpress.load()
    source = Path(record(model).source)
    ev = windows(tokenize(tok, read_text(SHARED / "eval.txt")), 512, a.eval_windows)
    work = scratch("mp-gguf-")
    f32 = work / "f32.gguf"
    write_gguf(f32, model, "F32", source)
    rows = [{"mix": "F32 (reference)", "ppl": perplexity_of_windows(model, ev).ppl, "size_bytes": f32.stat().st_size}]
    print(rows[0], flush=True)
    ours_im = theirs_im = None
    if a.imatrix:
        from modelpress.model.imatrix import compute_imatrix
        from tests.llamacpp_ref import imatrix_ref

        calib = windows(tokenize(tok, read_text(SHARED / "calib.txt")), 512, a.calib_windows)
        start = time.perf_counter()
        ours_im = compute_imatrix(model, list(calib), dataset="calib.txt")
        ours_s = time.perf_counter() - start
        ours_imp = ours_im.importance()
        rows.append({"mix": "imatrix", "windows": int(calib.shape[0]), "tensors": len(ours_imp),
                     "modelpress_seconds": ours_s})
        if a.best_of:  # llama.cpp's own imatrix (~17 min here) is needed only for the --best-of rows
            start = time.perf_counter()
            ref = imatrix_ref(f32, calib)
            theirs_im = {k: torch.from_numpy((s / np.float32(c)).astype(np.float32)) for k, (s, c) in ref.items()}
            rel = max(float((theirs_im[k] - ours_imp[k]).abs().max() / theirs_im[k].abs().max()) for k in theirs_im)
            rows[-1].update(llama_cpp_tensors=len(theirs_im), max_rel_diff_vs_llama_cpp=rel,
                            llama_cpp_seconds=time.perf_counter() - start)
        print(rows[-1], flush=True)

    def row(label: str, mix: str, m, imatrix: dict | None, vs_llama: bool = True, extra: dict | None = None) -> None:
        ours, theirs = work / f"mp-{mix}.gguf", work / f"llama-{mix}.gguf"
        start = time.perf_counter()
        write_gguf(ours, m, mix, source, imatrix=imatrix, progress=False)
        r = {"mix": mix, "variant": label, **(extra or {})}
        r["modelpress_seconds"] = time.perf_counter() - start
        if vs_llama:
            r["llama_cpp_seconds"] = llama_quantize(f32, theirs, mix, imatrix=imatrix)
            r.update(compare(ours, theirs))
            r["llama_cpp_size_bytes"] = theirs.stat().st_size
        loaded, _ = modelpress.load(ours)
        r.update(size_bytes=ours.stat().st_size, ppl=perplexity_of_windows(loaded, ev).ppl)
        r["ppl_change_pct"] = 100 * (r["ppl"] / rows[0]["ppl"] - 1)
        rows.append(r)
        print({k: v for k, v in r.items() if k != "differing"}, flush=True)
        write_result(a.out, "gguf export", rows, evaluation=f"../shared/data/eval.txt, {ev.shape[0]} windows of 512",
                     reference="llama-cpp-python 0.3.36 llama_model_quantize (2 threads) on modelpress' F32 export")
        for f in (ours, theirs):
            if f.exists():
                f.unlink()
        del loaded

    for mix in a.mixes.split(","):
        row("no imatrix", mix, model, None)
        if ours_im is not None:
            row("modelpress imatrix", mix, model, ours_im.importance())
    if ours_im is not None and a.best_of:
        mix = a.best_of
        theirs = work / f"llama-im-{mix}.gguf"
        sec = llama_quantize(f32, theirs, mix, imatrix=theirs_im)
        loaded, _ = modelpress.load(theirs)
        r = {"mix": mix, "variant": "llama.cpp quantize with llama.cpp's imatrix", "llama_cpp_seconds": sec,
             "size_bytes": theirs.stat().st_size, "ppl": perplexity_of_windows(loaded, ev).ppl}
        r["ppl_change_pct"] = 100 * (r["ppl"] / rows[0]["ppl"] - 1)
        rows.append(r)
        print(r, flush=True)
        for method, config in (("awq", modelpress.AWQConfig(bits=4, group_size=32, scales_only=True)),
                               ("gptq", modelpress.GPTQConfig(bits=4, group_size=32, act_order=True,
                                                              static_groups=True))):
            m = copy.deepcopy(model)
            start = time.perf_counter()
            modelpress.quantize(m, config, list(calib))
            im = compute_imatrix(m, list(calib), dataset="calib.txt")
            extra = {"method_seconds": time.perf_counter() - start, "method": config.to_dict()}
            row(f"{method} + modelpress imatrix", mix, m, im.importance(), vs_llama=False, extra=extra)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
