"""GPTQ and AWQ on the default model beside RTN and llm-compressor, in one run.

    .venv/bin/python benchmarks/gptq_awq.py --out benchmarks/results/gptq_awq.json \
        --peer /work/peers/lc/bin/python          # llm-compressor's own venv (../shared/PEERS.md)

Calibration: ../shared/data/calib.txt, 128 windows of 512 tokens; evaluation: every 512-token
window of ../shared/data/eval.txt. Each row: method, bits, group size, quantize seconds, peak
memory, size, bits per weight, ppl and its change against fp32, and the same out of domain (issue 28):
on --ood-windows windows of modelpress' default evaluation text (pydoc topics, unlike the Jargon File it
was calibrated on; 0: not measured). benchmarks/ood.py runs both directions for every calibrated method. With --peer, llm-compressor
quantizes the same fp32 weights with the same calibration windows (token ids handed over in a
file), reports its own ppl on the same windows, and modelpress loads the compressed-tensors
checkpoint it wrote and measures the ppl again; each peer row comes right after modelpress' row
of the same algorithm and bits (llm-compressor's default GPTQ orders columns by activation with
static groups, as modelpress' GPTQ does by default since issue 28: method gptq, or gptq-act as the
earlier result files name it; gptq-columns is the stored column order), so that their timings share
the machine's state. --peer-only
--keep adds peer rows to an earlier file (llm-compressor's AWQ on 2 cores: ~9 min per smoothing mapping,
three per block, with 127 windows and other jobs beside it; plan hours).
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from modelpress.data import default_text, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.eval.size import model_size  # noqa: E402
from modelpress.model.sequential import peak_rss_bytes  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# llm-compressor's GPTQModifier orders columns by activation with static groups by default
# (actorder "static"): the same algorithm as modelpress' act_order + static_groups, its default too
PEER_OF = {"gptq": "gptq", "gptq-act": "gptq", "awq": "awq"}
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "llmcompressor_run.py"


def configs(name: str, bits: int, group: int):
    return {"rtn": lambda: modelpress.RTNConfig(bits=bits, group_size=group),
            "gptq": lambda: modelpress.GPTQConfig(bits=bits, group_size=group),  # act order + static groups
            "gptq-act": lambda: modelpress.GPTQConfig(bits=bits, group_size=group, act_order=True, static_groups=True),
            "gptq-columns": lambda: modelpress.GPTQConfig(bits=bits, group_size=group, act_order=False,
                                                          static_groups=False),
            "gptq-act-mse": lambda: modelpress.GPTQConfig(bits=bits, group_size=group, act_order=True,
                                                          static_groups=True, mse=True),
            "awq": lambda: modelpress.AWQConfig(bits=bits, group_size=group)}[name]()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="4,3")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--methods", default="rtn,gptq-columns,gptq,awq",
                   help="rtn, gptq (the defaults: activation order, static groups), gptq-columns (stored order), "
                        "gptq-act (= gptq), gptq-act-mse, awq")
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=100)
    p.add_argument("--ood-windows", type=int, default=16, help="windows of the default text, out of domain (0: none)")
    p.add_argument("--peer", help="python of llm-compressor's venv; omitted: no peer rows")
    p.add_argument("--peer-methods", default="gptq,awq")
    p.add_argument("--peer-only", action="store_true", help="only the peer's rows (with --keep: added to earlier ones)")
    p.add_argument("--keep", action="store_true", help="keep the rows of --out that this run does not redo")
    p.add_argument("--out", default="benchmarks/results/gptq_awq.json")
    a = p.parse_args()

    model, tok = modelpress.load()
    calib = windows(tokenize(tok, read_text(SHARED / "calib.txt")), 512, a.calib_windows)
    ev = windows(tokenize(tok, read_text(SHARED / "eval.txt")), 512, a.eval_windows)
    work = scratch("mp-gptq-")
    rows = []
    kept = json.loads(Path(a.out).read_text())["rows"] if a.keep and Path(a.out).exists() else []

    def key(row: dict) -> tuple:
        return row["tool"].split(" ")[0], row["method"], row.get("bits")

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        done = {key(r) for r in rows}  # partial results survive an interruption
        write(a.out, [r for r in kept if key(r) not in done] + rows, calib, ev)

    ood = windows(tokenize(tok, default_text("eval")), 512, a.ood_windows) if a.ood_windows else None
    known = [r for r in kept if key(r) == ("modelpress", "fp32", None) and ("ppl_ood" in r or ood is None)]
    if known:  # the same weights and windows give the same number: 3 to 10 minutes saved
        base, base_ood = known[0]["ppl"], known[0].get("ppl_ood")
    else:
        base = perplexity_of_windows(model, ev).ppl
        base_ood = perplexity_of_windows(model, ood, progress=False).ppl if ood is not None else None
        emit({"method": "fp32", "tool": "modelpress", "ppl": base, "size_bytes": model_size(model).size_bytes,
              **({"ppl_ood": base_ood} if ood is not None else {})})

    def out_of_domain(row: dict, m: torch.nn.Module | None) -> dict:  # the row's model on the other text too
        if ood is not None and m is not None:
            row["ppl_ood"] = perplexity_of_windows(m, ood, progress=False).ppl
            row["ppl_ood_change_pct"] = 100 * (row["ppl_ood"] / base_ood - 1)
        return row

    if a.peer:
        fp32_dir = modelpress.save(model, tok, work / "fp32")
        torch.save(calib.clone(), work / "calib.pt")
        torch.save(ev.clone(), work / "eval.pt")
    for bits in map(int, a.bits.split(",")):
        for name in a.methods.split(","):
            if not a.peer_only:
                emit(out_of_domain(*ours(model, name, bits, a.group_size, calib, ev, base)))
            if a.peer and PEER_OF.get(name) in a.peer_methods.split(","):  # right after: timings side by side
                emit(out_of_domain(*peer(a.peer, PEER_OF[name], bits, a.group_size, fp32_dir, work, ev, base)))
    print(f"wrote {a.out}")


def ours(model, name: str, bits: int, group: int, calib: torch.Tensor, ev: torch.Tensor,
         base: float) -> tuple[dict, torch.nn.Module]:
    cfg = configs(name, bits, group)
    q = copy.deepcopy(model)
    start = time.perf_counter()
    modelpress.quantize(q, cfg, list(calib) if cfg.calibrated else None)
    seconds = time.perf_counter() - start
    size = model_size(q)
    ppl = perplexity_of_windows(q, ev).ppl
    return {"method": name, "tool": "modelpress", "bits": bits, "group_size": group,
            "config": cfg.to_dict(), "quantize_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
            "size_bytes": size.size_bytes, "linear_bits_per_weight": size.linear_bits_per_weight,
            "ppl": ppl, "ppl_change_pct": 100 * (ppl / base - 1)}, q


def peer(python: str, method: str, bits: int | None, group: int, fp32_dir: Path, work: Path, ev: torch.Tensor,
         base: float, extra: tuple[str, ...] = ()) -> tuple[dict, torch.nn.Module | None]:
    """llm-compressor in its own venv (`extra`: more flags of peers/llmcompressor_run.py; the calibration
    and evaluation windows as work/calib.pt, work/eval.pt); then its checkpoint loaded in modelpress,
    ppl again. Returns the row and the loaded model (None where the peer failed: the row says why)."""
    out = work / f"lc-{method}-{bits}-{'-'.join(extra).replace(':', '_')}"
    res = subprocess.run([python, str(PEER_SCRIPT), "--model", str(fp32_dir), "--calib-ids",
                          str(work / "calib.pt"), "--eval-ids", str(work / "eval.pt"), "--method", method,
                          "--bits", str(bits or 0), "--group-size", str(group), "--out", str(out), *extra],
                         capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"method": method, "tool": "llm-compressor", "bits": bits, "error": res.stderr[-2000:]}, None
    row = json.loads(lines[-1])
    loaded, _ = modelpress.load(out)
    row.update(bits=bits, ppl_change_pct=100 * (row["ppl"] / base - 1),
               ppl_loaded_in_modelpress=perplexity_of_windows(loaded, ev).ppl,
               size_bytes=model_size(loaded).size_bytes)
    return row, loaded


def write(path: str, rows: list, calib: torch.Tensor, ev: torch.Tensor) -> None:
    write_result(path, "gptq and awq", rows,
                 calibration=f"../shared/data/calib.txt, {calib.shape[0]} windows of {calib.shape[1]}",
                 evaluation=f"../shared/data/eval.txt, {ev.shape[0]} windows of {ev.shape[1]}")


if __name__ == "__main__":
    main()
