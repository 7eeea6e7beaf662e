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
    # x quantized and dequantized, W stored as int8 and dequantized, for each of 3 layers
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    assert "Relu" in ops and "BatchNormalization" not in ops  # fused into the convs
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    consts.update({t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer})
    codes = sorted((consts[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear"
                    and consts.get(n.input[0]) is not None and consts[n.input[0]].ndim > 1), key=lambda c: c.size)
    ours_codes = sorted((m.weight.numpy() for m in q.modules() if isinstance(m, modelpress.nn.W8A8Linear)),
                        key=lambda c: c.size)
    assert [c.dtype for c in codes] == [np.int8] * 3  # our layers' own codes
    assert all(np.array_equal(c.reshape(len(c), -1), o) for c, o in zip(codes, ours_codes))
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


@pytest.fixture
def tiny_w8a8():
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    calib = [torch.randint(0, 250, (64,)) for _ in range(4)]
    return model, modelpress.quantize(copy.deepcopy(model), W8A8Config(smoothquant=0.5), calib)


def test_a_decoder_exports_its_prefill_graph_and_onnx_runtime_gives_our_logits(tiny_w8a8, tmp_path):
    model, q = tiny_w8a8
    ids = torch.randint(0, 250, (2, 37))
    for m, name in ((model, "fp32.onnx"), (q, "w8a8.onnx")):
        path = export_onnx(m, None, tmp_path / name)
        ops = [n.op_type for n in onnx.load(path).graph.node]
        # static W8A8: one activation quantizer per distinct layer input (q/k/v and gate/up share theirs)
        assert ops.count("QuantizeLinear") == (0 if m is model else 4 * 2) and \
            ops.count("DequantizeLinear") == (0 if m is model else 11 * 2)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        theirs = session.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            ours = m(ids).logits.numpy()
        assert theirs.shape == ours.shape
        # float: the same operations summed in another order; W8A8: the same integers, but a value at a
        # rounding midpoint of a layer's input may move by one step (observed: 7e-7 of the logits' range)
        assert np.abs(theirs - ours).max() <= (1e-4 if m is model else 2e-2) * np.abs(ours).max()
        assert np.mean(theirs.argmax(-1) == ours.argmax(-1)) >= 0.99


def test_what_the_prefill_export_refuses(tiny_w8a8, tmp_path):
    model, _ = tiny_w8a8
    dyn = modelpress.quantize(copy.deepcopy(model), W8A8Config(activations="dynamic"), None)
    with pytest.raises(modelpress.ModelpressError, match="static activation scales"):
        export_onnx(dyn, None, tmp_path / "d.onnx")
    rtn = modelpress.quantize(copy.deepcopy(model), modelpress.RTNConfig(bits=4, group_size=32))
    with pytest.raises(modelpress.ModelpressError, match="float and static W8A8 layers"):
        export_onnx(rtn, None, tmp_path / "r.onnx")
    other = copy.deepcopy(model)
    other.config.model_type = "gemma2"
    with pytest.raises(modelpress.ModelpressError, match="model types llama"):
        export_onnx(other, None, tmp_path / "g.onnx")
    assert not list(tmp_path.iterdir())


def test_cli_exports_a_w8a8_checkpoint_as_onnx(tmp_path, capsys):
    from modelpress.cli import main
    from tests.conftest import byte_tokenizer, tiny_llama
    from tests.model.test_load import write_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, tiny_llama(), byte_tokenizer())
    (tmp_path / "calib.txt").write_text("the thing in the winter " * 200)
    assert main(["quantize", str(gguf), "--method", "w8a8", "--calib", str(tmp_path / "calib.txt"), "--samples", "4",
                 "--ctx", "64", "--out", str(tmp_path / "q")]) == 0
    assert main(["export", str(tmp_path / "q"), "--format", "onnx", "--max-len", "128",
                 "--out", str(tmp_path / "q.onnx")]) == 0
    assert "prefill graph" in capsys.readouterr()[1]
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 250, (1, 20))
    theirs = session.run(None, {"input_ids": ids.numpy()})[0]
    q, _ = modelpress.load(str(tmp_path / "q"))
    with torch.no_grad():
        ours = q(ids).logits.numpy()
    assert np.abs(theirs - ours).max() <= 2e-2 * np.abs(ours).max()
    assert main(["export", str(tmp_path / "q"), "--format", "onnx", "--type", "Q4_0", "--out",
                 str(tmp_path / "x.onnx")]) == 2
    assert "--type" in capsys.readouterr()[1] and not (tmp_path / "x.onnx").exists()
