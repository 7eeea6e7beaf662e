"""Decode speed and greedy tokens on the same GGUF files: modelpress beside llama.cpp, in one run.

    .venv/bin/python benchmarks/gguf_decode.py --out benchmarks/results/gguf_decode.json

modelpress exports the default model as F32, Q8_0 and Q4_K_M (its Q8_0 / Q4_K_M bytes equal
llama.cpp's own: benchmarks/gguf_export.py) and llama.cpp (llama-cpp-python's
`llama_model_quantize`) makes its own Q4_K_M from the F32 file. On each file, with 2 threads:
llama.cpp's decode tokens/s (llama-cpp-python's `Llama.eval`, one token a step, greedy, after a
prompt) and modelpress' (the file loaded with its quantized layers kept in blocks,
`load(..., keep_blocks=True)`; the F32 file runs as fp32; decode through the serving engine's
fused decode, as `modelpress generate` runs it); both generate 64 greedy tokens from the
same prompt, and the row counts how many of them agree. The speeds alternate between the two,
--repeats times (the machine's speed drifts: the ratio is that of the medians). A last row checks
that llama.cpp generates the same greedy tokens from modelpress' Q4_K_M as from its own. Quantize seconds for Q4_K_M are
measured in the same run (modelpress' export against llama.cpp's quantizer), without and with an
importance matrix (modelpress', from 8 windows of ../shared/data/calib.txt, handed to both).
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
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
from benchmarks.gguf_export import compare, llama_quantize  # noqa: E402
from modelpress.data import read_text, tokenize, windows  # noqa: E402
from modelpress.eval.speed import decode_ids_per_s, greedy_ids  # noqa: E402
from modelpress.formats.gguf_writer import write_gguf  # noqa: E402
from modelpress.generate import encode_prompt  # noqa: E402
from modelpress.model.imatrix import compute_imatrix  # noqa: E402
from modelpress.record import record
from modelpress.serve.runner import ModelRunner, cache_blocks  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPT = "Explain in a few sentences why the sky is blue."


def llama_greedy(path: Path, prompt: list[int], n: int, threads: int = 2) -> tuple[list[int], float]:
    """(n greedy tokens, decode tokens/s) from llama.cpp; the prompt and 4 warm-up steps untimed."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(prompt)
    out, start = [], None
    for step in range(n + 4):
        if step == 4:
            start = time.perf_counter()
        # the last position's logits (without logits_all, Llama.eval keeps no scores)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        out.append(tok)
        llm.eval([tok])
    sec = time.perf_counter() - start
    llm.close()
    return out[:n], n / sec


def agree(a: list[int], b: list[int]) -> int:
    """Tokens equal from the start (greedy paths part for good at the first difference)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/gguf_decode.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    model, tok = modelpress.load()
    source = Path(record(model).source)
    prompt = encode_prompt(tok, PROMPT, True)
    work = scratch("mp-decode-")
    files = {}
    rows = []
    for mix in ("F32", "Q8_0", "Q4_K_M"):
        files[mix] = work / f"mp-{mix}.gguf"
        start = time.perf_counter()
        write_gguf(files[mix], model, mix, source, progress=False)
        ours_s = time.perf_counter() - start
        if mix == "Q4_K_M":
            files["llama.cpp Q4_K_M"] = work / "llama-Q4_K_M.gguf"
            rows.append({"row": "quantize Q4_K_M", "modelpress_seconds": ours_s,
                         "llama_cpp_seconds": llama_quantize(files["F32"], files["llama.cpp Q4_K_M"], "Q4_K_M")})
            print(rows[-1], flush=True)
            calib = windows(tokenize(tok, read_text(SHARED / "calib.txt")), 512, 8)
            im = compute_imatrix(model, list(calib), dataset="calib.txt").importance()
            start = time.perf_counter()
            write_gguf(work / "im.gguf", model, mix, source, imatrix=im, progress=False)
            ours_s = time.perf_counter() - start
            theirs_s = llama_quantize(files["F32"], work / "im-llama.gguf", "Q4_K_M", imatrix=im)
            same = compare(work / "im.gguf", work / "im-llama.gguf")
            rows.append({"row": "quantize Q4_K_M with an imatrix", "modelpress_seconds": ours_s,
                         "llama_cpp_seconds": theirs_s, **{k: v for k, v in same.items() if k != "differing"}})
            print(rows[-1], flush=True)
            for f in ("im.gguf", "im-llama.gguf"):
                (work / f).unlink()
    del model
    for mix in ("F32", "Q8_0", "Q4_K_M"):
        path = files[mix]
        m, _ = modelpress.load(path, keep_blocks=True)
        runner = ModelRunner(m, cache_blocks(prompt.shape[1] + a.tokens, 16), 16)  # the decoder generate runs
        ours = list(greedy_ids(runner, prompt, a.tokens))
        theirs_all, ours_all = [], []
        for _ in range(a.repeats):
            theirs, tps = llama_greedy(path, prompt[0].tolist(), a.tokens)
            theirs_all.append(tps)
            ours_all.append(decode_ids_per_s(m, prompt, a.tokens))
        theirs_tps, ours_tps = float(np.median(theirs_all)), float(np.median(ours_all))
        rows.append({"row": f"decode {mix}", "file_bytes": path.stat().st_size, "llama_cpp_tokens_per_s": theirs_tps,
                     "modelpress_tokens_per_s": ours_tps, "ratio": ours_tps / theirs_tps,
                     "llama_cpp_runs": theirs_all, "modelpress_runs": ours_all,
                     "greedy_tokens_agreeing": agree(ours, theirs), "greedy_tokens": a.tokens})
        print(rows[-1], flush=True)
        del m
    mine, _ = llama_greedy(files["Q4_K_M"], prompt[0].tolist(), a.tokens)
    own, _ = llama_greedy(files["llama.cpp Q4_K_M"], prompt[0].tolist(), a.tokens)
    same = compare(files["Q4_K_M"], files["llama.cpp Q4_K_M"])
    rows.append({"row": "llama.cpp greedy on modelpress' Q4_K_M vs on its own Q4_K_M",
                 "identical_tensors": f"{same['identical']}/{same['llama_cpp_tensors']}",
                 "greedy_tokens_agreeing": agree(mine, own), "greedy_tokens": a.tokens})
    print(rows[-1], flush=True)
    write_result(a.out, "gguf decode", rows, prompt=PROMPT, threads_both=2,
                 reference="llama-cpp-python 0.3.36 (Llama.eval, 2 threads)")
    for f in files.values():
        f.unlink()
    work.rmdir()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
