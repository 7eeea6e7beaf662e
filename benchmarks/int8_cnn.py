"""W8A8 on a small CNN beside ONNX Runtime's int8, one run: the CNN of tests/methods/test_w8a8_cnn.py
(two Conv-BN-ReLU, a max pool, a linear layer) trained on scikit-learn's bundled digits (1400 train /
397 test images, 8 x 8), then int8 by modelpress (W8A8Config with each calibrator, dynamic per
token) and by ONNX Runtime's quantize_static on the float model's ONNX file (QDQ, per-channel int8
weights, int8 activations; MinMax, Entropy, Percentile calibrators) over the same 512 training
images: test accuracy, and latency of a batch of 1 and of 64 images (median of --repeats), both on
--threads threads.

    .venv/bin/python benchmarks/int8_cnn.py --out benchmarks/results/int8_cnn.json
Needs onnx, onnxruntime, scikit-learn (the test extra). Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modelpress  # noqa: E402
from benchmarks.common import median_seconds, scratch, write_result  # noqa: E402
from modelpress import W8A8Config  # noqa: E402
from modelpress.formats.onnx_export import export_onnx  # noqa: E402
from tests.digits_cnn import trained_cnn  # noqa: E402


def _row(name: str, predict, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:  # noqa: ANN001
    acc = 100.0 * float((torch.as_tensor(predict(x)).argmax(-1) == y).float().mean())
    row = {"method": name, "accuracy": acc, "batch1_ms": 1000 * median_seconds(lambda: predict(x[:1]), repeats),
           "batch64_ms": 1000 * median_seconds(lambda: predict(x[:64]), repeats)}
    print(row, flush=True)
    return row


def _torch_predict(model: torch.nn.Module):  # noqa: ANN202
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)
    return predict


def _ort_predict(path: Path, threads: int):  # noqa: ANN202
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/int8_cnn.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model, train, x, y = trained_cnn()
    calib = list(train[:512].split(64))
    rows = [_row("fp32 (torch)", _torch_predict(model), x, y, a.repeats)]
    for name, config in (("modelpress int8 static max", W8A8Config()),
                         ("modelpress int8 static percentile", W8A8Config(calibrator="percentile")),
                         ("modelpress int8 static entropy", W8A8Config(calibrator="entropy")),
                         ("modelpress int8 static mse", W8A8Config(calibrator="mse")),
                         ("modelpress int8 dynamic", W8A8Config(activations="dynamic"))):
        q = modelpress.quantize(copy.deepcopy(model), config, calib)
        rows.append(_row(name, _torch_predict(q), x, y, a.repeats))

    work = scratch("mp-cnn-")
    fp32_onnx = export_onnx(model, x[:1], work / "fp32.onnx")
    rows.append(_row("fp32 (ONNX Runtime)", _ort_predict(fp32_onnx, a.threads), x, y, a.repeats))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": b.numpy()} for b in calib])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile):
        out = work / f"int8_{method.name}.onnx"
        quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method)
        rows.append(_row(f"ONNX Runtime quantize_static {method.name}", _ort_predict(out, a.threads), x, y, a.repeats))

    write_result(Path(a.out), "int8 cnn", rows, data="scikit-learn digits, 1400 train / 397 test, 8 x 8",
                 calibration="512 training images", np_version=np.__version__)


if __name__ == "__main__":
    main()
