"""Automatic mixed precision on the default model: does the Fisher proxy rank tensors as measured
KL does, and does `auto` beat llama.cpp's mixes at their own size?

    .venv/bin/python benchmarks/auto_mix.py --out benchmarks/results/auto_mix.json

1. Ranking: every linear layer of blocks --blocks (default 0, 10, 20, 29) rounded alone to Q4_0
   (a type every row length takes); its measured mean KL against fp32 on --rank-windows windows of
   eval.txt beside the Fisher prediction (methods/auto.fisher_diagonal on --fisher-windows
   windows of calib.txt); Spearman's rank correlation and the ratio of the two.
2. At the size of Q4_K_M and of Q3_K_M: `modelpress compare` rows for the mix (llama.cpp's rules),
   auto at that mix's size, and auto without Q4_1 (the default model's weights come from a Q4_1
   file, so Q4_1 re-rounds them losslessly), on --eval-windows windows of eval.txt.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from modelpress.data import read_text, tokenize, windows  # noqa: E402
from modelpress.eval.divergence import divergence, reference  # noqa: E402
from modelpress.methods.auto import DEFAULT_FORMATS, fisher_diagonal, rounded  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def ranking(model, tok, blocks: list[int], fisher_windows: int, rank_windows: int) -> dict:
    calib = list(windows(tokenize(tok, read_text(SHARED / "calib.txt")), 512, fisher_windows))
    ev = windows(tokenize(tok, read_text(SHARED / "eval.txt")), 512, rank_windows)
    names = [n for n, p in model.named_parameters()
             if p.dim() == 2 and any(n.startswith(f"model.layers.{b}.") for b in blocks)]
    start = time.perf_counter()
    fisher = fisher_diagonal(model, names, calib)
    fisher_s = time.perf_counter() - start
    ref = reference(model, ev)
    rows = []
    params = dict(model.named_parameters())
    for n in names:
        w = params[n].detach().clone()
        q = rounded(w, "Q4_0")
        predicted = 0.5 * (fisher[n] * (w - q).pow(2)).sum().item()
        with torch.no_grad():
            params[n].copy_(q)
        measured = divergence(model, ev, ref, progress=False).kl_mean
        with torch.no_grad():
            params[n].copy_(w)
        rows.append({"tensor": n, "predicted_kl": predicted, "measured_kl": measured})
        print(rows[-1], flush=True)
    p, m = [r["predicted_kl"] for r in rows], [r["measured_kl"] for r in rows]
    return {"type": "Q4_0", "tensors": len(rows), "fisher_windows": fisher_windows, "fisher_seconds": fisher_s,
            "eval_windows": rank_windows, "spearman": spearman(p, m),
            "predicted_over_measured_median": torch.tensor([a / b for a, b in zip(p, m)]).median().item(),
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,10,20,29")
    p.add_argument("--fisher-windows", type=int, default=8)
    p.add_argument("--rank-windows", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--samples", type=int, default=32, help="calibration windows for auto (its Fisher uses 8)")
    p.add_argument("--mixes", default="Q4_K_M,Q3_K_M")
    p.add_argument("--skip-ranking", action="store_true")
    p.add_argument("--work", default="results/auto_mix", help="compare's folder (rows cached there)")
    p.add_argument("--out", default="benchmarks/results/auto_mix.json")
    a = p.parse_args()
    result = {}
    if not a.skip_ranking:
        model, tok = modelpress.load()
        result["ranking"] = ranking(copy.deepcopy(model), tok, [int(b) for b in a.blocks.split(",")],
                                    a.fisher_windows, a.rank_windows)
        del model
        write_result(a.out, "auto mixed precision", [], **result)
    from modelpress.eval.compare import compare

    # the reference weights are the Q4_1 file's: re-rounding them to Q4_1 is lossless, so auto with
    # every format finds Q4_1; the rows without Q4_1 compare the allocation itself with the mix's rules
    no_q4_1 = "+".join(f.lower() for f in DEFAULT_FORMATS if f != "Q4_1")
    methods = [m for mix in a.mixes.split(",")
               for m in (mix.lower(), f"auto-{mix.lower()}", f"auto-{mix.lower()}@{no_q4_1}")]
    res = compare(None, methods, a.work, str(SHARED / "eval.txt"), str(SHARED / "calib.txt"),
                  eval_windows=a.eval_windows, samples=a.samples)
    write_result(a.out, "auto mixed precision", res["rows"], **result, compare_settings=res["settings"],
                 reference_ppl=res["reference_ppl"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
