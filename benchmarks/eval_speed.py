"""Perplexity speed (issue 24): `modelpress eval`'s perplexity on fp32, Q4_K_M and AWQ w4 g64 beside
llama.cpp's llama-perplexity on the GGUF of the same weights (F32, Q4_K_M; Q4_0 for AWQ) and
transformers' per-window forward (fp32: transformers runs a GGUF dequantized, and AWQ on a CPU not
at all), in one run, the tools alternating --repeats times (best of each reported, all runs kept).

    .venv/bin/python benchmarks/eval_speed.py --llama-perplexity <llama.cpp build>/bin/llama-perplexity

Both score --windows windows of --ctx tokens of eval.txt (llama-perplexity: --chunks, -b 4 * ctx so
that it runs 4 windows a batch, as its default does; it scores the second half of each window, we
every position: the work per token is the same forward). tokens/s = windows x ctx / the scoring's
wall time (llama-perplexity: from its "calculating perplexity" line to its final estimate; model
load excluded on both sides). Ours in fp32 (the model's own numbers) and with --compute-dtype
bfloat16 (autocast, AMX where the CPU has it). Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from modelpress import AWQConfig  # noqa: E402
from modelpress.data import calibration_windows, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows, transformers_perplexity  # noqa: E402
from modelpress.formats.gguf_writer import write_gguf  # noqa: E402
from modelpress.record import record  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
_STAMP = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+)")


def _seconds(line: str) -> float:
    """llama.cpp's log time stamp, minutes.seconds.milliseconds.microseconds since start."""
    mnt, s, ms, us = (int(g) for g in _STAMP.match(line.strip()).groups())
    return mnt * 60 + s + ms / 1e3 + us / 1e6


def llama_perplexity(binary: str, gguf: Path, text: Path, ctx: int, n: int) -> dict:
    """tokens/s and the estimate of llama-perplexity on `gguf` (2 threads), from its own time stamps."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    out = subprocess.run([binary, "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(n), "-t", "2",
                          "-b", str(4 * ctx)], capture_output=True, text=True, env=env, check=True)
    lines = (out.stdout + out.stderr).splitlines()
    start = next(ln for ln in lines if "calculating perplexity" in ln)
    end = next(ln for ln in lines if "Final estimate" in ln)
    ppl = float(re.search(r"PPL = ([0-9.]+)", end).group(1))
    return {"tokens_per_s": n * ctx / (_seconds(end) - _seconds(start)), "ppl": ppl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-perplexity", help="llama.cpp's llama-perplexity binary (the peer; skipped if absent)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/eval_speed.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    base, tok = modelpress.load()
    text = DATA / "eval.txt"
    wins = windows(tokenize(tok, read_text(text)), a.ctx, a.windows)
    work = scratch("mp-eval-speed-")
    ggufs = {}
    for mix in ("F32", "Q4_K_M", "Q4_0"):
        ggufs[mix] = work / f"{mix}.gguf"
        write_gguf(ggufs[mix], base, mix, record(base).source, progress=False)
    calib = calibration_windows(tok, DATA / "calib.txt", a.ctx, a.calib_windows)
    models = {  # name: (how we load it, the GGUF llama-perplexity runs beside it)
        "fp32": (lambda: base, "F32"),
        "Q4_K_M (eval's default: the file's weights dequantized)": (lambda: modelpress.load(ggufs["Q4_K_M"])[0],
                                                                     "Q4_K_M"),
        "Q4_K_M (--gguf-blocks)": (lambda: modelpress.load(ggufs["Q4_K_M"], keep_blocks=True)[0], "Q4_K_M"),
        "awq w4 g64": (lambda: modelpress.quantize(modelpress.load()[0], AWQConfig(bits=4, group_size=64), calib),
                       "Q4_0"),
    }
    rows = []
    for name, (make, mix) in models.items():
        model = make()
        runs: dict[str, list] = {"float32": [], "bfloat16": [], "llama-perplexity": []}
        for _ in range(a.repeats):
            for dtype in ("float32", "bfloat16"):
                r = perplexity_of_windows(model, wins, progress=False, compute_dtype=dtype)
                runs[dtype].append({"tokens_per_s": r.tokens_per_s, "ppl": r.ppl})
            if a.llama_perplexity:
                runs["llama-perplexity"].append(llama_perplexity(a.llama_perplexity, ggufs[mix], text, a.ctx,
                                                                 a.windows))
        row = {"model": name, "peer_gguf": mix}
        for tool, rs in runs.items():
            if rs:
                best = max(rs, key=lambda r: r["tokens_per_s"])
                row[f"{tool} tokens_per_s"], row[f"{tool} ppl"], row[f"{tool} runs"] = (
                    best["tokens_per_s"], best["ppl"], [r["tokens_per_s"] for r in rs])
        if runs["llama-perplexity"]:
            for dtype in ("float32", "bfloat16"):
                row[f"ratio {dtype} vs llama-perplexity"] = (row[f"{dtype} tokens_per_s"]
                                                             / row["llama-perplexity tokens_per_s"])
        rows.append(row)
        print(row, flush=True)
        del model
    t0 = time.perf_counter()
    ref = transformers_perplexity(base, wins, progress=False)
    tf = {"model": "fp32", "tool": "transformers (model(input_ids=w, labels=w) per window)",
          "tokens_per_s": ref.tokens_per_s, "ppl": ref.ppl, "seconds": time.perf_counter() - t0}
    for row in rows:
        for dtype in ("float32", "bfloat16"):
            row[f"ratio {dtype} vs transformers fp32"] = row[f"{dtype} tokens_per_s"] / tf["tokens_per_s"]
    rows.append(tf)
    print(tf, flush=True)
    write_result(Path(a.out), "eval_speed", rows, windows=a.windows, ctx=a.ctx, repeats=a.repeats, text=str(text),
                 note="ours: eval/perplexity.py (8 windows a forward, the head per 1024 positions); llama-perplexity "
                      "scores the second half of each window after a BOS, so its ppl is not ours: the speeds compare")


if __name__ == "__main__":
    main()
