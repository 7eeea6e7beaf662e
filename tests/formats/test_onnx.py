"""ONNX Q/DQ export (formats/onnx_export.py) of the W8A8 digits CNN (tests/methods/test_w8a8_cnn.py):
QuantizeLinear / DequantizeLinear around every quantized layer with our scales, and ONNX Runtime's
predictions equal ours."""
import copy

import numpy as np
import pytest
import torch

import modelpress
from modelpress import W8A8Config
from modelpress.formats.onnx_export import export_onnx
from tests.methods.test_w8a8_cnn import digits  # noqa: F401  (the trained CNN fixture)

onnx = pytest.importorskip("onnx", reason="onnx is not installed: the Q/DQ export is not checked")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the exported file is not run")


def test_onnx_runtime_runs_our_qdq_file_with_our_predictions(digits, tmp_path):  # noqa: F811
    model, train, x, _ = digits
    q = modelpress.quantize(copy.deepcopy(model), W8A8Config(calibrator="entropy"), list(train[:512].split(64)))
    path = export_onnx(q, x[:2], tmp_path / "cnn.onnx")
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 6 and ops.count("DequantizeLinear") == 6  # x and W of 3 layers
    assert "Relu" in ops and "BatchNormalization" not in ops  # fused into the convs
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    consts.update({t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer})
    x_scales = [float(consts[n.input[1]]) for n in graph.node if n.op_type == "QuantizeLinear" and consts[n.input[1]].ndim == 0]
    ours_scales = [float(q[i].input_scale if i == 8 else q[i].linear.input_scale) for i in (0, 3, 8)]
    assert sorted(x_scales) == pytest.approx(sorted(ours_scales), rel=1e-7)  # our activation scales, as stored
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ours = q(x).numpy()
    # the same integers; float sums in another order can move a value at a rounding midpoint of the next
    # layer's input by one step: observed 397 of 397 predictions equal, logits within 2.1e-3 of their range
    assert np.mean(theirs.argmax(-1) == ours.argmax(-1)) >= 0.99
    assert np.abs(theirs - ours).max() <= 2e-2 * np.abs(ours).max()


def test_what_onnx_export_refuses(digits, tmp_path):  # noqa: F811
    model, train, x, _ = digits
    q = modelpress.quantize(copy.deepcopy(model), W8A8Config(activations="dynamic"), None)
    with pytest.raises(modelpress.ModelpressError, match="static activation scales"):
        export_onnx(q, x[:2], tmp_path / "d.onnx")
    assert not list(tmp_path.iterdir())
