"""Calibrated methods in and out of domain (issue 28): calibrate on one text, evaluate on another.

    LLAMA_CPP_LIB_PATH=... .venv/bin/python benchmarks/ood.py --peer <llm-compressor venv>/bin/python

Texts: "jargon" (../shared/data: calib.txt to calibrate, eval.txt to evaluate: the Jargon File) and
"stdlib" (modelpress' default text: data.default_text("calib"), pydoc topics interleaved with module
docstrings, to calibrate; default_text("eval"), the other pydoc topics, to evaluate). Every method
(w4 g64 asymmetric) is calibrated on each calibration text and evaluated on both evaluation texts: the
evaluation text of the calibration's kind is in domain, the other out of domain. Rows: RTN and
Q4_K_M without calibration (once), GPTQ with modelpress' defaults (activation order, static groups),
GPTQ with the columns in stored order (modelpress' defaults before issue 28), GPTQ + MSE clipping,
AWQ, Q4_K_M with an imatrix, and llm-compressor's GPTQ with its defaults on the same windows (--peer;
its checkpoint evaluated by modelpress). Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import emitter, scratch  # noqa: E402
from modelpress.data import default_text, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.compare import build, recipe  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
G = 64


def gptq_variant(name: str) -> tuple[modelpress.GPTQConfig, int | None]:
    """'gptq' and its variants, dash-separated after it: 'columns' (stored order, the defaults before issue
    28), 'mse', 'damp<x>' (the Hessian's damping, a fraction of its mean diagonal), 'n<N>' (only the first N
    calibration windows): gptq-damp0.1, gptq-n16, gptq-columns-mse. Returns the config and N (None: all)."""
    opts: dict = {"bits": 4, "group_size": G}
    n = None
    for part in name.split("-")[1:]:
        if part == "columns":
            opts.update(act_order=False, static_groups=False)
        elif part == "mse":
            opts["mse"] = True
        elif part.startswith("damp"):
            opts["damp"] = float(part[4:])
        elif part.startswith("n") and part[1:].isdigit():
            n = int(part[1:])
        else:
            raise SystemExit(f"ood.py: unknown GPTQ variant {part!r} in {name!r} (columns, mse, damp<x>, n<N>)")
    return modelpress.GPTQConfig(**opts), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-windows", type=int, default=64, help="windows of 512 tokens (gptq-n<N> takes the first N)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--methods", default="gptq,gptq-columns,gptq-mse,awq,q4_k_m-imat",
                   help="comma-separated: gptq[-columns][-mse][-damp<x>][-n<N>], awq, q4_k_m-imat, or any compare "
                        "recipe (auto-q4_k_m, ...)")
    p.add_argument("--no-baselines", action="store_true", help="skip the RTN and Q4_K_M rows (fp32 is always run)")
    p.add_argument("--calib-texts", default="jargon,stdlib", help="the calibration texts to run (jargon, stdlib)")
    p.add_argument("--peer", help="python of llm-compressor's venv (../shared/PEERS.md); omitted: no peer rows")
    p.add_argument("--out", default="benchmarks/results/ood.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    base, tok = modelpress.load()
    calib = {"jargon": windows(tokenize(tok, read_text(DATA / "calib.txt")), 512, a.calib_windows),
             "stdlib": windows(tokenize(tok, default_text("calib")), 512, a.calib_windows)}
    evals = {"jargon": windows(tokenize(tok, read_text(DATA / "eval.txt")), 512, a.eval_windows),
             "stdlib": windows(tokenize(tok, default_text("eval")), 512, a.eval_windows)}
    work = scratch("mp-ood-")
    _, emit = emitter(a.out, "ood", calib_windows=a.calib_windows, eval_windows=a.eval_windows, bits=4, group_size=G,
                      symmetric=False, texts={"jargon": "../shared/data calib.txt / eval.txt (the Jargon File)",
                                              "stdlib": "modelpress' default text: calib = pydoc topics + module "
                                                        "docstrings, eval = the other pydoc topics"})
    ref = {}

    def row(method: str, calib_text: str | None, model: torch.nn.Module, seconds: float, **extra) -> None:  # noqa: ANN003
        ppl = {k: perplexity_of_windows(model, v, progress=False).ppl for k, v in evals.items()}
        out = {"method": method, "calibrated_on": calib_text, "quantize_seconds": seconds, **extra,
               **{f"ppl {k}": v for k, v in ppl.items()}}
        if ref:
            out.update({f"ppl change % {k}": 100 * (v / ref[k] - 1) for k, v in ppl.items()})
            if calib_text:
                out["ppl change % in domain"] = out[f"ppl change % {calib_text}"]
                out["ppl change % out of domain"] = out[f"ppl change % {'stdlib' if calib_text == 'jargon' else 'jargon'}"]
        else:
            ref.update(ppl)
        emit(out)

    row("fp32", None, base, 0.0)
    for name in () if a.no_baselines else ("rtn-w4", "q4_k_m"):
        m, facts = build(recipe(name), copy.deepcopy(base), tok, None, work)
        row(name, None, m, facts["quantize_seconds"])
    if a.peer:
        fp32_dir = modelpress.save(base, tok, work / "fp32")
    for text, wins in calib.items():
        if text not in a.calib_texts.split(","):
            continue
        for name in a.methods.split(","):
            t0 = time.perf_counter()
            if name.startswith("gptq"):
                cfg, n = gptq_variant(name)
                m = modelpress.quantize(copy.deepcopy(base), cfg, list(wins[:n]))
                row(name, text, m, time.perf_counter() - t0, config=cfg.to_dict(), windows=len(wins[:n]))
            else:
                m, facts = build(recipe({"awq": "awq-w4"}.get(name, name)), copy.deepcopy(base), tok, list(wins), work)
                row(name, text, m, facts["quantize_seconds"])
        if a.peer:
            from benchmarks.gptq_awq import peer

            torch.save(wins.clone(), work / "calib.pt")
            torch.save(evals["jargon"].clone(), work / "eval.pt")
            r, theirs = peer(a.peer, "gptq", 4, G, fp32_dir, work, evals["jargon"], ref["jargon"])
            if theirs is None:
                emit({**r, "calibrated_on": text})
                continue
            row("llm-compressor gptq (its defaults)", text, theirs, r["quantize_seconds"], tool=r["tool"],
                ppl_reported_by_tool_jargon=r["ppl"])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
