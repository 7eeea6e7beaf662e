"""The default model's W8A8 beside ONNX Runtime's static quantization, one run: our prefill graph of
the fp32 model (`modelpress export --format onnx`) quantized by onnxruntime.quantization's
quantize_static (QDQ, int8 weights per channel, int8 activations per tensor; calibrators MinMax,
Entropy, Percentile; its SmoothQuant option, which runs Intel Neural Compressor's ORTSmoothQuant,
where neural-compressor 2.x imports) on the same calibration windows of ../shared/data/calib.txt,
perplexity on ../shared/data/eval.txt (the same windows as benchmarks/int8.py), and prefill time of
512 tokens in ONNX Runtime; and modelpress' w8a8-sq (static, SmoothQuant searched) exported as
Q/DQ and run by ONNX Runtime, its perplexity beside ours.

Only the decoder blocks' linear products are quantized on both sides (ONNX Runtime's
nodes_to_quantize: the MatMuls of the *_proj weights; attention's products and the head stay
float, as in modelpress' W8A8). ONNX Runtime keeps its defaults otherwise (asymmetric activations,
symmetric weights).

    PYTHONPATH=<neural-compressor 2.x, --no-deps target> .venv/bin/python benchmarks/int8_onnx.py
Nothing here asserts a timing; each prefill is the median of --repeats runs after a warm-up."""
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
from benchmarks.common import median_seconds, scratch, write_result  # noqa: E402
from modelpress import W8A8Config  # noqa: E402
from modelpress.data import calibration_windows, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.formats.onnx_export import export_prefill_onnx  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


class OrtLM(torch.nn.Module):
    """An ONNX Runtime session of a prefill graph, called as a causal LM (`.logits`) so that the
    perplexity protocol is modelpress' own."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # perplexity reads the device here

    def forward(self, input_ids: torch.Tensor, **_: object):  # noqa: ANN201
        logits = self.session.run(None, {"input_ids": input_ids.numpy()})[0]
        return type("Out", (), {"logits": torch.from_numpy(logits)})()


class Reader:
    """quantize_static's CalibrationDataReader over our windows, with set_range (strided collection:
    ONNX Runtime's histogram calibrators otherwise keep every window's activations at once)."""

    def __init__(self, wins: list[torch.Tensor]) -> None:
        self.wins, self.start, self.end, self.i = wins, 0, len(wins), 0

    def __len__(self) -> int:
        return len(self.wins)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.i = start_index, end_index, start_index

    def get_next(self) -> dict | None:
        if self.i >= self.end:
            return None
        self.i += 1
        return {"input_ids": self.wins[self.i - 1][None].numpy()}

    def rewind(self) -> None:
        self.i = self.start

    def __iter__(self):  # noqa: ANN204  (neural-compressor's SmoothQuant iterates the reader)
        for w in self.wins[self.start:self.end]:
            yield {"input_ids": w[None].numpy()}


def linear_matmuls(path: Path) -> list[str]:
    """The MatMul nodes whose second input is a *_proj weight (the decoder blocks' linear layers)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "_proj" in n.name]


def ort_quantize(fp32: Path, out: Path, calib: list[torch.Tensor], method: str, smoothquant: bool) -> float:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    extra = {"CalibStridedMinMax": 2}
    if smoothquant:
        extra.update({"SmoothQuant": True, "SmoothQuantAlpha": 0.5})
    t0 = time.perf_counter()
    quantize_static(str(fp32), str(out), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=linear_matmuls(fp32), extra_options=extra)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/int8_onnx.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base, tok = modelpress.load()
    calib = calibration_windows(tok, DATA / "calib.txt", 512, a.calib_windows)
    wins = windows(tokenize(tok, read_text(DATA / "eval.txt")), 512, a.eval_windows)
    ids = calib[0][None, :512]
    tmp = scratch("int8_onnx-")
    fp32 = export_prefill_onnx(base, tmp / "fp32.onnx", max_len=512)

    def measure(m: torch.nn.Module) -> dict:
        with torch.no_grad():
            return {"ppl": perplexity_of_windows(m, wins, batch_size=1, progress=False).ppl,
                    "prefill_512_s": median_seconds(lambda: m(ids), a.repeats)}

    rows = [{"method": "fp32 (modelpress, torch)", **measure(base)},
            {"method": "fp32 ONNX (our export, ONNX Runtime)", **measure(OrtLM(fp32, a.threads))}]
    print(rows, flush=True)
    try:
        import neural_compressor  # noqa: F401
        have_inc = True
    except ImportError:
        have_inc = False
    runs = [(m, False) for m in ("MinMax", "Entropy", "Percentile")] + [("MinMax", True)]
    for method, sq in runs:
        name = f"onnxruntime quantize_static {method}" + (" + SmoothQuant 0.5 (neural-compressor)" if sq else "")
        if sq and not have_inc:
            rows.append({"method": name, "skipped": "neural-compressor 2.x is not importable (its ORTSmoothQuant)"})
            continue
        out = tmp / f"ort-{method}-{sq}.onnx"
        row = {"method": name, "quantize_s": ort_quantize(fp32, out, calib, method, sq)}
        rows.append({**row, **measure(OrtLM(out, a.threads))})
        print(rows[-1], flush=True)
        out.unlink()
    t0 = time.perf_counter()
    ours = modelpress.quantize(copy.deepcopy(base), W8A8Config(smoothquant="search"), calib)
    row = {"method": "modelpress w8a8-sq (static, searched)", "quantize_s": time.perf_counter() - t0, **measure(ours)}
    rows.append(row)
    ours_onnx = export_prefill_onnx(ours, tmp / "ours.onnx", max_len=512)
    rows.append({"method": "modelpress w8a8-sq exported, run by ONNX Runtime", **measure(OrtLM(ours_onnx, a.threads))})
    for r in rows:
        if "ppl" in r:
            r["ppl_vs_fp32_pct"] = 100 * (r["ppl"] / rows[0]["ppl"] - 1)
    print(rows[-2:], flush=True)
    import onnxruntime

    write_result(Path(a.out), "int8_onnx", rows, calib_windows=a.calib_windows, eval_windows=a.eval_windows,
                 onnxruntime=onnxruntime.__version__, neural_compressor=getattr(
                     sys.modules.get("neural_compressor"), "__version__", None),
                 data="../shared/data/calib.txt -> eval.txt", ort_config="QDQ, per-channel int8 weights, int8 "
                 "activations (asymmetric, ONNX Runtime's default), *_proj MatMuls only, strided calibration by 2")


if __name__ == "__main__":
    main()
