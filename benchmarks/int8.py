"""W8A8 beside the float model and the int8 peers, one run: the default model calibrated on
../shared/data/calib.txt (--calib-windows windows of 512), perplexity on ../shared/data/eval.txt
(--eval-windows windows of 512) for each W8A8 variant (static per tensor with each calibrator,
SmoothQuant at 0.5 and searched, dynamic per token) and for torchao's
Int8DynamicActivationInt8WeightConfig where torchao is installed (`pip install --no-deps torchao`); then speed: prefill of 512
tokens (batch 1) for fp32, W8A8 static and dynamic, and llama.cpp's Q8_0 prompt processing of the
same 512 tokens (llama-cpp-python; LLAMA_CPP_LIB_PATH may name an AMX-free build, see README),
and greedy decode tokens/s of W8A8 against weight-only int8 (modelpress' rtn int8 row).

    .venv/bin/python benchmarks/int8.py --out benchmarks/results/int8.json
Nothing here asserts a timing; each speed is the median of --repeats runs after a warm-up."""
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
from benchmarks.common import median_seconds, scratch  # noqa: E402
from modelpress import RTNConfig, W8A8Config  # noqa: E402
from modelpress.data import calibration_windows, read_text  # noqa: E402
from modelpress.eval.perplexity import perplexity  # noqa: E402
from modelpress.eval.speed import decode_tokens_per_s  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
VARIANTS = {
    "w8a8 static max": W8A8Config(),
    "w8a8 static entropy": W8A8Config(calibrator="entropy"),
    "w8a8 static percentile 99.99": W8A8Config(calibrator="percentile"),
    "w8a8 static mse": W8A8Config(calibrator="mse"),
    "w8a8-sq static 0.5": W8A8Config(smoothquant=0.5),
    "w8a8-sq static search": W8A8Config(smoothquant="search"),
    "w8a8-dyn per token": W8A8Config(activations="dynamic"),
    "w8a8-dyn-sq per token 0.5": W8A8Config(activations="dynamic", smoothquant=0.5),
    "w8a8-dyn-sq per token search": W8A8Config(activations="dynamic", smoothquant="search"),
}


def prefill_s(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """One forward over the prompt with the next token's logits only, as an engine's prefill (and
    llama.cpp's prompt processing) computes them."""
    with torch.no_grad():
        return median_seconds(lambda: model(ids, logits_to_keep=1), repeats)


def torchao_row(base: torch.nn.Module, ppl) -> dict:  # noqa: ANN001
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            quantize_,
        )
    except ImportError as e:
        return {"method": "torchao int8 dynamic activations", "error": f"torchao is not installed ({e})"}
    m = copy.deepcopy(base)  # the decoder blocks' linear layers, as W8A8 (the head stays float)
    quantize_(m, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and not fqn.endswith("lm_head"))
    return {"method": "torchao int8 dynamic activations", "tool": "torchao", "ppl": ppl(m)}


def llama_cpp_prefill_s(base: torch.nn.Module, tok, ids: torch.Tensor, repeats: int) -> dict:  # noqa: ANN001
    try:
        from llama_cpp import Llama
    except ImportError as e:
        return {"error": f"llama-cpp-python is not installed ({e})"}
    path = scratch("mp-int8-") / "q8_0.gguf"
    modelpress.export_gguf(base, tok, path, mix="Q8_0")
    llm = Llama(str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2, verbose=False)
    tokens = ids[0].tolist()

    def run() -> None:
        llm.reset()
        llm.eval(tokens)

    return {"prefill_s": median_seconds(run, repeats), "lib": os.environ.get("LLAMA_CPP_LIB_PATH", "the wheel's")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--out", default="benchmarks/results/int8.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base, tok = modelpress.load()
    calib = calibration_windows(tok, DATA / "calib.txt", 512, a.calib_windows)
    text = read_text(DATA / "eval.txt")

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, text, 512, max_windows=a.eval_windows, progress=False).ppl

    rows = [{"method": "fp32", "ppl": ppl(base)}]
    models = {}
    for name, config in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        q = modelpress.quantize(copy.deepcopy(base), config, calib)
        row = {"method": name, "config": config.to_dict(), "quantize_s": time.perf_counter() - t0, "ppl": ppl(q)}
        row["ppl_vs_fp32_pct"] = 100 * (row["ppl"] / rows[0]["ppl"] - 1)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "config"}, flush=True)
        models[name] = q
    rows.append(torchao_row(base, ppl))
    print(rows[-1], flush=True)

    ids = calib[0][None, :512]
    speed = {"prefill_512_s": {"fp32": prefill_s(base, ids, a.repeats)}}
    for name in ("w8a8-sq static search", "w8a8-dyn per token"):
        if name in models:
            speed["prefill_512_s"][name] = prefill_s(models[name], ids, a.repeats)
    speed["llama.cpp Q8_0"] = llama_cpp_prefill_s(base, tok, ids, a.repeats)
    int8 = modelpress.quantize(copy.deepcopy(base), RTNConfig(bits=8, group_size=None, symmetric=True))
    speed["decode_tokens_per_s"] = {"rtn int8 (weight-only)": decode_tokens_per_s(int8, tok, progress=False)}
    for name in ("w8a8-sq static search", "w8a8-dyn per token"):
        if name in models:
            speed["decode_tokens_per_s"][name] = decode_tokens_per_s(models[name], tok, progress=False)
    print(speed, flush=True)
    from benchmarks.common import write_result

    write_result(Path(a.out), "int8", rows, speed=speed, calib_windows=a.calib_windows, eval_windows=a.eval_windows,
                 data="../shared/data/calib.txt -> eval.txt", peers_not_run="ONNX Runtime quantize_static on this model and "
                 "Intel Neural Compressor's SmoothQuant: not yet (issue 23; the CNN beside ONNX Runtime: int8_cnn.py)")


if __name__ == "__main__":
    main()
